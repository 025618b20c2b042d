"""The money rules: every way a hold is settled or an uncertain settlement resolved, on one screen.

Pure: holds and answers in, immutable settlements out. Sync requests, async tasks, the background
settler, start-up recovery and admins all settle through these functions, and the schema refuses
what they would never produce (a settlement above its hold other than an explicit overrun, a
resolution of anything but an uncertain settlement, a second settlement or resolution).

    upstream reply with images      capture(images x unit price, at most the hold)
    task completed                  capture(the cost it reports; above the hold = overrun)
    upstream said no / never sent   release
    outcome unknown                 uncertain(the whole hold): counted, never silently refunded
    uncertain, truth known later    resolution captured | released (admin, or the gateway)
    held, stuck past the max age    expiry by an admin: uncertain(the whole hold)
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

from gateway.core.ledger import (
    GATEWAY_ACTOR,
    Capture,
    Hold,
    LedgerEntry,
    Release,
    Resolution,
    ResolvedState,
    Settlement,
    Uncertain,
    actor_problem,
)
from gateway.core.money import UNITS_PER_CNY

MAX_TASK_COST_CNY = 10_000  # no task is billed this much; a larger figure is garbage, not a bill
REASON_LIMIT = 500
REASON_TEXT = "the reason must be one line of printable text"


class ResolutionRefused(ValueError):
    """This entry cannot be resolved that way; the message says why."""


class NotResolvable(ResolutionRefused):
    """The entry is not uncertain, or was resolved already: nothing to resolve (409)."""


class ExpiryRefused(ValueError):
    """This held entry cannot be expired (not held, or still young); the message says why."""


def capture_reply(hold: Hold, images: int, upstream_id: str | None, result: str) -> Capture:
    """A sync answer: charge the images returned, never more than were held."""
    served = max(0, min(images, hold.n))
    return Capture(
        images=served,
        amount=served * hold.unit_price,
        upstream_id=upstream_id,
        reason=None if served == hold.n else f"{served} of {hold.n} images returned",
        result=result,
    )


def release(reason: str, *, upstream_id: str | None = None, result: str | None = None) -> Release:
    return Release(reason=reason[:REASON_LIMIT], upstream_id=upstream_id, result=result)


def uncertain(hold: Hold, reason: str, *, upstream_id: str | None = None) -> Uncertain:
    return Uncertain(amount=hold.amount, reason=reason[:REASON_LIMIT], upstream_id=upstream_id)


def interrupted(hold: Hold, *, sent: bool) -> Release | Uncertain:
    """Cancelled (a drain past its time) or broken by a bug: only a request that provably never
    reached the upstream is released."""
    if not sent:
        return release("cancelled before the request was sent")
    return uncertain(hold, "interrupted after the request was sent")


def recovered(hold_amount: int) -> Uncertain:
    """Left held by a process that stopped: it may have been generated."""
    return Uncertain(
        amount=hold_amount, reason="the gateway stopped while the request was in flight"
    )


def expired(hold_amount: int) -> Uncertain:
    return Uncertain(amount=hold_amount, reason="task still pending after the maximum age")


def task_settlement(
    hold_amount: int, n: int, task_id: str, answer: Mapping[str, Any], result: str
) -> tuple[Capture | Release, str | None]:
    """A task's terminal answer as a settlement, and a warning to log (or None).

    The ledger must equal what the upstream billed, so a reported cost above the hold is kept
    as an explicit overrun. An unreadable cost (missing, negative, not finite, absurd) is
    charged at the price table instead, loudly.
    """
    if answer.get("status") != "completed":
        return release("upstream task failed", upstream_id=task_id, result=result), None
    listed = [v for v in (answer.get("data"), answer.get("result_urls")) if isinstance(v, list)]
    images = min(len(listed[0]), n) if listed else n  # the schema holds images <= n
    cost, warning = _reported_cost(answer.get("cost"), hold_amount)
    amount, overrun = min(cost, hold_amount), max(0, cost - hold_amount)
    if overrun:
        warning = (
            f"the upstream billed {_cny(cost)} for a task held at {_cny(hold_amount)}: "
            f"overrun of {_cny(overrun)} recorded (is the price table out of date?)"
        )
    capture = Capture(
        images=images, amount=amount, overrun=overrun, upstream_id=task_id, result=result
    )
    return capture, warning


def landed(entry: LedgerEntry, settlement: Settlement, now: float) -> bool:
    """Whether ``entry`` was settled by exactly this settlement, stored at ``now``: how a retry
    whose first try lost its acknowledgement knows the money moved (and must be reported)."""
    return (
        entry.settled_state == settlement.state
        and entry.settled_amount == settlement.amount
        and entry.reason == settlement.reason
        and entry.settled_at == now
    )


def admin_resolution(
    entry: LedgerEntry, state: ResolvedState, images: int | None, reason: str, *, actor: str
) -> Resolution:
    """An admin (``actor``) closes an uncertain entry: ``images`` x unit price captured
    (default: all held), the rest released."""
    _check_resolvable(entry)
    problem = _reason_problem(reason) or actor_problem(actor)
    if problem:
        raise ResolutionRefused(problem)
    if state == "released":
        if images not in (None, 0):
            raise ResolutionRefused("--images goes with --captured only")
        return Resolution("released", 0, 0, reason.strip()[:REASON_LIMIT], actor)
    count = entry.n if images is None else images
    if not 0 <= count <= entry.n:
        raise ResolutionRefused(f"{count} images is more than the {entry.n} held")
    amount = count * entry.unit_price
    if amount > entry.settled_amount:
        raise ResolutionRefused("that is more than the uncertain amount")
    return Resolution("captured", count, amount, reason.strip()[:REASON_LIMIT], actor)


def admin_expiry(
    entry: LedgerEntry,
    *,
    now: float,
    max_pending_age_s: float,
    instance_gone: bool,
    reason: str,
    actor: str,
) -> Uncertain:
    """An admin (``actor``) gives up on a stuck hold: one still ``held`` past ``[tasks]
    max_pending_age_s``, or whose instance is gone, becomes uncertain, whole (it may have been
    generated), to be resolved like any other. A younger hold of a live gateway may still
    settle by itself, and anything already settled has nothing to expire."""
    if entry.settled_state != "held":
        raise ExpiryRefused(
            f"{entry.request_id} is {entry.state}, not held: only held entries can be expired"
        )
    problem = _reason_problem(reason) or actor_problem(actor)
    if problem:
        raise ExpiryRefused(problem)
    age = now - entry.created_at
    if age < max_pending_age_s and not instance_gone:
        raise ExpiryRefused(
            f"{entry.request_id} has been held for {_duration(age)}, less than [tasks] "
            f"max_pending_age_s ({_duration(max_pending_age_s)}), and its gateway is alive: "
            "it may still settle by itself"
        )
    text = f"expired by {actor}: {reason.strip()}"
    return Uncertain(amount=entry.held, reason=text[:REASON_LIMIT])


def automatic_resolution(
    entry: LedgerEntry, answer: Mapping[str, Any], result: str
) -> tuple[Resolution, str | None]:
    """A task whose hold went uncertain has finished after all: resolve it to what happened."""
    _check_resolvable(entry)
    settled, warning = task_settlement(
        entry.settled_amount, entry.n, entry.task_id or "", answer, result
    )
    if isinstance(settled, Release):
        reason = "resolved automatically: the upstream task failed"
        return Resolution("released", 0, 0, reason, GATEWAY_ACTOR), warning
    reason = "resolved automatically: the upstream task completed"
    resolution = Resolution(
        "captured", settled.images, settled.amount, reason, GATEWAY_ACTOR, overrun=settled.overrun
    )
    return resolution, warning


def _check_resolvable(entry: LedgerEntry) -> None:
    if entry.resolution is not None:
        raise NotResolvable(f"{entry.request_id} was already resolved")
    if entry.settled_state != "uncertain":
        raise NotResolvable(
            f"{entry.request_id} is {entry.settled_state}, not uncertain: only uncertain "
            "entries can be resolved"
        )


def _reason_problem(reason: str) -> str | None:
    if not reason.strip():
        return "a reason is required"
    if not reason.isprintable():  # NUL, control characters, lone surrogates: not storable
        return REASON_TEXT
    return None


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _reported_cost(value: object, hold_amount: int) -> tuple[int, str | None]:
    units = _units(value)
    if units is None:
        return hold_amount, (
            f"the upstream reported an unreadable task cost ({_describe(value)}); "
            f"charged the price table ({_cny(hold_amount)})"
        )
    return units, None


def _units(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        return None
    if not amount.is_finite() or amount < 0 or amount > MAX_TASK_COST_CNY:
        return None
    return int((amount * UNITS_PER_CNY).to_integral_value(ROUND_HALF_UP))


def _describe(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _cny(units: int) -> str:
    return f"{units / UNITS_PER_CNY:.4f} CNY"
