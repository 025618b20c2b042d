"""The PostgreSQL engine: one shared ledger for a fleet of gateway instances.

- The reservation is one statement: inserting the hold fires a trigger whose conditional
  ``UPDATE usage ... WHERE spent + reserved + uncertain + amount <= budget`` takes the team's
  row lock and moves the money, committed before the upstream is called. Under READ
  COMMITTED a waiting UPDATE re-checks its condition on the row as committed, so no spread of
  a burst over instances can overspend. A capped key's row is checked in the same statement.
- Instances heartbeat. The holds of one silent for ``instance_lease_s`` become uncertain (by
  whichever instance notices first); a live instance's holds are never touched, so start-up
  does not recover anything by itself. Silence is only counted while the instance judging it
  could reach the database itself (``instance_silent`` in migration 0006): an outage of the
  database stops every heartbeat, so it says nothing about an instance. A reservation
  registers its instance again if it was taken for dead (a pause past its lease), in the
  same transaction as its hold, and an instance never reaps itself.
- Limits, in-flight Idempotency-Key claims and the task poll cache are rows every instance
  sees; the settler claims due tasks with ``FOR UPDATE SKIP LOCKED``.
- Migrations run at start under an advisory lock, one transaction each, so several instances
  may start at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg

from gateway.core.errors import StorageUnavailable
from gateway.core.ledger import (
    BudgetRefused,
    Correction,
    Hold,
    LedgerEntry,
    Resolution,
    Settlement,
    Usage,
)
from gateway.core.limits import WINDOW_S, Scope, concurrency_refusal, rate_refusal
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
    Grouping,
    InstanceRow,
    LedgerQuery,
    ReportRow,
    Store,
    StoredOutcome,
    TaskPoll,
    TaskRow,
    UnknownEntry,
    Verification,
)
from gateway.store.common import (
    ENTRY_COLUMNS,
    IMAGES,
    IN_FLIGHT,
    POSITION,
    RESTORE_PREFIX,
    SUMS,
    TASK_SELECT,
    daily_spend_sql,
    hold_params,
    settlement_params,
    to_entry,
    to_position,
    to_task_row,
    verification,
)
from gateway.store.results import ResultIndex, SqlResultIndex

T = TypeVar("T")
log = logging.getLogger("gateway.store")

MIGRATION_LOCK = 0x1A6E_6A7E  # pg_advisory_lock key: one migrating instance at a time
ENTRY_LOCK = 0x1A6E  # pg_advisory_xact_lock(ENTRY_LOCK, hashtext(id)): one decision per entry
LATE_TRIES = 3  # a late decision re-made after another transaction closed the entry first
CONNECT_TIMEOUT_S = 10.0
COMMAND_TIMEOUT_S = 30.0
FETCH_LEASE_S = 30.0  # an instance fetching a task's answer has this long before another may
DEFAULT_LEASE_S = 30.0
UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    # A session the server terminated can leave asyncpg's protocol stuck mid-operation
    # ("cannot switch to state ..."), MagicStack/asyncpg#1069: a dead connection, not a bug here.
    asyncpg.InternalClientError,
)


# SQLSTATE classes meaning "the database cannot be used now", not "this statement is wrong":
# connection exception, insufficient resources (disk full, too many connections), operator
# intervention (shutdown), system error (I/O), object not in prerequisite state (connections
# disallowed).
UNAVAILABLE_CLASSES = frozenset({"08", "53", "57", "58", "55"})


class PostgresOpenError(Exception):
    """The database cannot be reached or used; the message says which and why (no secrets)."""


class PostgresStore(Store):
    """Open with ``await PostgresStore.open(dsn)``; see the module docstring."""

    def __init__(self, pool: asyncpg.Pool, instance_id: str, lease_s: float) -> None:
        self._pool = pool
        self.instance_id = instance_id
        self.lease_s = lease_s
        self.created = False
        self._failures = 0  # times the database could not be used, ever
        self._failures_beaten = 0  # ... as of the last heartbeat that stored its count

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        migrate: bool = True,
        register: bool = True,
        lease_s: float = DEFAULT_LEASE_S,
        max_connections: int = 20,
        name: str | None = None,
    ) -> PostgresStore:
        """Connect, migrate (unless a tool), and register this instance in the fleet (its id
        starts with ``name``, the instance's name in the access log, when given)."""
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=1,
                max_size=max_connections,
                timeout=CONNECT_TIMEOUT_S,
                command_timeout=COMMAND_TIMEOUT_S,
                server_settings={"application_name": "image-gateway"},
                reset=_leaves_no_session_state,
            )
        except (*UNAVAILABLE, asyncpg.PostgresError) as exc:
            raise PostgresOpenError(f"cannot connect to PostgreSQL: {_why(exc)}") from None
        except (ValueError, OverflowError):  # its text may quote the URL: not repeated
            raise PostgresOpenError(
                "the PostgreSQL URL is malformed (asyncpg cannot parse it)"
            ) from None
        try:
            async with pool.acquire() as conn:
                try:
                    was = await _migrate(conn, migrate=migrate)
                except asyncpg.PostgresError as exc:  # e.g. a role without CREATE
                    raise PostgresOpenError(
                        f"cannot prepare the PostgreSQL database: {_why(exc)}"
                    ) from None
            instance_id = f"{name or socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
            store = cls(pool, instance_id, lease_s)
            store.created = was == 0 and migrate
            if register:
                async with store._connection() as conn:
                    await store._beat(conn, 0)
        except BaseException:
            await pool.close()
            raise
        return store

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(StorageUnavailable):  # else the others find it silent
            await self._execute("DELETE FROM instances WHERE instance_id = $1", self.instance_id)
        try:
            await asyncio.wait_for(self._pool.close(), 10)
        except TimeoutError:
            self._pool.terminate()

    async def check_ready(self) -> None:
        await self.heartbeat()

    async def schema_state(self) -> migrations.SchemaState:
        rows = await self._fetch(SCHEMA_META)
        return migrations.state_of({r["key"]: r["value"] for r in rows})

    async def position(self) -> Position:
        async with self._connection() as conn, conn.transaction(isolation="repeatable_read"):
            return to_position(tuple(await conn.fetchrow(POSITION)))

    async def record_restore(self, accepted_at: float, record: str) -> None:
        await self._execute(
            "INSERT INTO meta (key, value) VALUES ($1, $2)"
            " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            f"{RESTORE_PREFIX}{accepted_at:.6f}",
            record,
        )

    async def restores_since(self, since: float) -> list[str]:
        rows = await self._fetch(
            "SELECT key, value FROM meta WHERE key LIKE $1 ORDER BY key", RESTORE_PREFIX + "%"
        )
        prefix = len(RESTORE_PREFIX)
        return [r["value"] for r in rows if float(r["key"][prefix:]) >= since]

    # -- plumbing ----------------------------------------------------------------------------

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection; the database being unreachable is StorageUnavailable, whether
        on connecting (any failure) or during a statement (the server's connection, resource
        and shutdown error classes)."""
        try:
            conn = await self._pool.acquire(timeout=CONNECT_TIMEOUT_S)
        except (*UNAVAILABLE, asyncpg.PostgresError) as exc:
            raise self._unavailable(exc) from None
        try:
            yield conn
        except asyncpg.InternalClientError as exc:
            _discard(conn)  # stuck mid-protocol: the pool's (no-op) reset would not notice
            raise self._unavailable(exc) from None
        except UNAVAILABLE as exc:
            raise self._unavailable(exc) from None
        except asyncpg.PostgresError as exc:
            if str(getattr(exc, "sqlstate", "") or "")[:2] in UNAVAILABLE_CLASSES:
                raise self._unavailable(exc) from None
            raise
        finally:
            # Release waits for a timed-out statement's cancellation to reach the server (so
            # it cannot commit after the caller moved on) and drops a closed connection.
            try:
                await self._pool.release(conn)
            except (*UNAVAILABLE, asyncpg.PostgresError) as exc:
                raise self._unavailable(exc) from None

    def _unavailable(self, exc: BaseException) -> StorageUnavailable:
        self._failures += 1  # this instance was cut off: its view of the fleet starts again
        return _unavailable(exc)

    async def _execute(self, sql: str, *args: Any) -> str:
        async with self._connection() as conn:
            return str(await conn.execute(sql, *args))

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async with self._connection() as conn:
            return list(await conn.fetch(sql, *args))

    async def _in_transaction(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        async with self._connection() as conn, conn.transaction():
            return await work(conn)

    async def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[asyncpg.Record]:
        """For tests, tools and statements written once for both engines: ``?`` placeholders,
        as on SQLite."""
        return await self._fetch(_numbered(sql), *params)

    async def _changed(self, sql: str, params: Sequence[Any] = ()) -> int:
        """A ``?``-placeholder write: the number of rows it changed."""
        done = await self._execute(_numbered(sql), *params)
        return int(done.split()[-1])

    @property
    def results(self) -> ResultIndex:
        return SqlResultIndex(self._changed, self._rows)

    # -- money -------------------------------------------------------------------------------

    async def reserve(self, hold: Hold) -> Usage:
        async with self._connection() as conn:
            try:
                row = await conn.fetchrow(_RESERVE_SQL, *hold_params(hold), self.instance_id)
            except asyncpg.RaiseError as exc:
                message = str(exc)
                if message == "budget_exceeded":
                    raise BudgetRefused(await _usage(conn, hold.team, hold.period)) from None
                if message == "key_budget_exceeded" and hold.key_fp is not None:
                    usage = await _key_usage(conn, hold.team, hold.key_fp, hold.period)
                    raise BudgetRefused(usage, scope="key") from None
                raise
        assert row is not None
        return Usage(row["spent"], row["reserved"], row["uncertain"], row["overrun"])

    async def settle(self, request_id: str, settlement: Settlement, now: float) -> bool:
        async with self._connection() as conn:
            return await _settle(conn, request_id, settlement, now)

    async def resolve(
        self, entry_id: str, decide: Decide, now: float, *, logged: bool
    ) -> LedgerEntry:
        async def resolve(conn: asyncpg.Connection) -> LedgerEntry:
            row = await conn.fetchrow(_ENTRY_BY_ANY_ID, entry_id)
            if row is None:
                raise UnknownEntry(entry_id)
            await _lock_entry(conn, row["request_id"])
            entry = to_entry(await conn.fetchrow(_ENTRY_BY_REQUEST, row["request_id"]))
            await _insert_resolution(conn, entry, decide(entry), now, logged=logged)
            return to_entry(await conn.fetchrow(_ENTRY_BY_REQUEST, entry.request_id))

        try:
            return await self._in_transaction(resolve)
        except asyncpg.UniqueViolationError:  # another instance resolved it meanwhile
            raise NotResolvable(f"{entry_id} was already resolved") from None

    async def expire(
        self, entry_id: str, decide: DecideExpiry, now: float, *, actor: str
    ) -> LedgerEntry:
        """A hold's instance is gone when it has no row in ``instances``, or one silent for the
        lease as the reaper counts silence (or the hold has no instance: copied from SQLite)."""

        async def expire(conn: asyncpg.Connection) -> LedgerEntry:
            row = await conn.fetchrow(_ENTRY_BY_ANY_ID, entry_id)
            if row is None:
                raise UnknownEntry(entry_id)
            entry = to_entry(row)
            gone = await conn.fetchval(
                "SELECT h.instance_id IS NULL OR NOT EXISTS (SELECT 1 FROM instances i"
                "  WHERE i.instance_id = h.instance_id"
                "    AND NOT instance_silent(i.heartbeat_at, $3, $2))"
                " FROM holds h WHERE h.request_id = $1",
                entry.request_id,
                float(self.lease_s),
                self.instance_id,
            )
            if not await _settle(conn, entry.request_id, decide(entry, bool(gone)), now):
                raise ExpiryRefused(f"{entry.request_id} was settled meanwhile")
            await conn.execute(
                "INSERT INTO expiries (request_id, actor, expired_at) VALUES ($1, $2, $3)",
                entry.request_id,
                actor,
                now,
            )
            return to_entry(await conn.fetchrow(_ENTRY_BY_REQUEST, entry.request_id))

        return await self._in_transaction(expire)

    async def settle_late(self, request_id: str, decide: DecideLate, now: float) -> Closed | None:
        return await self._in_transaction(lambda conn: _late(conn, request_id, decide, now))

    async def usage(self, team: str, period: str) -> Usage:
        async with self._connection() as conn:
            return await _usage(conn, team, period)

    async def key_usage(self, team: str, key_fp: str, period: str) -> Usage:
        async with self._connection() as conn:
            return await _key_usage(conn, team, key_fp, period)

    async def entries(self, query: LedgerQuery) -> list[LedgerEntry]:
        clauses, params = [], []
        for column, value, op in (
            ("team", query.team, "="),
            ("state", query.state, "="),
            ("created_at", query.since, ">="),
            ("created_at", query.until, "<"),
        ):
            if value is not None:
                params.append(value)
                clauses.append(f"{column} {op} ${len(params)}")
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        limit = f" LIMIT {int(query.limit)}" if query.limit is not None else ""
        rows = await self._fetch(
            f"SELECT {ENTRY_COLUMNS} FROM ledger{where}"
            f" ORDER BY created_at DESC, request_id DESC{limit}",
            *params,
        )
        return [to_entry(row) for row in rows]

    async def report(
        self,
        team: str,
        *,
        since: float | None,
        until: float | None,
        by: Grouping | None,
        tz: str,
    ) -> list[ReportRow]:
        group = _GROUPS[by] if by is not None else "NULL::text"
        key_id = (
            "(SELECT h.key_id FROM holds h WHERE h.key_fp = ledger.key_fp"
            " ORDER BY h.created_at DESC LIMIT 1)"
            if by == "key"
            else "NULL::text"
        )
        params: list[Any] = [team, -1e18 if since is None else since]
        params += [1e18 if until is None else until] + ([tz] if by == "day" else [])
        rows = await self._fetch(
            f"SELECT {group}, {SUMS}, SUM({IMAGES}), COUNT(*), MAX(created_at), {key_id}"
            " FROM ledger WHERE team = $1 AND created_at >= $2 AND created_at < $3"
            " GROUP BY 1 ORDER BY 1",
            *params,
        )
        return [_report_row(r) for r in rows if r[6]]

    async def key_last_used(self) -> dict[str, float]:
        rows = await self._fetch(
            "SELECT key_fp, MAX(created_at) FROM holds WHERE key_fp IS NOT NULL GROUP BY key_fp"
        )
        return {row[0]: row[1] for row in rows}

    async def find_entry(self, entry_id: str) -> LedgerEntry | None:
        rows = await self._fetch(_ENTRY_BY_ANY_ID, entry_id)
        return to_entry(rows[0]) if rows else None

    async def verify(self) -> Verification:
        async with (  # one snapshot for counters and entries
            self._connection() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            return await verify_on(conn)

    async def daily_spend(self, team: str, bounds: Sequence[float]) -> list[DaySpend]:
        marks = [f"${i}" for i in range(1, len(bounds) + 2)]
        rows = await self._fetch(
            daily_spend_sql([marks[0], *(f"{m}::float8" for m in marks[1:])]), team, *bounds
        )
        return [DaySpend(r[0], r[1], r[2], r[3], int(r[4]), int(r[5] or 0)) for r in rows]

    async def stored_results(self, request_ids: Sequence[str]) -> dict[str, str]:
        if not request_ids:
            return {}
        rows = await self._fetch(
            "SELECT l.request_id, COALESCE(s.result, t.result) FROM ledger l"
            " LEFT JOIN settlements s USING (request_id)"
            " LEFT JOIN tasks t ON t.request_id = l.request_id"
            " WHERE l.request_id = ANY($1::text[])"
            " AND (l.state = 'captured' OR l.corrected_images > 0)",
            list(request_ids),
        )
        return {row[0]: row[1] for row in rows if row[1] is not None}

    async def open_tasks(self, team: str, limit: int) -> list[TaskRow]:
        rows = await self._fetch(
            TASK_SELECT + " WHERE t.team = $1 AND t.status = 'pending'"
            " ORDER BY t.created_at LIMIT $2",
            team,
            limit,
        )
        return [to_task_row(row) for row in rows]

    async def hold_state(self, request_id: str) -> tuple[str, str | None] | None:
        rows = await self._fetch(
            "SELECT l.state, s.result FROM ledger l LEFT JOIN settlements s USING (request_id)"
            " WHERE l.request_id = $1",
            request_id,
        )
        return (rows[0][0], rows[0][1]) if rows else None

    async def recover_in_flight(self, now: float) -> list[LedgerEntry]:
        """Nothing at start: another instance's in-flight holds are its own business until it
        has been silent for its lease (``reap_silent_instances``)."""
        return []

    async def latest_attempt(self, team: str, fingerprint: str, since: float) -> Attempt | None:
        rows = await self._fetch(
            "SELECT l.request_id, l.state, s.result, l.task_id,"
            " EXISTS (SELECT 1 FROM instances i WHERE i.instance_id = h.instance_id"
            "   AND NOT instance_silent(i.heartbeat_at, $4, $5))"
            " FROM ledger l JOIN holds h USING (request_id)"
            " LEFT JOIN settlements s USING (request_id)"
            " WHERE h.team = $1 AND h.fingerprint = $2 AND h.created_at >= $3"
            " ORDER BY h.created_at DESC LIMIT 1",
            team,
            fingerprint,
            since,
            self.instance_id,
            float(self.lease_s),
        )
        if not rows:
            return None
        row = rows[0]
        return Attempt(row[0], row[1], row[2], row[3], live=bool(row[4]))

    async def unlogged_resolutions(self) -> list[LedgerEntry]:
        rows = await self._fetch(
            f"SELECT {ENTRY_COLUMNS} FROM ledger WHERE resolved_state IS NOT NULL"
            " AND request_id NOT IN (SELECT request_id FROM resolution_log) ORDER BY resolved_at"
        )
        return [to_entry(row) for row in rows]

    async def claim_resolution_log(self, request_id: str, now: float) -> bool:
        status = await self._execute(
            "INSERT INTO resolution_log (request_id, logged_at) VALUES ($1, $2)"
            " ON CONFLICT DO NOTHING",
            request_id,
            now,
        )
        return status == "INSERT 0 1"

    async def unlogged_expiries(self) -> list[Expiry]:
        rows = await self._fetch(
            f"SELECT {ENTRY_COLUMNS}, e.actor FROM ledger JOIN expiries e USING (request_id)"
            " WHERE e.logged_at IS NULL ORDER BY e.expired_at"
        )
        return [Expiry(to_entry(tuple(row)[:-1]), row[-1]) for row in rows]

    async def claim_expiry_log(self, request_id: str, now: float) -> bool:
        status = await self._execute(
            "UPDATE expiries SET logged_at = $1 WHERE request_id = $2 AND logged_at IS NULL",
            now,
            request_id,
        )
        return status == "UPDATE 1"

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
        async with self._connection() as conn:
            await _insert_task(
                conn, task_id, team, request_id, now, "pending", None, first_poll_at, upstream,
                unit_price,
            )  # fmt: skip

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
        async def record(conn: asyncpg.Connection) -> Closed | None:
            await _insert_task(
                conn, task_id, team, request_id, created_at, "completed", result, NEVER,
                settlement.upstream, settlement.unit_price,
            )  # fmt: skip
            return await _close(conn, request_id, settlement, late, now)

        return await self._in_transaction(record)

    async def task(self, task_id: str) -> TaskRow | None:
        rows = await self._fetch(TASK_SELECT + " WHERE t.task_id = $1", task_id)
        return to_task_row(rows[0]) if rows else None

    async def due_tasks(self, now: float, limit: int) -> list[TaskRow]:
        """Claimed by this instance for one lease: another settler skips them meanwhile."""

        async def claim(conn: asyncpg.Connection) -> list[TaskRow]:
            ids = await conn.fetch(
                "SELECT task_id FROM tasks WHERE status = 'pending' AND next_poll_at <= $1"
                " ORDER BY next_poll_at LIMIT $2 FOR UPDATE SKIP LOCKED",
                now,
                limit,
            )
            if not ids:
                return []
            task_ids = [row[0] for row in ids]
            await conn.execute(
                "UPDATE tasks SET next_poll_at = $1 WHERE task_id = ANY($2::text[])",
                now + self.lease_s,
                task_ids,
            )
            rows = await conn.fetch(TASK_SELECT + " WHERE t.task_id = ANY($1::text[])", task_ids)
            return sorted(
                (to_task_row(row) for row in rows), key=lambda r: task_ids.index(r.task_id)
            )

        return await self._in_transaction(claim)

    async def next_task_due(self) -> float | None:
        rows = await self._fetch("SELECT MIN(next_poll_at) FROM tasks WHERE status = 'pending'")
        return rows[0][0]

    async def unsettled_task_count(self) -> int:
        rows = await self._fetch(
            "SELECT COUNT(*) FROM tasks t LEFT JOIN settlements s USING (request_id)"
            " WHERE s.request_id IS NULL"
        )
        return int(rows[0][0])

    async def reschedule_task(self, task_id: str, next_poll_at: float) -> None:
        await self._execute(
            "UPDATE tasks SET polls = polls + 1, next_poll_at = $1 WHERE task_id = $2",
            next_poll_at,
            task_id,
        )

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
        async def finish(conn: asyncpg.Connection) -> Closed | None:
            done = await conn.execute(
                "UPDATE tasks SET status = $1, result = $2, polls = polls + 1"
                " WHERE task_id = $3 AND status = 'pending'",
                status,
                result,
                row.task_id,
            )
            if done != "UPDATE 1":
                return None  # another poll or instance finished it first
            return await _close(conn, row.request_id, settlement, late, now)

        return await self._in_transaction(finish)

    async def claim_task_poll(self, task_id: str, now: float, ttl_s: float) -> TaskPoll:
        rows = await self._fetch(
            "UPDATE tasks SET fetching_until = $2 WHERE task_id = $1 AND status = 'pending'"
            " AND (fetching_until IS NULL OR fetching_until < $3)"
            " AND (answered_at IS NULL OR answered_at < $4) RETURNING task_id",
            task_id,
            now + FETCH_LEASE_S,
            now,
            now - ttl_s,
        )
        if rows:
            return TaskPoll(claimed=True)
        cached = await self._fetch(
            "SELECT CASE WHEN status = 'pending' THEN answer ELSE result END, answered_at,"
            " status FROM tasks WHERE task_id = $1",
            task_id,
        )
        if (
            cached
            and cached[0][0] is not None
            and (cached[0][2] != "pending" or (cached[0][1] or 0) >= now - ttl_s)
        ):
            return TaskPoll(claimed=False, answer=cached[0][0])
        return TaskPoll(claimed=False)

    async def store_task_answer(self, task_id: str, answer: str, now: float) -> None:
        await self._execute(
            "UPDATE tasks SET answer = $2, answered_at = $3, fetching_until = NULL"
            " WHERE task_id = $1",
            task_id,
            answer,
            now,
        )

    async def task_answer_since(self, task_id: str, since: float) -> str | None:
        rows = await self._fetch(
            "SELECT CASE WHEN status = 'pending' THEN answer ELSE result END, answered_at,"
            " status FROM tasks WHERE task_id = $1",
            task_id,
        )
        if not rows or rows[0][0] is None:
            return None
        answer, answered_at, status = rows[0]
        return answer if status != "pending" or (answered_at or 0) >= since else None

    # -- the fleet ---------------------------------------------------------------------------

    async def heartbeat(self) -> None:
        failures = self._failures
        async with self._connection() as conn:
            again = await self._beat(conn, failures)
        self._failures_beaten = failures  # committed
        if again:
            log.error(
                "this instance (%s) was silent past its lease and the fleet took it for dead "
                "(its in-flight holds were made uncertain); registered again",
                self.instance_id,
            )

    async def _beat(self, conn: asyncpg.Connection, failures: int) -> bool:
        """One heartbeat; True if the instance had to be registered again. After a failure to
        reach the database (``failures`` counts them; the caller records it as told once its
        transaction commits), it tells the database that this instance's view of the fleet
        starts again (``reachable_since``)."""
        again = await conn.fetchval(
            "SELECT instance_heartbeat($1, $2, $3, $4, $5)",
            self.instance_id,
            socket.gethostname(),
            os.getpid(),
            float(self.lease_s),
            failures != self._failures_beaten,
        )
        return bool(again)

    async def instances(self) -> list[InstanceRow]:
        rows = await self._fetch(
            "SELECT instance_id, host, pid, extract(epoch FROM started_at)::float8,"
            " extract(epoch FROM heartbeat_at)::float8 FROM instances ORDER BY started_at"
        )
        return [InstanceRow(*row) for row in rows]

    async def reap_silent_instances(self, now: float, lease_s: float) -> list[LedgerEntry]:
        failures = self._failures

        async def reap(conn: asyncpg.Connection) -> list[LedgerEntry]:
            await self._beat(conn, failures)  # its own view first: cut off, it judges nobody
            silent = await conn.fetch(
                "DELETE FROM instances WHERE instance_id <> $2"
                " AND instance_silent(heartbeat_at, $2, $1) RETURNING instance_id",
                float(lease_s),
                self.instance_id,
            )
            gone = [row[0] for row in silent]
            left = await conn.fetch(  # theirs, and any whose instance is gone without a trace
                "SELECT h.request_id, h.amount FROM holds h"
                " LEFT JOIN settlements s USING (request_id)"
                " LEFT JOIN tasks t ON t.request_id = h.request_id"
                f" WHERE s.request_id IS NULL AND {IN_FLIGHT}"
                " AND h.instance_id IS DISTINCT FROM $1 AND (h.instance_id IS NULL"
                " OR h.instance_id NOT IN (SELECT instance_id FROM instances))"
                " ORDER BY h.created_at",
                self.instance_id,
            )
            if not left and not gone:
                return []
            turned = []  # a hold its own instance settled meanwhile is not reported again
            for request_id, amount in left:
                if await _settle(conn, request_id, recovered(amount), now):
                    turned.append(to_entry(await conn.fetchrow(_ENTRY_BY_REQUEST, request_id)))
            await conn.execute(
                "DELETE FROM admissions"
                " WHERE instance_id NOT IN (SELECT instance_id FROM instances)"
            )
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

        reaped = await self._in_transaction(reap)
        self._failures_beaten = failures  # committed
        return reaped

    async def admit(self, request_id: str, scopes: list[Scope], now: float) -> None:
        """Exact fleet-wide: each scope's check and count happen under its advisory lock."""

        async def admit(conn: asyncpg.Connection) -> None:
            for scope in sorted(scopes, key=lambda s: s.id):  # one lock order: no deadlock
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", scope.id)
            for scope in scopes:
                if scope.max_concurrent is not None:
                    running = await conn.fetchval(
                        "SELECT COUNT(*) FROM admissions WHERE scope = $1", scope.id
                    )
                    if running >= scope.max_concurrent:
                        raise concurrency_refusal(scope)
                if scope.rpm is not None:
                    recent = await conn.fetch(
                        "SELECT at FROM rate_events WHERE scope = $1 AND at > $2 ORDER BY at",
                        scope.id,
                        now - WINDOW_S,
                    )
                    if len(recent) >= scope.rpm:
                        raise rate_refusal(scope, recent[0][0], now)
            for scope in scopes:
                if scope.max_concurrent is not None:
                    await conn.execute(
                        "INSERT INTO admissions (request_id, scope, instance_id)"
                        " VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                        request_id,
                        scope.id,
                        self.instance_id,
                    )
                if scope.rpm is not None:
                    await conn.execute(
                        "INSERT INTO rate_events (scope, at) VALUES ($1, $2)", scope.id, now
                    )
                    await conn.execute(
                        "DELETE FROM rate_events WHERE scope = $1 AND at <= $2",
                        scope.id,
                        now - WINDOW_S,
                    )

        await self._in_transaction(admit)

    async def release(self, request_id: str, scopes: list[Scope]) -> None:
        await self._execute("DELETE FROM admissions WHERE request_id = $1", request_id)

    # -- idempotency -------------------------------------------------------------------------

    async def claim_idempotency_key(
        self, team: str, key: str, *, fingerprint: str, request_id: str, now: float, keep_s: float
    ) -> StoredOutcome | None:
        async def claim(conn: asyncpg.Connection) -> StoredOutcome | None:
            await conn.execute(
                "DELETE FROM idempotency WHERE team = $1 AND key = $2 AND created_at < $3",
                team,
                key,
                now - keep_s,
            )
            while True:  # the holder may release its claim between our two statements
                inserted = await conn.execute(
                    "INSERT INTO idempotency (team, key, fingerprint, request_id, created_at,"
                    " instance_id) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                    team,
                    key,
                    fingerprint,
                    request_id,
                    now,
                    self.instance_id,
                )
                if inserted == "INSERT 0 1":
                    return None
                row = await conn.fetchrow(
                    "SELECT fingerprint, request_id, status, body, headers,"
                    " EXISTS (SELECT 1 FROM instances i WHERE i.instance_id = d.instance_id"
                    "   AND i.instance_id <> $3 AND NOT instance_silent(i.heartbeat_at, $3, $4))"
                    " FROM idempotency d WHERE team = $1 AND key = $2",
                    team,
                    key,
                    self.instance_id,
                    float(self.lease_s),
                )
                if row is not None:
                    return StoredOutcome(
                        row[0], row[1], row[2], row[3], json.loads(row[4] or "{}"),
                        live=bool(row[5]),
                    )  # fmt: skip

        return await self._in_transaction(claim)

    async def store_idempotent_outcome(
        self, team: str, key: str, status: int, body: str, headers: dict[str, str]
    ) -> None:
        await self._execute(
            "UPDATE idempotency SET status = $1, body = $2, headers = $3"
            " WHERE team = $4 AND key = $5",
            status,
            body,
            json.dumps(headers),
            team,
            key,
        )

    async def release_idempotency_key(self, team: str, key: str) -> None:
        await self._execute(
            "DELETE FROM idempotency WHERE team = $1 AND key = $2 AND status IS NULL", team, key
        )

    async def purge_idempotency(self, before: float) -> int:
        done = await self._execute("DELETE FROM idempotency WHERE created_at < $1", before)
        return int(done.split()[-1])


def _numbered(sql: str) -> str:
    parts = sql.split("?")
    return parts[0] + "".join(f"${i}{part}" for i, part in enumerate(parts[1:], 1))


def _discard(conn: asyncpg.Connection) -> None:
    """Never hand this connection out again. Only for a stuck protocol: terminating a
    connection whose statement timed out would cancel asyncpg's pending cancel request, and
    the statement could still commit. One asyncpg already detached says so (InterfaceError)."""
    with contextlib.suppress(asyncpg.InterfaceError):
        conn.terminate()


async def _leaves_no_session_state(conn: asyncpg.Connection) -> None:
    """The pool's reset of a released connection, after asyncpg's own rollback of any open
    transaction (which always runs first): nothing more.

    asyncpg's default would send ``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL`` on every release: one more round trip and transaction per statement, twice per
    request (reservation and settlement). This store leaves no session state to undo: settings
    are ``SET LOCAL``, cursors live inside transactions, nothing LISTENs, and the one
    session-level advisory lock (migrations) is released in a ``finally`` on a connection
    whose pool is closed if that fails. That query also probed the connection: one left stuck
    mid-protocol is now terminated by ``_connection`` instead, so it is never handed out again.
    """


async def verify_on(conn: asyncpg.Connection) -> Verification:
    """Every counter against its entries, on this connection (and in its transaction)."""
    rows = await conn.fetch(
        "SELECT 'stored', team, period, spent, reserved, uncertain, overrun FROM usage"
        f" UNION ALL SELECT 'summed', team, period, {SUMS} FROM ledger GROUP BY team, period"
        " UNION ALL SELECT 'key stored', team || ' ' || key_fp, period, spent, reserved,"
        " uncertain, overrun FROM key_usage"
        f" UNION ALL SELECT 'key summed', team || ' ' || key_fp, period, {SUMS} FROM ledger"
        " WHERE key_fp IS NOT NULL GROUP BY team, key_fp, period"
        " UNION ALL SELECT 'count', '', '', COUNT(*), 0, 0, 0 FROM holds"
    )
    return verification([(r[0], r[1], r[2], *(int(v) for v in r[3:])) for r in rows])


# -- migrations ------------------------------------------------------------------------------


async def _migrate(conn: asyncpg.Connection, *, migrate: bool) -> int:
    """Migrate to this code's schema under the advisory lock; the step it was at."""
    steps = migrations.load("postgres")
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        current = was = await _schema_state(conn)
        if not migrate:
            migrations.require_current(current, steps, where="the PostgreSQL database")
            return was.step
        for step in migrations.pending(current, steps, where="the PostgreSQL database"):
            records = migrations.records_after(step, steps, current)
            async with conn.transaction():
                await conn.execute(step.sql)
                await conn.executemany(
                    "INSERT INTO meta (key, value) VALUES ($1, $2)"
                    " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                    list(records.items()),
                )
            current = migrations.state_of(records)
            log.info("database migrated to schema step %d (%s)", step.version, step.name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    return was.step


async def _schema_state(conn: asyncpg.Connection) -> migrations.SchemaState:
    exists = await conn.fetchval("SELECT to_regclass('public.meta') IS NOT NULL")
    if not exists:
        tables = await conn.fetchval(
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = 'public'"
        )
        if tables:
            raise PostgresOpenError(
                "the PostgreSQL database has tables but is not an image-gateway database"
            )
        return migrations.SchemaState(0, 0)
    return migrations.state_of({r["key"]: r["value"] for r in await conn.fetch(SCHEMA_META)})


# -- statements ------------------------------------------------------------------------------

SCHEMA_META = (
    "SELECT key, value FROM meta WHERE key IN ('schema_version', 'schema_step', 'min_release')"
)

_RESERVE_SQL = (
    "SELECT * FROM reserve_hold($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14,"
    " $15, $16, $17)"
)
_SETTLE_SQL = (
    "INSERT INTO settlements (request_id, state, amount, overrun, images, upstream_id, reason,"
    " result, settled_at, upstream, unit_price) SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10,"
    " $11 WHERE EXISTS (SELECT 1 FROM holds WHERE request_id = $1)"
    " ON CONFLICT (request_id) DO NOTHING"
)
_ENTRY_BY_REQUEST = f"SELECT {ENTRY_COLUMNS} FROM ledger WHERE request_id = $1"
_ENTRY_BY_ANY_ID = (
    f"SELECT {ENTRY_COLUMNS} FROM ledger WHERE request_id = $1 OR upstream_id = $1"
    " OR task_id = $1 ORDER BY created_at LIMIT 1"
)
_GROUPS = {
    "key": "key_fp",
    "end_user": "end_user",
    "quality": "quality",
    "day": "to_char(to_timestamp(created_at) AT TIME ZONE $4, 'YYYY-MM-DD')",
    "upstream": "upstream",
}


async def _usage(conn: asyncpg.Connection, team: str, period: str) -> Usage:
    row = await conn.fetchrow(
        "SELECT spent, reserved, uncertain, overrun FROM usage WHERE team = $1 AND period = $2",
        team,
        period,
    )
    return Usage(*row) if row else Usage()


async def _key_usage(conn: asyncpg.Connection, team: str, key_fp: str, period: str) -> Usage:
    row = await conn.fetchrow(
        "SELECT spent, reserved, uncertain, overrun FROM key_usage"
        " WHERE team = $1 AND key_fp = $2 AND period = $3",
        team,
        key_fp,
        period,
    )
    return Usage(*row) if row else Usage()


async def _settle(conn: asyncpg.Connection, request_id: str, s: Settlement, now: float) -> bool:
    done = await conn.execute(_SETTLE_SQL, *settlement_params(request_id, s, now))
    return bool(done == "INSERT 0 1")


async def _insert_resolution(
    conn: asyncpg.Connection,
    entry: LedgerEntry,
    resolution: Resolution,
    now: float,
    *,
    logged: bool,
) -> None:
    await conn.execute(
        "INSERT INTO resolutions (request_id, state, images, amount, overrun, reason, actor,"
        " upstream_id, resolved_at, upstream) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        entry.request_id, resolution.state, resolution.images, resolution.amount,
        resolution.overrun, resolution.reason, resolution.actor, resolution.upstream_id, now,
        resolution.upstream,
    )  # fmt: skip
    if logged:
        await conn.execute(
            "INSERT INTO resolution_log (request_id, logged_at) VALUES ($1, $2)",
            entry.request_id,
            now,
        )


async def _insert_task(conn: asyncpg.Connection, task_id: str, *values: Any) -> None:
    """``values``: team, request_id, created_at, status, result, next_poll_at, upstream,
    unit_price."""
    try:
        await conn.execute(
            "INSERT INTO tasks (task_id, team, request_id, created_at, status, result,"
            " next_poll_at, upstream, unit_price) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            task_id,
            *values,
        )
    except asyncpg.UniqueViolationError as exc:  # its DETAIL names the whole id: not logged
        if exc.constraint_name == "tasks_pkey":
            raise DuplicateTask from None
        raise


async def _close(
    conn: asyncpg.Connection, request_id: str, settlement: Settlement, late: DecideLate, now: float
) -> Closed | None:
    """Settle the hold, or, if it was closed before (by a statement that may have committed
    while this one waited on its key), apply the late decision."""
    if await _settle(conn, request_id, settlement, now):
        return Closed(to_entry(await conn.fetchrow(_ENTRY_BY_REQUEST, request_id)))
    return await _late(conn, request_id, late, now)


async def _late(
    conn: asyncpg.Connection, request_id: str, decide: DecideLate, now: float
) -> Closed | None:
    """Apply what ``decide`` makes of the entry as committed now. Under the entry's lock, so an
    admin's resolution through this code cannot interleave; one written past it (by hand, or
    an older release) fails the insert, and the decision is made again on what it left."""
    await _lock_entry(conn, request_id)
    for _ in range(LATE_TRIES):
        row = await conn.fetchrow(_ENTRY_BY_REQUEST, request_id)
        if row is None:
            return None
        entry = to_entry(row)
        decision = decide(entry)
        try:
            async with conn.transaction():  # a savepoint: what came before is kept
                if isinstance(decision, Resolve):
                    await _insert_resolution(conn, entry, decision.resolution, now, logged=True)
                elif isinstance(decision, Correct):
                    await _insert_correction(conn, request_id, decision.correction, now)
        except asyncpg.UniqueViolationError:
            continue  # resolved by someone else meanwhile: decide on what it is now
        return Closed(to_entry(await conn.fetchrow(_ENTRY_BY_REQUEST, request_id)), decision)
    raise StorageUnavailable(f"the ledger entry {request_id} kept changing; retried")


async def _lock_entry(conn: asyncpg.Connection, request_id: str) -> None:
    """Serialize every decision about one entry (resolutions, late outcomes) until commit."""
    await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", ENTRY_LOCK, request_id)


async def _insert_correction(
    conn: asyncpg.Connection, request_id: str, correction: Correction, now: float
) -> None:
    await conn.execute(
        "INSERT INTO corrections (request_id, images, amount, reason, upstream_id, corrected_at,"
        " upstream) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        request_id, correction.images, correction.amount, correction.reason,
        correction.upstream_id, now, correction.upstream,
    )  # fmt: skip


def _report_row(r: asyncpg.Record) -> ReportRow:
    """PostgreSQL sums bigints as numeric: back to integers."""
    spent, reserved, uncertain, overrun, images, requests = (int(r[i] or 0) for i in range(1, 7))
    return ReportRow(r[0], spent, reserved, uncertain, overrun, images, requests, r[7], r[8])


def _unavailable(exc: BaseException) -> StorageUnavailable:
    log.error("PostgreSQL cannot be used: %s", _why(exc))
    return StorageUnavailable(
        "The gateway's database cannot be reached right now; nothing was sent or charged. "
        "An administrator must bring PostgreSQL back."
    )


def _why(exc: BaseException) -> str:
    """What went wrong, without the DSN (which may hold a password)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc) or type(exc).__name__
    return text if "postgres://" not in text and "postgresql://" not in text else type(exc).__name__
