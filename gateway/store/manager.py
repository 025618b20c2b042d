"""The store: every storage operation, written once, over an engine that only runs statements.

Each method is one complete operation: it returns once its write is committed (durable), or
raises. What happens between statements (settle a task's hold or resolve it, claim an
Idempotency-Key, recover the holds of a stopped process) is decided here, in a script of
named statements (``engine.Script``) that every engine runs: SQLite in its writer thread,
PostgreSQL on one connection, the in-memory engine in Python. Money rules are not decided
here either: the store records what ``gateway.core.settlement`` decided, and the schema
refuses anything else.

An engine ``shared`` by a fleet (PostgreSQL) keeps the limits, the task poll cache and
liveness in the database; one owned by a single process keeps them in that process.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Sequence
from typing import Any, TypeVar

from gateway.core.errors import StorageUnavailable
from gateway.core.ledger import (
    BudgetRefused,
    Grouping,
    Hold,
    LedgerEntry,
    Resolution,
    Settlement,
    Usage,
)
from gateway.core.limits import WINDOW_S, Limiter, Scope, concurrency_refusal, rate_refusal
from gateway.core.money import format_cny
from gateway.core.restore import Position
from gateway.core.settlement import Correct, ExpiryRefused, NotResolvable, Resolve, recovered
from gateway.store import migrations
from gateway.store.base import (
    NEVER,
    Attempt,
    Closed,
    DaySpend,
    Decide,
    DecideExpiry,
    DecideLate,
    DuplicateTask,
    Expiry,
    InstanceRow,
    LedgerQuery,
    Refused,
    ReportRow,
    StoredOutcome,
    TaskPoll,
    TaskRow,
    UnknownEntry,
    Verification,
)
from gateway.store.common import (
    RESTORE_PREFIX,
    correction_params,
    heartbeat,
    hold_params,
    report_row,
    resolution_params,
    settlement_params,
    to_entry,
    to_position,
    to_task_row,
    usage_of,
    verification,
)
from gateway.store.engine import Engine, Script, Step, count, every, one, only
from gateway.store.results import ResultIndex

T = TypeVar("T")
log = logging.getLogger("gateway.store")

LATE_TRIES = 3  # a late decision made again after another transaction closed the entry first
FETCH_LEASE_S = 30.0  # an instance fetching a task's answer has this long before another may
UNBOUNDED = 1e18  # a report or listing without since/until


class Store:
    """The ledger, tasks and stored outcomes of one database; see the module docstring."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.results = ResultIndex(engine)  # the result store's index, in the same database
        self._limiter = Limiter()
        self._failures_beaten = 0  # the engine's failures as of the last heartbeat committed
        self._opened_at = time.time()  # an unshared ledger's one instance started here

    @property
    def closed(self) -> bool:
        return self.engine.closed

    @property
    def created(self) -> bool:
        """Opening made a new, empty ledger."""
        return self.engine.created

    @property
    def instance_id(self) -> str:
        return self.engine.instance_id

    async def close(self) -> None:
        """Commit what is queued and close; closing twice is harmless."""
        await self.engine.close()

    async def check_ready(self) -> None:
        """Prove the database is the configured one and writable; StorageUnavailable if not.
        A fleet member proves it with its heartbeat (registering again if taken for dead)."""
        await self.engine.check_ready()
        await self.heartbeat()

    async def schema_state(self) -> migrations.SchemaState:
        """The schema records in ``meta``, read afresh: a newer release may migrate the
        database under a running fleet."""
        rows = await self._read(every("schema_meta"))
        return migrations.state_of({row["key"]: row["value"] for row in rows})

    async def position(self) -> Position:
        """How far the ledger has gone, read in one snapshot (see ``core.restore``)."""
        return to_position(await self._read(one("position")))

    async def record_restore(self, accepted_at: float, record: str) -> None:
        """Keep an accepted restore in the ledger (a ``meta`` row ``restore_accepted:<time>``)."""
        await self._write(count("set_meta", key=f"{RESTORE_PREFIX}{accepted_at:.6f}", value=record))

    async def restores_since(self, since: float) -> list[str]:
        """Restores accepted at or after ``since`` (their records), oldest first."""
        rows = await self._read(every("restores", prefix=RESTORE_PREFIX + "%"))
        start = len(RESTORE_PREFIX)
        return [row["value"] for row in rows if float(row["key"][start:]) >= since]

    # -- money -------------------------------------------------------------------------------

    async def reserve(self, hold: Hold) -> Usage:
        """Record ``hold`` and reserve its amount in one atomic step (or BudgetRefused)."""

        def reserve() -> Script[Usage]:
            try:
                row = yield one("reserve", **hold_params(hold), instance_id=self.instance_id)
            except Refused as refused:
                if str(refused) == "budget_exceeded":
                    row = yield one("usage", team=hold.team, period=hold.period)
                    raise BudgetRefused(usage_of(row)) from None
                if str(refused) == "key_budget_exceeded" and hold.key_fp is not None:
                    key = {"team": hold.team, "key_fp": hold.key_fp, "period": hold.period}
                    row = yield one("key_usage", **key)
                    raise BudgetRefused(usage_of(row), scope="key") from None
                raise
            return usage_of(row)

        return await self.engine.write(reserve())

    async def settle(self, request_id: str, settlement: Settlement, now: float) -> bool:
        """Settle a hold once; False if it was settled before (that settlement stands).
        Deferred: its request has its answer, so it rides the next reservation's commit."""
        step = count("settle", **settlement_params(request_id, settlement, now))
        return bool(await self.engine.write(only(step), defer=True))

    async def resolve(
        self, entry_id: str, decide: Decide, now: float, *, logged: bool
    ) -> LedgerEntry:
        """Resolve an uncertain entry with what ``decide`` makes of it, atomically; the entry
        after. ``logged``: the caller writes its access-log line (else a gateway will)."""

        def resolve() -> Script[LedgerEntry]:
            row = yield one("entry_by_any_id", entry_id=entry_id)
            if row is None:
                raise UnknownEntry(entry_id)
            yield one("lock_entry", request_id=row["request_id"])  # then decide on it as it is
            entry = yield from _entry(row["request_id"])
            if not (yield from _resolution(entry, decide(entry), now, logged=logged)):
                raise NotResolvable(f"{entry_id} was already resolved")  # by another, meanwhile
            return to_entry((yield one("entry", request_id=entry.request_id)))

        return await self.engine.write(resolve(), atomic=True)

    async def expire(
        self, entry_id: str, decide: DecideExpiry, now: float, *, actor: str
    ) -> LedgerEntry:
        """Turn a stuck ``held`` entry uncertain with what ``decide`` makes of it (told whether
        the hold's instance is gone), atomically, recording ``actor`` for a gateway to log; the
        entry after. UnknownEntry; ExpiryRefused (also when it settled meanwhile)."""

        def expire() -> Script[LedgerEntry]:
            row = yield one("entry_by_any_id", entry_id=entry_id)
            if row is None:
                raise UnknownEntry(entry_id)
            entry, lease_s = to_entry(row), float(self.engine.lease_s)
            holder = yield one("hold_instance_gone", request_id=entry.request_id,
                               lease_s=lease_s, instance_id=self.instance_id)  # fmt: skip
            settlement = decide(entry, bool(holder["gone"]))
            if not (yield count("settle", **settlement_params(entry.request_id, settlement, now))):
                raise ExpiryRefused(f"{entry.request_id} was settled meanwhile")
            yield count("insert_expiry", request_id=entry.request_id, actor=actor, expired_at=now)
            return (yield from _entry(entry.request_id))

        return await self.engine.write(expire(), atomic=True)

    async def settle_late(self, request_id: str, decide: DecideLate, now: float) -> Closed | None:
        """For an outcome learned once the entry was no longer held: apply what ``decide``
        makes of the entry as it is now (resolve, correct or nothing), atomically, and
        serialized with any other decision on it. None if there is no such entry."""
        return await self.engine.write(_late(request_id, decide, now), atomic=True)

    async def usage(self, team: str, period: str) -> Usage:
        return usage_of(await self._read(one("usage", team=team, period=period)))

    async def key_usage(self, team: str, key_fp: str, period: str) -> Usage:
        step = one("key_usage", team=team, key_fp=key_fp, period=period)
        return usage_of(await self._read(step))

    async def entries(self, query: LedgerQuery) -> list[LedgerEntry]:
        """Entries created in ``[since, until)`` (None: unbounded), newest first."""
        since = -UNBOUNDED if query.since is None else query.since
        until = UNBOUNDED if query.until is None else query.until
        limit = None if query.limit is None else int(query.limit)
        step = every("entries", team=query.team, state=query.state, since=since, until=until,
                     limit=limit)  # fmt: skip
        return [to_entry(row) for row in await self._read(step)]

    async def report(
        self, team: str, *, since: float | None, until: float | None, by: Grouping | None, tz: str
    ) -> list[ReportRow]:
        """Spend of ``team`` in ``[since, until)`` from the ledger, grouped ``by`` (days cut in
        the IANA zone ``tz``)."""
        since = -UNBOUNDED if since is None else since
        until = UNBOUNDED if until is None else until
        step = every("report", team=team, since=since, until=until, by=by, tz=tz)
        return [report_row(row) for row in await self._read(step) if row["requests"]]

    async def daily_spend(
        self, team: str, *, since: float, until: float, tz: str
    ) -> list[DaySpend]:
        """Spend of ``team`` in ``[since, until)`` per local day (in the IANA zone ``tz``), key
        and quality; groups without spend are left out."""
        step = every("daily_spend", team=team, since=since, until=until, tz=tz)
        return [
            DaySpend(r["day"], r["key_fp"], r["key_id"], r["quality"], int(r["spent"]),
                     int(r["images"] or 0))
            for r in await self._read(step)
        ]  # fmt: skip

    async def stored_results(self, request_ids: Sequence[str]) -> dict[str, str]:
        """The stored answer (a sync body, or the task's last answer) of each request that was
        served (captured, or corrected later) and has one; never shown as such (its URLs are
        credentials)."""
        if not request_ids:
            return {}
        step = every("stored_results", request_ids=json.dumps(list(request_ids)))
        return {r["request_id"]: r["result"] for r in await self._read(step) if r["result"]}

    async def open_tasks(self, team: str, limit: int) -> list[TaskRow]:
        """The team's tasks still pending upstream, oldest first."""
        rows = await self._read(every("open_tasks", team=team, limit=limit))
        return [to_task_row(row) for row in rows]

    async def key_last_used(self) -> dict[str, float]:
        """When each key (by fingerprint) last reached the ledger."""
        return {row["key_fp"]: row["last_at"] for row in await self._read(every("key_last_used"))}

    async def find_entry(self, entry_id: str) -> LedgerEntry | None:
        """By ledger (request) id, or by the full upstream or task id."""
        row = await self._read(one("entry_by_any_id", entry_id=entry_id))
        return None if row is None else to_entry(row)

    async def verify(self) -> Verification:
        """Recompute every counter from holds, settlements and resolutions."""
        return verification(await self._read(every("verify")))

    async def hold_state(self, request_id: str) -> tuple[str, str | None] | None:
        """The entry's state and stored result, or None without a hold."""
        row = await self._read(one("hold_state", request_id=request_id))
        return None if row is None else (row["state"], row["result"])

    async def recover_in_flight(self, now: float) -> list[LedgerEntry]:
        """Holds left held by a stopped process become uncertain; the entries turned. A
        shared database recovers nothing at start: another instance's in-flight holds are its
        own business until it has been silent for its lease (``reap_silent_instances``)."""
        if self.engine.shared:
            return []

        def recover() -> Script[list[LedgerEntry]]:
            return (yield from _recover((yield every("in_flight_holds")), now))

        return await self.engine.write(recover(), atomic=True)

    async def latest_attempt(self, team: str, fingerprint: str, since: float) -> Attempt | None:
        """The newest request of ``team`` with this fingerprint since ``since`` (a retry's
        original), with what came of it."""
        row = await self._read(
            one("latest_attempt", team=team, fingerprint=fingerprint, since=since,
                lease_s=float(self.engine.lease_s), instance_id=self.instance_id)
        )  # fmt: skip
        if row is None:
            return None
        return Attempt(row["request_id"], row["state"], row["result"], row["task_id"],
                       live=bool(row["live"]))  # fmt: skip

    async def unlogged_resolutions(self) -> list[LedgerEntry]:
        """Resolutions nobody has written an access-log line for yet (made by a CLI)."""
        return [to_entry(row) for row in await self._read(every("unlogged_resolutions"))]

    async def claim_resolution_log(self, request_id: str, now: float) -> bool:
        """True exactly once per resolution: the caller writes its line."""
        return bool(
            await self._write(count("log_resolution", request_id=request_id, logged_at=now))
        )

    async def unlogged_expiries(self) -> list[Expiry]:
        """Expiries nobody has written an access-log line for yet (made by the CLI)."""
        rows = await self._read(every("unlogged_expiries"))
        return [Expiry(to_entry(row), row["expired_by"]) for row in rows]

    async def claim_expiry_log(self, request_id: str, now: float) -> bool:
        """True exactly once per expiry: the caller writes its line."""
        claimed = count("claim_expiry_log", request_id=request_id, logged_at=now)
        return bool(await self._write(claimed))

    # -- async tasks -------------------------------------------------------------------------

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
        task = {"task_id": task_id, "team": team, "request_id": request_id, "created_at": now,
                "upstream": upstream, "unit_price": unit_price}  # fmt: skip
        step = count(
            "insert_task", **task, status="pending", result=None, next_poll_at=first_poll_at
        )
        if not await self._write(step):
            raise DuplicateTask

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

        def record() -> Script[Closed | None]:
            if not (
                yield count("insert_task", task_id=task_id, team=team, request_id=request_id,
                            created_at=created_at, status="completed", result=result,
                            next_poll_at=NEVER, upstream=settlement.upstream,
                            unit_price=settlement.unit_price)
            ):  # fmt: skip
                raise DuplicateTask
            return (yield from _close(request_id, settlement, late, now))

        return await self.engine.write(record(), atomic=True)

    async def task(self, task_id: str) -> TaskRow | None:
        row = await self._read(one("task", task_id=task_id))
        return None if row is None else to_task_row(row)

    async def due_tasks(self, now: float, limit: int) -> list[TaskRow]:
        """Pending tasks due for a poll, whatever their money (one an admin resolved may still
        complete, and what it delivered is then recorded); on a shared database, claimed by
        this instance for one lease."""
        step = every("due_tasks", now=now, limit=limit, lease_until=now + self.engine.lease_s)
        return [to_task_row(row) for row in await self._write(step)]

    async def next_task_due(self) -> float | None:
        row = await self._read(one("next_task_due"))
        return None if row is None else row["due"]

    async def unsettled_task_count(self) -> int:
        return int((await self._read(one("unsettled_task_count")))["tasks"])

    async def reschedule_task(self, task_id: str, next_poll_at: float) -> None:
        await self._write(count("reschedule_task", task_id=task_id, next_poll_at=next_poll_at))

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

        def finish() -> Script[Closed | None]:
            finished = count("finish_task", task_id=row.task_id, status=status, result=result)
            if not (yield finished):
                return None  # another poll or instance finished it first
            return (yield from _close(row.request_id, settlement, late, now))

        return await self.engine.write(finish(), atomic=True)

    async def claim_task_poll(self, task_id: str, now: float, ttl_s: float) -> TaskPoll:
        """Claim the next upstream poll of a pending task (fleet-wide one per ``ttl_s``); in
        one process the tracker's own cache stands in front and every poll is its own."""
        if not self.engine.shared:
            return TaskPoll(claimed=True)

        def claim() -> Script[TaskPoll]:
            until, fresh_since = now + FETCH_LEASE_S, now - ttl_s
            claimed = count("claim_task_poll", task_id=task_id, now=now, fetching_until=until,
                            fresh_since=fresh_since)  # fmt: skip
            if (yield claimed):
                return TaskPoll(claimed=True)
            cached = yield one("task_answer", task_id=task_id)
            return TaskPoll(claimed=False, answer=_answer_since(cached, now - ttl_s))

        return await self.engine.write(claim())

    async def store_task_answer(self, task_id: str, answer: str, now: float) -> None:
        """Share a pending task's fresh answer with the fleet."""
        if self.engine.shared:
            step = count("store_task_answer", task_id=task_id, answer=answer, answered_at=now)
            await self._write(step)

    async def task_answer_since(self, task_id: str, since: float) -> str | None:
        """A pending answer fetched at or after ``since``, or the terminal result, if any."""
        if not self.engine.shared:
            return None
        return _answer_since(await self._read(one("task_answer", task_id=task_id)), since)

    # -- the fleet ---------------------------------------------------------------------------

    async def heartbeat(self) -> None:
        """Tell the fleet this instance is alive (registering it again if it was taken for
        dead)."""
        if not self.engine.shared:
            return
        failures = self.engine.failures
        row = await self._write(self._beat(failures))
        self._failures_beaten = failures  # committed
        if row["again"]:
            log.error(
                "this instance (%s) was silent past its lease and the fleet took it for dead "
                "(its in-flight holds were made uncertain); registered again",
                self.instance_id,
            )

    def _beat(self, failures: int) -> Step:
        """A heartbeat; after a failure to reach the database since the last one committed,
        this instance's view of the fleet starts again."""
        lost = failures != self._failures_beaten
        return heartbeat(self.instance_id, self.engine.lease_s, lost=lost)

    async def instances(self) -> list[InstanceRow]:
        """The instances on this ledger, oldest first (one owned by a process: that process)."""
        if not self.engine.shared:
            now = time.time()
            return [InstanceRow(self.instance_id, socket.gethostname(), os.getpid(),
                                self._opened_at, now)]  # fmt: skip
        return [
            InstanceRow(r["instance_id"], r["host"], r["pid"], r["started_at"], r["heartbeat_at"])
            for r in await self._read(every("instances"))
        ]

    async def reap_silent_instances(self, now: float, lease_s: float) -> list[LedgerEntry]:
        """Holds of other instances silent for ``lease_s`` while this one could reach the
        database become uncertain; the entries turned. Never this instance's own."""
        if not self.engine.shared:
            return []
        failures = self.engine.failures

        def reap() -> Script[list[LedgerEntry]]:
            yield self._beat(failures)  # its own view first: cut off, it judges nobody
            silent = every("reap_instances", lease_s=float(lease_s), instance_id=self.instance_id)
            gone = [row["instance_id"] for row in (yield silent)]
            left = yield every("orphaned_holds", instance_id=self.instance_id)
            if not left and not gone:
                return []
            turned = yield from _recover(left, now)  # not those settled meanwhile
            yield count("drop_orphaned_admissions")
            log.warning(
                "instance(s) %s silent for over %ss: %d in-flight hold(s) made uncertain%s",
                ", ".join(gone) or "(already gone)",
                lease_s,
                len(turned),
                "".join(
                    f"{', ' if i else ': '}{e.request_id} ({e.team}, {format_cny(e.held)})"
                    for i, e in enumerate(turned)
                ),
            )
            return turned

        reaped = await self.engine.write(reap(), atomic=True)
        self._failures_beaten = failures  # committed
        return reaped

    async def admit(self, request_id: str, scopes: list[Scope], now: float) -> None:
        """Count the request against every scope's rpm and max_concurrent, or RateLimited;
        fleet-wide exact, each scope's check and count under its lock."""
        if not self.engine.shared:
            self._limiter.admit(request_id, scopes, now)
            return

        def admit() -> Script[None]:
            for scope in sorted(scopes, key=lambda s: s.id):  # one lock order: no deadlock
                yield one("lock_scope", scope=scope.id)
            for scope in scopes:
                if scope.max_concurrent is not None:
                    running = (yield one("running", scope=scope.id))["running"]
                    if running >= scope.max_concurrent:
                        raise concurrency_refusal(scope)
                if scope.rpm is not None:
                    recent = yield every("recent_requests", scope=scope.id, since=now - WINDOW_S)
                    if len(recent) >= scope.rpm:
                        raise rate_refusal(scope, recent[0]["at"], now)
            for scope in scopes:
                if scope.max_concurrent is not None:
                    yield count("admit", request_id=request_id, scope=scope.id,
                                instance_id=self.instance_id)  # fmt: skip
                if scope.rpm is not None:
                    yield count("count_request", scope=scope.id, at=now)
                    yield count("forget_requests", scope=scope.id, before=now - WINDOW_S)

        await self.engine.write(admit(), atomic=True)

    async def release(self, request_id: str, scopes: list[Scope]) -> None:
        """The admitted request has ended."""
        if not self.engine.shared:
            self._limiter.release(request_id, scopes)
            return
        await self._write(count("release", request_id=request_id))

    # -- idempotency -------------------------------------------------------------------------

    async def claim_idempotency_key(
        self, team: str, key: str, *, fingerprint: str, request_id: str, now: float, keep_s: float
    ) -> StoredOutcome | None:
        """Claim (team, key) for this request; the earlier claim instead if there is one."""
        me = {"team": team, "key": key, "instance_id": self.instance_id}
        mine = {**me, "fingerprint": fingerprint, "request_id": request_id, "created_at": now}
        held_by = {**me, "lease_s": float(self.engine.lease_s)}

        def claim() -> Script[StoredOutcome | None]:
            yield count("expire_idempotency_key", team=team, key=key, before=now - keep_s)
            while True:  # the holder may release its claim between our two statements
                if (yield count("claim_idempotency_key", **mine)):
                    return None
                row = yield one("idempotency_key", **held_by)
                if row is not None:
                    return StoredOutcome(
                        row["fingerprint"], row["request_id"], row["status"], row["body"],
                        json.loads(row["headers"] or "{}"), live=bool(row["live"]),
                    )  # fmt: skip

        return await self.engine.write(claim(), atomic=True)

    async def store_idempotent_outcome(
        self, team: str, key: str, status: int, body: str, headers: dict[str, str]
    ) -> None:
        await self._write(
            count("store_idempotent_outcome", team=team, key=key, status=status, body=body,
                  headers=json.dumps(headers))
        )  # fmt: skip

    async def release_idempotency_key(self, team: str, key: str) -> None:
        await self._write(count("release_idempotency_key", team=team, key=key))

    async def purge_idempotency(self, before: float) -> int:
        return int(await self._write(count("purge_idempotency", before=before)))

    # -- one statement -----------------------------------------------------------------------

    async def _read(self, step: Step) -> Any:
        return await self.engine.read(only(step))

    async def _write(self, step: Step) -> Any:
        return await self.engine.write(only(step))


def _entry(request_id: str) -> Script[LedgerEntry]:
    return to_entry((yield one("entry", request_id=request_id)))


def _resolution(
    entry: LedgerEntry, resolution: Resolution, now: float, *, logged: bool
) -> Script[bool]:
    """Insert the resolution (and its log claim); False if the entry was resolved already."""
    if not (yield count("resolve", **resolution_params(entry.request_id, resolution, now))):
        return False
    if logged:
        yield count("log_resolution", request_id=entry.request_id, logged_at=now)
    return True


def _recover(left: list[Any], now: float) -> Script[list[LedgerEntry]]:
    """Settle each left hold (rows of request_id, amount) as uncertain; the entries turned
    (not one its own request settled meanwhile)."""
    entries = []
    for row in left:
        uncertain = settlement_params(row["request_id"], recovered(row["amount"]), now)
        if (yield count("settle", **uncertain)):
            entries.append((yield from _entry(row["request_id"])))
    return entries


def _close(
    request_id: str, settlement: Settlement, late: DecideLate, now: float
) -> Script[Closed | None]:
    """Settle the hold, or, if it was closed before (by a statement that may have committed
    while this one waited on its key), apply the late decision."""
    if (yield count("settle", **settlement_params(request_id, settlement, now))):
        return Closed((yield from _entry(request_id)))
    return (yield from _late(request_id, late, now))


def _late(request_id: str, decide: DecideLate, now: float) -> Script[Closed | None]:
    """Apply what ``decide`` makes of the entry as committed now, under the entry's lock (an
    admin's resolution through this code cannot interleave); one written past it (by hand, or
    by an older release) leaves the resolution undone, and the decision is made again."""
    yield one("lock_entry", request_id=request_id)
    for _ in range(LATE_TRIES):
        row = yield one("entry", request_id=request_id)
        if row is None:
            return None
        entry = to_entry(row)
        decision = decide(entry)
        if isinstance(decision, Resolve):
            if not (yield from _resolution(entry, decision.resolution, now, logged=True)):
                continue  # resolved by someone else meanwhile: decide on what it is now
        elif isinstance(decision, Correct):
            yield count(
                "insert_correction", **correction_params(request_id, decision.correction, now)
            )
        return Closed((yield from _entry(request_id)), decision)
    raise StorageUnavailable(f"the ledger entry {request_id} kept changing; retried")


def _answer_since(row: Any, since: float) -> str | None:
    """A task's shared answer if it is the final one or was fetched at or after ``since``."""
    if row is None or row["answer"] is None:
        return None
    final = row["status"] != "pending"
    return row["answer"] if final or (row["answered_at"] or 0) >= since else None
