"""Rehearsal and start-up, on real processes: ``serve --config PATH --simulate-upstream`` runs
the real config against the embedded simulator, the demo keeps its key and ledger across
restarts, and a start that cannot succeed is one line and exit status 1."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from openai import OpenAI

from gateway import __version__
from tests.conftest import TEAM_KEYS, Upstream, base_config, merge
from tests.process import GatewayProcess, to_toml

pytestmark = pytest.mark.process

NO_KEY_VARIABLE = "IMAGE_GATEWAY_REHEARSAL_HAS_NO_KEY"  # never set: no central key is needed
BANNER_END = "Press Ctrl-C to stop."


def rehearsal_config(tmp_path: Path, fake: Upstream, **overrides: Any) -> Path:
    """The tests' production-like config: its [upstream] is a live fake that counts requests."""
    config = merge(base_config(tmp_path, fake.url), {"upstream": {"api_key_env": NO_KEY_VARIABLE}})
    path = tmp_path / "gateway.toml"
    path.write_text(to_toml(merge(config, overrides)))
    return path


def readme_sdk_example(url: str) -> str:
    """README "Pointing clients at it", with the team's key and the gateway's URL."""
    with OpenAI(base_url=url + "/v1", api_key=TEAM_KEYS["design"]) as client:
        image = client.images.generate(
            model="gpt-image-2", prompt="a lighthouse at dawn", size="1536x1024"
        )
        return str(image.data[0].url)


async def readme_curl_example(url: str, team: str = "design") -> tuple[int, dict[str, Any]]:
    """README's curl line, sent as it is: a JSON POST with the upstream's own shapes."""
    async with aiohttp.ClientSession() as http:
        async with http.post(
            url + "/v1/images/generations",
            headers={"Authorization": f"Bearer {TEAM_KEYS[team]}"},
            json={"model": "gpt-image-2", "prompt": "a corgi astronaut", "size": "16:9",
                  "resolution": "2k"},
        ) as resp:  # fmt: skip
            return resp.status, await resp.json()


async def get_json(url: str, key: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers=headers) as resp:
            return resp.status, await resp.json()


async def image_gateway(*args: str, cwd: Path | None = None) -> tuple[int, str, list[str]]:
    """Run ``image-gateway ARGS`` to its end: exit code, stdout, stderr's non-INFO lines."""
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args, cwd=cwd, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    lines = [line for line in err.decode().splitlines() if " INFO " not in line]
    return proc.returncode or 0, out.decode(), lines


# -- serve --config PATH --simulate-upstream --------------------------------------------------


async def test_a_rehearsal_runs_the_real_config_and_its_budgets_against_the_simulator(
    tmp_path: Path, upstream: Upstream
) -> None:
    config = rehearsal_config(tmp_path, upstream, teams={"design": {"budget_cny": "0.40"}})
    process = GatewayProcess(config, args=("--simulate-upstream",))
    try:
        url = await process.start()
        assert await get_json(url + "/readyz") == (
            200,
            {
                "status": "ready",
                "version": __version__,
                "checks": {
                    "config": "ok",
                    "database": "ok",
                    "central_key": "ok",
                    "upstream": "simulated",
                },
            },
        )
        sdk_url, (status, body), (ops_status, _) = await asyncio.gather(
            asyncio.to_thread(readme_sdk_example, url),
            readme_curl_example(url),
            readme_curl_example(url, team="ops"),  # another team's budget is its own
        )
        assert (status, ops_status) == (200, 200) and body["data"][0]["url"]
        async with aiohttp.ClientSession() as http:
            async with http.get(sdk_url) as resp:  # README: the URL answers 302 to a real PNG
                assert resp.status == 200 and resp.history[0].status == 302
                assert (await resp.read()).startswith(b"\x89PNG\r\n\x1a\n")
        status, body = await readme_curl_example(url)  # two medium images spent 0.40
        assert status == 402
        assert (body["error"]["type"], body["error"]["code"]) == (
            "insufficient_quota",
            "budget_exceeded",
        )
        assert "budget 0.4000 CNY" in body["error"]["message"]
        code, stderr = await process.stop()
        stdout = await process.stdout()
    finally:
        await process.close()
    assert code == 0
    assert upstream.sim.received == []  # the configured upstream never heard of it
    warnings = [line for line in stderr.splitlines() if " WARNING gateway: SIMULATED" in line]
    assert len(warnings) == 1 and "NOT PRODUCTION" in warnings[0], stderr
    assert "REHEARSAL" in stdout and "SIMULATED UPSTREAM, NOT PRODUCTION" in stdout
    assert f"  ledger    {tmp_path / 'gateway.db'}\n" in stdout  # the ledger really charged
    assert "sk_simulated_" not in stderr + stdout
    logged = [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()]
    assert sorted(
        (line["team"], line["status"]) for line in logged if line["endpoint"] == "generations"
    ) == [("design", 200), ("design", 200), ("design", 402), ("ops", 200)]

    code, out, errors = await image_gateway(
        "usage", "--config", str(config), "--team", "design", "--json"
    )
    assert (code, errors) == (0, [])
    design = json.loads(out)["teams"]["design"]
    assert (design["spent_cny"], design["remaining_cny"], design["images"]["medium"]) == (
        0.4,
        0.0,
        2,
    )
    code, out, errors = await image_gateway(
        "ledger", "list", "--config", str(config), "--team", "design", "--json"
    )
    assert (code, errors) == (0, [])
    assert [entry["state"] for entry in json.loads(out)["entries"]] == ["captured", "captured"]


async def test_a_rehearsal_reloads_its_config_without_a_central_key(
    tmp_path: Path, upstream: Upstream
) -> None:
    config = rehearsal_config(tmp_path, upstream, teams={"design": {"budget_cny": "0"}})
    process = GatewayProcess(config, args=("--simulate-upstream",))
    try:
        url = await process.start()
        assert (await readme_curl_example(url))[0] == 402
        rehearsal_config(tmp_path, upstream, teams={"design": {"budget_cny": "0.20"}})
        process.signal(signal.SIGHUP)
        await process.expect("READY=1")
        assert (await readme_curl_example(url))[0] == 200
        assert (await get_json(url + "/readyz"))[1]["checks"]["upstream"] == "simulated"
        code, stderr = await process.stop()
    finally:
        await process.close()
    assert code == 0
    assert "config reloaded" in stderr
    assert "reload refused" not in stderr and "only after a restart" not in stderr
    assert upstream.sim.received == []


async def test_readyz_of_a_production_gateway_names_no_simulated_upstream(
    tmp_path: Path, upstream: Upstream
) -> None:
    config = rehearsal_config(tmp_path, upstream, upstream={"api_key_env": "TEST_UPSTREAM_KEY"})
    process = GatewayProcess(config)
    try:
        url = await process.start()
        status, body = await get_json(url + "/readyz")
    finally:
        await process.close()
    assert status == 200 and "upstream" not in body["checks"]


# -- serve --demo -----------------------------------------------------------------------------


def banner_keys(banner: str) -> tuple[str, str]:
    team = re.search(r"Its key:\n\n    (igw_\S+)\n", banner)
    admin = re.search(r"/admin/usage -H \"Authorization: Bearer (igw_\S+)\"", banner)
    assert team and admin, banner
    return team[1], admin[1]


async def start_demo(cwd: Path) -> tuple[GatewayProcess, str]:
    process = GatewayProcess(None, args=("--demo", "--port", "0"), cwd=cwd)
    await process.start()
    return process, await process.stdout_until(BANNER_END)


async def test_the_demo_keeps_its_key_and_ledger_across_restarts(tmp_path: Path) -> None:
    process, banner = await start_demo(tmp_path)
    try:
        budget = re.search(r'Team "demo" has a daily budget of ([0-9.]+) CNY', banner)
        assert budget and float(budget[1]) >= 100, banner
        key, admin_key = banner_keys(banner)
        async with aiohttp.ClientSession() as http:
            async with http.post(
                process.url + "/v1/images/generations",
                headers={"Authorization": f"Bearer {key}"},
                json={"prompt": "an orange cat"},
            ) as resp:
                assert resp.status == 200
        code, stderr = await process.stop()
    finally:
        await process.close()
    assert code == 0 and key not in stderr and admin_key not in stderr
    folder = tmp_path / ".image-gateway-demo"
    assert str(folder) in banner
    assert f"The ledger: {folder / 'gateway.db'}\n" in banner
    assert folder.stat().st_mode & 0o777 == 0o700
    assert (folder / "keys.json").stat().st_mode & 0o777 == 0o600
    assert (folder / "gateway.db").exists()

    again, banner = await start_demo(tmp_path)
    try:
        assert banner_keys(banner) == (key, admin_key)  # a printed snippet keeps working
        status, report = await get_json(again.url + "/admin/usage", admin_key)
        assert status == 200 and report["teams"]["demo"]["spent_cny"] == 0.2  # the ledger too
    finally:
        await again.close()


async def test_the_demo_refuses_a_key_file_it_did_not_write(tmp_path: Path) -> None:
    folder = tmp_path / ".image-gateway-demo"
    folder.mkdir()
    (folder / "keys.json").write_text("not json")
    code, _, lines = await image_gateway("serve", "--demo", "--port", "0", cwd=tmp_path)
    assert (code, lines) == (
        1,
        [
            f"image-gateway: cannot start: {folder / 'keys.json'} is not the demo's key file "
            f"(delete {folder} to start over)"
        ],
    )


# -- start-up failures of both: one line, exit 1 ---------------------------------------------


@pytest.fixture
def taken_port() -> Any:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


async def test_the_demo_on_a_port_in_use_is_one_line(tmp_path: Path, taken_port: int) -> None:
    code, out, lines = await image_gateway(
        "serve", "--demo", "--port", str(taken_port), cwd=tmp_path
    )
    assert (code, out) == (1, "")
    assert lines == [
        f"image-gateway: cannot start: cannot listen on 127.0.0.1:{taken_port}: "
        "address already in use"
    ]


@pytest.mark.parametrize(
    "case", ["port in use", "log not writable", "config invalid", "with --demo", "with --port"]
)
async def test_a_rehearsal_that_cannot_start_is_one_line(
    tmp_path: Path, upstream: Upstream, taken_port: int, case: str
) -> None:
    args = ["serve", "--simulate-upstream"]
    if case == "port in use":
        config = rehearsal_config(tmp_path, upstream, server={"port": taken_port})
        expected = f"cannot start: cannot listen on 127.0.0.1:{taken_port}: address already in use"
    elif case == "log not writable":
        access = tmp_path / "no-such-folder" / "access.log"
        config = rehearsal_config(tmp_path, upstream, log={"access": str(access)})
        expected = f"cannot start: cannot open the access log {access}: No such file or directory"
    elif case == "config invalid":
        config = rehearsal_config(tmp_path, upstream, teams={"ops": {"rmp": 5}})
        expected = (
            f"{config}: invalid config: teams.ops.rmp is not a known setting; did you mean rpm?"
        )
    elif case == "with --demo":
        config, args = None, [*args, "--demo"]
        expected = "--simulate-upstream is only valid with --config (--demo always is)"
    else:
        config = rehearsal_config(tmp_path, upstream)
        args.extend(["--port", "9999"])
        expected = "--host and --port are for --demo; set [server] host and port instead"
    if config is not None:
        args.extend(["--config", str(config)])
    code, out, lines = await image_gateway(*args, cwd=tmp_path)
    assert (code, out, lines) == (1, "", [f"image-gateway: {expected}"])
    assert not (tmp_path / "gateway.db").exists()  # refused before the ledger was touched
    assert upstream.sim.received == []
