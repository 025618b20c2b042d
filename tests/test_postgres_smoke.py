"""Smoke tests of the PostgreSQL features the ledger backend will rely on, with asyncpg against
the throwaway server of tests/postgres.py: a conditional UPDATE that cannot overspend under a
burst, transaction-scoped advisory locks, LISTEN/NOTIFY and FOR UPDATE SKIP LOCKED."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest

from tests.postgres import PostgresServer, with_database

TIMEOUT = 10  # seconds, for any one step

SPEND = (
    "UPDATE budgets SET spent = spent + $2 WHERE team = $1 AND spent + $2 <= budget RETURNING spent"
)


@asynccontextmanager
async def connect(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn, timeout=TIMEOUT, command_timeout=TIMEOUT)
    try:
        yield conn
    finally:
        await conn.close(timeout=TIMEOUT)


async def test_fresh_database_is_empty_and_writable(postgres_dsn: str) -> None:
    async with connect(postgres_dsn) as conn:
        assert (
            await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0
        )
        assert (await conn.fetchval("SHOW server_version")).split(".")[0] >= "13"
        await conn.execute("CREATE TABLE t (id bigserial PRIMARY KEY, note text NOT NULL)")
        await conn.executemany("INSERT INTO t (note) VALUES ($1)", [("a",), ("b",)])
        assert await conn.fetchval("SELECT count(*) FROM t") == 2


async def test_local_server_listens_on_loopback_and_socket(
    postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    if postgres_server.external:
        pytest.skip("an external server was given")
    assert postgres_server.dsn.startswith("postgresql://postgres@127.0.0.1:")
    async with connect(postgres_dsn) as conn:
        assert await conn.fetchval("SELECT host(inet_server_addr())") == "127.0.0.1"
        assert await conn.fetchval("SHOW listen_addresses") == "127.0.0.1"
    assert postgres_server.socket_dsn is not None
    async with connect(with_database(postgres_server.socket_dsn, "postgres")) as conn:
        assert await conn.fetchval("SELECT inet_server_addr()") is None  # a unix socket


async def test_conditional_update_never_overspends_under_a_burst(postgres_dsn: str) -> None:
    budget, amount, clients = 1000, 30, 50
    async with connect(postgres_dsn) as conn:
        await conn.execute(
            "CREATE TABLE budgets (team text PRIMARY KEY, budget bigint NOT NULL,"
            " spent bigint NOT NULL DEFAULT 0)"
        )
        await conn.execute("INSERT INTO budgets (team, budget) VALUES ('design', $1)", budget)

    conns = await asyncio.wait_for(
        asyncio.gather(
            *(asyncpg.connect(postgres_dsn, command_timeout=TIMEOUT) for _ in range(clients))
        ),
        TIMEOUT,
    )
    try:
        for c in conns:
            await c.prepare(SPEND)  # so the burst is only the UPDATEs
        start = asyncio.Event()

        async def spend(c: asyncpg.Connection) -> int | None:
            await start.wait()
            return await c.fetchval(SPEND, "design", amount)

        tasks = [asyncio.create_task(spend(c)) for c in conns]
        await asyncio.sleep(0)
        start.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)
    finally:
        await asyncio.gather(*(c.close(timeout=TIMEOUT) for c in conns))

    granted = sorted(r for r in results if r is not None)
    assert len(granted) == budget // amount  # 33: every one that fits, and no more
    assert granted == [amount * (i + 1) for i in range(len(granted))]  # each saw the one before
    async with connect(postgres_dsn) as conn:
        assert await conn.fetchval("SELECT spent FROM budgets") == amount * len(granted) <= budget


async def test_advisory_xact_lock_serializes_two_connections(postgres_dsn: str) -> None:
    key = 0x1D_6A7E  # a constant, as a migration lock would use
    async with (
        connect(postgres_dsn) as a,
        connect(postgres_dsn) as b,
        connect(postgres_dsn) as watcher,
    ):
        tx_a = a.transaction()
        await tx_a.start()
        await a.execute("SELECT pg_advisory_xact_lock($1)", key)

        async with b.transaction():
            assert await b.fetchval("SELECT pg_try_advisory_xact_lock($1)", key) is False

        tx_b = b.transaction()
        await tx_b.start()
        waiter = asyncio.create_task(b.execute("SELECT pg_advisory_xact_lock($1)", key))
        for _ in range(TIMEOUT * 100):  # until b is seen waiting for the lock
            if await watcher.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            ):
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("b never waited for the advisory lock")
        assert not waiter.done()

        await tx_a.commit()  # the lock goes with the transaction
        await asyncio.wait_for(waiter, TIMEOUT)
        assert (
            await watcher.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            )
            == 1
        )
        await tx_b.commit()
        assert (
            await watcher.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 0
        )


async def test_listen_notify_between_two_connections(postgres_dsn: str) -> None:
    received: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    async with connect(postgres_dsn) as listener, connect(postgres_dsn) as sender:
        await listener.add_listener(
            "budget_changed",
            lambda _c, _pid, channel, payload: received.put_nowait((channel, payload)),
        )
        async with sender.transaction():
            await sender.execute("SELECT pg_notify('budget_changed', 'design')")
            await sender.execute("NOTIFY budget_changed, 'ops'")
            await asyncio.sleep(0.05)
            assert received.empty()  # delivered on commit only
        got = [await asyncio.wait_for(received.get(), TIMEOUT) for _ in range(2)]
        assert got == [("budget_changed", "design"), ("budget_changed", "ops")]


async def test_for_update_skip_locked_claims_disjoint_rows(postgres_dsn: str) -> None:
    claim = (
        "UPDATE jobs SET claimed_by = $1 WHERE id IN"
        " (SELECT id FROM jobs WHERE claimed_by IS NULL ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)"
        " RETURNING id"
    )
    async with connect(postgres_dsn) as a, connect(postgres_dsn) as b:
        await a.execute("CREATE TABLE jobs (id int PRIMARY KEY, claimed_by text)")
        await a.execute("INSERT INTO jobs SELECT g FROM generate_series(1, 10) g")

        async with a.transaction():
            got_a = sorted(r["id"] for r in await a.fetch(claim, "a", 4))
            tx_b = b.transaction()
            await tx_b.start()
            # Not blocked by a's locked rows: skips them (the short timeout would fire if not).
            got_b = sorted(r["id"] for r in await b.fetch(claim, "b", 4, timeout=2))
            await b.execute("SET LOCAL lock_timeout = '200ms'")
            with pytest.raises(asyncpg.LockNotAvailableError):  # plain FOR UPDATE would wait
                await b.fetch("SELECT id FROM jobs WHERE id = $1 FOR UPDATE", got_a[0])
            await tx_b.rollback()
        assert got_a == [1, 2, 3, 4]
        assert got_b == [5, 6, 7, 8]
        rows = await a.fetch("SELECT claimed_by, count(*) AS n FROM jobs GROUP BY 1 ORDER BY 1")
        assert [(r["claimed_by"], r["n"]) for r in rows] == [("a", 4), (None, 6)]  # b rolled back


def test_with_database_replaces_only_the_database() -> None:
    assert (
        with_database("postgresql://u:p@127.0.0.1:5433/postgres?sslmode=disable", "test_x")
        == "postgresql://u:p@127.0.0.1:5433/test_x?sslmode=disable"
    )
    assert with_database("postgres://u@/maint?host=/run/pg&dbname=maint", "t") == (
        "postgres://u@/t?host=%2Frun%2Fpg"
    )
    with pytest.raises(ValueError, match="postgresql://"):
        with_database("host=127.0.0.1 dbname=x", "t")
