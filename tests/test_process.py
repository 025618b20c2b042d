"""Real gateway processes: sd_notify, SIGHUP reload, SIGTERM drain, SIGKILL crash recovery, demo."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.client import post
from tests.conftest import ADMIN_KEY, TEAM_KEYS, Upstream, base_config, merge
from tests.fakes import gate
from tests.process import GatewayProcess, to_toml

pytestmark = pytest.mark.process

Start = Callable[..., Awaitable[GatewayProcess]]


@pytest.fixture
async def start_process(tmp_path: Path, upstream: Upstream) -> AsyncIterator[Start]:
    started: list[GatewayProcess] = []

    async def start(**overrides: Any) -> GatewayProcess:
        write_config(tmp_path, upstream, **overrides)
        process = GatewayProcess(tmp_path / "gateway.toml")
        started.append(process)
        await process.start()
        return process

    yield start
    for process in started:
        await process.close()


def write_config(tmp_path: Path, upstream: Upstream, **overrides: Any) -> None:
    config = merge(base_config(tmp_path, upstream.url), overrides)
    (tmp_path / "gateway.toml").write_text(to_toml(config))


def headers(team: str = "design") -> dict[str, str]:
    return {"Authorization": f"Bearer {TEAM_KEYS[team]}"}


def ledger(tmp_path: Path) -> list[tuple[str, int]]:
    with sqlite3.connect(f"file:{tmp_path / 'gateway.db'}?mode=ro", uri=True) as db:
        return [
            tuple(row) for row in db.execute("SELECT state, held FROM ledger ORDER BY created_at")
        ]


async def test_sd_notify_reload_and_stop_messages(
    start_process: Start, tmp_path: Path, upstream: Upstream
) -> None:
    process = await start_process()
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", process.url)
    assert process.messages[0].splitlines()[0] == "READY=1"
    process.signal(signal.SIGHUP)
    reloading = await process.expect("RELOADING=1")
    assert re.search(r"^MONOTONIC_USEC=\d+$", reloading, re.M)
    await process.expect("READY=1")
    process.signal(signal.SIGTERM)
    await process.expect("STOPPING=1")
    code, stderr = await process.stop(signal_it=False)
    assert code == 0
    assert "stopped cleanly" in stderr


async def test_sighup_applies_a_new_budget_and_ignores_a_broken_config(
    start_process: Start, tmp_path: Path, upstream: Upstream
) -> None:
    process = await start_process()
    assert (await post(process.url))[0] == 200
    write_config(tmp_path, upstream, teams={"design": {"budget_cny": 0.3}})
    process.signal(signal.SIGHUP)
    await process.expect("READY=1")
    status, body, _ = await post(process.url)
    assert status == 402 and "budget 0.3000 CNY" in body["error"]["message"]
    (tmp_path / "gateway.toml").write_text("[server]\nport = 'not a number'\n")
    process.signal(signal.SIGHUP)
    await process.expect("READY=1")
    assert (await post(process.url, quality="low"))[0] == 200  # the 0.3 budget still rules
    assert (await post(process.url))[0] == 402
    code, stderr = await process.stop()
    assert code == 0
    assert "reload refused" in stderr and "server.port" in stderr


async def test_sigterm_drains_a_slow_request(
    start_process: Start, tmp_path: Path, upstream: Upstream
) -> None:
    process = await start_process()
    release, arrived = asyncio.Event(), asyncio.Event()
    upstream.faults.add(gate(release, arrived))
    slow = asyncio.create_task(post(process.url))
    await arrived.wait()
    process.signal(signal.SIGTERM)
    await process.expect("STOPPING=1")
    with pytest.raises(aiohttp.ClientConnectionError):
        await post(process.url)  # no new connections while draining
    process.signal(signal.SIGTERM)  # a second SIGTERM while draining changes nothing
    release.set()
    status, body, _ = await slow
    assert status == 200 and body["data"][0]["url"]
    code, _ = await process.stop(signal_it=False)
    assert code == 0
    assert ledger(tmp_path) == [("captured", 2000)]


async def test_sigkill_during_the_upstream_call_leaves_an_uncertain_hold(
    start_process: Start, tmp_path: Path, upstream: Upstream
) -> None:
    process = await start_process()
    release, arrived = asyncio.Event(), asyncio.Event()
    upstream.faults.add(gate(release, arrived))
    request = asyncio.create_task(post(process.url, quality="high"))
    await arrived.wait()
    assert ledger(tmp_path) == [("held", 4000)]
    await process.kill()
    with pytest.raises(aiohttp.ClientError):
        await request
    release.set()
    restarted = await start_process()
    assert ledger(tmp_path) == [("uncertain", 4000)]
    report = await admin_usage(restarted.url)
    assert (report["reserved_cny"], report["uncertain_cny"], report["spent_cny"]) == (0.0, 0.4, 0.0)


async def test_sigkill_after_the_upstream_answered_before_capture(
    start_process: Start, tmp_path: Path, upstream: Upstream
) -> None:
    process = await start_process()
    release, arrived = asyncio.Event(), asyncio.Event()
    upstream.faults.add(gate(release, arrived))
    request = asyncio.create_task(post(process.url))
    await arrived.wait()
    blocker = sqlite3.connect(tmp_path / "gateway.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # the capture will wait for this lock
    release.set()
    status, *_ = await request  # the answer does not wait for the capture to commit
    assert status == 200
    await process.kill()  # ... which is still waiting for the lock
    blocker.execute("ROLLBACK")
    blocker.close()
    await start_process()
    assert ledger(tmp_path) == [("uncertain", 2000)]  # served upstream: counted, never refunded


async def test_idempotent_outcomes_survive_sigkill(start_process: Start, tmp_path: Path) -> None:
    process = await start_process()
    async with aiohttp.ClientSession() as http:
        key = {**headers(), "Idempotency-Key": "survives-kill-9"}
        async with http.post(
            process.url + "/v1/images/generations", headers=key, json={"prompt": "x"}
        ) as resp:
            first = await resp.json()
        await process.kill()
        restarted = await start_process()
        async with http.post(
            restarted.url + "/v1/images/generations", headers=key, json={"prompt": "x"}
        ) as resp:
            assert resp.headers["Idempotent-Replayed"] == "true"
            assert await resp.json() == first


async def admin_usage(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(
            url + "/admin/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        ) as resp:
            return (await resp.json())["teams"]["design"]


async def test_metrics_on_their_own_port(start_process: Start, unused_tcp_port: int) -> None:
    process = await start_process(metrics={"port": unused_tcp_port})
    async with aiohttp.ClientSession() as http:
        async with http.get(process.url + "/metrics") as resp:
            assert resp.status == 404
        async with http.get(f"http://127.0.0.1:{unused_tcp_port}/metrics") as resp:
            assert resp.status == 401  # admin keys are configured: /metrics needs one
        async with http.get(
            f"http://127.0.0.1:{unused_tcp_port}/metrics",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        ) as resp:
            assert resp.status == 200
            assert "gateway_requests_in_flight" in await resp.text()


async def test_demo_mode_works_as_printed(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--demo", "--port", "0",
        cwd=tmp_path,  # its keys and database go to ./.image-gateway-demo/
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        banner = ""
        while "Press Ctrl-C" not in banner:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line, banner
            banner += line.decode()
        curl = banner.split("Generate an image with curl")[1].split("\n\n")[1]
        if shutil.which("curl") and shutil.which("bash"):  # run as printed, where curl exists
            shell = await asyncio.create_subprocess_exec(
                "bash", "-c", curl, stdout=asyncio.subprocess.PIPE
            )
            out, _ = await shell.communicate()
            url = json.loads(out)["data"][0]["url"]
            async with aiohttp.ClientSession() as http:
                async with http.get(url) as resp:
                    assert resp.status == 200 and resp.history[0].status == 302
                    assert (await resp.read()).startswith(b"\x89PNG\r\n\x1a\n")
        snippet = banner.split("OpenAI Python SDK:")[1].split("\n\n")[1]
        python = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "\n".join(line[4:] for line in snippet.splitlines()),
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await python.communicate()
        assert python.returncode == 0 and out.decode().startswith("http://127.0.0.1:")
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 30)
    assert proc.returncode == 0
