"""The money rules: every way a hold is settled or an uncertain settlement resolved, on one screen.

Pure: holds and answers in, immutable settlements out. Sync requests, async tasks, the background
settler, start-up recovery and admins all settle through these functions, and the schema refuses
what they would never produce (a settlement above its hold other than an explicit overrun, a
resolution of anything but an uncertain settlement, a second settlement or resolution).

    upstream reply with images      capture(images x the serving upstream's price, at most the hold)
    task completed                  capture(the cost it reports; above the hold = overrun)
    upstream said no / never sent   release
    outcome unknown                 uncertain(the whole hold): counted, never silently refunded
    uncertain, truth known later    resolution captured | released (admin, or the gateway)
    held, stuck past the max age    expiry by an admin: uncertain(the whole hold)
    closed, then found served       correction: what was delivered minus what is charged

An outcome the gateway learns once its entry is no longer held (a reaper or recovery made it
uncertain, an admin resolved it, a timeout released it) is never dropped: ``late_outcome``
decides, from the entry as the ledger has it now, between resolving it, correcting it and
ignoring the news (loudly when it contradicts the charge). The engines only apply the decision.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

from gateway.core.ledger import (
    GATEWAY_ACTOR,
    Capture,
    Correction,
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


def capture_reply(
    hold: Hold,
    images: int,
    upstream_id: str | None,
    result: str,
    *,
    upstream: str | None = None,
    price: int | None = None,
) -> Capture:
    """A sync answer: the images returned at the price of the upstream that served them
    (``price``; the hold's if not given), never more images or a higher price than were held."""
    served = max(0, min(images, hold.n))
    unit = hold.unit_price if price is None else min(price, hold.unit_price)
    return Capture(
        images=served,
        amount=served * unit,
        upstream_id=upstream_id,
        reason=None if served == hold.n else f"{served} of {hold.n} images returned",
        result=result,
        upstream=upstream,
        unit_price=unit,
    )


def release(
    reason: str,
    *,
    upstream_id: str | None = None,
    result: str | None = None,
    upstream: str | None = None,
) -> Release:
    return Release(
        reason=reason[:REASON_LIMIT], upstream_id=upstream_id, result=result, upstream=upstream
    )


def uncertain(
    hold: Hold,
    reason: str,
    *,
    upstream_id: str | None = None,
    upstream: str | None = None,
    price: int | None = None,
) -> Uncertain:
    """The whole hold stays counted; ``upstream`` and its ``price`` are kept for the resolution."""
    return Uncertain(
        amount=hold.amount,
        reason=reason[:REASON_LIMIT],
        upstream_id=upstream_id,
        upstream=upstream,
        unit_price=None if price is None else min(price, hold.unit_price),
    )


def interrupted(
    hold: Hold, *, sent: bool, upstream: str | None = None, price: int | None = None
) -> Release | Uncertain:
    """Cancelled (a drain past its time) or broken by a bug: only a request that provably never
    reached the upstream is released."""
    if not sent:
        return release("cancelled before the request was sent", upstream=upstream)
    return uncertain(hold, "interrupted after the request was sent", upstream=upstream, price=price)


def recovered(hold_amount: int) -> Uncertain:
    """Left held by a process that stopped: it may have been generated."""
    return Uncertain(
        amount=hold_amount, reason="the gateway stopped while the request was in flight"
    )


def expired(hold_amount: int) -> Uncertain:
    return Uncertain(amount=hold_amount, reason="task still pending after the maximum age")


def task_settlement(
    hold_amount: int,
    n: int,
    task_id: str,
    answer: Mapping[str, Any],
    result: str,
    *,
    upstream: str | None = None,
    price: int | None = None,
) -> tuple[Capture | Release, str | None]:
    """A task's terminal answer as a settlement, and a warning to log (or None).

    The ledger must equal what the upstream billed, so a reported cost above the hold is kept
    as an explicit overrun. An unreadable cost (missing, negative, not finite, absurd) is
    charged at the price table instead, loudly: ``n`` x ``price`` (the task's upstream's), or
    the hold when that price is not known.
    """
    if answer.get("status") != "completed":
        failed = release(
            "upstream task failed", upstream_id=task_id, result=result, upstream=upstream
        )
        return failed, None
    listed = [v for v in (answer.get("data"), answer.get("result_urls")) if isinstance(v, list)]
    images = min(len(listed[0]), n) if listed else n  # the schema holds images <= n
    table = hold_amount if price is None else min(n * price, hold_amount)
    cost, warning = _reported_cost(answer.get("cost"), table)
    amount, overrun = min(cost, hold_amount), max(0, cost - hold_amount)
    if overrun:
        warning = (
            f"the upstream billed {_cny(cost)} for a task held at {_cny(hold_amount)}: "
            f"overrun of {_cny(overrun)} recorded (is the price table out of date?)"
        )
    capture = Capture(
        images=images, amount=amount, overrun=overrun, upstream_id=task_id, result=result,
        upstream=upstream, unit_price=price,
    )  # fmt: skip
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
    amount = count * entry.price
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


@dataclass(frozen=True, slots=True)
class Resolve:
    """The entry is uncertain and unresolved: the outcome resolves it."""

    resolution: Resolution


@dataclass(frozen=True, slots=True)
class Correct:
    """The entry was closed without what the upstream delivered: append the difference."""

    correction: Correction


@dataclass(frozen=True, slots=True)
class Ignore:
    """Nothing to record. ``contradicts``: the outcome says less was delivered than the entry
    charges (never refunded on that word alone: an admin checks with the provider)."""

    why: str
    contradicts: bool = False


LateDecision = Resolve | Correct | Ignore


def late_outcome(entry: LedgerEntry, learned: Settlement) -> LateDecision:
    """What an outcome learned after the entry stopped being held does to it.

    ``learned`` is the settlement the outcome would have made of a held entry: a capture says
    what was delivered and billed (amount plus overrun), a release that nothing was, an
    uncertain settlement that nothing is known.

        entry now                          learned: capture        release         unknown
        held                               ignore (settled, not late)
        uncertain, unresolved              resolve captured        resolve released  ignore
        closed: captured, released,        correct the excess      ignore (and warn  ignore
          or resolved (+ corrections)        (else ignore)           if charged)
    """
    if entry.settled_state == "held":
        return Ignore(f"{entry.request_id} is still held: it is settled, not corrected")
    if isinstance(learned, Uncertain):
        return Ignore(f"the outcome of {entry.request_id} is still unknown")
    source = _source(entry)
    if entry.settled_state == "uncertain" and entry.resolution is None:
        return Resolve(_late_resolution(entry, learned, source))
    images = learned.images - entry.charged_images
    amount = learned.charged - entry.charged
    if images <= 0 and amount <= 0:
        contradicts = learned.charged < entry.charged
        return Ignore(
            f"{source} of {entry.request_id} delivered {learned.images} image(s) "
            f"({_cny(learned.charged)}); the entry charges {entry.charged_images} "
            f"({_cny(entry.charged)})" + (": nothing refunded" if contradicts else ""),
            contradicts=contradicts,
        )
    reason = (
        f"{source} delivered {learned.images} image(s) for {_cny(learned.charged)} after the "
        f"entry was {_closed_as(entry)}"
    )
    return Correct(
        Correction(
            max(images, 0), max(amount, 0), reason, learned.upstream_id, upstream=learned.upstream
        )
    )


def late_landed(entry: LedgerEntry, now: float) -> Resolve | Correct | None:
    """What an earlier try of a late outcome stored at ``now``, if it did: how a retry whose
    first try lost its acknowledgement still reports the money it moved."""
    r = entry.resolution
    if r is not None and r.actor == GATEWAY_ACTOR and r.resolved_at == now:
        resolution = Resolution(r.state, r.images, r.amount, r.reason, GATEWAY_ACTOR, r.overrun)
        return Resolve(resolution)
    for c in entry.corrections:
        if c.at == now:
            return Correct(Correction(c.images, c.amount, c.reason))
    return None


def _late_resolution(entry: LedgerEntry, learned: Capture | Release, source: str) -> Resolution:
    if isinstance(learned, Release):
        reason = f"resolved automatically: {source} generated nothing ({learned.reason})"
        return Resolution(
            "released", 0, 0, reason[:REASON_LIMIT], GATEWAY_ACTOR,
            upstream_id=learned.upstream_id, upstream=learned.upstream,
        )  # fmt: skip
    billed = learned.charged
    amount = min(billed, entry.settled_amount)
    reason = f"resolved automatically: {source} completed after the hold went uncertain"
    return Resolution(
        "captured",
        min(learned.images, entry.n),
        amount,
        reason,
        GATEWAY_ACTOR,
        overrun=billed - amount,
        upstream_id=learned.upstream_id,
        upstream=learned.upstream,
    )


def _source(entry: LedgerEntry) -> str:
    return "the upstream task" if entry.task_id is not None else "the upstream request"


def _closed_as(entry: LedgerEntry) -> str:
    if entry.resolution is not None:
        actor = entry.resolution.actor
        by = "the gateway" if actor == GATEWAY_ACTOR else actor
        return f"resolved {entry.resolution.state} by {by}"
    return entry.settled_state


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


def _reported_cost(value: object, table: int) -> tuple[int, str | None]:
    units = _units(value)
    if units is None:
        return table, (
            f"the upstream reported an unreadable task cost ({_describe(value)}); "
            f"charged the price table ({_cny(table)})"
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
