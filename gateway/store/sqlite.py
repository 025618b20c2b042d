"""The SQLite engine: one file, one gateway process, money rules enforced by the schema.

- Inserting a hold *is* the reservation: a trigger checks ``spent + reserved + uncertain +
  amount <= budget`` and moves the amount into ``reserved`` inside the same statement. Every write
  runs on one connection in one thread (``sqlite_writer.Writer``), inside IMMEDIATE
  transactions, so no two reservations can see the same headroom. A script of the store runs
  whole inside one batch, in a savepoint when it is atomic; reads run on a second, read-only
  connection.
- ``holds``, ``settlements`` and ``resolutions`` are append-only; a request settles at most once
  and an uncertain settlement is resolved at most once (primary keys), each capped by its hold.
- WAL mode with ``synchronous=FULL``: a write returns once its transaction is on disk.
- The process holds an exclusive ``flock`` on the database file: a second gateway on the same
  file is refused (its start-up recovery would mark the first one's live requests uncertain).
  Tools (``usage``, ``ledger``) open it without that lock.
- The statements are in ``sql/sqlite/queries.sql``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from gateway.core.errors import StorageUnavailable
from gateway.core.periods import local_day
from gateway.store import migrations, queries
from gateway.store.base import Refused
from gateway.store.engine import Script, Step, count, drive, only, run_now
from gateway.store.errors import StoreLocked, StoreOpenError
from gateway.store.sqlite_writer import Writer

T = TypeVar("T")
log = logging.getLogger("gateway.store")

ERROR_LOG_EVERY_S = 10.0


class SQLiteEngine:
    """Open with ``await SQLiteEngine.open(path)``; see the module docstring."""

    shared = False  # one process per file: limits, poll cache and recovery live in it
    instance_id = "local"
    lease_s = 0.0
    failures = 0

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
        self._sql = queries.load("sqlite")

    @classmethod
    async def open(
        cls, path: Path, *, exclusive: bool = True, migrate: bool = True
    ) -> SQLiteEngine:
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
            reader = await _open_reader(f"{path.as_uri()}?mode=ro")
        except BaseException:
            await writer.close()
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        return cls(path, writer, reader, lock_fd=lock_fd, created=created)

    @classmethod
    async def open_read_only(cls, path: Path) -> SQLiteEngine:
        """For reports: never creates or changes a file, whoever runs it.

        With no ``-wal`` file there is no gateway writing, so the file is opened ``immutable``
        and SQLite creates no ``-wal``/``-shm`` files (which, made by root, would lock the
        service's own user out at its next start).
        """
        path = path.absolute()  # noqa: ASYNC240 - getcwd, no disk I/O worth a thread
        try:
            reader = await _open_reader(_read_only_uri(path))
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
        await self.write(only(count("ready_probe", at=str(time.time()))))
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

    async def read(self, script: Script[T]) -> T:
        return await drive(script, self._read)

    async def write(self, script: Script[T], *, atomic: bool = False, defer: bool = False) -> T:
        """The whole script in the writer thread, inside the next group-commit batch (for a
        deferred one, the next batch someone waits for: see ``sqlite_writer``)."""
        sql = self._sql
        return await self._run(lambda conn: run_now(drive(script, partial(_step, conn, sql))),
                               atomic=atomic, defer=defer)  # fmt: skip

    # -- plumbing ----------------------------------------------------------------------------

    async def _read(self, step: Step) -> Any:
        try:
            # One step in the reader's thread: a statement left open between two steps would
            # hold its snapshot for a concurrent read too (the storage watch reads while
            # requests do), and that read would miss a commit made in between.
            rows = await self._reader.execute_fetchall(self._sql[step.query], step.params)
            return _rows_wanted(step, list(rows))
        except sqlite3.DatabaseError as exc:
            raise self._unavailable(exc) from None

    async def _run(
        self, operation: Callable[[sqlite3.Connection], T], *, atomic: bool = False,
        defer: bool = False,
    ) -> T:  # fmt: skip
        if self._writer is None:
            raise sqlite3.ProgrammingError("this database was opened read-only")
        try:
            return await self._writer.run(operation, atomic=atomic, defer=defer)
        except sqlite3.IntegrityError:
            raise
        except sqlite3.DatabaseError as exc:
            raise self._unavailable(exc) from None

    async def _write(self, sql: str, params: Iterable[Any] = ()) -> int:
        """For tests and tools: one statement of their own."""
        values = tuple(params)
        return await self._run(lambda conn: conn.execute(sql, values).rowcount)

    async def _rows(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        """For tests and tools: the rows of a statement of their own, as tuples."""
        try:
            return [tuple(row) for row in await self._reader.execute_fetchall(sql, tuple(params))]
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


async def _step(conn: sqlite3.Connection, sql: dict[str, str], step: Step) -> Any:
    """One step in the writer thread (``async`` for ``drive``, it never suspends)."""
    try:
        cursor = conn.execute(sql[step.query], step.params)
    except sqlite3.IntegrityError as exc:
        raise Refused(str(exc)) from exc
    if step.want == "count":  # a write without RETURNING: done once executed
        return cursor.rowcount
    return _rows_wanted(step, cursor.fetchall())


def _rows_wanted(step: Step, rows: list[Any]) -> Any:
    """Every row is fetched, so no statement is left half-run."""
    return rows if step.want == "all" else (rows[0] if rows else None)


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


async def _open_reader(uri: str) -> aiosqlite.Connection:
    reader = await aiosqlite.connect(uri, uri=True)
    try:
        await reader.execute("PRAGMA busy_timeout=10000")
        await reader.create_function("local_day", 2, local_day, deterministic=True)
    except BaseException:
        await reader.close()
        raise
    reader.row_factory = sqlite3.Row
    return reader


async def _open_writer(path: Path, *, migrate: bool) -> Writer:
    def setup(conn: sqlite3.Connection) -> None:
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        # Statement journals (a trigger's statement inside a batch) in memory, not temp files.
        conn.execute("PRAGMA temp_store=MEMORY")
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
    sql = queries.load("sqlite")
    try:
        tables = {row[0] for row in await reader.execute_fetchall(sql["tables"])}
        meta = await reader.execute_fetchall(sql["schema_meta"]) if "meta" in tables else []
    except sqlite3.DatabaseError as exc:
        raise StoreOpenError(f"{path}: cannot read the database ({exc})") from None
    return migrations.state_of({str(row[0]): str(row[1]) for row in meta})


def _schema_state(conn: sqlite3.Connection, path: Path) -> migrations.SchemaState:
    sql = queries.load("sqlite")
    tables = {row[0] for row in conn.execute(sql["tables"])}
    if "meta" not in tables:
        if tables:
            raise StoreOpenError(f"{path} is an SQLite file but not an image-gateway database")
        return migrations.SchemaState(0, 0)
    return migrations.state_of({row[0]: row[1] for row in conn.execute(sql["schema_meta"])})


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
