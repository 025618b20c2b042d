"""PostgreSQL for the fleet scenario: the throwaway server of ``tests/postgres.py``
(``LocalPostgres``: the pgserver wheel's PostgreSQL 16 binaries, 127.0.0.1 only, stopped and
removed on exit), here with its data folder on real disk and, unless asked otherwise,
PostgreSQL's durable defaults (fsync, synchronous_commit and full_page_writes on), as
production runs it.

Also: the direct measurement of the reservation statement on one hot team row, with the
gateway's own SQL (``reserve_hold()`` and the settlement insert) on its migrated schema, and the
server-side view of a load (WAL flushes per request, what the backends waited on).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import asyncpg

from gateway.core.ledger import Hold
from gateway.core.settlement import capture_reply
from gateway.store.common import hold_params, settlement_params
from gateway.store.postgres import PostgresEngine
from gateway.store.queries import load, numbered
from tests.postgres import FAST_SETTINGS, LocalPostgres, PostgresServer, create_database

DURABLE: Mapping[str, str] = {}  # PostgreSQL's defaults
FAST = FAST_SETTINGS  # the test suite's: fsync, synchronous_commit, full_page_writes off
HOT_TEAM = "hot"
PERIOD = "2026-12"
UNIT_PRICE = 2_000  # 0.20 CNY in 1/10,000 CNY


@contextlib.contextmanager
def local_server(settings: Mapping[str, str], parent: Path) -> Iterator[tuple[PostgresServer, int]]:
    """A fresh server whose data folder is under ``parent`` (world-traversable: as root the
    server runs as ``nobody``) and its postmaster's pid (the id of its session, too); stopped
    and removed when the block ends, also on failure."""
    local = LocalPostgres(settings=dict(settings), parent=parent)
    with local as server:
        assert local.process is not None
        yield server, local.process.pid


def describe(settings: Mapping[str, str]) -> str:
    if not settings:
        return "durable defaults (fsync=on, synchronous_commit=on, full_page_writes=on)"
    return ", ".join(f"{k}={v}" for k, v in settings.items())


async def migrated_database(maintenance_dsn: str, name: str) -> str:
    """A fresh database with the gateway's schema (migrated as a gateway would); its DSN."""
    dsn = await create_database(maintenance_dsn, name)
    engine = await PostgresEngine.open(dsn, register=False)
    await engine.close()
    return dsn


def _hold(request_id: str) -> Hold:
    return Hold(
        request_id=request_id,
        team=HOT_TEAM,
        period=PERIOD,
        created_at=time.time(),
        endpoint="generations",
        mode="sync",
        quality="medium",
        n=1,
        unit_price=UNIT_PRICE,
        budget=10**15,
        fingerprint="bench",
    )


async def hot_row(
    dsn: str, conns: int, seconds: float, *, settle: bool, async_settle: bool = False
) -> dict[str, Any]:
    """``conns`` connections each calling ``reserve_hold()`` for the same team (one hot
    ``usage`` row) in a closed loop for ``seconds``; with ``settle``, each reservation is
    followed by its capture (the gateway's two ledger statements per request). Every call is
    its own transaction, committed (durably, with the server's defaults) before the next.

    ``async_settle`` measures a possible next step, not what the gateway does: the capture
    committed with ``synchronous_commit = off`` (its row lock released without waiting for
    its WAL flush; the next durable commit flushes it)."""
    ids = itertools.count()
    latencies: list[float] = []
    reserve, settle_sql = (numbered(load("postgres")[name]) for name in ("reserve", "settle"))
    pool = await asyncpg.create_pool(dsn, min_size=conns, max_size=conns)
    settle_settings = {"synchronous_commit": "off"} if async_settle else {}
    settle_pool = await asyncpg.create_pool(
        dsn, min_size=conns, max_size=conns, server_settings=settle_settings
    )
    try:

        async def worker(until: float) -> None:
            async with pool.acquire() as conn, settle_pool.acquire() as settling:
                while time.monotonic() < until:
                    hold = _hold(f"direct-{conns}-{settle}-{next(ids)}")
                    started = time.perf_counter()
                    params = {**hold_params(hold), "instance_id": "bench-direct"}
                    await conn.fetchrow(reserve.sql, *(params[n] for n in reserve.names))
                    latencies.append(time.perf_counter() - started)
                    if settle:
                        s = capture_reply(hold, 1, None, "{}")
                        values = settlement_params(hold.request_id, s, time.time())
                        await settling.execute(
                            settle_sql.sql, *(values[n] for n in settle_sql.names)
                        )

        await asyncio.gather(*(worker(time.monotonic() + 0.5) for _ in range(conns)))  # warm-up
        latencies.clear()
        started = time.perf_counter()
        until = time.monotonic() + seconds
        await asyncio.wait_for(asyncio.gather(*(worker(until) for _ in range(conns))), seconds + 60)
        elapsed = time.perf_counter() - started
    finally:
        await pool.close()
        await settle_pool.close()
    values = sorted(latencies)
    return {
        "conns": conns,
        "settle": settle,
        "async_settle": async_settle,
        "reservations": len(values),
        "per_s": len(values) / elapsed,
        "reserve_mean_ms": statistics.fmean(values) * 1000 if values else float("nan"),
        "reserve_p50_ms": values[len(values) // 2] * 1000 if values else float("nan"),
    }


class ServerView:
    """What the server did during a load: WAL records and flushes (``pg_stat_wal``), commits
    (``pg_stat_database``), and a sample of what its backends were waiting on
    (``pg_stat_activity`` every 10 ms)."""

    def __init__(self, dsn: str, database: str) -> None:
        self.dsn = dsn
        self.database = database
        self.waits: Counter[str] = Counter()
        self.samples = 0
        self._counters: dict[str, float] = {}

    async def _read(self, conn: asyncpg.Connection) -> dict[str, float]:
        wal = await conn.fetchrow(
            "SELECT wal_records, wal_bytes, wal_write, wal_sync FROM pg_stat_wal"
        )
        db = await conn.fetchrow(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = $1", self.database
        )
        return {**{k: float(v) for k, v in wal.items()}, "xact_commit": float(db[0])}

    @contextlib.asynccontextmanager
    async def watching(self) -> AsyncIterator[ServerView]:
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute("SELECT pg_stat_clear_snapshot()")
            before = await self._read(conn)
            stop = asyncio.Event()
            sampler = asyncio.create_task(self._sample(conn, stop))
            try:
                yield self
            finally:
                stop.set()
                await sampler
            # A backend reports its counters at most once a second while busy, and 10 s after
            # it went idle: wait for the gateways' idle pool connections to report theirs.
            await asyncio.sleep(10.5)
            await conn.execute("SELECT pg_stat_clear_snapshot()")
            after = await self._read(conn)
            self._counters = {k: after[k] - before[k] for k in after}
        finally:
            await conn.close()

    async def _sample(self, conn: asyncpg.Connection, stop: asyncio.Event) -> None:
        sql = (
            "SELECT coalesce(wait_event_type || ':' || wait_event, 'on CPU'), state"
            " FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend'"
            " AND pid <> pg_backend_pid()"
        )
        while not stop.is_set():
            for wait, state in await conn.fetch(sql, self.database):
                self.waits["idle (waiting for the gateway)" if state == "idle" else wait] += 1
            self.samples += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.01)

    def summary(self, requests: int) -> dict[str, Any]:
        per = max(1, requests)
        c = self._counters
        return {
            "wal_records_per_request": c.get("wal_records", 0) / per,
            "wal_bytes_per_request": c.get("wal_bytes", 0) / per,
            "wal_flushes_per_request": c.get("wal_sync", 0) / per,
            "commits_per_request": c.get("xact_commit", 0) / per,
            "backends_waiting": {
                wait: n / max(1, self.samples) for wait, n in self.waits.most_common(6)
            },
        }
