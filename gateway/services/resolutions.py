"""Closing stuck and uncertain money: an admin's resolution or expiry, and the access-log line of
each.

A resolution made inside a gateway (``POST /admin/ledger/.../resolve``, or a task that ended
after its hold went uncertain) writes its own line at once. One made by the CLI, which cannot
reach a running gateway's log, is picked up by the next gateway pass (``log_outside``): each
resolution is claimed for logging exactly once, whichever process gets there first. An expiry
(``ledger expire``, CLI only) is logged the same way.
"""

from __future__ import annotations

from gateway.core.ledger import LedgerEntry, ResolvedState
from gateway.core.settlement import admin_expiry, admin_resolution
from gateway.services.books import Books, MoneyMoved
from gateway.store.manager import Store


async def resolve(
    store: Store,
    entry_id: str,
    *,
    state: ResolvedState,
    images: int | None,
    reason: str,
    actor: str,
    now: float,
    books: Books | None,
) -> LedgerEntry:
    """Resolve an uncertain entry (UnknownEntry, ResolutionRefused); ``books``: log it here."""
    entry = await store.resolve(
        entry_id,
        lambda found: admin_resolution(found, state, images, reason, actor=actor),
        now,
        logged=books is not None,
    )
    if books is not None:
        books.moved(MoneyMoved.of_entry(entry))
    return entry


async def expire(
    store: Store, entry_id: str, *, reason: str, actor: str, now: float, max_pending_age_s: float
) -> LedgerEntry:
    """Turn a stuck held entry uncertain (UnknownEntry, ExpiryRefused); a gateway logs it."""
    return await store.expire(
        entry_id,
        lambda found, gone: admin_expiry(
            found,
            now=now,
            max_pending_age_s=max_pending_age_s,
            instance_gone=gone,
            reason=reason,
            actor=actor,
        ),
        now,
        actor=actor,
    )


async def log_outside(store: Store, books: Books, now: float) -> int:
    """Write the lines of expiries and resolutions made elsewhere (the CLI), in that order (an
    entry expired and then resolved gets both); how many were written."""
    written = 0
    for expiry in await store.unlogged_expiries():
        if await store.claim_expiry_log(expiry.entry.request_id, now):
            books.moved(MoneyMoved.expired(expiry.entry, expiry.actor))
            written += 1
    for entry in await store.unlogged_resolutions():
        if await store.claim_resolution_log(entry.request_id, now):
            books.moved(MoneyMoved.of_entry(entry))
            written += 1
    return written
