"""PostgreSQL figures for the coming ledger backend, on the server that tests/postgres.py starts.

    .venv/bin/python bench/pg_ledger.py [--seconds 3] [--starts 5]

Prints: session start time (initdb + postgres ready, median of --starts fresh servers), per-test
CREATE DATABASE time (WAL_LOG and FILE_COPY strategies, and from a template), and the rate of
the ledger's hot-row conditional UPDATE with 1 and 32 connections; each with the test server's
settings (fsync/synchronous_commit/full_page_writes off) and with PostgreSQL's durable defaults.
Everything listens on 127.0.0.1 and is stopped before the script exits. Not part of the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.postgres import FAST_SETTINGS, LocalPostgres, create_database, drop_database

UPDATE = (
    "UPDATE budgets SET spent = spent + $2 WHERE team = $1 AND spent + $2 <= budget RETURNING spent"
)


async def create_db_times(dsn: str, n: int = 10) -> dict[str, float]:
    out: dict[str, float] = {}
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE DATABASE tmpl")
        tconn = await asyncpg.connect(dsn.rsplit("/", 1)[0] + "/tmpl")
        await tconn.execute(
            "CREATE TABLE budgets (team text PRIMARY KEY, budget bigint, spent bigint);"
            "CREATE TABLE ledger (id bigserial PRIMARY KEY, team text, amount bigint,"
            " at timestamptz);"
            "CREATE INDEX ON ledger (team, at)"
        )
        await tconn.close()
        for label, extra in (
            ("wal_log", ""),
            ("file_copy", " STRATEGY FILE_COPY"),
            ("template_wal_log", " TEMPLATE tmpl"),
        ):
            times = []
            for i in range(n):
                t = time.perf_counter()
                await conn.execute(f"CREATE DATABASE d_{label}_{i}{extra}")
                times.append(time.perf_counter() - t)
            drops = []
            for i in range(n):
                t = time.perf_counter()
                await conn.execute(f"DROP DATABASE d_{label}_{i} WITH (FORCE)")
                drops.append(time.perf_counter() - t)
            out[f"create_{label}_ms"] = statistics.median(times) * 1000
            out[f"drop_{label}_ms"] = statistics.median(drops) * 1000
        t = time.perf_counter()
        for _ in range(n):
            dsn2 = await create_database(dsn, "fixture_like")
            c = await asyncpg.connect(dsn2)
            await c.close()
            await drop_database(dsn, "fixture_like")
        out["fixture_roundtrip_ms"] = (time.perf_counter() - t) / n * 1000
    finally:
        await conn.close()
    return out


async def hot_row_rate(dsn: str, conns: int, seconds: float) -> tuple[float, int]:
    name = f"hot_{conns}"
    db = await create_database(dsn, name)
    try:
        pool = await asyncpg.create_pool(db, min_size=conns, max_size=conns)
        try:
            await pool.execute(
                "CREATE TABLE budgets (team text PRIMARY KEY, budget bigint, spent bigint)"
            )
            await pool.execute("INSERT INTO budgets VALUES ('design', 1000000000000, 0)")
            done = 0
            deadline = time.monotonic() + seconds

            async def worker() -> None:
                nonlocal done
                async with pool.acquire() as c:
                    while time.monotonic() < deadline:
                        assert await c.fetchval(UPDATE, "design", 1) is not None
                        done += 1

            t = time.perf_counter()
            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(conns))), seconds + 30)
            elapsed = time.perf_counter() - t
            spent = await pool.fetchval("SELECT spent FROM budgets")
            assert spent == done, (spent, done)
            return done / elapsed, done
        finally:
            await pool.close()
    finally:
        await drop_database(dsn, name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--starts", type=int, default=5)
    args = ap.parse_args()

    starts = []
    for _ in range(args.starts):
        t = time.perf_counter()
        with LocalPostgres():
            starts.append(time.perf_counter() - t)
    print(
        f"session start (initdb+ready), {args.starts} fresh servers:"
        f" median {statistics.median(starts):.3f} s"
        f" (min {min(starts):.3f}, max {max(starts):.3f})"
    )
    disk = Path(tempfile.gettempdir())
    for label, settings, parent in (
        ("test settings, default folder", FAST_SETTINGS, None),
        ("test settings, on disk", FAST_SETTINGS, disk),
        ("durable defaults, on disk", {}, disk),
    ):
        with LocalPostgres(settings=settings, parent=parent) as server:
            shown = dict(settings) or "fsync=on synchronous_commit=on"
            print(f"-- {label} ({server.socket_dir}): {shown}")
            for key, value in asyncio.run(create_db_times(server.dsn)).items():
                print(f"   {key}: {value:.1f}")
            for conns in (1, 32):
                rate, n = asyncio.run(hot_row_rate(server.dsn, conns, args.seconds))
                print(f"   hot-row UPDATE, {conns} conn: {rate:,.0f}/s ({n} in {args.seconds} s)")


if __name__ == "__main__":
    main()
