"""``image-gateway db copy``: a SQLite history into an empty PostgreSQL database, whole.

Everything is copied in one transaction, as it is: holds, tasks, settlements, resolutions and
their log, stored Idempotency-Key outcomes, and the counters. The triggers that move money are
told to stand aside (``image_gateway.copying``) since the counters are copied too; the ones
that refuse a settlement above its hold still check every row. The copy ends with ``ledger
verify`` on the target: counters and entries must agree, or the transaction is rolled back.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from gateway.store import migrations
from gateway.store.postgres import verify_on

# In the order that keeps every reference satisfied (settlements of a task's hold may carry an
# overrun only once the task is there).
TABLES = (
    "holds", "tasks", "settlements", "resolutions", "resolution_log", "idempotency", "usage",
    "key_usage",
)  # fmt: skip


class CopyRefused(Exception):
    """The copy cannot be done as asked; the message says why."""


@dataclass(frozen=True, slots=True)
class Copied:
    rows: dict[str, int]
    entries: int


History = dict[str, tuple[list[str], list[tuple[object, ...]]]]


def read_history(source: Path) -> History:
    """Every table to copy, read from the SQLite file (read-only, at this code's schema)."""
    if not source.exists():
        raise CopyRefused(f"no SQLite database at {source}")
    with sqlite3.connect(f"{source.absolute().as_uri()}?mode=ro", uri=True) as sqlite:
        row = sqlite.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        migrations.require_current(int(row[0]), migrations.load("sqlite"), where=str(source))
        return {name: _read(sqlite, name) for name in TABLES}


async def copy_to_postgres(tables: History, dsn: str) -> Copied:
    """Copy, verify, commit; CopyRefused for a non-empty target or a failed check."""
    conn = await asyncpg.connect(dsn)
    try:
        if await conn.fetchval("SELECT COUNT(*) FROM holds") or await conn.fetchval(
            "SELECT COUNT(*) FROM usage"
        ):
            raise CopyRefused("the PostgreSQL database is not empty: copy into a new one")
        async with conn.transaction():
            await conn.execute("SET LOCAL image_gateway.copying = 'on'")
            target_columns = {name: await _columns(conn, name) for name in TABLES}
            counts = {}
            for name in TABLES:
                columns, rows = tables[name]
                kept = [c for c in columns if c in target_columns[name]]
                picks = [columns.index(c) for c in kept]
                records = [tuple(row[i] for i in picks) for row in rows]
                await conn.copy_records_to_table(name, records=records, columns=kept)
                counts[name] = len(records)
            await conn.execute("SET LOCAL image_gateway.copying = 'off'")
            checked = await verify_on(conn)
            if checked.mismatches:
                raise CopyRefused(
                    f"the copy does not verify ({len(checked.mismatches)} counter(s) differ "
                    "from their entries); nothing was committed. Run `image-gateway ledger "
                    "verify` on the SQLite database."
                )
    finally:
        await conn.close()
    return Copied(counts, counts["holds"])


def _read(sqlite: sqlite3.Connection, table: str) -> tuple[list[str], list[tuple[object, ...]]]:
    cursor = sqlite.execute(f"SELECT * FROM {table}")  # noqa: S608 - a fixed table name
    columns = [d[0] for d in cursor.description]
    return columns, cursor.fetchall()


async def _columns(conn: asyncpg.Connection, table: str) -> set[str]:
    rows = await conn.fetch(
        "SELECT column_name FROM information_schema.columns WHERE table_name = $1", table
    )
    return {row[0] for row in rows}
