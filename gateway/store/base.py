"""The records the store hands back, and the errors it raises.

Callers get values, never cursors or connections. ``StorageUnavailable`` (``core.errors``)
means the database cannot be used right now (disk full, file gone, server down). A write then
almost always did not land, but an acknowledgement lost after the commit (a PostgreSQL
connection that drops, a statement timeout) means it may have: a caller that retries a write,
or gives up on one, checks what is stored rather than assuming. ``Refused`` means the schema
refused a statement: money rules are not decided in storage, the schema only refuses what
``gateway.core.settlement`` would never decide.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gateway.core.ledger import LedgerEntry, Mismatch, Resolution, Uncertain
from gateway.core.settlement import LateDecision

NEVER = 1e18  # next_poll_at of a task nobody needs to poll again


class UnknownEntry(LookupError):
    """No ledger entry has that request, upstream or task id."""


class DuplicateTask(Exception):
    """The upstream handed out a task id the ledger already has (a broken upstream)."""


class Refused(Exception):
    """The schema refused a statement: a trigger's or a constraint's message (a budget
    exceeded, a settlement above its hold, an append-only table). The engine's own error is
    its ``__cause__``."""


@dataclass(frozen=True, slots=True)
class TaskRow:
    task_id: str
    team: str
    request_id: str
    created_at: float
    status: str
    result: str | None
    polls: int
    next_poll_at: float
    hold_amount: int
    unit_price: int
    quality: str
    n: int
    settled: str | None  # the settlement's state, None while held
    resolved: bool
    upstream: str | None = None  # where it was created, and is polled (None: before 0007)
    upstream_unit_price: int | None = None  # that upstream's price per image


@dataclass(frozen=True, slots=True)
class Closed:
    """What closing a request's money did: its settlement landed (``late`` None), or the entry
    was no longer held and ``late`` is what was decided about the outcome (and applied)."""

    entry: LedgerEntry
    late: LateDecision | None = None


@dataclass(frozen=True, slots=True)
class StoredOutcome:
    fingerprint: str
    request_id: str
    status: int | None
    body: str | None
    headers: dict[str, str]
    live: bool = False  # claimed by another instance that is still alive


@dataclass(frozen=True, slots=True)
class Attempt:
    """An earlier request that a retry repeats: its state, stored result and task, and whether
    another live instance is still working on it."""

    request_id: str
    state: str
    result: str | None
    task_id: str | None
    live: bool


@dataclass(frozen=True, slots=True)
class TaskPoll:
    """Who asks the upstream about a pending task: ``claimed`` (this caller), else the answer
    another instance fetched within the cache time, if any."""

    claimed: bool
    answer: str | None = None


@dataclass(frozen=True, slots=True)
class LedgerQuery:
    """Entries created in ``[since, until)`` (None: unbounded), newest first."""

    team: str | None = None
    state: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int | None = None


@dataclass(frozen=True, slots=True)
class ReportRow:
    """One group of a team's ledger entries in a time window (``group`` None: all of them)."""

    group: str | None
    spent: int
    reserved: int
    uncertain: int
    overrun: int
    images: int
    requests: int
    last_at: float | None
    key_id: str | None = None  # for a key group: the identity it last had


@dataclass(frozen=True, slots=True)
class DaySpend:
    """A team's spend on one local day by one key at one quality (the console's charts)."""

    day: str  # YYYY-MM-DD in the configured time zone
    key_fp: str | None
    key_id: str | None  # an identity the key had then, for a key no longer configured
    quality: str
    spent: int
    images: int


@dataclass(frozen=True, slots=True)
class InstanceRow:
    """A gateway instance on this ledger, as the fleet sees it."""

    instance_id: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float


@dataclass(frozen=True, slots=True)
class Verification:
    entries: int
    mismatches: tuple[Mismatch, ...]


Decide = Callable[[LedgerEntry], Resolution]
DecideExpiry = Callable[[LedgerEntry, bool], Uncertain]  # (entry, its instance is gone)
DecideLate = Callable[[LedgerEntry], LateDecision]  # gateway.core.settlement.late_outcome


@dataclass(frozen=True, slots=True)
class Expiry:
    """A held entry an admin turned uncertain (``ledger expire``), and who did it."""

    entry: LedgerEntry
    actor: str
