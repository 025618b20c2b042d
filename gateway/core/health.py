"""An upstream's health, as plain values: what each answer does to it, and whether it may be sent
a request now. Pure; the caller passes the time (seconds) and keeps the values.

    healthy ──max_fails failures──> cooling(cooldown_s, doubling up to 10 min) ──probe ok──> healthy
       │   ──429/503 Retry-After──> cooling(that long)        └──probe fails──> cooling(doubled)
       │   ──402──> disabled(quota_retry_s, then probed)
       └── ──401──> disabled(until a reload)

While an upstream is cooling or disabled, only its probe (the one request sent once its time is
up) changes its state: answers to requests sent before it cooled are stale and only noted as
its ``last_error``. A reload re-enables a disabled upstream (its key or balance may be fixed).
Each instance learns on its own: nothing here is shared across a fleet.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

State = Literal["healthy", "cooling", "disabled"]
Kind = Literal["ok", "failure", "rate_limited", "quota", "auth"]

MAX_COOLDOWN_S = 600.0
MAX_RETRY_AFTER_S = 86_400.0  # a Retry-After beyond a day is a broken header, not a plan


@dataclass(frozen=True, slots=True)
class Policy:
    cooldown_s: float = 30.0
    max_fails: int = 3
    quota_retry_s: float = 3600.0


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one request's answer says about the upstream (not about the request)."""

    kind: Kind
    error: str | None = None  # for ``last_error``: a short description, never the upstream's text
    retry_after: float | None = None  # rate_limited only


OK = Verdict("ok")


@dataclass(frozen=True, slots=True)
class Health:
    state: State = "healthy"
    until: float | None = None  # when a cooldown or a 402 ends; None while healthy or for a 401
    fails: int = 0  # consecutive failures while healthy
    cooldowns: int = 0  # cooldowns in a row without a success: the next one lasts twice as long
    probing: bool = False  # a request is testing it
    last_error: str | None = None


def available(health: Health, now: float) -> bool:
    """Whether a request may be sent to it now: healthy, or its time is up and nobody probes it."""
    if health.state == "healthy":
        return True
    return health.until is not None and now >= health.until and not health.probing


def take(health: Health, now: float) -> tuple[Health, bool]:
    """A request is about to be sent: the new value, and whether that request is the probe."""
    if health.state == "healthy":
        return health, False
    if not available(health, now):
        raise ValueError("not available")
    return replace(health, probing=True), True


def abandoned(health: Health) -> Health:
    """The probe ended without a verdict (cancelled): the next request probes instead."""
    return replace(health, probing=False)


def observe(health: Health, verdict: Verdict, now: float, policy: Policy, *, probe: bool) -> Health:
    """The health after ``verdict`` on a request sent while it was healthy, or as its probe."""
    if health.state != "healthy" and not probe:  # stale: sent before it cooled
        return health if verdict.error is None else replace(health, last_error=verdict.error)
    last_error = verdict.error or health.last_error
    if verdict.kind == "ok":
        return Health(last_error=health.last_error)
    if verdict.kind == "auth":
        return Health("disabled", None, last_error=last_error)
    if verdict.kind == "quota":
        return Health("disabled", now + policy.quota_retry_s, last_error=last_error)
    if verdict.kind == "rate_limited" and verdict.retry_after is not None:
        wait = min(max(verdict.retry_after, 0.0), MAX_RETRY_AFTER_S)
        return Health("cooling", now + wait, cooldowns=health.cooldowns, last_error=last_error)
    fails = health.fails + 1
    if health.state == "healthy" and fails < policy.max_fails:
        return Health(fails=fails, cooldowns=health.cooldowns, last_error=last_error)
    wait = min(policy.cooldown_s * 2**health.cooldowns, MAX_COOLDOWN_S)
    return Health("cooling", now + wait, cooldowns=health.cooldowns + 1, last_error=last_error)


def reloaded(health: Health) -> Health:
    """After a reload: a disabled upstream is tried again (its key or balance may be fixed)."""
    return Health(last_error=health.last_error) if health.state == "disabled" else health


def retry_after(healths: list[Health], now: float, fallback: float) -> float:
    """Seconds until the first of these may be tried again (``fallback`` if none has a time)."""
    times = [h.until - now for h in healths if h.until is not None]
    return max(1.0, min(times)) if times else fallback
