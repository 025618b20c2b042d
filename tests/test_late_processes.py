"""Issue 19's four scenarios with real processes: the gateway learns the truth about a request
after its ledger entry was closed, or the fleet mistakes an outage or a pause for a death.

Each ends where every money test ends, read from outside: every request answered 200, every
served image captured or corrected, each team's access-log lines adding up to its spend,
``ledger verify`` consistent, and the fake upstream's served images equal to the images the
ledger charges (captured plus corrected).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from gateway.core.money import cny_to_units
from tests.conftest import (
    ADMIN_KEY,
    PG_URL_ENV,
    TEAM_KEYS,
    UPSTREAM_KEY,
    Upstream,
    base_config,
    merge,
)
from tests.fakes import gate
from tests.postgres import LocalPostgres, create_database, pg_bin_dir
from tests.process import GatewayProcess, to_toml

pytestmark = pytest.mark.process

LEASE_S = 3.0
DEADLINE_S = 30.0


class Fleet:
    """Gateway processes on one config (and one access log), and the CLI beside them."""

    def __init__(self, tmp_path: Path, upstream: Upstream, env: dict[str, str]) -> None:
        self.tmp_path, self.upstream, self.env = tmp_path, upstream, env
        self.config = tmp_path / "gateway.toml"
        self.processes: list[GatewayProcess] = []

    async def start(self, count: int, **overrides: Any) -> list[GatewayProcess]:
        config = merge(base_config(self.tmp_path, self.upstream.url), overrides)
        config["upstream"]["timeout_s"] = 120  # held at the upstream on purpose, for a while
        if PG_URL_ENV in self.env:
            config["storage"] = {"backend": "postgres", "dsn_env": PG_URL_ENV,
                                 "instance_lease_s": LEASE_S}  # fmt: skip
        self.config.write_text(to_toml(config))
        new = [GatewayProcess(self.config, env=self.env) for _ in range(count)]
        self.processes += new
        await asyncio.gather(*(p.start() for p in new))
        return new

    async def cli(self, *args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", *args, "--config", str(self.config),
            env={**os.environ, "TEST_UPSTREAM_KEY": UPSTREAM_KEY, **self.env},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        return proc.returncode or 0, out.decode()

    async def entries(self) -> list[dict[str, Any]]:
        _, out = await self.cli("ledger", "list", "--json", "--period", "total")
        return list(json.loads(out)["entries"])

    async def until_entries(self, check: Callable[[list[dict[str, Any]]], bool]) -> list[dict]:
        """The ledger, once ``check`` holds of it (polled, with a deadline)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE_S
        while not check(entries := await self.entries()):
            assert loop.time() < deadline, entries
            await asyncio.sleep(0.2)
        return entries

    async def books_balance(self) -> list[dict[str, Any]]:
        """The books, read from outside once nothing is held: the counters equal the entries,
        the access log adds up to the spend, the upstream served what is charged."""
        entries = await self.until_entries(lambda es: all(e["state"] != "held" for e in es))
        _, out = await self.cli("ledger", "verify")
        assert out.startswith("consistent"), out
        spent: dict[str, int] = {}
        for e in entries:
            if e["state"] != "uncertain":  # settled_cny of an uncertain entry is not spent
                spent[e["team"]] = spent.get(e["team"], 0) + cny_to_units(e["settled_cny"])
        _, out = await self.cli("usage", "--json", "--period", "total")
        usage = json.loads(out)["teams"]
        assert {t: cny_to_units(u["spent_cny"]) for t, u in usage.items() if u["spent_cny"]} == {
            t: v for t, v in spent.items() if v
        }
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE_S
        while (logged := self.logged()) != {t: v for t, v in spent.items() if v}:
            assert loop.time() < deadline, (logged, spent)  # a line follows its commit
            await asyncio.sleep(0.1)
        charged = sum(e["images"] for e in entries)  # captured plus corrected
        assert charged == self.upstream.sim.served_images(), (entries, self.upstream.sim.served)
        return entries

    def logged(self) -> dict[str, int]:
        path = self.tmp_path / "access.log"
        lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        logged: dict[str, int] = {}
        for line in lines:
            if line["team"] is not None and line["cost_cny"]:
                logged[line["team"]] = logged.get(line["team"], 0) + cny_to_units(line["cost_cny"])
        return logged

    async def close(self) -> None:
        for process in self.processes:
            await process.close()


@pytest.fixture
async def fleet(tmp_path: Path, upstream: Upstream, postgres_dsn: str) -> AsyncIterator[Fleet]:
    started = Fleet(tmp_path, upstream, {PG_URL_ENV: postgres_dsn})
    yield started
    await started.close()


async def post(url: str, suffix: str = "", **body: Any) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            url + "/v1/images/generations" + suffix,
            headers={"Authorization": f"Bearer {TEAM_KEYS['design']}"},
            json={"prompt": "late", **body},
        ) as resp:
            return resp.status, await resp.json()


async def gated(url: str, upstream: Upstream, **body: Any) -> tuple[asyncio.Task, asyncio.Event]:
    """A sync request held at the upstream until the returned event is set."""
    release, arrived = asyncio.Event(), asyncio.Event()
    upstream.faults.add(gate(release, arrived))
    request = asyncio.create_task(post(url, **body))
    await asyncio.wait_for(arrived.wait(), DEADLINE_S)
    return request, release


async def metric(url: str, name: str) -> float:
    async with aiohttp.ClientSession() as http:
        async with http.get(
            url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        ) as resp:
            text = await resp.text()
    return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(name))


# -- 1: a task completes after an admin released it ---------------------------------------------


async def test_a_task_completing_after_an_admin_released_it_is_charged_as_a_correction(
    tmp_path: Path, upstream: Upstream
) -> None:
    """Async high n=2; the task runs past max_pending_age_s, so its hold turns uncertain; the
    admin follows the README ("not in the usage details yet" -> --released); then the task
    completes, billed 0.80. Before: the ledger stayed released 0.00, without a word."""
    fleet = Fleet(tmp_path, upstream, {})
    try:
        (gateway,) = await fleet.start(
            1, tasks={"max_pending_age_s": 1, "settle_interval_s": 0.2,
                      "settle_max_interval_s": 0.5, "poll_cache_ttl_s": 0.1},
        )  # fmt: skip
        status, task = await post(gateway.url, "?async=1", quality="high", n=2)
        assert status == 202
        (entry,) = await fleet.until_entries(lambda es: es[0]["state"] == "uncertain")
        await fleet.cli("ledger", "resolve", entry["request_id"], "--released",
                        "--reason", "not in the provider's usage details yet")  # fmt: skip
        upstream.sim.finish_task(task["task_id"])
        await until_completed(gateway.url, task["task_id"])  # the client gets its images
        (entry,) = await fleet.until_entries(lambda es: es[0]["settled_cny"] == 0.8)
        assert (entry["state"], entry["settled_cny"], entry["images"]) == ("released", 0.8, 2)
        assert [(c["images"], c["amount_cny"]) for c in entry["corrections"]] == [(2, 0.8)]
        _, out = await fleet.cli("ledger", "export", "--period", "total")
        header, row = (line.split(",") for line in out.splitlines()[:2])
        assert row[header.index("corrected_cny")] == "0.8"
        assert await metric(gateway.url, "gateway_ledger_corrections_total{") == 1
        await fleet.books_balance()
        assert upstream.sim.served_images() == 2
    finally:
        await fleet.close()
    err = await gateway.stderr()
    assert f"CORRECTION: ledger id {entry['request_id']} (team design): 0.8000 CNY" in err


async def until_completed(url: str, task_id: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(
                f"{url}/v1/images/tasks/{task_id}",
                headers={"Authorization": f"Bearer {TEAM_KEYS['design']}"},
            ) as resp:
                assert resp.status == 200
                if (await resp.json())["status"] == "completed":
                    return
            assert loop.time() < deadline
            await asyncio.sleep(0.1)


# -- 2: a PostgreSQL outage longer than the lease -----------------------------------------------


@pytest.fixture
async def own_postgres() -> AsyncIterator[LocalPostgres]:
    """A server of this test's own, to stop and start."""
    pg_bin_dir()
    server = LocalPostgres()
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


async def test_a_postgresql_outage_longer_than_the_lease_reaps_no_live_instance(
    tmp_path: Path, upstream: Upstream, own_postgres: LocalPostgres
) -> None:
    """Three instances, one sync request in flight on each, PostgreSQL down for 5 s (over the
    3 s lease), then back. Before: the first reaper to run after the restart took the others
    for dead and made their holds uncertain; their captures were then refused in silence."""
    assert own_postgres.info is not None
    dsn = await create_database(own_postgres.info.dsn, "outage")
    fleet = Fleet(tmp_path, upstream, {PG_URL_ENV: dsn})
    try:
        instances = await fleet.start(3)
        in_flight = [await gated(i.url, upstream) for i in instances]
        loop = asyncio.get_running_loop()
        back_at = loop.time() + LEASE_S + 2
        await asyncio.to_thread(own_postgres.halt)
        for instance in instances:  # each has noticed
            await until_status(instance.url + "/readyz", 503)
        await asyncio.sleep(max(0.0, back_at - loop.time()))  # the outage itself: 5 s
        await asyncio.to_thread(own_postgres.resume)
        conn = await asyncpg.connect(dsn)
        try:
            await until_heartbeats(conn, 3)  # every instance is back on the database
            deadline = loop.time() + 2 * LEASE_S  # ... and for two leases after, nothing
            while loop.time() < deadline:  # is reaped (before: within the first second)
                states = await conn.fetch("SELECT state FROM ledger")
                assert [s[0] for s in states] == ["held"] * 3, states
                await asyncio.sleep(0.2)
        finally:
            await conn.close()
        for _, release in in_flight:
            release.set()
        for request, _ in in_flight:
            assert (await request)[0] == 200
        entries = await fleet.books_balance()
        assert sorted(e["state"] for e in entries) == ["captured"] * 3
        assert all(e["resolution"] is None for e in entries)
    finally:
        await fleet.close()


async def until_status(url: str, status: int) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(url) as resp:
                if resp.status == status:
                    return
            assert loop.time() < deadline, f"{url} never answered {status}"
            await asyncio.sleep(0.1)


async def until_heartbeats(conn: asyncpg.Connection, count: int) -> None:
    """Until ``count`` instances have heartbeated since the server (re)started."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while await conn.fetchval(
        "SELECT count(*) FROM instances WHERE heartbeat_at > pg_postmaster_start_time()"
    ) < count:  # fmt: skip
        assert loop.time() < deadline
        await asyncio.sleep(0.05)


# -- 3 and 4: an instance paused past its lease ------------------------------------------------


async def paused_and_reaped(
    fleet: Fleet, upstream: Upstream, **body: Any
) -> tuple[GatewayProcess, GatewayProcess, asyncio.Task, asyncio.Event, str]:
    """Two instances; A serves a sync request and is paused (SIGSTOP) until B has made its
    hold uncertain. A, B, the request, its gate and its ledger id."""
    a, b = await fleet.start(2)
    request, release = await gated(a.url, upstream, **body)
    (held,) = await fleet.entries()
    assert a.proc is not None
    a.proc.send_signal(signal.SIGSTOP)
    try:
        await fleet.until_entries(lambda es: es[0]["state"] == "uncertain")
    except BaseException:
        a.proc.send_signal(signal.SIGCONT)
        raise
    return a, b, request, release, held["request_id"]


async def test_an_instance_resumed_past_its_lease_loses_nothing_it_serves(
    fleet: Fleet, upstream: Upstream
) -> None:
    """Before: requests taken right after SIGCONT were reserved under the deleted instance id
    and the next reaper pass (sometimes its own) made some uncertain; and the request it was
    serving when paused was answered 200 while the ledger kept it uncertain, no line naming
    it."""
    a, _, paused, release, ledger_id = await paused_and_reaped(fleet, upstream)
    assert a.proc is not None
    a.proc.send_signal(signal.SIGCONT)
    after = [await gated(a.url, upstream) for _ in range(8)]  # reserved at once on resuming
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2 * LEASE_S  # reapers run every lease/3: six passes of each
    while loop.time() < deadline:
        entries = await fleet.entries()
        assert [e["state"] for e in entries].count("held") == 8, entries
        await asyncio.sleep(0.2)
    for _, gate_of in after:
        gate_of.set()
    release.set()
    assert (await paused)[0] == 200
    assert [(await request)[0] for request, _ in after] == [200] * 8
    entries = await fleet.books_balance()
    assert [e["state"] for e in entries] == ["captured"] * 9
    (resumed,) = [e for e in entries if e["request_id"] == ledger_id]
    assert resumed["resolution"]["state"] == "captured" and resumed["upstream_id"]


async def test_a_sync_answer_for_an_entry_an_admin_released_is_corrected(
    fleet: Fleet, upstream: Upstream
) -> None:
    """A settlement that did not land was dropped without a word, whatever the reason: here
    the admin released the paused instance's uncertain request, which the upstream then
    served (two images)."""
    a, _, paused, release, ledger_id = await paused_and_reaped(fleet, upstream, quality="high", n=2)
    await fleet.cli("ledger", "resolve", ledger_id, "--released", "--reason", "not billed yet")
    assert a.proc is not None
    a.proc.send_signal(signal.SIGCONT)
    release.set()
    assert (await paused)[0] == 200
    (entry,) = await fleet.until_entries(lambda es: es[0]["settled_cny"] == 0.8)
    assert [(c["images"], c["amount_cny"]) for c in entry["corrections"]] == [(2, 0.8)]
    assert (entry["state"], entry["settled_cny"], entry["images"]) == ("released", 0.8, 2)
    await fleet.books_balance()
    assert await metric(a.url, "gateway_ledger_corrections_total{") == 1
    await a.stop()
    assert f"CORRECTION: ledger id {ledger_id} (team design): 0.8000 CNY" in await a.stderr()
