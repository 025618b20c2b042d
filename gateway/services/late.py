"""Outcomes learned after a request's entry stopped being held: recorded, never dropped.

A sync answer whose settlement finds the hold already closed (a reaper took its instance for
dead, a start-up recovery, a shutdown past its drain), an instant task whose hold was closed
meanwhile, a task that ends after its hold went uncertain or an admin resolved it: the
settlement cannot land, so ``gateway.core.settlement.late_outcome`` decides what the outcome
does to the entry as the ledger has it now (resolve it, correct it, or nothing new) and the
store applies that atomically. Here it is carried out and reported: a resolution on the
request's own access-log line while it is open, a correction always on a ``settle`` line of
its own, with a warning naming the ledger id, team and amount.
"""

from __future__ import annotations

import logging

from gateway.core.ledger import LedgerEntry, Settlement
from gateway.core.money import format_cny
from gateway.core.settlement import Correct, Ignore, Resolve, landed, late_landed, late_outcome
from gateway.services.books import Books, LogSlot, MoneyMoved
from gateway.store.base import Closed
from gateway.store.manager import Store

log = logging.getLogger("gateway.ledger")


async def settle(db: Store, request_id: str, settlement: Settlement, now: float) -> bool | Closed:
    """Settle a hold. True: this settlement moved the money. Closed: the entry was no longer
    held, and what its late outcome did (to report). False: no such hold.

    Safe to retry with the same ``now``: a try whose commit lost its acknowledgement is
    recognized by its timestamp, and reported as if this one had landed it."""
    if await db.settle(request_id, settlement, now):
        return True
    closed = await db.settle_late(request_id, lambda entry: late_outcome(entry, settlement), now)
    if closed is None:
        return False
    if isinstance(closed.late, Ignore):
        return earlier_try(closed.entry, settlement, now) or closed
    return closed


def earlier_try(entry: LedgerEntry, settlement: Settlement, now: float) -> Closed | None:
    """What an earlier try of this very write (same ``settlement``, same ``now``) stored, if
    it did: the settlement itself, or its late outcome."""
    if landed(entry, settlement, now):
        return Closed(entry)
    late = late_landed(entry, now)
    return Closed(entry, late) if late is not None else None


def report(books: Books, closed: Closed, slot: LogSlot | None = None) -> None:
    """Count and log what closing the entry did."""
    entry, late = closed.entry, closed.late
    if late is None or isinstance(late, Resolve):
        if isinstance(late, Resolve):
            log.warning(
                "ledger id %s (team %s): its outcome came after its hold went uncertain: "
                "resolved automatically as %s, %s",
                entry.request_id,
                entry.team,
                entry.state,
                format_cny(late.resolution.charged),
            )
        books.moved(MoneyMoved.of_entry(entry), slot)
    elif isinstance(late, Correct):
        correction = late.correction
        log.warning(
            "CORRECTION: ledger id %s (team %s): %s for %d image(s) added to spent: %s",
            entry.request_id,
            entry.team,
            format_cny(correction.amount),
            correction.images,
            correction.reason,
        )
        books.moved(MoneyMoved.corrected(entry, correction))
    elif late.contradicts:
        log.warning(
            "ledger id %s (team %s): %s; compare with the provider's usage details",
            entry.request_id,
            entry.team,
            late.why,
        )
    else:
        log.info("late outcome, nothing new: %s", late.why)
