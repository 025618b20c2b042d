"""The result store with real processes (issue 25): a gateway process in front of a fake upstream
process that the test stops, a fleet of two on PostgreSQL, and ``results purge``."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import ADMIN_KEY, PG_URL_ENV, TEAM_KEYS, UPSTREAM_KEY, base_config, merge
from tests.process import GatewayProcess, to_toml
from tests.upstream_process import UpstreamProcess

pytestmark = pytest.mark.process

Start = Callable[..., Awaitable[GatewayProcess]]
PROXY = {"upstream": {"proxy_results": True}}


@pytest.fixture
async def fake() -> AsyncIterator[UpstreamProcess]:
    process = UpstreamProcess("default", UPSTREAM_KEY)
    await process.start()
    yield process
    await process.close()


@pytest.fixture
async def gateways(tmp_path: Path, fake: UpstreamProcess) -> AsyncIterator[Start]:
    """``await start(name, **overrides)``: a gateway process with its own config file."""
    started: list[GatewayProcess] = []

    async def start(name: str = "gw", env: dict[str, str] | None = None, **overrides: Any) -> Any:
        config = merge(base_config(tmp_path, fake.url), overrides)
        if config["storage"].get("backend") == "postgres":
            config["storage"].pop("database", None)
        path = tmp_path / f"{name}.toml"
        path.write_text(to_toml(config))
        process = GatewayProcess(path, env=env)
        started.append(process)
        await process.start()
        return process

    yield start
    for process in started:
        await process.close()


async def generate(url: str, team: str = "design", headers: dict[str, str] | None = None,
                   **body: Any) -> tuple[int, dict[str, Any], dict[str, str]]:  # fmt: skip
    async with aiohttp.ClientSession() as http:
        async with http.post(
            url + "/v1/images/generations",
            headers={"Authorization": f"Bearer {TEAM_KEYS[team]}", **(headers or {})},
            json={"prompt": "a harbour at dawn", **body},
        ) as resp:
            return resp.status, await resp.json(), dict(resp.headers)


async def get(url: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as resp:
            return resp.status, await resp.read()


async def delete(url: str, request_id: str, team: str = "design") -> int:
    async with aiohttp.ClientSession() as http:
        async with http.delete(
            f"{url}/v1/images/results/{request_id}",
            headers={"Authorization": f"Bearer {TEAM_KEYS[team]}"},
        ) as resp:
            return resp.status


async def stored_images(url: str) -> float:
    async with aiohttp.ClientSession() as http:
        async with http.get(
            url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        ) as resp:
            text = await resp.text()
    line = next(line for line in text.splitlines() if line.startswith("gateway_results_images "))
    return float(line.split()[1])


async def until_stored(url: str, count: int, seconds: float = 20) -> None:
    """Wait (with a deadline) until the process's store holds ``count`` images."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while await stored_images(url) < count:
        assert loop.time() < deadline, "the images were never stored"
        await asyncio.sleep(0.05)


async def books_balance(gateway: GatewayProcess, served: int, env: dict[str, str] | None = None
                        ) -> None:  # fmt: skip
    """The ledger read from outside, once nothing is held: its counters equal its entries,
    every entry was captured, and it charged the images the fake upstream served (``served``,
    read before the upstream was stopped)."""
    config = gateway.config
    assert config is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while True:
        code, out = await cli(config, "ledger", "list", "--json", "--period", "total", env=env)
        assert code == 0, out
        entries = json.loads(out)["entries"]
        if all(e["state"] != "held" for e in entries) or loop.time() > deadline:
            break
        await asyncio.sleep(0.05)  # a sync settlement follows its answer
    assert {e["state"] for e in entries} == {"captured"}
    assert sum(e["images"] for e in entries) == served
    code, out = await cli(config, "ledger", "verify", env=env)
    assert code == 0 and out.startswith("consistent"), out


async def cli(config: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args, "--config", str(config),
        env={**os.environ, "TEST_UPSTREAM_KEY": UPSTREAM_KEY, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, (out + err).decode()


async def test_a_paid_result_outlives_its_upstream(gateways: Start, fake: UpstreamProcess) -> None:
    gateway = await gateways(**PROXY)
    key = {"Idempotency-Key": "harbour"}
    status, answer, _ = await generate(gateway.url, headers=key, response_format="b64_json")
    assert status == 200
    image = base64.b64decode(answer["data"][0]["b64_json"])
    status, by_url, _ = await generate(gateway.url, prompt="by its url", n=2)
    assert status == 200
    await until_stored(gateway.url, 3)
    expected = []
    for item in by_url["data"]:
        status, body = await get(item["url"])
        assert status == 200
        expected.append(body)
    served = (await fake.state())["served_images"]
    await fake.kill()  # the upstream and its file host are gone
    for item, body in zip(by_url["data"], expected, strict=True):
        assert await get(item["url"]) == (200, body)
    status, again, headers = await generate(gateway.url, headers=key, response_format="b64_json")
    assert status == 200 and headers["Idempotent-Replayed"] == "true"
    assert base64.b64decode(again["data"][0]["b64_json"]) == image
    assert "X-Gateway-Warning" not in headers
    await books_balance(gateway, served)


async def test_deleted_by_the_owner_or_by_purge_is_gone(
    gateways: Start, fake: UpstreamProcess, tmp_path: Path
) -> None:
    gateway = await gateways(**PROXY)
    _, first, headers = await generate(gateway.url, prompt="first")
    first_id = headers["X-Request-ID"]  # the ledger id, when the client sent no id of its own
    _, second, _ = await generate(gateway.url, prompt="second", team="ops")
    await until_stored(gateway.url, 2)
    assert await delete(gateway.url, first_id, team="ops") == 404
    assert await delete(gateway.url, first_id) == 200
    assert (await get(first["data"][0]["url"]))[0] == 410
    assert await delete(gateway.url, first_id) == 410
    assert (await get(second["data"][0]["url"]))[0] == 200
    code, out = await cli(gateway.config, "results", "purge", "--team", "ops", "--json")  # type: ignore[arg-type]
    assert code == 0 and '"images": 1' in out, out
    assert (await get(second["data"][0]["url"]))[0] == 410
    files = [p for p in (tmp_path / "results").rglob("*") if p.is_file()]
    assert files == []
    code, out = await cli(gateway.config, "results", "purge", "--before", "someday")  # type: ignore[arg-type]
    assert code == 1 and out.count("\n") == 1 and "--before" in out
    await books_balance(gateway, (await fake.state())["served_images"])  # the ledger untouched


async def test_a_fleet_answers_a_result_made_on_the_other_instance(
    gateways: Start, fake: UpstreamProcess, migrated_postgres_dsn: str, tmp_path: Path
) -> None:
    env = {PG_URL_ENV: migrated_postgres_dsn}
    storage = {"backend": "postgres", "dsn_env": PG_URL_ENV}
    first = await gateways("a", env, storage=storage, results={"directory": "results-a"}, **PROXY)
    second = await gateways("b", env, storage=storage, results={"directory": "results-b"}, **PROXY)
    _, answer, headers = await generate(first.url, n=2)
    await until_stored(first.url, 2)
    urls = [item["url"].replace(first.url, second.url) for item in answer["data"]]
    bodies = [await get(url) for url in urls]  # b has no file: fetched from the upstream, kept
    assert [status for status, _ in bodies] == [200, 200]
    assert len(list((tmp_path / "results-b").rglob("*/*/*"))) == 2
    served = (await fake.state())["served_images"]
    await fake.kill()
    assert [await get(url) for url in urls] == bodies  # from b's own store now
    assert (
        await delete(second.url, headers["X-Request-ID"]) == 200
    )  # deleted through the other instance
    assert [(await get(item["url"]))[0] for item in answer["data"]] == [410, 410]
    await books_balance(first, served, env)


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A directory on a filesystem with no room left: a 64 KiB tmpfs, filled."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    mount = tmp_path / "full"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    try:
        (mount / "results").mkdir()
        with contextlib.suppress(OSError), (mount / "filler").open("wb") as fh:
            while True:
                fh.write(b"\0" * 4096)
                fh.flush()
        yield mount / "results"
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


async def test_a_full_disk_never_fails_a_paid_request(
    gateways: Start, fake: UpstreamProcess, full_disk: Path
) -> None:
    gateway = await gateways(results={"directory": str(full_disk)}, **PROXY)
    status, answer, _ = await generate(gateway.url, response_format="b64_json")
    assert status == 200 and base64.b64decode(answer["data"][0]["b64_json"])[:4] == b"\x89PNG"
    status, by_url, _ = await generate(gateway.url, prompt="by url")
    assert status == 200
    status, body = await get(by_url["data"][0]["url"])  # streamed from the upstream
    assert status == 200 and body[:4] == b"\x89PNG"
    assert await failures(gateway.url, "disk") >= 2
    assert not any(full_disk.rglob("*/*/*"))
    await books_balance(gateway, (await fake.state())["served_images"])
    await gateway.stop()
    assert "No space left on device" in await gateway.stderr()
    assert "WARNING" in await gateway.stderr()


async def failures(url: str, reason: str, seconds: float = 20) -> float:
    """``gateway_results_fetch_failures_total{reason}`` once it is above zero (or at the
    deadline)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        async with aiohttp.ClientSession() as http:
            async with http.get(
                url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
            ) as resp:
                text = await resp.text()
        wanted = f'gateway_results_fetch_failures_total{{reason="{reason}"}} '
        value = float(next(ln for ln in text.splitlines() if ln.startswith(wanted)).split()[1])
        if value >= 2 or loop.time() > deadline:
            return value
        await asyncio.sleep(0.05)
