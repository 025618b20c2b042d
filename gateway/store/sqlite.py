"""The SQLite engine: one file, one gateway process, money rules enforced by the schema.

- Inserting a hold *is* the reservation: a trigger checks ``spent + reserved + uncertain +
  amount <= budget`` and moves the amount into ``reserved`` inside the same statement. Every write
  runs on one connection in one thread (``sqlite_writer.Writer``), inside IMMEDIATE
  transactions, so no two reservations can see the same headroom.
- ``holds``, ``settlements`` and ``resolutions`` are append-only; a request settles at most once
  and an uncertain settlement is resolved at most once (primary keys), each capped by its hold.
- WAL mode with ``synchronous=FULL``: a write returns once its transaction is on disk.
- The process holds an exclusive ``flock`` on the database file: a second gateway on the same
  file is refused (its start-up recovery would mark the first one's live requests uncertain).
  Tools (``usage``, ``ledger``) open it without that lock.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import aiosqlite

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
from gateway.core.limits import Limiter, Scope
from gateway.core.restore import Position
from gateway.core.settlement import Correct, ExpiryRefused, Resolve, recovered
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
from gateway.store.sqlite_writer import Writer

T = TypeVar("T")
log = logging.getLogger("gateway.store")

ERROR_LOG_EVERY_S = 10.0


class StoreLocked(Exception):
    """Another gateway process has this database open."""


class StoreOpenError(Exception):
    """The database cannot be opened; the message names the file and why."""


class SQLiteStore(Store):
    """Open with ``await SQLiteStore.open(path)``; see the module docstring."""

    def __init__(
        self,
        path: Path,
        writer: Writer | None,
        reader: aiosqlite.Connection,
        *,
        lock_fd: int | None = None,
        created: bool = False,
    ) -> None:
        self.path = path
        self.created = created  # this process made a new, empty ledger
        self.closed = False
        self._writer = writer
        self._reader = reader
        self._lock_fd = lock_fd
        self._identity = _fd_identity(lock_fd) if lock_fd is not None else None
        self._wal_identity = _identity(_wal(path))
        self._last_error_log = 0.0
        self._local_day = False
        self._limiter = Limiter()
        self._opened_at = time.time()

    @classmethod
    async def open(cls, path: Path, *, exclusive: bool = True, migrate: bool = True) -> SQLiteStore:
        """The gateway's own connection: migrated, and locked against a second process.

        ``exclusive=False, migrate=False`` is for admin tools writing beside a running gateway:
        they need the schema to be current already.
        """
        path = path.absolute()  # noqa: ASYNC240 - getcwd, no disk I/O worth a thread
        created = not path.exists()
        lock_fd = _lock(path) if exclusive else None
        try:
            writer = await _open_writer(path, migrate=migrate)
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        try:
            reader = await aiosqlite.connect(f"{path.as_uri()}?mode=ro", uri=True)
            await reader.execute("PRAGMA busy_timeout=10000")
        except BaseException:
            await writer.close()
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        return cls(path, writer, reader, lock_fd=lock_fd, created=created)

    @classmethod
    async def open_read_only(cls, path: Path) -> SQLiteStore:
        """For reports: never creates or changes a file, whoever runs it.

        With no ``-wal`` file there is no gateway writing, so the file is opened ``immutable``
        and SQLite creates no ``-wal``/``-shm`` files (which, made by root, would lock the
        service's own user out at its next start).
        """
        path = path.absolute()  # noqa: ASYNC240 - getcwd, no disk I/O worth a thread
        try:
            reader = await aiosqlite.connect(_read_only_uri(path), uri=True)
        except sqlite3.DatabaseError as exc:
            raise StoreOpenError(f"{path}: cannot read the database ({exc})") from None
        try:  # refused here, the reader's thread must still end, or the process never exits
            state = await _read_schema_state(reader, path)
            migrations.require_current(state, migrations.load("sqlite"), where=str(path))
        except BaseException:
            await reader.close()
            raise
        return cls(path, None, reader)

    async def close(self) -> None:
        self.closed = True
        await self._reader.close()
        if self._writer is not None:
            await self._writer.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def check_ready(self) -> None:
        await self._run(
            lambda conn: conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('ready_probe', ?)",
                (str(time.time()),),
            )
        )
        if self._identity is not None and _identity(self.path) != self._identity:
            raise StorageUnavailable(
                f"the database file {self.path} is not the one this process has open "
                "(deleted or replaced while running); restart after restoring it"
            )
        if self._lock_fd is None:
            return
        if self._wal_identity is None:  # no -wal existed at open: the first write made it
            self._wal_identity = _identity(_wal(self.path))
        elif _identity(_wal(self.path)) != self._wal_identity:
            raise StorageUnavailable(
                f"the write-ahead log {_wal(self.path)} was removed or replaced while running; "
                "restart the gateway (committed money may be missing from the file)"
            )

    async def schema_state(self) -> migrations.SchemaState:
        return migrations.state_of(dict(await self._rows(_SCHEMA_META)))

    async def position(self) -> Position:
        return to_position((await self._rows(POSITION))[0])

    async def record_restore(self, accepted_at: float, record: str) -> None:
        await self._write(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            (f"{RESTORE_PREFIX}{accepted_at:.6f}", record),
        )

    async def restores_since(self, since: float) -> list[str]:
        rows = await self._rows(
            "SELECT key, value FROM meta WHERE key LIKE ? ORDER BY key", (RESTORE_PREFIX + "%",)
        )
        return [value for key, value in rows if float(key.removeprefix(RESTORE_PREFIX)) >= since]

    @property
    def results(self) -> ResultIndex:
        return SqlResultIndex(self._write, self._rows)

    # -- plumbing ----------------------------------------------------------------------------

    async def _run(
        self, operation: Callable[[sqlite3.Connection], T], *, atomic: bool = False
    ) -> T:
        if self._writer is None:
            raise sqlite3.ProgrammingError("this database was opened read-only")
        try:
            return await self._writer.run(operation, atomic=atomic)
        except sqlite3.IntegrityError:
            raise
        except sqlite3.DatabaseError as exc:
            raise self._unavailable(exc) from None

    async def _write(self, sql: str, params: Iterable[Any] = ()) -> int:
        values = tuple(params)
        return await self._run(lambda conn: conn.execute(sql, values).rowcount)

    async def _rows(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        try:
            # One step in the reader's thread: a statement left open between two steps would
            # hold its snapshot for a concurrent read too (the storage watch reads while
            # requests do), and that read would miss a commit made in between.
            return list(await self._reader.execute_fetchall(sql, tuple(params)))
        except sqlite3.DatabaseError as exc:
            raise self._unavailable(exc) from None

    def _unavailable(self, exc: sqlite3.DatabaseError) -> StorageUnavailable:
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_EVERY_S:  # a full disk fails every request
            self._last_error_log = now
            log.error("database %s cannot be used: %s", self.path, exc)
        return StorageUnavailable(
            f"The gateway's database cannot be written right now ({exc}); nothing was sent or "
            "charged. An administrator must free disk space or restore the database."
        )

    # -- money -------------------------------------------------------------------------------

    async def reserve(self, hold: Hold) -> Usage:
        def reserve(conn: sqlite3.Connection) -> Usage:
            try:
                conn.execute(_RESERVE_SQL, hold_params(hold))
            except sqlite3.IntegrityError as exc:
                if str(exc) == "budget_exceeded":
                    raise BudgetRefused(_usage(conn, hold.team, hold.period)) from None
                if str(exc) == "key_budget_exceeded" and hold.key_fp is not None:
                    usage = _key_usage(conn, hold.team, hold.key_fp, hold.period)
                    raise BudgetRefused(usage, scope="key") from None
                raise
            return _usage(conn, hold.team, hold.period)

        return await self._run(reserve)

    async def settle(self, request_id: str, settlement: Settlement, now: float) -> bool:
        return await self._run(lambda conn: _settle(conn, request_id, settlement, now))

    async def resolve(
        self, entry_id: str, decide: Decide, now: float, *, logged: bool
    ) -> LedgerEntry:
        def resolve(conn: sqlite3.Connection) -> LedgerEntry:
            rows = conn.execute(_ENTRY_BY_ANY_ID, (entry_id,) * 3).fetchall()
            if not rows:
                raise UnknownEntry(entry_id)
            entry = to_entry(rows[0])
            _insert_resolution(conn, entry, decide(entry), now, logged=logged)
            return to_entry(conn.execute(_ENTRY_BY_REQUEST, (entry.request_id,)).fetchone())

        return await self._run(resolve, atomic=True)

    async def expire(
        self, entry_id: str, decide: DecideExpiry, now: float, *, actor: str
    ) -> LedgerEntry:
        """One process per file: a hold's gateway is never known to be gone here (a start
        turns whatever its last run left in flight uncertain by itself)."""

        def expire(conn: sqlite3.Connection) -> LedgerEntry:
            rows = conn.execute(_ENTRY_BY_ANY_ID, (entry_id,) * 3).fetchall()
            if not rows:
                raise UnknownEntry(entry_id)
            entry = to_entry(rows[0])
            if not _settle(conn, entry.request_id, decide(entry, False), now):
                raise ExpiryRefused(f"{entry.request_id} was settled meanwhile")
            conn.execute(
                "INSERT INTO expiries (request_id, actor, expired_at) VALUES (?, ?, ?)",
                (entry.request_id, actor, now),
            )
            return to_entry(conn.execute(_ENTRY_BY_REQUEST, (entry.request_id,)).fetchone())

        return await self._run(expire, atomic=True)

    async def settle_late(self, request_id: str, decide: DecideLate, now: float) -> Closed | None:
        return await self._run(lambda conn: _late(conn, request_id, decide, now), atomic=True)

    async def usage(self, team: str, period: str) -> Usage:
        rows = await self._rows(
            "SELECT spent, reserved, uncertain, overrun FROM usage WHERE team = ? AND period = ?",
            (team, period),
        )
        return Usage(*rows[0]) if rows else Usage()

    async def entries(self, query: LedgerQuery) -> list[LedgerEntry]:
        clauses, params = [], []
        for column, value, op in (
            ("team", query.team, "="),
            ("state", query.state, "="),
            ("created_at", query.since, ">="),
            ("created_at", query.until, "<"),
        ):
            if value is not None:
                clauses.append(f"{column} {op} ?")
                params.append(value)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        limit = f" LIMIT {int(query.limit)}" if query.limit is not None else ""
        rows = await self._rows(
            f"SELECT {ENTRY_COLUMNS} FROM ledger{where}"
            f" ORDER BY created_at DESC, request_id DESC{limit}",
            params,
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
        await self._local_day_function()
        group = _GROUPS[by] if by is not None else "NULL"
        key_id = (
            "(SELECT h.key_id FROM holds h WHERE h.key_fp = ledger.key_fp"
            " ORDER BY h.created_at DESC LIMIT 1)"
            if by == "key"
            else "NULL"
        )
        params: list[Any] = [tz] if by == "day" else []
        params += [team, -1e18 if since is None else since, 1e18 if until is None else until]
        rows = await self._rows(
            f"SELECT {group}, {SUMS}, SUM({IMAGES}), COUNT(*), MAX(created_at), {key_id}"
            " FROM ledger WHERE team = ? AND created_at >= ? AND created_at < ?"
            " GROUP BY 1 ORDER BY 1",
            params,
        )
        return [ReportRow(*row) for row in rows if row[6]]

    async def key_last_used(self) -> dict[str, float]:
        rows = await self._rows(
            "SELECT key_fp, MAX(created_at) FROM holds WHERE key_fp IS NOT NULL GROUP BY key_fp"
        )
        return dict(rows)

    async def key_usage(self, team: str, key_fp: str, period: str) -> Usage:
        rows = await self._rows(
            "SELECT spent, reserved, uncertain, overrun FROM key_usage"
            " WHERE team = ? AND key_fp = ? AND period = ?",
            (team, key_fp, period),
        )
        return Usage(*rows[0]) if rows else Usage()

    async def _local_day_function(self) -> None:
        if not self._local_day:
            await self._reader.create_function("local_day", 2, _local_day, deterministic=True)
            self._local_day = True

    async def find_entry(self, entry_id: str) -> LedgerEntry | None:
        rows = await self._rows(_ENTRY_BY_ANY_ID, (entry_id,) * 3)
        return to_entry(rows[0]) if rows else None

    async def verify(self) -> Verification:
        # One statement, so counters and entries are read from the same snapshot.
        rows = await self._rows(
            "SELECT 'stored', team, period, spent, reserved, uncertain, overrun FROM usage"
            f" UNION ALL SELECT 'summed', team, period, {SUMS} FROM ledger GROUP BY team, period"
            " UNION ALL SELECT 'key stored', team || ' ' || key_fp, period, spent, reserved,"
            " uncertain, overrun FROM key_usage"
            f" UNION ALL SELECT 'key summed', team || ' ' || key_fp, period, {SUMS} FROM ledger"
            " WHERE key_fp IS NOT NULL GROUP BY team, key_fp, period"
            " UNION ALL SELECT 'count', '', '', COUNT(*), 0, 0, 0 FROM holds"
        )
        return verification(rows)

    async def daily_spend(self, team: str, bounds: Sequence[float]) -> list[DaySpend]:
        marks = [f"?{i}" for i in range(1, len(bounds) + 2)]
        rows = await self._rows(daily_spend_sql(marks), (team, *bounds))
        return [DaySpend(*row) for row in rows]

    async def stored_results(self, request_ids: Sequence[str]) -> dict[str, str]:
        if not request_ids:
            return {}
        marks = ", ".join("?" * len(request_ids))
        rows = await self._rows(
            "SELECT l.request_id, COALESCE(s.result, t.result) FROM ledger l"
            " LEFT JOIN settlements s USING (request_id)"
            " LEFT JOIN tasks t ON t.request_id = l.request_id"
            f" WHERE l.request_id IN ({marks})"
            " AND (l.state = 'captured' OR l.corrected_images > 0)",
            tuple(request_ids),
        )
        return {request_id: result for request_id, result in rows if result is not None}

    async def open_tasks(self, team: str, limit: int) -> list[TaskRow]:
        rows = await self._rows(
            TASK_SELECT + " WHERE t.team = ? AND t.status = 'pending'"
            " ORDER BY t.created_at LIMIT ?",
            (team, limit),
        )
        return [to_task_row(row) for row in rows]

    async def hold_state(self, request_id: str) -> tuple[str, str | None] | None:
        rows = await self._rows(
            "SELECT l.state, s.result FROM ledger l LEFT JOIN settlements s USING (request_id)"
            " WHERE l.request_id = ?",
            (request_id,),
        )
        return (rows[0][0], rows[0][1]) if rows else None

    async def recover_in_flight(self, now: float) -> list[LedgerEntry]:
        def recover(conn: sqlite3.Connection) -> list[LedgerEntry]:
            left = conn.execute(
                "SELECT h.request_id, h.amount FROM holds h"
                " LEFT JOIN settlements s USING (request_id)"
                " LEFT JOIN tasks t ON t.request_id = h.request_id"
                f" WHERE s.request_id IS NULL AND {IN_FLIGHT} ORDER BY h.created_at"
            ).fetchall()
            for request_id, amount in left:
                _settle(conn, request_id, recovered(amount), now)
            return [
                to_entry(conn.execute(_ENTRY_BY_REQUEST, (request_id,)).fetchone())
                for request_id, _ in left
            ]

        return await self._run(recover, atomic=True)

    async def latest_attempt(self, team: str, fingerprint: str, since: float) -> Attempt | None:
        rows = await self._rows(
            "SELECT l.request_id, l.state, s.result, l.task_id FROM ledger l"
            " LEFT JOIN settlements s USING (request_id) JOIN holds h USING (request_id)"
            " WHERE h.team = ? AND h.fingerprint = ? AND h.created_at >= ?"
            " ORDER BY h.created_at DESC LIMIT 1",
            (team, fingerprint, since),
        )
        if not rows:
            return None
        request_id, state, result, task_id = rows[0]
        return Attempt(request_id, state, result, task_id, live=False)  # one process: not live

    async def unlogged_resolutions(self) -> list[LedgerEntry]:
        rows = await self._rows(
            f"SELECT {ENTRY_COLUMNS} FROM ledger WHERE resolved_state IS NOT NULL"
            " AND request_id NOT IN (SELECT request_id FROM resolution_log)"
            " ORDER BY resolved_at"
        )
        return [to_entry(row) for row in rows]

    async def claim_resolution_log(self, request_id: str, now: float) -> bool:
        changed = await self._write(
            "INSERT INTO resolution_log (request_id, logged_at) VALUES (?, ?)"
            " ON CONFLICT DO NOTHING",
            (request_id, now),
        )
        return changed == 1

    async def unlogged_expiries(self) -> list[Expiry]:
        rows = await self._rows(
            f"SELECT {ENTRY_COLUMNS}, e.actor FROM ledger JOIN expiries e USING (request_id)"
            " WHERE e.logged_at IS NULL ORDER BY e.expired_at"
        )
        return [Expiry(to_entry(row[:-1]), row[-1]) for row in rows]

    async def claim_expiry_log(self, request_id: str, now: float) -> bool:
        changed = await self._write(
            "UPDATE expiries SET logged_at = ? WHERE request_id = ? AND logged_at IS NULL",
            (now, request_id),
        )
        return changed == 1

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
        values = (task_id, team, request_id, now, "pending", None, first_poll_at, upstream,
                  unit_price)  # fmt: skip
        await self._run(lambda conn: _insert_task(conn, values))

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
        def record(conn: sqlite3.Connection) -> Closed | None:
            _insert_task(
                conn,
                (task_id, team, request_id, created_at, "completed", result, NEVER,
                 settlement.upstream, settlement.unit_price),
            )  # fmt: skip
            return _close(conn, request_id, settlement, late, now)

        return await self._run(record, atomic=True)

    async def task(self, task_id: str) -> TaskRow | None:
        rows = await self._rows(TASK_SELECT + " WHERE t.task_id = ?", (task_id,))
        return to_task_row(rows[0]) if rows else None

    async def due_tasks(self, now: float, limit: int) -> list[TaskRow]:
        rows = await self._rows(
            TASK_SELECT + " WHERE t.status = 'pending'"
            " AND t.next_poll_at <= ? ORDER BY t.next_poll_at LIMIT ?",
            (now, limit),
        )
        return [to_task_row(row) for row in rows]

    async def next_task_due(self) -> float | None:
        rows = await self._rows("SELECT MIN(next_poll_at) FROM tasks WHERE status = 'pending'")
        return rows[0][0]

    async def unsettled_task_count(self) -> int:
        rows = await self._rows(
            "SELECT COUNT(*) FROM tasks t LEFT JOIN settlements s USING (request_id)"
            " WHERE s.request_id IS NULL"
        )
        return int(rows[0][0])

    async def reschedule_task(self, task_id: str, next_poll_at: float) -> None:
        await self._write(
            "UPDATE tasks SET polls = polls + 1, next_poll_at = ? WHERE task_id = ?",
            (next_poll_at, task_id),
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
        def finish(conn: sqlite3.Connection) -> Closed | None:
            if not _finish_task(conn, row.task_id, status, result):
                return None  # another poll finished it first
            return _close(conn, row.request_id, settlement, late, now)

        return await self._run(finish, atomic=True)

    # One process per file: the poll cache and the limits live in this process's memory
    # (TaskTracker's cache in front of these, and a Limiter), and there is no fleet.

    async def claim_task_poll(self, task_id: str, now: float, ttl_s: float) -> TaskPoll:
        return TaskPoll(claimed=True)

    async def store_task_answer(self, task_id: str, answer: str, now: float) -> None:
        return None

    async def task_answer_since(self, task_id: str, since: float) -> str | None:
        return None

    async def heartbeat(self) -> None:
        return None

    async def instances(self) -> list[InstanceRow]:
        """One process per file: this one."""
        host, pid = socket.gethostname(), os.getpid()
        return [InstanceRow(self.instance_id, host, pid, self._opened_at, time.time())]

    async def reap_silent_instances(self, now: float, lease_s: float) -> list[LedgerEntry]:
        return []

    async def admit(self, request_id: str, scopes: list[Scope], now: float) -> None:
        self._limiter.admit(request_id, scopes, now)

    async def release(self, request_id: str, scopes: list[Scope]) -> None:
        self._limiter.release(request_id, scopes)

    # -- idempotency -------------------------------------------------------------------------

    async def claim_idempotency_key(
        self, team: str, key: str, *, fingerprint: str, request_id: str, now: float, keep_s: float
    ) -> StoredOutcome | None:
        def claim(conn: sqlite3.Connection) -> StoredOutcome | None:
            conn.execute(
                "DELETE FROM idempotency WHERE team = ? AND key = ? AND created_at < ?",
                (team, key, now - keep_s),
            )
            inserted = conn.execute(
                "INSERT INTO idempotency (team, key, fingerprint, request_id, created_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (team, key, fingerprint, request_id, now),
            ).rowcount
            if inserted == 1:
                return None
            row = conn.execute(
                "SELECT fingerprint, request_id, status, body, headers FROM idempotency"
                " WHERE team = ? AND key = ?",
                (team, key),
            ).fetchone()
            return StoredOutcome(row[0], row[1], row[2], row[3], json.loads(row[4] or "{}"))

        return await self._run(claim, atomic=True)

    async def store_idempotent_outcome(
        self, team: str, key: str, status: int, body: str, headers: dict[str, str]
    ) -> None:
        await self._write(
            "UPDATE idempotency SET status = ?, body = ?, headers = ? WHERE team = ? AND key = ?",
            (status, body, json.dumps(headers), team, key),
        )

    async def release_idempotency_key(self, team: str, key: str) -> None:
        await self._write(
            "DELETE FROM idempotency WHERE team = ? AND key = ? AND status IS NULL", (team, key)
        )

    async def purge_idempotency(self, before: float) -> int:
        return await self._write("DELETE FROM idempotency WHERE created_at < ?", (before,))


# -- opening ---------------------------------------------------------------------------------


def _lock(path: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as exc:
        raise StoreOpenError(f"{path}: cannot open the database ({exc.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreLocked(
            f"{path} is in use by another gateway process; run one process per SQLite "
            "database (several instances need the postgres backend)"
        ) from None
    return fd


async def _open_writer(path: Path, *, migrate: bool) -> Writer:
    def setup(conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        current = _schema_state(conn, path)
        if migrate:
            steps = migrations.load("sqlite")
            for step in migrations.pending(current, steps, where=str(path)):
                current = _apply(conn, step, steps, current)
        else:
            migrations.require_current(current, migrations.load("sqlite"), where=str(path))

    try:
        return await Writer.open(path, setup)
    except sqlite3.DatabaseError as exc:
        raise StoreOpenError(f"{path}: cannot use the database ({exc})") from None
    except OSError as exc:
        raise StoreOpenError(f"{path}: cannot open the database ({exc.strerror})") from None


async def _read_schema_state(reader: aiosqlite.Connection, path: Path) -> migrations.SchemaState:
    try:
        async with reader.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ) as cursor:
            if await cursor.fetchone() is None:
                return _NO_SCHEMA
        async with reader.execute(_SCHEMA_META) as cursor:
            rows = await cursor.fetchall()
    except sqlite3.DatabaseError as exc:
        raise StoreOpenError(f"{path}: cannot read the database ({exc})") from None
    return migrations.state_of({str(k): str(v) for k, v in rows})


def _schema_state(conn: sqlite3.Connection, path: Path) -> migrations.SchemaState:
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "meta" not in tables:
        if tables:
            raise StoreOpenError(f"{path} is an SQLite file but not an image-gateway database")
        return _NO_SCHEMA
    return migrations.state_of(dict(conn.execute(_SCHEMA_META).fetchall()))


def _apply(
    conn: sqlite3.Connection,
    step: migrations.Migration,
    steps: tuple[migrations.Migration, ...],
    current: migrations.SchemaState,
) -> migrations.SchemaState:
    """One migration in one transaction, its records (step, level, floor) in the same one."""
    records = migrations.records_after(step, steps, current)
    rows = ", ".join(
        "('{}', '{}')".format(key, value.replace("'", "''")) for key, value in records.items()
    )
    script = (
        f"BEGIN IMMEDIATE;\n{step.sql}\n;\nINSERT OR REPLACE INTO meta (key, value)"
        f" VALUES {rows};\nCOMMIT;"
    )
    try:
        conn.executescript(script)
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    log.info("database migrated to schema step %d (%s)", step.version, step.name)
    return migrations.state_of(records)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino


def _local_day(ts: float, tz: str) -> str:
    """``YYYY-MM-DD`` of a Unix time in an IANA zone: the day a daily budget counts it in."""
    return datetime.fromtimestamp(ts, ZoneInfo(tz)).date().isoformat()


def _fd_identity(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


def _wal(path: Path) -> Path:
    return path.with_name(path.name + "-wal")


def _read_only_uri(path: Path) -> str:
    if not path.exists():
        raise FileNotFoundError(f"no database at {path} (has the gateway run yet?)")
    live = _wal(path).exists()
    return f"{path.as_uri()}?{'mode=ro' if live else 'immutable=1'}"


# -- statements ------------------------------------------------------------------------------

_NO_SCHEMA = migrations.SchemaState(0, 0)
_SCHEMA_META = (
    "SELECT key, value FROM meta WHERE key IN ('schema_version', 'schema_step', 'min_release')"
)

_RESERVE_SQL = (
    "INSERT INTO holds (request_id, team, period, created_at, endpoint, mode, quality,"
    " n, unit_price, amount, budget, fingerprint, key_id, key_fp, key_budget, end_user)"
    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)

_SETTLE_SQL = (
    "INSERT INTO settlements (request_id, state, amount, overrun, images, upstream_id, reason,"
    " result, settled_at, upstream, unit_price) SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10,"
    " ?11 WHERE EXISTS (SELECT 1 FROM holds WHERE request_id = ?1)"
    " ON CONFLICT (request_id) DO NOTHING"
)

_ENTRY_BY_REQUEST = f"SELECT {ENTRY_COLUMNS} FROM ledger WHERE request_id = ?"
_ENTRY_BY_ANY_ID = (
    f"SELECT {ENTRY_COLUMNS} FROM ledger WHERE request_id = ? OR upstream_id = ?"
    " OR task_id = ? ORDER BY created_at LIMIT 1"
)

_GROUPS = {
    "key": "key_fp",
    "end_user": "end_user",
    "quality": "quality",
    "day": "local_day(created_at, ?)",
    "upstream": "upstream",
}


def _key_usage(conn: sqlite3.Connection, team: str, key_fp: str, period: str) -> Usage:
    row = conn.execute(
        "SELECT spent, reserved, uncertain, overrun FROM key_usage"
        " WHERE team = ? AND key_fp = ? AND period = ?",
        (team, key_fp, period),
    ).fetchone()
    return Usage(*row) if row else Usage()


def _usage(conn: sqlite3.Connection, team: str, period: str) -> Usage:
    row = conn.execute(
        "SELECT spent, reserved, uncertain, overrun FROM usage WHERE team = ? AND period = ?",
        (team, period),
    ).fetchone()
    return Usage(*row) if row else Usage()


def _settle(conn: sqlite3.Connection, request_id: str, s: Settlement, now: float) -> bool:
    return conn.execute(_SETTLE_SQL, settlement_params(request_id, s, now)).rowcount == 1


def _insert_task(conn: sqlite3.Connection, values: tuple[Any, ...]) -> None:
    try:
        conn.execute(
            "INSERT INTO tasks (task_id, team, request_id, created_at, status, result,"
            " next_poll_at, upstream, unit_price) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            values,
        )
    except sqlite3.IntegrityError:
        # SQLite names one violated constraint, not always the task id's (a retry of this very
        # row breaks both): the row itself decides.
        if conn.execute("SELECT 1 FROM tasks WHERE task_id = ?", (values[0],)).fetchone():
            raise DuplicateTask from None
        raise


def _finish_task(conn: sqlite3.Connection, task_id: str, status: str, result: str) -> bool:
    changed = conn.execute(
        "UPDATE tasks SET status = ?, result = ?, polls = polls + 1"
        " WHERE task_id = ? AND status = 'pending'",
        (status, result, task_id),
    ).rowcount
    return changed == 1


def _close(
    conn: sqlite3.Connection, request_id: str, settlement: Settlement, late: DecideLate, now: float
) -> Closed | None:
    """Settle the hold, or, if it was closed before, apply the late decision."""
    if _settle(conn, request_id, settlement, now):
        return Closed(to_entry(conn.execute(_ENTRY_BY_REQUEST, (request_id,)).fetchone()))
    return _late(conn, request_id, late, now)


def _late(
    conn: sqlite3.Connection, request_id: str, decide: DecideLate, now: float
) -> Closed | None:
    """Apply what ``decide`` makes of the entry as stored (one writer: nothing interleaves)."""
    row = conn.execute(_ENTRY_BY_REQUEST, (request_id,)).fetchone()
    if row is None:
        return None
    entry = to_entry(row)
    decision = decide(entry)
    if isinstance(decision, Resolve):
        _insert_resolution(conn, entry, decision.resolution, now, logged=True)
    elif isinstance(decision, Correct):
        _insert_correction(conn, request_id, decision.correction, now)
    return Closed(to_entry(conn.execute(_ENTRY_BY_REQUEST, (request_id,)).fetchone()), decision)


def _insert_correction(
    conn: sqlite3.Connection, request_id: str, correction: Correction, now: float
) -> None:
    conn.execute(
        "INSERT INTO corrections (request_id, images, amount, reason, upstream_id, corrected_at,"
        " upstream) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (request_id, correction.images, correction.amount, correction.reason,
         correction.upstream_id, now, correction.upstream),
    )  # fmt: skip


def _insert_resolution(
    conn: sqlite3.Connection,
    entry: LedgerEntry,
    resolution: Resolution,
    now: float,
    *,
    logged: bool,
) -> None:
    conn.execute(
        "INSERT INTO resolutions (request_id, state, images, amount, overrun, reason, actor,"
        " upstream_id, resolved_at, upstream) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            entry.request_id, resolution.state, resolution.images, resolution.amount,
            resolution.overrun, resolution.reason, resolution.actor, resolution.upstream_id, now,
            resolution.upstream,
        ),
    )  # fmt: skip
    if logged:
        conn.execute(
            "INSERT INTO resolution_log (request_id, logged_at) VALUES (?, ?)",
            (entry.request_id, now),
        )
