"""The storage interface every engine implements, and the records it hands back.

Callers get values, never cursors or connections. Each method is one complete operation: it
returns once its write is committed (durable), or raises. ``StorageUnavailable`` means the
database cannot be used right now (disk full, file gone, server down). The write then almost
always did not land, but an acknowledgement lost after the commit (a PostgreSQL connection that
drops, a statement timeout) means it may have: a caller that retries a write, or gives up on
one, checks what is stored rather than assuming.
Money rules are not decided here: the engine stores what ``gateway.core.settlement`` decided and its
schema refuses anything else.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from gateway.core.ledger import (
    Hold,
    LedgerEntry,
    Mismatch,
    Resolution,
    Settlement,
    Uncertain,
    Usage,
)
from gateway.core.limits import Scope
from gateway.core.restore import Position
from gateway.core.settlement import LateDecision
from gateway.store.migrations import SchemaState
from gateway.store.results import ResultIndex

NEVER = 1e18  # next_poll_at of a task nobody needs to poll again


class UnknownEntry(LookupError):
    """No ledger entry has that request, upstream or task id."""


class DuplicateTask(Exception):
    """The upstream handed out a task id the ledger already has (a broken upstream)."""


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


Grouping = Literal["key", "end_user", "day", "quality", "upstream"]


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
    """A team's spend in one interval (a local day) by one key at one quality (the console's
    charts)."""

    day: int  # the interval's number: 0 for the first
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


@dataclass(frozen=True, slots=True)
class Expiry:
    """A held entry an admin turned uncertain (``ledger expire``), and who did it."""

    entry: LedgerEntry
    actor: str


DecideLate = Callable[[LedgerEntry], LateDecision]  # gateway.core.settlement.late_outcome


class Store(abc.ABC):
    """One engine's ledger, tasks and stored outcomes."""

    closed: bool = False
    created: bool = False  # opening made a new, empty ledger

    @property
    @abc.abstractmethod
    def results(self) -> ResultIndex:
        """The result store's index (``gateway.store.results``), in this database."""

    # -- lifecycle ---------------------------------------------------------------------------

    @abc.abstractmethod
    async def close(self) -> None:
        """Commit what is queued and close; closing twice is harmless."""

    @abc.abstractmethod
    async def schema_state(self) -> SchemaState:
        """The schema records in ``meta``, read afresh: a newer release may migrate the
        database under a running fleet."""

    @abc.abstractmethod
    async def position(self) -> Position:
        """How far the ledger has gone, read in one snapshot (see ``core.restore``)."""

    @abc.abstractmethod
    async def record_restore(self, accepted_at: float, record: str) -> None:
        """Keep an accepted restore in the ledger (a ``meta`` row ``restore_accepted:<time>``)."""

    @abc.abstractmethod
    async def restores_since(self, since: float) -> list[str]:
        """Restores accepted at or after ``since`` (their records), oldest first."""

    @abc.abstractmethod
    async def check_ready(self) -> None:
        """Prove the database is the configured one and writable; StorageUnavailable if not."""

    # -- money -------------------------------------------------------------------------------

    @abc.abstractmethod
    async def reserve(self, hold: Hold) -> Usage:
        """Record ``hold`` and reserve its amount in one atomic step (or BudgetRefused)."""

    @abc.abstractmethod
    async def settle(self, request_id: str, settlement: Settlement, now: float) -> bool:
        """Settle a hold once; False if it was settled before (that settlement stands)."""

    @abc.abstractmethod
    async def resolve(
        self, entry_id: str, decide: Decide, now: float, *, logged: bool
    ) -> LedgerEntry:
        """Resolve an uncertain entry with what ``decide`` makes of it, atomically; the entry
        after. ``logged``: the caller writes its access-log line (else a gateway will)."""

    @abc.abstractmethod
    async def expire(
        self, entry_id: str, decide: DecideExpiry, now: float, *, actor: str
    ) -> LedgerEntry:
        """Turn a stuck ``held`` entry uncertain with what ``decide`` makes of it (told whether
        the hold's instance is gone), atomically, recording ``actor`` for a gateway to log; the
        entry after. UnknownEntry; ExpiryRefused (also when it settled meanwhile)."""

    @abc.abstractmethod
    async def settle_late(self, request_id: str, decide: DecideLate, now: float) -> Closed | None:
        """For an outcome learned once the entry was no longer held: apply what ``decide``
        makes of the entry as it is now (resolve, correct or nothing), atomically, and
        serialized with any other decision on it. None if there is no such entry."""

    @abc.abstractmethod
    async def usage(self, team: str, period: str) -> Usage: ...

    @abc.abstractmethod
    async def entries(self, query: LedgerQuery) -> list[LedgerEntry]: ...

    @abc.abstractmethod
    async def report(
        self,
        team: str,
        *,
        since: float | None,
        until: float | None,
        by: Grouping | None,
        tz: str,
    ) -> list[ReportRow]:
        """Spend of ``team`` in ``[since, until)`` from the ledger, grouped ``by`` (days cut in
        the IANA zone ``tz``)."""

    @abc.abstractmethod
    async def key_last_used(self) -> dict[str, float]:
        """When each key (by fingerprint) last reached the ledger."""

    @abc.abstractmethod
    async def key_usage(self, team: str, key_fp: str, period: str) -> Usage: ...

    @abc.abstractmethod
    async def find_entry(self, entry_id: str) -> LedgerEntry | None:
        """By ledger (request) id, or by the full upstream or task id."""

    @abc.abstractmethod
    async def verify(self) -> Verification:
        """Recompute every counter from holds, settlements and resolutions."""

    @abc.abstractmethod
    async def daily_spend(self, team: str, bounds: Sequence[float]) -> list[DaySpend]:
        """Spend of ``team`` between ascending ``bounds`` (local midnights), per interval, key
        and quality; groups without spend are left out."""

    @abc.abstractmethod
    async def stored_results(self, request_ids: Sequence[str]) -> dict[str, str]:
        """The stored answer (a sync body, or the task's last answer) of each request that was
        served (captured, or corrected later) and has one; never shown as such (its URLs are
        credentials)."""

    @abc.abstractmethod
    async def open_tasks(self, team: str, limit: int) -> list[TaskRow]:
        """The team's pending tasks whose money is still open, oldest first."""

    @abc.abstractmethod
    async def hold_state(self, request_id: str) -> tuple[str, str | None] | None:
        """The entry's state and stored result, or None without a hold."""

    @abc.abstractmethod
    async def recover_in_flight(self, now: float) -> list[LedgerEntry]:
        """Holds left held by a stopped process become uncertain; the entries turned."""

    @abc.abstractmethod
    async def latest_attempt(self, team: str, fingerprint: str, since: float) -> Attempt | None:
        """The newest request of ``team`` with this fingerprint since ``since`` (a retry's
        original), with what came of it."""

    @abc.abstractmethod
    async def unlogged_resolutions(self) -> list[LedgerEntry]:
        """Resolutions nobody has written an access-log line for yet (made by a CLI)."""

    @abc.abstractmethod
    async def claim_resolution_log(self, request_id: str, now: float) -> bool:
        """True exactly once per resolution: the caller writes its line."""

    @abc.abstractmethod
    async def unlogged_expiries(self) -> list[Expiry]:
        """Expiries nobody has written an access-log line for yet (made by the CLI)."""

    @abc.abstractmethod
    async def claim_expiry_log(self, request_id: str, now: float) -> bool:
        """True exactly once per expiry: the caller writes its line."""

    # -- async tasks -------------------------------------------------------------------------

    @abc.abstractmethod
    async def record_task(
        self,
        task_id: str,
        team: str,
        request_id: str,
        now: float,
        first_poll_at: float,
        *,
        upstream: str | None = None,
        unit_price: int | None = None,
    ) -> None:
        """A pending task of a held request, created at ``upstream`` (whose price per image is
        ``unit_price``); ``DuplicateTask`` if the id is taken."""

    @abc.abstractmethod
    async def record_completed_task(
        self,
        task_id: str,
        team: str,
        request_id: str,
        created_at: float,
        *,
        result: str,
        settlement: Settlement,
        late: DecideLate,
        now: float,
    ) -> Closed | None:
        """A task that was complete when submitted, and its settlement, in one step (a crash
        must not leave a held hold with a finished task; the task's upstream and price are the
        settlement's); if the hold was closed meanwhile, ``late`` decides, as in
        ``settle_late``. ``DuplicateTask`` if the id is taken."""

    @abc.abstractmethod
    async def task(self, task_id: str) -> TaskRow | None: ...

    @abc.abstractmethod
    async def due_tasks(self, now: float, limit: int) -> list[TaskRow]:
        """Pending tasks due for a poll, whatever their money: one an admin resolved may still
        complete, and what it delivered is then recorded (``late_outcome``)."""

    @abc.abstractmethod
    async def next_task_due(self) -> float | None: ...

    @abc.abstractmethod
    async def unsettled_task_count(self) -> int: ...

    @abc.abstractmethod
    async def reschedule_task(self, task_id: str, next_poll_at: float) -> None: ...

    @abc.abstractmethod
    async def finish_task(
        self,
        row: TaskRow,
        *,
        status: str,
        result: str,
        settlement: Settlement,
        late: DecideLate,
        now: float,
    ) -> Closed | None:
        """Store a task's terminal answer and close its money in one step: ``settlement`` if
        the hold is still held, else what ``late`` decides (as in ``settle_late``). None when
        another poll stored the answer first."""

    @abc.abstractmethod
    async def claim_task_poll(self, task_id: str, now: float, ttl_s: float) -> TaskPoll:
        """Claim the next upstream poll of a pending task (fleet-wide one per ``ttl_s``)."""

    @abc.abstractmethod
    async def store_task_answer(self, task_id: str, answer: str, now: float) -> None:
        """Share a pending task's fresh answer with the fleet."""

    @abc.abstractmethod
    async def task_answer_since(self, task_id: str, since: float) -> str | None:
        """A pending answer fetched at or after ``since``, or the terminal result, if any."""

    # -- the fleet ---------------------------------------------------------------------------

    instance_id: str = "local"

    @abc.abstractmethod
    async def heartbeat(self) -> None:
        """Tell the fleet this instance is alive (registering it again if it was taken for
        dead)."""

    @abc.abstractmethod
    async def instances(self) -> list[InstanceRow]:
        """The instances on this ledger (SQLite: this process), oldest first. Read-only."""

    @abc.abstractmethod
    async def reap_silent_instances(self, now: float, lease_s: float) -> list[LedgerEntry]:
        """Holds of other instances silent for ``lease_s`` while this one could reach the
        database become uncertain; the entries turned. Never this instance's own."""

    @abc.abstractmethod
    async def admit(self, request_id: str, scopes: list[Scope], now: float) -> None:
        """Count the request against every scope's rpm and max_concurrent, or RateLimited."""

    @abc.abstractmethod
    async def release(self, request_id: str, scopes: list[Scope]) -> None:
        """The admitted request has ended."""

    # -- idempotency -------------------------------------------------------------------------

    @abc.abstractmethod
    async def claim_idempotency_key(
        self, team: str, key: str, *, fingerprint: str, request_id: str, now: float, keep_s: float
    ) -> StoredOutcome | None:
        """Claim (team, key) for this request; the earlier claim instead if there is one."""

    @abc.abstractmethod
    async def store_idempotent_outcome(
        self, team: str, key: str, status: int, body: str, headers: dict[str, str]
    ) -> None: ...

    @abc.abstractmethod
    async def release_idempotency_key(self, team: str, key: str) -> None: ...

    @abc.abstractmethod
    async def purge_idempotency(self, before: float) -> int: ...
