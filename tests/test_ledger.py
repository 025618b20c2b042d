"""Money an admin can close: resolving uncertain holds, an access log that adds up, the ledger
commands, and the four paths that used to break the promises (issue 11)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.core.ledger import Usage
from gateway.http.keys import DB, GENERATIONS, METRICS, TASKS
from gateway.store.base import LedgerQuery
from tests.client import get_task, post, usage
from tests.conftest import (
    ADMIN_KEY,
    Gateway,
    Upstream,
    base_config,
    books_balance,
    merge,
)
from tests.fakes import as_task, gate, hang, json_error, lost_answer, respond
from tests.process import GatewayProcess, to_toml, wait_for_lines

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
ENTRY_FIELDS = {
    "request_id", "team", "period", "created_at", "state", "quality", "n", "held_cny",
    "settled_cny", "images", "upstream_id", "task_id", "reason", "resolution", "overrun_cny",
    "corrections", "upstream",
}  # fmt: skip
EXPORT_HEADER = (
    "request_id,team,created_at,settled_at,state,quality,n,images,unit_price_cny,amount_cny,"
    "upstream_id,task_id,reason,corrected_cny,upstream"
)


async def cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


# -- the access log adds up ------------------------------------------------------------------


async def test_the_access_log_adds_up_to_usage_for_a_mixed_run(
    start_gateway, upstream: Upstream
) -> None:
    gateway = await start_gateway(upstream={"timeout_s": 0.5})
    url = gateway.url
    assert (await post(url, quality="high", n=2))[0] == 200  # sync: 0.8
    upstream.faults.add(json_error(500, "server_error", "failed"))
    assert (await post(url))[0] == 500  # released
    served = asyncio.Event()
    upstream.faults.add(lost_answer(served))
    status, _, _ = await post(url, quality="low")  # generated, the answer lost: uncertain 0.1
    assert status == 504
    await served.wait()  # ... and resolved below as captured
    await gateway.settled()
    (lost,) = [e for e in await gateway.db.entries(LedgerQuery()) if e.state == "uncertain"]
    _, polled_task, _ = await post(url, suffix="?async=1", quality="medium")  # async, polled: 0.2
    _, background_task, _ = await post(url, suffix="?async=1", quality="high")  # never polled
    upstream.sim.finish_task(polled_task["task_id"])
    assert (await get_task(gateway, polled_task["task_id"])).body["status"] == "completed"
    assert (await get_task(gateway, polled_task["task_id"])).body[
        "status"
    ] == "completed"  # carries 0
    upstream.sim.finish_task(background_task["task_id"])
    gateway.clock.advance(seconds=10)
    await gateway.app[TASKS].settle_due()  # the settler finds it: a line of its own
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{url}/admin/ledger/{lost.request_id}/resolve",
            headers=ADMIN,
            json={"state": "captured", "reason": "the provider's usage shows it"},
        ) as resp:
            assert resp.status == 200, await resp.text()
    assert await usage(gateway) == Usage(spent=8000 + 1000 + 2000 + 4000)
    lines = await gateway.log_lines()
    settle_lines = [line for line in lines if line["endpoint"] == "settle"]
    assert sorted((line["ledger_state"], line["cost_cny"]) for line in settle_lines) == [
        ("captured", 0.1),  # the resolution
        ("captured", 0.4),  # the task settled in the background
    ]
    completing = [line for line in lines if line["endpoint"] == "tasks"]
    assert [line["cost_cny"] for line in completing] == [0.2, 0.0]
    assert completing[0]["ledger_state"] == "captured"
    assert sum(line["cost_cny"] for line in lines) == pytest.approx(1.5)
    await books_balance(gateway, upstream)


# -- admin HTTP ------------------------------------------------------------------------------


async def test_admin_ledger_lists_and_resolves(start_gateway, upstream: Upstream) -> None:
    gateway = await start_gateway(upstream={"timeout_s": 0.5})
    upstream.faults.add(hang())
    await post(gateway.url, quality="high")
    assert (await post(gateway.url))[0] == 200
    await gateway.settled()
    async with aiohttp.ClientSession() as http:

        async def get(query: str) -> tuple[int, Any]:
            async with http.get(f"{gateway.url}/admin/ledger{query}", headers=ADMIN) as resp:
                return resp.status, await resp.json()

        async def resolve(request_id: str, body: Any) -> tuple[int, Any]:
            async with http.post(
                f"{gateway.url}/admin/ledger/{request_id}/resolve", headers=ADMIN, json=body
            ) as resp:
                return resp.status, await resp.json()

        status, listed = await get("?state=uncertain")
        assert status == 200
        (entry,) = listed["entries"]
        assert set(entry) == ENTRY_FIELDS
        assert (entry["state"], entry["held_cny"], entry["settled_cny"]) == ("uncertain", 0.4, 0.4)
        assert entry["reason"] == "upstream_timeout" and entry["resolution"] is None
        assert len((await get(""))[1]["entries"]) == 2
        assert (await get("?period=2026-11&team=design"))[0] == 200
        for bad in ("?state=lost", "?period=2026-13", "?period=yesterday", "?team=nobody"):
            status, body = await get(bad)
            assert (status, body["error"]["type"]) == (400, "invalid_request_error"), bad
        async with http.get(f"{gateway.url}/admin/ledger", headers=gateway.headers()) as resp:
            assert resp.status == 401

        request_id = entry["request_id"]
        for body, param in (
            ({"state": "kept", "reason": "x"}, "state"),
            ({"state": "released"}, "reason"),
            ({"state": "released", "reason": "  "}, "reason"),
            ({"state": "released", "reason": "ok\u0000"}, "reason"),  # PostgreSQL refuses NUL
            ({"state": "released", "reason": "ok\ud800"}, "reason"),  # a lone surrogate
            ({"state": "captured", "images": -1, "reason": "x"}, "images"),
            ({"state": "captured", "images": 2, "reason": "x"}, "images"),  # above the 1 held
            ({"state": "released", "reason": "x", "extra": 1}, "extra"),
            ([], None),
        ):
            status, error = await resolve(request_id, body)
            assert status == 400, body
            assert error["error"]["param"] == param, body
        assert (await resolve("req_nobody", {"state": "released", "reason": "x"}))[0] == 404
        status, resolved = await resolve(request_id, {"state": "released", "reason": "checked"})
        assert status == 200
        assert resolved["state"] == "released"
        assert resolved["resolution"]["state"] == "released"
        assert resolved["resolution"]["reason"] == "checked"
        status, again = await resolve(request_id, {"state": "released", "reason": "again"})
        assert (status, again["error"]["code"]) == (409, "not_uncertain")
        captured = next(e for e in (await get(""))[1]["entries"] if e["state"] == "captured")
        status, _ = await resolve(captured["request_id"], {"state": "released", "reason": "x"})
        assert status == 409
    assert await usage(gateway) == Usage(spent=2000)
    await books_balance(gateway, upstream)


# -- the four paths that broke the promises --------------------------------------------------


async def test_a_task_billed_above_its_hold_is_an_explicit_overrun(
    start_gateway, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = await start_gateway(teams={"design": {"budget_cny": 100.0}})
    _, task, _ = await post(gateway.url, suffix="?async=1")
    upstream.faults.add(
        respond({"task_id": task["task_id"], "status": "completed", "cost": 500,
                 "result_url": "https://api.icodeeasy.cc/v1/images/files/x-1.png"}),
        kind="TASK",
    )  # fmt: skip
    assert (await get_task(gateway, task["task_id"])).body["status"] == "completed"
    assert await usage(gateway) == Usage(spent=5_000_000, overrun=4_998_000)
    (entry,) = await gateway.db.entries(LedgerQuery())
    assert (entry.settled_amount, entry.overrun) == (2000, 4_998_000)
    registry = gateway.app[METRICS].registry
    assert registry.get_sample_value(
        "gateway_ledger_overrun_cny_total", {"team": "design"}
    ) == pytest.approx(499.8)
    assert any(entry.request_id in r.message and "overrun" in r.message for r in caplog.records)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gateway.url}/admin/usage", headers=ADMIN) as resp:
            assert (await resp.json())["teams"]["design"]["overrun_cny"] == pytest.approx(499.8)
        async with http.get(f"{gateway.url}/admin/ledger", headers=ADMIN) as resp:
            assert (await resp.json())["entries"][0]["overrun_cny"] == pytest.approx(499.8)
    await books_balance(gateway)


@pytest.mark.parametrize("cost", [-1, 1e30, "NaN", "Infinity", "lots", True, None])
async def test_an_unreadable_task_cost_is_charged_at_the_price_table(
    gateway: Gateway, upstream: Upstream, cost: Any
) -> None:
    _, task, _ = await post(gateway.url, suffix="?async=1", quality="high")
    upstream.faults.add(
        respond({"task_id": task["task_id"], "status": "completed", "cost": cost}), kind="TASK"
    )
    assert (await get_task(gateway, task["task_id"])).body["status"] == "completed"
    assert await usage(gateway) == Usage(spent=4000)
    await books_balance(gateway)


async def test_a_bad_task_never_stops_the_settler(gateway: Gateway, upstream: Upstream) -> None:
    _, bad, _ = await post(gateway.url, suffix="?async=1")
    _, good, _ = await post(gateway.url, suffix="?async=1", quality="low")
    upstream.sim.finish_task(good["task_id"])
    upstream.faults.add(respond({"task_id": bad["task_id"], "status": 7}), kind="TASK")
    gateway.clock.advance(seconds=10)
    await gateway.app[TASKS].settle_due()
    assert await usage(gateway) == Usage(spent=1000, reserved=2000)
    await books_balance(gateway)


async def test_a_202_to_a_sync_request_is_followed_to_its_images(
    start_gateway, upstream: Upstream
) -> None:
    gateway = await start_gateway(tasks={"poll_cache_ttl_s": 0.05})
    upstream.faults.add(as_task(upstream.sim.finish_task))
    status, body, _ = await post(gateway.url, n=2)
    assert status == 200, body
    assert body["id"] and body["data"][0]["url"].startswith(upstream.url)
    await gateway.settled()
    assert await usage(gateway) == Usage(spent=4000)
    (line,) = [line for line in await gateway.log_lines() if line["endpoint"] == "generations"]
    assert (line["status"], line["cost_cny"], line["ledger_state"]) == (200, 0.4, "captured")
    await books_balance(gateway, upstream)


async def test_a_200_to_an_async_request_is_a_completed_task(
    gateway: Gateway, upstream: Upstream
) -> None:
    upstream.faults.add(
        respond({"created": 1, "id": "gen-answered-at-once-0123456789",
                 "data": [{"url": "https://api.icodeeasy.cc/v1/images/files/a-1.png"}]})
    )  # fmt: skip
    status, body, _ = await post(gateway.url, suffix="?async=1")
    assert status == 200, body
    assert (body["status"], body["task_id"]) == ("completed", "gen-answered-at-once-0123456789")
    assert body["data"][0]["url"].endswith("a-1.png")
    assert (await get_task(gateway, body["task_id"])).body["status"] == "completed"
    assert upstream.sim.task_polls() == []  # answered from the ledger
    assert await usage(gateway) == Usage(spent=2000)
    await books_balance(gateway)


async def test_a_cancel_during_the_reservation_releases_the_hold(
    gateway: Gateway, upstream: Upstream, tmp_path: Path
) -> None:
    store = gateway.app[DB]
    original, reserving = store.reserve, asyncio.Event()

    async def spy(hold: Any) -> Any:
        reserving.set()
        return await original(hold)

    store.reserve = spy  # type: ignore[method-assign]
    blocker = sqlite3.connect(tmp_path / "gateway.db", isolation_level=None, timeout=30)
    blocker.execute("BEGIN IMMEDIATE")  # the reservation's write waits for this lock
    request = asyncio.create_task(post(gateway.url))
    await reserving.wait()  # its write is queued and waiting
    generations = gateway.app[GENERATIONS]
    (running,) = generations._by_request.values()
    drained = asyncio.create_task(generations.drain(0))  # shutdown, with the drain time over
    while not running.task.cancelling():  # noqa: ASYNC110 - no event marks a pending cancel
        await asyncio.sleep(0)
    blocker.execute("ROLLBACK")  # the write lands after all
    blocker.close()
    assert await drained == 1
    with pytest.raises(aiohttp.ClientError):
        await request
    (entry,) = await gateway.db.entries(LedgerQuery())
    assert (entry.state, entry.reason) == ("released", "cancelled before the request was sent")
    assert upstream.sim.generation_requests() == []
    assert await usage(gateway) == Usage()


# -- the ledger commands, with real processes ------------------------------------------------


@pytest.fixture
async def start_process(
    tmp_path: Path, upstream: Upstream
) -> AsyncIterator[Callable[..., Awaitable[GatewayProcess]]]:
    started: list[GatewayProcess] = []

    async def start(**overrides: Any) -> GatewayProcess:
        config = merge(base_config(tmp_path, upstream.url), overrides)
        (tmp_path / "gateway.toml").write_text(to_toml(config))
        process = GatewayProcess(tmp_path / "gateway.toml")
        started.append(process)
        await process.start()
        return process

    yield start
    for process in started:
        await process.close()


@pytest.mark.process
async def test_sigkill_then_resolve_frees_the_headroom_while_the_gateway_runs(
    start_process, tmp_path: Path, upstream: Upstream
) -> None:
    config = tmp_path / "gateway.toml"
    overrides = {"teams": {"design": {"budget_cny": 0.8}}, "tasks": {"settle_interval_s": 0.2}}
    process = await start_process(**overrides)
    release, arrived = asyncio.Event(), asyncio.Event()
    upstream.faults.add(gate(release, arrived))
    request = asyncio.create_task(post(process.url, quality="high"))
    await arrived.wait()
    await process.kill()
    with pytest.raises(aiohttp.ClientError):
        await request
    release.set()

    restarted = await start_process(**overrides)
    code, out, _ = await cli(
        "ledger", "list", "--config", str(config), "--state", "uncertain", "--json"
    )
    assert code == 0
    (entry,) = json.loads(out)["entries"]
    assert (entry["state"], entry["held_cny"], entry["team"]) == ("uncertain", 0.4, "design")
    assert entry["reason"] == "the gateway stopped while the request was in flight"
    assert (await post(restarted.url, quality="high"))[0] == 200  # 0.4 spent + 0.4 uncertain
    assert (await post(restarted.url, quality="high"))[0] == 402

    code, out, err = await cli(
        "ledger", "resolve", entry["request_id"], "--config", str(config), "--released",
        "--reason", "not in the provider's usage details",
    )  # fmt: skip
    assert (code, err) == (0, "")
    assert out.strip() == (
        f"{entry['request_id']} (design): released, 0.4000 CNY moved from uncertain back to the "
        "budget"
    )
    assert (await post(restarted.url, quality="high"))[0] == 200  # the freed headroom
    code, _, err = await cli(
        "ledger", "resolve", entry["request_id"], "--config", str(config), "--released",
        "--reason", "twice",
    )  # fmt: skip
    assert code == 1 and "already resolved" in err and err.count("\n") == 1

    # The running gateway writes the CLI's resolution to the access log on its next pass.
    lines = [json.loads(line) for line in await wait_for_lines(tmp_path / "access.log", 6)]
    settle = [line for line in lines if line["endpoint"] == "settle"]
    assert [(line["ledger_id"], line["ledger_state"]) for line in settle] == [
        (entry["request_id"], "uncertain"),  # the recovery at start
        (entry["request_id"], "released"),  # the resolution
    ]
    assert sum(line["cost_cny"] for line in lines) == pytest.approx(0.8)
    code, out, _ = await cli("ledger", "verify", "--config", str(config))
    assert (code, out) == (0, "consistent (3 entries)\n")
    code, stderr = await restarted.stop()
    assert code == 0
    recovery = next(line for line in stderr.splitlines() if "in flight" in line)
    assert f"{entry['request_id']} (design, 0.4000 CNY)" in recovery


@pytest.mark.process
async def test_ledger_commands_list_export_verify_and_refuse(
    start_process, tmp_path: Path, upstream: Upstream
) -> None:
    config = str(tmp_path / "gateway.toml")
    process = await start_process(upstream={"timeout_s": 0.5})
    assert (await post(process.url, quality="high", n=2))[0] == 200
    upstream.faults.add(hang())
    assert (await post(process.url, team="ops"))[0] == 504
    await wait_for_lines(tmp_path / "access.log", 2)

    code, out, _ = await cli("ledger", "list", "--config", config)
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["created_at", "request_id", "team", "state", "quality", "held",
                              "counted", "images", "upstream", "upstream_id", "by", "reason"]  # fmt: skip
    assert [row.split()[3] for row in rows] == ["uncertain", "captured"]  # newest first

    code, out, _ = await cli("ledger", "export", "--config", config, "--period", "2026-12")
    assert code == 0
    assert out.splitlines()[0] == EXPORT_HEADER
    exported = list(csv.DictReader(io.StringIO(out)))
    assert [(r["team"], r["state"], r["amount_cny"], r["images"]) for r in exported] == [
        ("design", "captured", "0.8", "2"),
        ("ops", "uncertain", "0.2", "0"),
    ]
    code, out, _ = await cli("ledger", "export", "--config", config, "--period", "total",
                             "--format", "json")  # fmt: skip
    assert code == 0 and len(json.loads(out)["rows"]) == 2

    uncertain = exported[1]["request_id"]
    for args, message in (
        (("ledger", "resolve", "req_nobody", "--released"), "no ledger entry"),
        (("ledger", "resolve", exported[0]["request_id"], "--released"), "not uncertain"),
        (("ledger", "resolve", uncertain, "--captured", "--images", "2"), "more than the 1 held"),
        (("ledger", "resolve", uncertain, "--released", "--images", "1"), "--images goes with"),
        (("ledger", "resolve", uncertain, "--released", "--reason", " "), "a reason is required"),
        (("ledger", "list", "--period", "2026-13"), "not a date"),
        (("ledger", "list", "--team", "nobody"), "unknown team"),
    ):
        full = [*args, "--config", config]
        if "--reason" not in full and args[1] == "resolve":
            full += ["--reason", "test"]
        code, out, err = await cli(*full)
        assert code == 1, (args, out, err)
        assert message in err and err.count("\n") == 1, (args, err)

    code, out, _ = await cli("ledger", "verify", "--config", config)
    assert (code, out) == (0, "consistent (2 entries)\n")
    await process.stop()
    with sqlite3.connect(tmp_path / "gateway.db") as db:
        db.execute("UPDATE usage SET spent = spent + 1 WHERE team = 'design'")
    code, out, _ = await cli("ledger", "verify", "--config", config)
    assert code == 1
    assert "team design" in out and "spent is 0.8001 CNY, its entries sum to 0.8000 CNY" in out
