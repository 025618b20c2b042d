"""Several gateway processes on one PostgreSQL (issue 14): no overspend and no double
generation across them, fleet-wide limits, one upstream poll per TTL, and a dead instance's
holds closed after its lease and not before."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.client import post
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
from tests.process import GatewayProcess, to_toml

pytestmark = pytest.mark.process

Fleet = Callable[..., Awaitable[list[GatewayProcess]]]


@pytest.fixture
async def fleet(tmp_path: Path, upstream: Upstream, postgres_dsn: str) -> AsyncIterator[Fleet]:
    """``await fleet(3, **overrides)``: that many gateways sharing one fresh PostgreSQL."""
    started: list[GatewayProcess] = []

    async def start(count: int, **overrides: Any) -> list[GatewayProcess]:
        config = merge(base_config(tmp_path, upstream.url), overrides)
        config["storage"] = {"backend": "postgres", "dsn_env": PG_URL_ENV,
                             **overrides.get("storage", {})}  # fmt: skip
        path = tmp_path / "fleet.toml"
        path.write_text(to_toml(config))
        new = [GatewayProcess(path, env={PG_URL_ENV: postgres_dsn}) for _ in range(count)]
        started.extend(new)
        await asyncio.gather(*(p.start() for p in new))  # migrations race: the lock decides
        return new

    yield start
    for process in started:
        await process.close()


async def in_flight(url: str) -> float:
    async with aiohttp.ClientSession() as http:
        async with http.get(
            url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        ) as resp:
            text = await resp.text()
    line = next(
        line for line in text.splitlines() if line.startswith("gateway_requests_in_flight ")
    )
    return float(line.split()[1]) - 1  # the scrape itself is in flight too


async def until(
    measure: Callable[[], Awaitable[float]], at_least: float, seconds: float = 20
) -> None:
    """Wait for a condition another process exposes (its metrics), with a deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while await measure() < at_least:
        assert loop.time() < deadline, "the condition never held"
        await asyncio.sleep(0.05)


async def cli(config: Path, dsn: str, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args, "--config", str(config),
        env={**os.environ, PG_URL_ENV: dsn, "TEST_UPSTREAM_KEY": UPSTREAM_KEY},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, (out + err).decode()


async def test_a_burst_over_three_instances_stops_exactly_at_the_budget(
    fleet: Fleet, upstream: Upstream, tmp_path: Path, postgres_dsn: str
) -> None:
    instances = await fleet(3, teams={"design": {"budget_cny": 1.4, "period": "total"}})
    results = await asyncio.gather(*(post(instances[i % 3].url) for i in range(300)))
    statuses = [status for status, *_ in results]
    assert (statuses.count(200), statuses.count(402)) == (7, 293)  # 7 x 0.2 = 1.4
    assert len(upstream.sim.generation_requests()) == 7
    code, out = await cli(tmp_path / "fleet.toml", postgres_dsn, "ledger", "verify")
    assert (code, out.strip()) == (0, "consistent (7 entries)")
    code, out = await cli(tmp_path / "fleet.toml", postgres_dsn, "usage", "--json")
    assert json.loads(out)["teams"]["design"]["spent_cny"] == pytest.approx(1.4)


async def test_an_idempotency_key_and_an_sdk_retry_across_instances_buy_once(
    fleet: Fleet, upstream: Upstream
) -> None:
    a, b = await fleet(2)
    release, arrived = asyncio.Event(), asyncio.Event()
    upstream.faults.add(gate(release, arrived))
    key = {"Idempotency-Key": "split-across"}
    first = asyncio.create_task(post(a.url, headers=key))
    await arrived.wait()
    status, body, _ = await post(b.url, headers=key)  # in flight on A
    assert (status, body["error"]["code"]) == (409, "idempotency_key_in_use")
    release.set()
    done = await first
    assert done.status == 200
    replay = await post(b.url, headers=key)  # B replays A's outcome
    assert (replay.status, replay.body) == (done.status, done.body)
    assert len(upstream.sim.generation_requests()) == 1

    release, arrived = asyncio.Event(), asyncio.Event()
    upstream.faults.add(gate(release, arrived))
    original = asyncio.create_task(post(a.url, prompt="retried"))
    await arrived.wait()
    retry = asyncio.create_task(
        post(b.url, headers={"x-stainless-retry-count": "1"}, prompt="retried")
    )
    await until(lambda: in_flight(b.url), 1)  # B holds the retry, waiting on the shared ledger
    assert not retry.done()
    release.set()
    assert (await original)[1] == (await retry)[1]  # one generation, one answer
    assert len(upstream.sim.generation_requests()) == 2


async def test_limits_are_fleet_wide(fleet: Fleet, upstream: Upstream) -> None:
    instances = await fleet(3, teams={"design": {"max_concurrent": 2}, "ops": {"rpm": 3}})
    releases = []
    held = []
    for instance in instances[:2]:
        release, arrived = asyncio.Event(), asyncio.Event()
        upstream.faults.add(gate(release, arrived))
        held.append(asyncio.create_task(post(instance.url)))
        await arrived.wait()
        releases.append(release)
    status, body, _ = await post(instances[2].url)
    assert status == 429 and "max_concurrent" in body["error"]["message"]
    for release in releases:
        release.set()
    assert [(await task)[0] for task in held] == [200, 200]
    assert (await post(instances[2].url))[0] == 200  # room again

    async def ops(url: str) -> int:
        async with aiohttp.ClientSession() as http:
            async with http.post(
                url + "/v1/images/generations",
                headers={"Authorization": f"Bearer {TEAM_KEYS['ops']}"},
                json={"prompt": "x"},
            ) as resp:
                return resp.status

    assert [await ops(instances[i % 3].url) for i in range(4)] == [200, 200, 200, 429]


async def test_concurrent_polls_across_three_instances_cost_one_upstream_poll(
    fleet: Fleet, upstream: Upstream
) -> None:
    instances = await fleet(3, tasks={"poll_cache_ttl_s": 60, "settle_interval_s": 600})
    async with aiohttp.ClientSession() as http:
        async with http.post(
            instances[0].url + "/v1/images/generations?async=1",
            headers={"Authorization": f"Bearer {TEAM_KEYS['design']}"},
            json={"prompt": "polled"},
        ) as resp:
            task_id = (await resp.json())["task_id"]

        async def poll(url: str) -> str:
            async with http.get(
                f"{url}/v1/images/tasks/{task_id}",
                headers={"Authorization": f"Bearer {TEAM_KEYS['design']}"},
            ) as resp:
                assert resp.status == 200
                return (await resp.json())["status"]

        answers = await asyncio.gather(*(poll(instances[i % 3].url) for i in range(200)))
    assert set(answers) == {"pending"}
    assert len(upstream.sim.task_polls(task_id)) == 1


async def test_a_killed_instance_leaves_the_others_serving_and_its_holds_uncertain_after_its_lease(
    fleet: Fleet, upstream: Upstream, tmp_path: Path, postgres_dsn: str
) -> None:
    a, b = await fleet(2, storage={"instance_lease_s": 3})
    release, arrived = asyncio.Event(), asyncio.Event()
    upstream.faults.add(gate(release, arrived))
    doomed = asyncio.create_task(post(a.url, prompt="in flight when killed"))
    await arrived.wait()
    a.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    await a.proc.wait()  # type: ignore[union-attr]
    with pytest.raises(aiohttp.ClientError):
        await doomed
    assert (await post(b.url))[0] == 200  # the others keep answering
    code, out = await cli(tmp_path / "fleet.toml", postgres_dsn, "ledger", "list", "--json",
                          "--period", "total")  # fmt: skip
    states = {e["reason"] or "": e["state"] for e in json.loads(out)["entries"]}
    assert "held" in states.values()  # not before its lease
    release.set()  # the upstream generates it after all: paid, and nobody got it
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:  # B's reaper runs every lease/3: wait for it, with a deadline
        code, out = await cli(tmp_path / "fleet.toml", postgres_dsn, "ledger", "list", "--json",
                              "--state", "uncertain", "--period", "total")  # fmt: skip
        uncertain = json.loads(out)["entries"]
        if uncertain or loop.time() > deadline:
            break
        await asyncio.sleep(0.5)
    assert [e["reason"] for e in uncertain] == [
        "the gateway stopped while the request was in flight"
    ]
    sent = len(upstream.sim.generation_requests())
    _, body, _ = await post(
        b.url, headers={"x-stainless-retry-count": "1"}, prompt="in flight when killed"
    )
    assert body["error"]["code"] == "outcome_unknown"  # never a second paid generation
    assert len(upstream.sim.generation_requests()) == sent
    code, out = await cli(tmp_path / "fleet.toml", postgres_dsn, "ledger", "verify")
    assert code == 0
