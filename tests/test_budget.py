"""Team budgets end to end: exact reservations under concurrency, refunds, uncertainty, periods."""

from __future__ import annotations

import asyncio
import json
import random
import sys

import aiohttp
import openai
import pytest

from gateway.core.periods import period_at
from gateway.http.keys import CONFIG, DB
from tests.client import post, usage
from tests.conftest import ADMIN_KEY, Gateway, Upstream, build_settings
from tests.fakes import gate, hang, html_error, json_error, respond

PRICES = {"low": 0.1, "medium": 0.2, "high": 0.4, "auto": 0.2}


async def wait_until_done(tasks: list[asyncio.Task], count: int) -> None:
    """Wait (without sleeping) until ``count`` of ``tasks`` have finished."""
    pending = set(tasks)
    while len(tasks) - len(pending) < count:
        _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)


async def test_fifty_concurrent_requests_against_five_images(
    start_gateway, upstream: Upstream
) -> None:
    gateway = await start_gateway(teams={"design": {"budget_cny": 1.0}})
    release = asyncio.Event()
    arrivals = [asyncio.Event() for _ in range(5)]
    for arrived in arrivals:
        upstream.faults.add(gate(release, arrived))
    tasks = [asyncio.create_task(post(gateway)) for _ in range(50)]
    await wait_until_done(tasks, 45)  # the refusals come back while five are held upstream
    await asyncio.gather(*(arrived.wait() for arrived in arrivals))
    assert upstream.faults.seen == 5
    period = period_at("monthly", gateway.clock(), gateway.settings.server.tz)
    held = await gateway.app[DB].usage("design", period.key)  # now, without waiting
    assert (held.reserved, held.spent) == (10_000, 0)
    release.set()
    results = await asyncio.gather(*tasks)
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200] * 5 + [402] * 45
    for status, body, headers in results:
        if status == 402:
            assert body["error"]["type"] == "insufficient_quota"
            assert body["error"]["code"] == "budget_exceeded"
            assert headers["x-should-retry"] == "false"
    assert len(upstream.sim.generation_requests()) == 5
    final = await usage(gateway)
    assert (final.spent, final.reserved, final.uncertain) == (10_000, 0, 0)


async def test_mixed_qualities_and_n_never_overspend(start_gateway, upstream: Upstream) -> None:
    gateway = await start_gateway(teams={"design": {"budget_cny": 3.0}})
    rng = random.Random(7)
    asks = [(rng.choice(list(PRICES)), rng.randint(1, 4)) for _ in range(60)]
    results = await asyncio.gather(*(post(gateway, quality=q, n=n) for q, n in asks))
    final = await usage(gateway)
    served = [(q, n) for (q, n), (status, _, _) in zip(asks, results, strict=True) if status == 200]
    refused = [
        (q, n) for (q, n), (status, _, _) in zip(asks, results, strict=True) if status == 402
    ]
    assert len(served) + len(refused) == len(asks)
    spent = sum(round(PRICES[q] * 10_000) * n for q, n in served)
    assert final.spent == spent <= 30_000
    assert final.reserved == 0
    for q, n in refused:  # each refusal was right: it would not have fitted even at the end
        assert final.spent + round(PRICES[q] * 10_000) * n > 30_000
    assert len(upstream.sim.generation_requests()) == len(served)


async def test_402_message_names_everything(start_gateway) -> None:
    gateway = await start_gateway(teams={"design": {"budget_cny": 0.3}})
    assert (await post(gateway))[0] == 200
    await gateway.settled()  # the answer goes out before its settlement is stored
    status, body, _ = await post(gateway, quality="high")
    assert status == 402
    message = body["error"]["message"]
    for part in ("design", "monthly", "budget 0.3000 CNY", "spent 0.2000 CNY", "reserved 0.0000",
                 "costs 0.4000 CNY", "2026-12-01T00:00:00+00:00"):  # fmt: skip
        assert part in message, message


async def test_sdk_does_not_retry_a_402(start_gateway, upstream: Upstream) -> None:
    gateway = await start_gateway(teams={"design": {"budget_cny": 0.1}})
    client = gateway.async_openai(max_retries=2)
    with pytest.raises(openai.APIStatusError) as excinfo:
        await client.images.generate(prompt="x")
    assert excinfo.value.status_code == 402
    assert upstream.sim.generation_requests() == []


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (json_error(500, "server_error", "Image generation failed"), 500),
        (
            json_error(
                400, "invalid_request_error", "Your request was rejected by the safety system."
            ),
            400,
        ),
        (json_error(503, "server_error", "busy"), 503),
    ],
)
async def test_upstream_reported_failures_cost_nothing(
    gateway: Gateway, upstream: Upstream, fault, expected: int
) -> None:
    upstream.faults.add(fault)
    status, body, _ = await post(gateway)
    assert status == expected
    assert body["error"]["message"] in (
        "Image generation failed",
        "Your request was rejected by the safety system.",
        "busy",
    )
    final = await usage(gateway)
    assert (final.spent, final.reserved, final.uncertain) == (0, 0, 0)
    assert [e.state for e in await gateway.ledger()] == ["released"]


async def test_content_refusal_from_the_simulator_costs_nothing(gateway: Gateway) -> None:
    status, body, _ = await post(gateway, prompt="draw [refuse] this")
    assert status == 400
    assert "safety" in body["error"]["message"]
    await gateway.settled()
    final = await usage(gateway)
    assert final.committed == 0


@pytest.mark.parametrize(
    ("fault", "expected"),
    [(hang(), (504, "upstream_timeout")), (html_error(502), (502, "upstream_bad_gateway")),
     (html_error(504), (504, "upstream_bad_gateway"))],
)  # fmt: skip
async def test_unknown_outcomes_keep_the_hold_as_uncertain(
    start_gateway, upstream: Upstream, fault, expected: tuple[int, str]
) -> None:
    gateway = await start_gateway(upstream={"timeout_s": 0.5})
    upstream.faults.add(fault)
    status, body, headers = await post(gateway, quality="high")
    assert (status, body["error"]["code"]) == expected
    assert headers["x-should-retry"] == "false"
    assert body["error"]["type"] == "upstream_error"
    await gateway.settled()
    final = await usage(gateway)
    assert (final.spent, final.reserved, final.uncertain) == (0, 0, 4000)
    entries = await gateway.ledger()
    assert [(e.state, e.settled_amount) for e in entries] == [("uncertain", 4000)]


async def test_fewer_images_than_asked_are_charged_as_served(
    gateway: Gateway, upstream: Upstream
) -> None:
    upstream.faults.add(
        respond({"created": 1, "id": "u1", "data": [{"url": "https://x.test/1.png"}]})
    )
    status, body, _ = await post(gateway, n=3)
    assert status == 200 and len(body["data"]) == 1
    await gateway.settled()
    final = await usage(gateway)
    assert (final.spent, final.reserved) == (2000, 0)


async def test_spend_survives_a_restart(start_gateway, upstream: Upstream) -> None:
    first = await start_gateway()
    await post(first, n=2)
    await first.server.close()
    second = await start_gateway()
    final = await usage(second)
    assert (final.spent, final.reserved) == (4000, 0)


async def test_new_period_starts_from_zero_and_keeps_history(gateway: Gateway) -> None:
    await post(gateway, team="ops", quality="high")
    await gateway.settled()
    ops, tz = gateway.settings.teams["ops"].period, gateway.settings.server.tz
    old_period = period_at(ops, gateway.clock(), tz)
    before = await usage(gateway, "ops")
    gateway.clock.advance(days=1)
    new_period = period_at(ops, gateway.clock(), tz)
    after = await usage(gateway, "ops")
    assert new_period.key != old_period.key
    assert (before.spent, after.spent) == (4000, 0)
    await post(gateway, team="ops", quality="low")
    assert (await gateway.db.usage("ops", old_period.key)).spent == 4000
    assert (await gateway.db.usage("ops", new_period.key)).spent == 1000


async def test_reload_changes_budget_for_new_requests(
    gateway: Gateway, tmp_path, upstream: Upstream
) -> None:
    smaller = build_settings(tmp_path, upstream.url, teams={"design": {"budget_cny": 0.2}})
    assert (await post(gateway))[0] == 200
    gateway.app[CONFIG].reload(smaller)
    status, body, _ = await post(gateway)
    assert status == 402
    assert "budget 0.2000 CNY" in body["error"]["message"]


async def test_usage_report_agrees_with_what_the_upstream_served(
    gateway: Gateway, upstream: Upstream
) -> None:
    await post(gateway, quality="low", n=2)
    await post(gateway, quality="high")
    await post(gateway, prompt="[fail] please")
    await gateway.settled()
    async with aiohttp.ClientSession() as http:
        async with http.get(
            gateway.url + "/admin/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        ) as resp:
            assert resp.status == 200
            report = await resp.json()
        async with http.get(gateway.url + "/admin/usage", headers=gateway.headers()) as resp:
            assert resp.status == 401
    design = report["teams"]["design"]
    served = [
        r.body for r in upstream.sim.generation_requests() if "[fail]" not in r.body["prompt"]
    ]
    assert upstream.sim.generated == 2
    assert sum(body["n"] for body in served) == 3
    assert design["images"] == {"low": 2, "medium": 0, "high": 1, "auto": 0}
    assert design["spent_cny"] == pytest.approx(0.6)
    assert design["reserved_cny"] == 0.0
    assert design["remaining_cny"] == pytest.approx(99.4)
    assert design["period_start"] == "2026-11-01T00:00:00+00:00"
    assert set(report) == {"teams"} and set(report["teams"]) == {"design", "ops"}


async def test_rpm_limit(start_gateway, upstream: Upstream) -> None:
    gateway = await start_gateway(teams={"design": {"rpm": 2}})
    assert (await post(gateway))[0] == 200
    assert (await post(gateway))[0] == 200
    status, body, headers = await post(gateway)
    assert status == 429
    assert body["error"]["type"] == "rate_limit_error"
    assert 1 <= int(headers["Retry-After"]) <= 60
    gateway.clock.advance(seconds=61)
    assert (await post(gateway))[0] == 200
    assert len(upstream.sim.generation_requests()) == 3
    await gateway.settled()
    final = await usage(gateway)
    assert final.spent == 6000


async def test_max_concurrent_limit(start_gateway, upstream: Upstream) -> None:
    gateway = await start_gateway(teams={"design": {"max_concurrent": 1}})
    release, arrived = asyncio.Event(), asyncio.Event()
    upstream.faults.add(gate(release, arrived))
    first = asyncio.create_task(post(gateway))
    await arrived.wait()
    status, _, headers = await post(gateway)
    assert status == 429 and headers["Retry-After"] == "1"
    assert (await post(gateway, team="ops"))[0] == 200  # other teams unaffected
    release.set()
    assert (await first)[0] == 200
    assert (await post(gateway))[0] == 200


async def test_usage_cli_json(start_gateway, tmp_path, upstream: Upstream) -> None:
    gateway = await start_gateway(teams={"design": {"period": "total"}})
    await post(gateway, n=2)
    config = gateway.config_file(tmp_path / "gateway.toml")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "usage", "--config", str(config), "--json", "--team", "design",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=gateway.cli_env(),
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    team = json.loads(out)["teams"]["design"]
    assert team["spent_cny"] == pytest.approx(0.4)
    assert set(team) >= {
        "budget_cny",
        "spent_cny",
        "reserved_cny",
        "uncertain_cny",
        "remaining_cny",
        "images",
    }


@pytest.mark.sqlite_only
async def test_usage_cli_never_creates_files_when_the_gateway_is_stopped(
    start_gateway, tmp_path, upstream: Upstream
) -> None:
    gateway = await start_gateway(teams={"design": {"period": "total"}})
    await post(gateway)
    await gateway.server.close()
    before = sorted(p.name for p in tmp_path.iterdir())
    assert "gateway.db-wal" not in before
    config = tmp_path / "usage.toml"
    config.write_text(
        f'[storage]\ndatabase = "gateway.db"\n[teams.design]\nkeys_sha256 = ["{"1" * 64}"]\nbudget_cny = 1.0\nperiod = "total"\n'
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "usage", "--config", str(config), "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert json.loads(out)["teams"]["design"]["spent_cny"] == pytest.approx(0.2)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "usage.toml"])
    (tmp_path / "gateway.db").rename(tmp_path / "moved.db")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "usage", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    assert proc.returncode == 1 and b"no database" in err
