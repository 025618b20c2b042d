"""A fleet rehearsal (issue 21): ``image-gateway simulate-upstream`` runs the simulator alone, so
several real gateway processes on one PostgreSQL share its tasks and result files, and
``GET /__served`` says what it delivered, to the fen of ``ledger export``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.core.config import postgres_name
from tests.conftest import PG_URL_ENV, TEAM_KEYS, UPSTREAM_KEY, base_config, merge
from tests.process import GatewayProcess, to_toml

pytestmark = pytest.mark.process

BANNER_END = "Press Ctrl-C to stop."
DESIGN = {"Authorization": f"Bearer {TEAM_KEYS['design']}"}


@pytest.fixture
async def simulator() -> AsyncIterator[GatewayProcess]:
    """``image-gateway simulate-upstream --port 0`` as a real process, fast generations."""
    process = GatewayProcess(
        None, command="simulate-upstream", args=("--port", "0", "--delay", "0.1")
    )
    await process.start()
    yield process
    await process.close()


async def image_gateway(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args,
        env={**os.environ, "TEST_UPSTREAM_KEY": UPSTREAM_KEY, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def call(method: str, url: str, **kwargs: Any) -> tuple[int, Any, dict[str, str]]:
    async with aiohttp.ClientSession() as http:
        async with http.request(method, url, **kwargs) as resp:
            return resp.status, await resp.json(), dict(resp.headers)


async def test_two_instances_share_one_simulated_upstream_and_its_bill_matches_the_ledger(
    simulator: GatewayProcess, tmp_path: Path, postgres_dsn: str
) -> None:
    banner = await simulator.stdout_until(BANNER_END)
    assert f'[upstream] base_url = "{simulator.url}"' in banner
    assert "ledger    none here" in banner
    config = merge(base_config(tmp_path, simulator.url), {"tasks": {"settle_interval_s": 600}})
    config["storage"] = {"backend": "postgres", "dsn_env": PG_URL_ENV}
    path = tmp_path / "fleet.toml"
    path.write_text(to_toml(config))
    a, b = (GatewayProcess(path, env={PG_URL_ENV: postgres_dsn}) for _ in range(2))
    try:
        await asyncio.gather(a.start(), b.start())
        generations = "/v1/images/generations"
        status, task, _ = await call(
            "POST", a.url + generations + "?async=1", headers=DESIGN,
            json={"prompt": "submitted on a", "n": 2, "quality": "high"},
        )  # fmt: skip
        assert (status, task["status"]) == (202, "pending")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:  # polled on the other instance until the shared simulator completes it
            status, polled, _ = await call(
                "GET", f"{b.url}/v1/images/tasks/{task['task_id']}", headers=DESIGN
            )
            assert status == 200, polled  # never the 404 of an instance with its own simulator
            if polled["status"] != "pending" or loop.time() > deadline:
                break
            await asyncio.sleep(0.05)
        assert polled["status"] == "completed" and polled["data"][0]["url"]
        status, image, _ = await call("POST", b.url + generations, headers=DESIGN,
                                      json={"prompt": "sync on b"})  # fmt: skip
        assert status == 200
        async with aiohttp.ClientSession() as http:  # a result file of the shared simulator
            async with http.get(image["data"][0]["url"]) as resp:
                assert resp.status == 200 and (await resp.read()).startswith(b"\x89PNG")
        status, _, _ = await call("POST", a.url + generations, headers=DESIGN,
                                  json={"prompt": "[fail] not served"})  # fmt: skip
        assert status == 500

        status, served, _ = await call("GET", simulator.url + "/__served")
        code, out, _ = await image_gateway(
            "ledger", "export", "--config", str(path), "--period", "total", "--format", "json",
            env={PG_URL_ENV: postgres_dsn},
        )  # fmt: skip
        assert code == 0
        rows = json.loads(out)["rows"]
        assert (status, served["count"], served["images"], served["cost_cny"]) == (200, 2, 3, 1.0)
        assert {(s["id"], s["images"], s["cost_cny"]) for s in served["served"]} == {
            (r["upstream_id"], r["images"], r["amount_cny"]) for r in rows if r["images"]
        }
        assert [r["state"] for r in rows] == ["captured", "captured", "released"]
        assert {s["kind"] for s in served["served"]} == {"task", "generation"}
        code, out, _ = await image_gateway(
            "ledger", "verify", "--config", str(path), env={PG_URL_ENV: postgres_dsn}
        )
        assert (code, out) == (0, "consistent (3 entries)\n")
        for gateway in (a, b):
            assert (await gateway.stop())[0] == 0
    finally:
        await a.close()
        await b.close()
    simulator.signal(signal.SIGINT)  # Ctrl-C stops it as cleanly as SIGTERM
    code, stderr = await simulator.stop(signal_it=False)
    assert code == 0 and "stopped cleanly" in stderr
    assert "served 2 generation(s) and task(s), 3 image(s)" in stderr


def readme_served_example() -> dict[str, Any]:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    after = text.split("`GET /__served` on it lists", 1)[1]
    return dict(json.loads(after.split("```json\n", 1)[1].split("```", 1)[0]))


async def test_the_simulator_accepts_any_sk_key_and_nothing_else(
    simulator: GatewayProcess,
) -> None:
    body = {"model": "gpt-image-2", "prompt": "x"}
    url = simulator.url + "/v1/images/generations"
    for key, expected in (
        ("sk_one_gateway", 200),
        ("sk_another_gateway", 200),
        ("igw_a_team_key", 401),
        ("sk_", 401),
        ("sk_with space", 401),
        ("sk_no_bearer", 401),
    ):
        scheme = "" if key == "sk_no_bearer" else "Bearer "
        status, _, _ = await call(
            "POST", url, json=body, headers={"Authorization": f"{scheme}{key}"}
        )
        assert status == expected, key
    status, served, _ = await call("GET", simulator.url + "/__served")
    assert (served["count"], served["images"], served["cost_cny"]) == (2, 2, 0.4)  # 2 accepted
    documented = readme_served_example()  # README "A fleet rehearsal": the same shape
    assert set(served) == set(documented) == {"served", "count", "images", "cost_cny"}
    assert set(served["served"][0]) == set(documented["served"][0])
    assert set(documented["served"][0]) == {
        "id", "kind", "quality", "images", "cost_cny", "served_at"
    }  # fmt: skip
    code, stderr = await simulator.stop()
    assert code == 0 and "stopped cleanly" in stderr


async def test_simulate_upstream_on_a_port_in_use_is_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = await image_gateway("simulate-upstream", "--port", str(port))
    assert (code, out) == (1, "")
    assert err == (
        f"image-gateway: cannot start: cannot listen on 127.0.0.1:{port}: address already in use\n"
    )


async def test_a_rehearsal_of_a_postgres_config_points_at_simulate_upstream(tmp_path: Path) -> None:
    config = merge(base_config(tmp_path, "http://127.0.0.1:9"), {})
    config["storage"] = {"backend": "postgres", "dsn_env": PG_URL_ENV}
    path = tmp_path / "fleet.toml"
    path.write_text(to_toml(config))
    dsn = "postgresql://gateway:s3cret-pw@db.internal:5433/ledger"
    code, out, err = await image_gateway(
        "serve", "--config", str(path), "--simulate-upstream", env={PG_URL_ENV: dsn}
    )
    assert (code, out, err.count("\n")) == (1, "", 1)
    assert err.startswith("image-gateway: --simulate-upstream gives each instance a simulator")
    assert "`image-gateway simulate-upstream --port N`" in err
    assert "s3cret" not in err
    checked = await image_gateway(
        "check-config", "--config", str(path), "--simulate-upstream", env={PG_URL_ENV: dsn}
    )
    assert checked == (1, "", err)  # check-config says the same, before any connection


def test_the_ledger_is_named_by_host_and_database_never_the_password() -> None:
    for dsn, name in (
        ("postgresql://gw:pw@db.internal:5433/ledger", "PostgreSQL database ledger on db.internal:5433"),
        ("postgresql://gw:pw@db.internal/ledger?sslmode=require", "PostgreSQL database ledger on db.internal"),
        ("postgres://gw@/ledger?host=/run/postgresql", "PostgreSQL database ledger on /run/postgresql"),
        ("postgresql://gw:pw@db", "PostgreSQL database gw on db"),
    ):  # fmt: skip
        assert postgres_name(dsn) == name
        assert "pw" not in postgres_name(dsn)
