"""The one owner of SQLite: schema, the money ledger, tasks and stored outcomes.

Money rules live in the schema, so no code path can get them wrong:

- ``holds`` and ``settlements`` are append-only (triggers refuse UPDATE and DELETE).
- Inserting a hold *is* the reservation: a trigger checks ``spent + reserved + uncertain + amount
  <= budget`` for the team's period and moves the amount into ``reserved`` inside the same
  statement. Every write runs on one connection in one thread (``dbwriter.Writer``), one after
  the other inside IMMEDIATE transactions, so no two reservations can see the same headroom.
- A request is settled at most once: ``settlements.request_id`` is the primary key, and the
  settlement trigger moves the hold out of ``reserved`` into ``spent`` or ``uncertain``.

The database runs in WAL mode with ``synchronous=FULL``, and a write returns only once its
transaction is committed: a reservation is on disk before the upstream is called.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from gateway.dbwriter import Writer
from gateway.ledger import BudgetRefused, Hold, HoldState, Settlement, Usage

T = TypeVar("T")

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);

CREATE TABLE IF NOT EXISTS holds (
    request_id  TEXT PRIMARY KEY,
    team        TEXT NOT NULL,
    period      TEXT NOT NULL,
    created_at  REAL NOT NULL,
    endpoint    TEXT NOT NULL,
    mode        TEXT NOT NULL CHECK (mode IN ('sync', 'async')),
    quality     TEXT NOT NULL,
    n           INTEGER NOT NULL CHECK (n >= 1),
    unit_price  INTEGER NOT NULL CHECK (unit_price >= 0),
    amount      INTEGER NOT NULL CHECK (amount >= 0),
    budget      INTEGER NOT NULL,
    fingerprint TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS holds_by_fingerprint ON holds (team, fingerprint, created_at);
CREATE INDEX IF NOT EXISTS holds_by_period ON holds (team, period);

CREATE TABLE IF NOT EXISTS settlements (
    request_id  TEXT PRIMARY KEY REFERENCES holds (request_id),
    state       TEXT NOT NULL CHECK (state IN ('captured', 'released', 'uncertain')),
    amount      INTEGER NOT NULL CHECK (amount >= 0),
    images      INTEGER NOT NULL DEFAULT 0 CHECK (images >= 0),
    upstream_id TEXT,
    reason      TEXT,
    result      TEXT,
    settled_at  REAL NOT NULL
);

CREATE TABLE IF NOT EXISTS usage (
    team      TEXT NOT NULL,
    period    TEXT NOT NULL,
    spent     INTEGER NOT NULL DEFAULT 0,
    reserved  INTEGER NOT NULL DEFAULT 0,
    uncertain INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (team, period)
) WITHOUT ROWID;

CREATE TRIGGER IF NOT EXISTS hold_reserves BEFORE INSERT ON holds
BEGIN
    INSERT OR IGNORE INTO usage (team, period) VALUES (NEW.team, NEW.period);
    SELECT RAISE(ABORT, 'budget_exceeded') FROM usage
     WHERE team = NEW.team AND period = NEW.period
       AND spent + reserved + uncertain + NEW.amount > NEW.budget;
    UPDATE usage SET reserved = reserved + NEW.amount
     WHERE team = NEW.team AND period = NEW.period;
END;

CREATE TRIGGER IF NOT EXISTS settlement_moves_money AFTER INSERT ON settlements
BEGIN
    UPDATE usage SET
        reserved  = reserved - (SELECT amount FROM holds WHERE request_id = NEW.request_id),
        spent     = spent + CASE NEW.state WHEN 'captured' THEN NEW.amount ELSE 0 END,
        uncertain = uncertain + CASE NEW.state WHEN 'uncertain' THEN NEW.amount ELSE 0 END
     WHERE (team, period) = (SELECT team, period FROM holds WHERE request_id = NEW.request_id);
END;

CREATE TRIGGER IF NOT EXISTS holds_no_update BEFORE UPDATE ON holds
BEGIN SELECT RAISE(ABORT, 'holds are append-only'); END;
CREATE TRIGGER IF NOT EXISTS holds_no_delete BEFORE DELETE ON holds
BEGIN SELECT RAISE(ABORT, 'holds are append-only'); END;
CREATE TRIGGER IF NOT EXISTS settlements_no_update BEFORE UPDATE ON settlements
BEGIN SELECT RAISE(ABORT, 'settlements are append-only'); END;
CREATE TRIGGER IF NOT EXISTS settlements_no_delete BEFORE DELETE ON settlements
BEGIN SELECT RAISE(ABORT, 'settlements are append-only'); END;

CREATE VIEW IF NOT EXISTS ledger AS
SELECT h.request_id, h.team, h.period, h.created_at, h.endpoint, h.mode, h.quality, h.n,
       h.unit_price, h.amount AS held, COALESCE(s.state, 'held') AS state,
       COALESCE(s.amount, 0) AS settled, s.images, s.upstream_id, s.reason, s.settled_at
  FROM holds h LEFT JOIN settlements s USING (request_id);

CREATE TABLE IF NOT EXISTS tasks (
    task_id      TEXT PRIMARY KEY,
    team         TEXT NOT NULL,
    request_id   TEXT NOT NULL UNIQUE REFERENCES holds (request_id),
    created_at   REAL NOT NULL,
    status       TEXT NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'completed', 'failed')),
    result       TEXT,
    polls        INTEGER NOT NULL DEFAULT 0,
    next_poll_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_due ON tasks (status, next_poll_at);

CREATE TABLE IF NOT EXISTS idempotency (
    team        TEXT NOT NULL,
    key         TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    request_id  TEXT NOT NULL,
    created_at  REAL NOT NULL,
    status      INTEGER,
    body        TEXT,
    headers     TEXT,
    PRIMARY KEY (team, key)
);
CREATE INDEX IF NOT EXISTS idempotency_by_age ON idempotency (created_at);
"""


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
    settled: str | None


@dataclass(frozen=True, slots=True)
class StoredOutcome:
    fingerprint: str
    request_id: str
    status: int | None
    body: str | None
    headers: dict[str, str]


class Database:
    """Open with ``await Database.open(path)``; every method is one complete operation.

    Writes go through the group-commit ``Writer`` (its own thread and connection); reads use a
    separate read-only aiosqlite connection, so they never wait for a commit and never see an
    uncommitted write. The sync request path reads nothing: the writes return the usage.
    """

    def __init__(self, writer: Writer | None, reader: aiosqlite.Connection) -> None:
        self._writer = writer
        self._reader = reader

    @classmethod
    async def open(cls, path: Path) -> Database:
        writer = await Writer.open(path, _prepare)
        try:
            uri = f"{path.absolute().as_uri()}?mode=ro"  # noqa: ASYNC240 - getcwd, no disk I/O
            reader = await aiosqlite.connect(uri, uri=True)
            await reader.execute("PRAGMA busy_timeout=10000")
        except BaseException:
            await writer.close()
            raise
        return cls(writer, reader)

    @classmethod
    async def open_read_only(cls, path: Path) -> Database:
        """For offline reports: never creates or changes a file, whoever runs it.

        With no ``-wal`` file there is no gateway writing, so the file is opened ``immutable``
        and SQLite creates no ``-wal``/``-shm`` files (which, made by root, would lock the
        service's own user out at its next start).
        """
        return cls(None, await aiosqlite.connect(_read_only_uri(path), uri=True))

    async def close(self) -> None:
        """Commit what is queued and close; closing twice is harmless."""
        await self._reader.close()
        if self._writer is not None:
            await self._writer.close()

    async def _run(
        self, operation: Callable[[sqlite3.Connection], T], *, atomic: bool = False
    ) -> T:
        if self._writer is None:
            raise sqlite3.ProgrammingError("this database was opened read-only")
        return await self._writer.run(operation, atomic=atomic)

    async def _write(self, sql: str, params: Iterable[Any] = ()) -> int:
        """One statement; returns the rows it changed."""
        values = tuple(params)
        return await self._run(lambda conn: conn.execute(sql, values).rowcount)

    async def _rows(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        async with self._reader.execute(sql, tuple(params)) as cursor:
            return list(await cursor.fetchall())

    # -- money -------------------------------------------------------------------------------

    async def reserve(self, hold: Hold) -> Usage:
        """Record ``hold`` and reserve its amount; the team's usage after it, or BudgetRefused."""

        def reserve(conn: sqlite3.Connection) -> Usage:
            try:
                conn.execute(_RESERVE_SQL, _hold_params(hold))
            except sqlite3.IntegrityError as exc:
                if str(exc) == "budget_exceeded":
                    raise BudgetRefused(_usage(conn, hold.team, hold.period)) from None
                raise
            return _usage(conn, hold.team, hold.period)

        return await self._run(reserve)

    async def settle(self, request_id: str, settlement: Settlement, now: float) -> bool:
        """Settle a hold once; False if it was settled before (that settlement stands)."""
        return await self._run(lambda conn: _settle(conn, request_id, settlement, now))

    async def usage(self, team: str, period: str) -> Usage:
        rows = await self._rows(
            "SELECT spent, reserved, uncertain FROM usage WHERE team = ? AND period = ?",
            (team, period),
        )
        return Usage(*rows[0]) if rows else Usage()

    async def images_by_quality(self, team: str, period: str) -> dict[str, int]:
        rows = await self._rows(
            "SELECT quality, SUM(images) FROM ledger WHERE team = ? AND period = ?"
            " AND state = 'captured' GROUP BY quality",
            (team, period),
        )
        return dict(rows)

    async def ledger_totals(self, team: str, period: str) -> Usage:
        """The same figures as ``usage``, summed from the ledger: an audit of the counters."""
        rows = await self._rows(
            "SELECT COALESCE(SUM(CASE state WHEN 'captured' THEN settled END), 0),"
            " COALESCE(SUM(CASE state WHEN 'held' THEN held END), 0),"
            " COALESCE(SUM(CASE state WHEN 'uncertain' THEN settled END), 0)"
            " FROM ledger WHERE team = ? AND period = ?",
            (team, period),
        )
        return Usage(*rows[0])

    async def hold_state(self, request_id: str) -> tuple[HoldState, str | None] | None:
        rows = await self._rows(
            "SELECT COALESCE(s.state, 'held'), s.result FROM holds h"
            " LEFT JOIN settlements s USING (request_id) WHERE h.request_id = ?",
            (request_id,),
        )
        return (rows[0][0], rows[0][1]) if rows else None

    async def recover_in_flight(self, now: float) -> int:
        """Mark holds left ``held`` by a previous process as uncertain (never released)."""
        return await self._write(
            "INSERT INTO settlements (request_id, state, amount, reason, settled_at)"
            " SELECT h.request_id, 'uncertain', h.amount,"
            " 'the gateway stopped while the request was in flight', ?"
            " FROM holds h LEFT JOIN settlements s USING (request_id)"
            " LEFT JOIN tasks t ON t.request_id = h.request_id"
            " WHERE s.request_id IS NULL AND t.task_id IS NULL",
            (now,),
        )

    async def recent_success(
        self, team: str, fingerprint: str, since: float
    ) -> tuple[str, str] | None:
        """The newest captured (request id, result) with this fingerprint since ``since``."""
        rows = await self._rows(
            "SELECT h.request_id, s.result FROM holds h JOIN settlements s USING (request_id)"
            " WHERE h.team = ? AND h.fingerprint = ? AND h.created_at >= ?"
            " AND s.state = 'captured' AND h.mode = 'sync' ORDER BY h.created_at DESC LIMIT 1",
            (team, fingerprint, since),
        )
        return (rows[0][0], rows[0][1]) if rows else None

    async def check_writable(self) -> None:
        """An empty write transaction: fails if the file or its directory cannot be written."""
        await self._run(lambda conn: None)

    # -- async tasks -------------------------------------------------------------------------

    async def record_task(
        self, task_id: str, team: str, request_id: str, now: float, first_poll_at: float
    ) -> None:
        await self._write(
            "INSERT INTO tasks (task_id, team, request_id, created_at, next_poll_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (task_id, team, request_id, now, first_poll_at),
        )

    async def task(self, task_id: str) -> TaskRow | None:
        rows = await self._rows(_TASK_SELECT + " WHERE t.task_id = ?", (task_id,))
        return TaskRow(*rows[0]) if rows else None

    async def due_tasks(self, now: float, limit: int = 100) -> list[TaskRow]:
        rows = await self._rows(
            _TASK_SELECT + " WHERE t.status = 'pending' AND s.request_id IS NULL"
            " AND t.next_poll_at <= ? ORDER BY t.next_poll_at LIMIT ?",
            (now, limit),
        )
        return [TaskRow(*row) for row in rows]

    async def next_task_due(self) -> float | None:
        rows = await self._rows(
            "SELECT MIN(t.next_poll_at) FROM tasks t LEFT JOIN settlements s USING (request_id)"
            " WHERE t.status = 'pending' AND s.request_id IS NULL"
        )
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
        self, row: TaskRow, status: str, result: str | None, settlement: Settlement, now: float
    ) -> bool:
        """Store a terminal answer and settle the hold, both or neither; False if done before."""

        def finish(conn: sqlite3.Connection) -> bool:
            changed = conn.execute(
                "UPDATE tasks SET status = ?, result = ?, polls = polls + 1"
                " WHERE task_id = ? AND status = 'pending'",
                (status, result, row.task_id),
            ).rowcount
            return changed == 1 and _settle(conn, row.request_id, settlement, now)

        return await self._run(finish, atomic=True)

    async def expire_task(self, row: TaskRow, now: float) -> bool:
        """A task pending too long: its hold becomes uncertain; polls may still fetch it."""
        settlement = Settlement(
            "uncertain", row.hold_amount, reason="task still pending after the maximum age"
        )
        return await self.settle(row.request_id, settlement, now)

    async def store_late_result(self, task_id: str, status: str, result: str) -> None:
        await self._write(
            "UPDATE tasks SET status = ?, result = ? WHERE task_id = ? AND status = 'pending'",
            (status, result, task_id),
        )

    # -- idempotency -------------------------------------------------------------------------

    async def claim_idempotency_key(
        self, team: str, key: str, *, fingerprint: str, request_id: str, now: float, keep_s: float
    ) -> StoredOutcome | None:
        """Claim (team, key) for this request; return the earlier claim instead if there is one."""

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
        """Forget a claim whose request was refused before anything was spent."""
        await self._write(
            "DELETE FROM idempotency WHERE team = ? AND key = ? AND status IS NULL", (team, key)
        )

    async def purge_idempotency(self, before: float) -> int:
        return await self._write("DELETE FROM idempotency WHERE created_at < ?", (before,))


def _prepare(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=10000")
    conn.executescript(SCHEMA)
    conn.execute(
        "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
        (str(SCHEMA_VERSION),),
    )


def _usage(conn: sqlite3.Connection, team: str, period: str) -> Usage:
    row = conn.execute(
        "SELECT spent, reserved, uncertain FROM usage WHERE team = ? AND period = ?", (team, period)
    ).fetchone()
    return Usage(*row) if row else Usage()


def _settle(conn: sqlite3.Connection, request_id: str, settlement: Settlement, now: float) -> bool:
    return conn.execute(_SETTLE_SQL, _settle_params(request_id, settlement, now)).rowcount == 1


_RESERVE_SQL = (
    "INSERT INTO holds (request_id, team, period, created_at, endpoint, mode, quality,"
    " n, unit_price, amount, budget, fingerprint) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
)


def _hold_params(hold: Hold) -> tuple[Any, ...]:
    return (
        hold.request_id, hold.team, hold.period, hold.created_at, hold.endpoint, hold.mode,
        hold.quality, hold.n, hold.unit_price, hold.amount, hold.budget, hold.fingerprint,
    )  # fmt: skip


_SETTLE_SQL = (
    "INSERT INTO settlements (request_id, state, amount, images, upstream_id, reason, result,"
    " settled_at) SELECT ?, ?, ?, ?, ?, ?, ?, ? WHERE EXISTS"
    " (SELECT 1 FROM holds WHERE request_id = ?1) ON CONFLICT (request_id) DO NOTHING"
)

_TASK_SELECT = (
    "SELECT t.task_id, t.team, t.request_id, t.created_at, t.status, t.result, t.polls,"
    " t.next_poll_at, h.amount, h.unit_price, h.quality, h.n, s.state FROM tasks t"
    " JOIN holds h USING (request_id) LEFT JOIN settlements s USING (request_id)"
)


def _read_only_uri(path: Path) -> str:
    if not path.exists():
        raise FileNotFoundError(f"no database at {path} (has the gateway run yet?)")
    live = path.with_name(path.name + "-wal").exists()
    return f"{path.absolute().as_uri()}?{'mode=ro' if live else 'immutable=1'}"


def _settle_params(request_id: str, s: Settlement, now: float) -> tuple[Any, ...]:
    return (request_id, s.state, s.amount, s.images, s.upstream_id, s.reason, s.result, now)
