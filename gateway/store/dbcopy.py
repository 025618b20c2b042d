"""``image-gateway db copy``: a SQLite history into an empty PostgreSQL database, whole.

Everything is copied in one transaction, as it is: holds, tasks, settlements, resolutions and
their log, expiries, stored Idempotency-Key outcomes, and the counters. The triggers that move
money are told to stand aside (``image_gateway.copying``) since the counters are copied too; the
ones that refuse a settlement above its hold still check every row. The copy ends with ``ledger
verify`` on the target: counters and entries must agree, or the transaction is rolled back.

A source at an older schema (a 0.1 ledger, say: exactly what an admin moving to PostgreSQL
has) is not refused: a temporary copy of it is migrated, as a gateway would at start, and
copied; the source itself is left as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from gateway.store import migrations
from gateway.store.postgres import verify_on
from gateway.store.sqlite import SQLiteEngine

# In the order that keeps every reference satisfied (settlements of a task's hold may carry an
# overrun only once the task is there).
TABLES = (
    "holds", "tasks", "settlements", "resolutions", "resolution_log", "expiries", "corrections",
    "idempotency", "usage", "key_usage",
)  # fmt: skip


class CopyRefused(Exception):
    """The copy cannot be done as asked; the message says why."""


@dataclass(frozen=True, slots=True)
class Copied:
    rows: dict[str, int]
    entries: int
    migrated_from: int | None = None  # the source's schema step, if a migrated copy was copied


BATCH_ROWS = 5_000  # rows in memory at a time, however long the history


async def copy_sqlite_to_postgres(source: Path, dsn: str) -> Copied:
    """Copy, verify, commit; CopyRefused for a source in use or a non-empty target.

    The source is read in batches (a long history never sits in memory whole) under a shared
    lock, so no gateway can be writing to it while it is copied.
    """
    with _shared_lock(source), contextlib.closing(_read_only(source)) as sqlite:
        current = _schema_state(sqlite, source)
        steps = migrations.load("sqlite")
        if not migrations.pending(current, steps, where=str(source)):  # or SchemaTooNew
            return await _copy_into(sqlite, dsn)
        with tempfile.TemporaryDirectory(prefix="image-gateway-copy-") as folder:
            migrated = Path(folder) / "migrated.db"
            await asyncio.to_thread(_backup, sqlite, migrated)
            await (await SQLiteEngine.open(migrated)).close()  # migrated at open
            with contextlib.closing(_read_only(migrated)) as copy:
                copied = await _copy_into(copy, dsn)
        return Copied(copied.rows, copied.entries, migrated_from=current.step)


async def _copy_into(sqlite: sqlite3.Connection, dsn: str) -> Copied:
    conn = await asyncpg.connect(dsn)
    try:
        return await _copy(sqlite, conn)
    finally:
        await conn.close()


def _schema_state(sqlite: sqlite3.Connection, source: Path) -> migrations.SchemaState:
    try:
        meta = dict(sqlite.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.DatabaseError as exc:
        raise CopyRefused(f"{source} is not an image-gateway SQLite database ({exc})") from None
    return migrations.state_of(meta)


def _backup(sqlite: sqlite3.Connection, target: Path) -> None:
    """A consistent copy of the source (its write-ahead log included) at ``target``."""
    with contextlib.closing(sqlite3.connect(target)) as copy:
        sqlite.backup(copy)


async def _copy(sqlite: sqlite3.Connection, conn: asyncpg.Connection) -> Copied:
    if await conn.fetchval("SELECT COUNT(*) FROM holds") or await conn.fetchval(
        "SELECT COUNT(*) FROM usage"
    ):
        raise CopyRefused("the PostgreSQL database is not empty: copy into a new one")
    counts: dict[str, int] = {}
    async with conn.transaction():
        await conn.execute("SET LOCAL image_gateway.copying = 'on'")
        for name in TABLES:
            target = await _columns(conn, name)
            cursor = sqlite.execute(f"SELECT * FROM {name}")
            columns = [d[0] for d in cursor.description]
            kept = [c for c in columns if c in target]
            picks = [columns.index(c) for c in kept]
            counts[name] = 0
            while rows := await asyncio.to_thread(cursor.fetchmany, BATCH_ROWS):
                records = [tuple(row[i] for i in picks) for row in rows]
                await conn.copy_records_to_table(name, records=records, columns=kept)
                counts[name] += len(records)
        await conn.execute("SET LOCAL image_gateway.copying = 'off'")
        checked = await verify_on(conn)
        if checked.mismatches:
            raise CopyRefused(
                f"the copy does not verify ({len(checked.mismatches)} counter(s) differ "
                "from their entries); nothing was committed. Run `image-gateway ledger "
                "verify` on the SQLite database."
            )
    return Copied(counts, counts["holds"])


@contextlib.contextmanager
def _shared_lock(source: Path) -> Iterator[None]:
    """The gateway holds an exclusive ``flock`` on its database while it runs."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CopyRefused(f"no SQLite database at {source}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CopyRefused(
                f"{source} is in use by a running gateway: stop it first, so that nothing is "
                "written to it after the copy"
            ) from None
        yield
    finally:
        os.close(fd)


def _read_only(source: Path) -> sqlite3.Connection:
    return sqlite3.connect(
        f"{source.absolute().as_uri()}?mode=ro", uri=True, check_same_thread=False
    )


async def _columns(conn: asyncpg.Connection, table: str) -> set[str]:
    rows = await conn.fetch(
        "SELECT column_name FROM information_schema.columns WHERE table_name = $1", table
    )
    return {row[0] for row in rows}
