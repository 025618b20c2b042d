"""Named keys (issue 13): expiry, per-key caps in the same atomic step as the team's budget,
per-key limits, attribution of every record to a key and an end user, reports by key, end
user, day and past period, key listing and hashing, and reloads that change keys."""

from __future__ import annotations

import asyncio
import json
import sys
import tomllib
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from gateway.core.auth import key_digest
from gateway.core.config import ConfigError, parse_settings
from gateway.core.ledger import Usage
from gateway.http.keys import CONFIG, METRICS
from gateway.store.base import LedgerQuery
from tests.client import post, usage
from tests.conftest import (
    ADMIN_KEY,
    NAMED_KEYS,
    TEAM_KEYS,
    UPSTREAM_KEY,
    Gateway,
    Upstream,
    base_config,
    books_balance,
    build_settings,
    merge,
)

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
UNNAMED = f"design/sha256:{key_digest(TEAM_KEYS['design'])[:8]}"


def named(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "sha256": key_digest(NAMED_KEYS[name]), **extra}


def design(**team: Any) -> dict[str, Any]:
    return {"teams": {"design": team}}


def sdk(gateway: Gateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)


async def admin_usage(gateway: Gateway, query: str = "") -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gateway.url}/admin/usage{query}", headers=ADMIN) as resp:
            assert resp.status == 200, await resp.text()
            return (await resp.json())["teams"]


# -- end to end with the real SDK -------------------------------------------------------------


async def test_named_and_unnamed_keys_are_attributed_everywhere(
    start_gateway, upstream: Upstream
) -> None:
    gateway = await start_gateway(**design(keys=[named("web-app")]))
    async with sdk(gateway, NAMED_KEYS["web-app"]) as web, sdk(gateway, TEAM_KEYS["design"]) as old:
        await web.images.generate(prompt="x", user="alice@example.com")
        await web.images.generate(prompt="y", extra_headers={"X-Gateway-End-User": "bob"})
        await old.images.generate(prompt="z", quality="high")
    lines = [line for line in await gateway.log_lines() if line["endpoint"] == "generations"]
    assert sorted((line["key"], line["end_user"] or "") for line in lines) == [
        (UNNAMED, ""),
        ("design/web-app", "alice@example.com"),
        ("design/web-app", "bob"),
    ]
    entries = await gateway.db.entries(LedgerQuery())
    assert sorted((e.key_id, e.end_user or "") for e in entries) == [
        (UNNAMED, ""), ("design/web-app", "alice@example.com"), ("design/web-app", "bob"),
    ]  # fmt: skip
    by_key = (await admin_usage(gateway, "?by=key"))["design"]["by"]
    assert by_key["design/web-app"]["spent_cny"] == 0.4
    assert by_key["design/web-app"]["requests"] == 2 and by_key["design/web-app"]["last_used"]
    assert by_key[UNNAMED]["spent_cny"] == 0.4 and by_key[UNNAMED]["images"] == 1
    registry = gateway.app[METRICS].registry
    assert registry.get_sample_value(
        "gateway_spent_cny_total", {"team": "design", "key": "design/web-app"}
    ) == pytest.approx(0.4)
    await books_balance(gateway, upstream)


async def test_an_expired_key_is_refused_naming_its_date(start_gateway, upstream: Upstream) -> None:
    gateway = await start_gateway(**design(keys=[named("contractor", expires=date(2026, 11, 20))]))
    async with sdk(gateway, NAMED_KEYS["contractor"]) as client:
        with pytest.raises(openai.AuthenticationError) as refused:
            await client.images.generate(prompt="x")
    error = refused.value.body
    assert error["code"] == "key_expired" and error["type"] == "authentication_error"
    assert "2026-11-20T00:00:00+00:00" in error["message"]
    assert NAMED_KEYS["contractor"] not in error["message"]
    async with sdk(gateway, "igw_nobody_has_this_key_000000000000") as client:
        with pytest.raises(openai.AuthenticationError) as unknown:
            await client.images.generate(prompt="x")
    assert unknown.value.body["code"] == "invalid_api_key"
    assert upstream.sim.generation_requests() == []
    (line, _) = sorted(await gateway.log_lines(), key=lambda line: line["key"] is None)
    assert (line["status"], line["key"], line["error_code"]) == (
        401,
        "design/contractor",
        "key_expired",
    )
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gateway.url}/metrics", headers=ADMIN) as resp:
            text = await resp.text()
    (line,) = [line for line in text.splitlines() if line.startswith("gateway_key_expiry")]
    expiry = datetime(2026, 11, 20, tzinfo=UTC).timestamp()
    assert line.startswith('gateway_key_expiry_timestamp_seconds{key="design/contractor"}')
    assert float(line.split()[-1]) == expiry


async def test_a_burst_on_a_capped_key_stops_at_its_cap_while_another_key_goes_on(
    start_gateway, upstream: Upstream
) -> None:
    gateway = await start_gateway(
        **design(budget_cny=1.0, keys=[named("web-app", budget_cny=0.6), named("batch")])
    )
    async with (
        sdk(gateway, NAMED_KEYS["web-app"]) as capped,
        sdk(gateway, NAMED_KEYS["batch"]) as other,
    ):

        async def attempt(client: openai.AsyncOpenAI) -> str:
            try:
                await client.images.generate(prompt="burst")
            except openai.APIStatusError as exc:
                return exc.body["code"]
            return "ok"

        first = await asyncio.gather(*(attempt(capped) for _ in range(12)))
        assert sorted(first) == ["key_budget_exceeded"] * 9 + ["ok"] * 3  # 3 x 0.2 = its 0.6
        second = await asyncio.gather(*(attempt(other) for _ in range(12)))
        assert sorted(second) == ["budget_exceeded"] * 10 + ["ok"] * 2  # the team's last 0.4
    assert await usage(gateway) == Usage(spent=10_000)
    by_key = (await admin_usage(gateway, "?by=key"))["design"]["by"]
    assert (by_key["design/web-app"]["budget_cny"], by_key["design/web-app"]["remaining_cny"]) == (
        0.6,
        0.0,
    )
    assert "budget_cny" not in by_key["design/batch"]
    await books_balance(gateway, upstream)


async def test_both_caps_are_checked_in_one_atomic_step(start_gateway, upstream: Upstream) -> None:
    """A mixed burst where the key's cap and the team's budget both bind at once."""
    gateway = await start_gateway(
        **design(budget_cny=1.0, keys=[named("web-app", budget_cny=0.6), named("batch")])
    )
    results = await asyncio.gather(
        *(post(gateway, key=NAMED_KEYS[name]) for name in ["web-app", "batch"] * 15)
    )
    codes = [body.get("error", {}).get("code", "ok") for _, body, _ in results]
    assert codes.count("ok") == 5  # exactly the team's 1.0
    statuses = {status for status, *_ in results}
    assert statuses == {200, 402}
    entries = await gateway.db.entries(LedgerQuery())
    web = sum(e.charged for e in entries if e.key_id == "design/web-app")
    assert web <= 6000 and sum(e.charged for e in entries) == 10_000
    refusals = {body["error"]["message"].split(" has")[0] for _, body, _ in results
                if body.get("error", {}).get("code") == "key_budget_exceeded"}  # fmt: skip
    assert refusals <= {"Key 'design/web-app'"}
    await books_balance(gateway, upstream)


async def test_a_key_cap_refusal_names_the_cap_and_its_figures(
    start_gateway, upstream: Upstream
) -> None:
    gateway = await start_gateway(**design(keys=[named("web-app", budget_cny=0.3)]))
    assert (await post(gateway, key=NAMED_KEYS["web-app"]))[0] == 200
    await gateway.settled()  # the answer goes out before its settlement is stored
    status, body, _ = await post(gateway, key=NAMED_KEYS["web-app"])
    assert (status, body["error"]["code"], body["error"]["type"]) == (
        402, "key_budget_exceeded", "insufficient_quota",
    )  # fmt: skip
    message = body["error"]["message"]
    for part in ("Key 'design/web-app'", "budget 0.3000 CNY", "spent 0.2000 CNY",
                 "costs 0.2000 CNY", "resets at 2026-12-01T00:00:00+00:00"):  # fmt: skip
        assert part in message, message
    assert (await post(gateway, key=TEAM_KEYS["design"]))[0] == 200  # the team has room


async def test_key_rate_and_concurrency_limits_apply_beside_the_teams(
    start_gateway, upstream: Upstream
) -> None:
    gateway = await start_gateway(
        **design(keys=[named("web-app", rpm=2), named("batch", max_concurrent=1)])
    )
    async with sdk(gateway, NAMED_KEYS["web-app"]) as client:
        for _ in range(2):
            await client.images.generate(prompt="x")
        with pytest.raises(openai.RateLimitError) as limited:
            await client.images.generate(prompt="x")
    assert limited.value.body["type"] == "rate_limit_error"
    assert "Key 'design/web-app'" in limited.value.body["message"]
    assert limited.value.response.headers["Retry-After"].isdigit()
    assert (await post(gateway, key=TEAM_KEYS["design"]))[0] == 200  # other keys of the team go on
    release, arrived = asyncio.Event(), asyncio.Event()
    from tests.fakes import gate

    upstream.faults.add(gate(release, arrived))
    held = asyncio.create_task(post(gateway, key=NAMED_KEYS["batch"]))
    await arrived.wait()
    status, body, _ = await post(gateway, key=NAMED_KEYS["batch"])
    assert status == 429 and "max_concurrent" in body["error"]["message"]
    release.set()
    assert (await held)[0] == 200
    await books_balance(gateway, upstream)


# -- reports ---------------------------------------------------------------------------------


async def test_reports_by_end_user_day_quality_and_a_past_period(
    start_gateway, upstream: Upstream
) -> None:
    gateway = await start_gateway(**design(keys=[named("web-app")]))
    key = NAMED_KEYS["web-app"]
    await post(gateway, key=key, user="alice", quality="high")
    gateway.clock.advance(days=1)
    await post(gateway, key=key, user="alice")
    await post(gateway, key=key, user="bob", quality="low", n=2)
    gateway.clock.advance(days=10)  # the next month: 2026-12
    await post(gateway, key=key, user="carol")
    await gateway.settled()  # a sync answer leaves before its settlement commits
    report = await admin_usage(gateway, "?period=2026-11&by=end_user")
    design_team = report["design"]
    assert design_team["spent_cny"] == pytest.approx(0.8)
    assert design_team["remaining_cny"] is None  # a budget belongs to the current period
    assert {u: g["spent_cny"] for u, g in design_team["by"].items()} == {
        "alice": pytest.approx(0.6), "bob": pytest.approx(0.2),
    }  # fmt: skip
    days = (await admin_usage(gateway, "?period=2026-11&by=day"))["design"]["by"]
    assert {d: (g["requests"], g["images"]) for d, g in days.items()} == {
        "2026-11-26": (1, 1), "2026-11-27": (2, 3),
    }  # fmt: skip
    quality = (await admin_usage(gateway, "?period=total&by=quality"))["design"]["by"]
    assert {q: g["images"] for q, g in quality.items()} == {"high": 1, "low": 2, "medium": 2}
    current = (await admin_usage(gateway))["design"]
    assert (current["spent_cny"], current["remaining_cny"]) == (0.2, 99.8)
    served = upstream.sim.served_images()
    assert sum(g["images"] for g in quality.values()) == served == 5
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gateway.url}/admin/usage?by=team", headers=ADMIN) as resp:
            assert resp.status == 400
        async with http.get(f"{gateway.url}/admin/usage?period=2026-13", headers=ADMIN) as resp:
            assert resp.status == 400
    await books_balance(gateway, upstream)


async def test_spend_stays_with_a_key_after_a_rename_and_a_removed_key_is_refused_at_once(
    start_gateway, upstream: Upstream, tmp_path: Path
) -> None:
    gateway = await start_gateway(**design(keys=[named("web-app"), named("batch")]))
    async with aiohttp.ClientSession() as http:  # one kept-alive connection throughout

        async def on_it(key: str) -> int:
            async with http.post(
                gateway.url + "/v1/images/generations",
                headers={"Authorization": f"Bearer {key}"},
                json={"prompt": "kept alive"},
            ) as resp:
                await resp.read()
                return resp.status

        assert await on_it(NAMED_KEYS["web-app"]) == 200
        assert await on_it(NAMED_KEYS["batch"]) == 200
        renamed = [dict(named("web-app"), name="storefront")]  # batch removed, web-app renamed
        gateway.app[CONFIG].reload(build_settings(tmp_path, upstream.url, **design(keys=renamed)))
        assert await on_it(NAMED_KEYS["batch"]) == 401
        assert await on_it(NAMED_KEYS["web-app"]) == 200
    by_key = (await admin_usage(gateway, "?by=key"))["design"]["by"]
    assert by_key["design/storefront"]["requests"] == 2  # before and after the rename
    assert by_key["design/batch"]["requests"] == 1  # known by the name it last had
    await books_balance(gateway, upstream)


# -- config checks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "problem"),
    [
        ([named("web-app"), named("web-app") | {"sha256": "a" * 64}], "used twice"),
        (
            [named("web-app"), named("batch") | {"sha256": key_digest(NAMED_KEYS["web-app"])}],
            "also used by",
        ),
        ([named("web-app") | {"sha256": key_digest(TEAM_KEYS["ops"])}], "also used by"),
        ([named("web-app", expires="next week")], "must be a TOML date"),
        ([named("web-app", budget_cny=500.0)], "above the team's budget_cny"),
        ([named("web-app") | {"sha256": "0" * 64}], "placeholder"),
        ([named("web-app") | {"name": "Web App"}], "name is required"),
        ([named("web-app", rpm=0)], "at least 1"),
        ([named("web-app", color="red")], "not a known setting"),
    ],
)
def test_check_config_refuses_bad_keys(tmp_path: Path, keys: list[dict], problem: str) -> None:
    data = merge(base_config(tmp_path, "http://127.0.0.1:9"), design(keys=keys))
    with pytest.raises(ConfigError) as refused:
        parse_settings(data, base_dir=tmp_path, env={"TEST_UPSTREAM_KEY": UPSTREAM_KEY})
    assert any(problem in p for p in refused.value.problems), refused.value.problems


def test_an_expiry_is_a_date_or_an_offset_datetime(tmp_path: Path) -> None:
    text = f"""
[teams.design]
budget_cny = 1.0
[[teams.design.keys]]
name = "a"
sha256 = "{"a" * 64}"
expires = 2027-03-31
[[teams.design.keys]]
name = "b"
sha256 = "{"b" * 64}"
expires = 2027-03-31T08:00:00+08:00
"""
    settings = parse_settings(
        tomllib.loads(text), base_dir=tmp_path, env={"IMAGE_GATEWAY_UPSTREAM_KEY": "sk_x"}
    )
    a, b = settings.teams["design"].keys
    assert a.expires.isoformat() == "2027-03-31T00:00:00+00:00"
    assert b.expires == a.expires  # the same instant
    with pytest.raises(ConfigError, match="needs a time zone offset"):
        parse_settings(
            tomllib.loads(text.replace("+08:00", "")), base_dir=tmp_path,
            env={"IMAGE_GATEWAY_UPSTREAM_KEY": "sk_x"},
        )  # fmt: skip


# -- the key commands ------------------------------------------------------------------------


async def shell(command: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_shell(
        command, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_hash_key_gives_one_line_for_echo_and_printf_alike() -> None:
    gateway = f"{sys.executable} -m gateway hash-key"
    key = NAMED_KEYS["web-app"]
    expected = f'sha256 = "{key_digest(key)}"\n'
    assert await shell(f"echo {key} | {gateway}") == (0, expected, "")
    assert await shell(f"printf %s {key} | {gateway}") == (0, expected, "")
    assert await shell(f"printf '%s\\r\\n' {key} | {gateway}") == (0, expected, "")
    assert await shell(f"{gateway} {key}") == (0, expected, "")
    for bad in ("printf 'two\\n\\n'", "echo 'has a space in it, clearly not a key'", "echo short"):
        code, out, err = await shell(f"{bad} | {gateway}")
        assert (code, out) == (1, "") and err.startswith("image-gateway: not a key:"), bad


async def test_keys_lists_every_key_without_the_key(
    start_gateway, upstream: Upstream, tmp_path: Path
) -> None:
    overrides = design(
        keys=[
            named("web-app", budget_cny=2.0, rpm=5),
            named("contractor", expires=date(2026, 11, 20)),
        ]
    )
    gateway = await start_gateway(**overrides)
    assert (await post(gateway, key=NAMED_KEYS["web-app"]))[0] == 200
    await gateway.settled()
    config = gateway.config_file(tmp_path / "gateway.toml")
    code, out, err = await shell(
        f"{sys.executable} -m gateway keys --config {config} --json", env=gateway.cli_env()
    )
    assert code == 0, err
    listing = {k["key"]: k for k in json.loads(out)["keys"]}
    assert set(listing) == {UNNAMED, "design/web-app", "design/contractor",
                            f"ops/sha256:{key_digest(TEAM_KEYS['ops'])[:8]}"}  # fmt: skip
    web = listing["design/web-app"]
    assert (web["fingerprint"], web["budget_cny"], web["rpm"]) == (
        key_digest(NAMED_KEYS["web-app"])[:8],
        2.0,
        5,
    )
    assert web["last_used"] is not None and listing["design/contractor"]["expired"] is True
    code, out, _ = await shell(
        f"{sys.executable} -m gateway keys --config {config}", env=gateway.cli_env()
    )
    assert code == 0 and "(EXPIRED)" in out and "never" in out
    for secret in NAMED_KEYS.values():
        assert secret not in out


async def test_usage_cli_by_key_and_period(
    start_gateway, upstream: Upstream, tmp_path: Path
) -> None:
    overrides = design(keys=[named("web-app")])
    gateway = await start_gateway(**overrides)
    await post(gateway, key=NAMED_KEYS["web-app"], user="alice")
    await gateway.settled()
    config = gateway.config_file(tmp_path / "gateway.toml")
    env = gateway.cli_env()
    code, out, err = await shell(
        f"{sys.executable} -m gateway usage --config {config} --team design --by key --period 2026-11 --json",
        env=env,
    )
    assert code == 0, err
    by = json.loads(out)["teams"]["design"]["by"]
    assert by["design/web-app"]["spent_cny"] == 0.2
    code, out, err = await shell(
        f"{sys.executable} -m gateway usage --config {config} --by end_user --period 2026-11",
        env=env,
    )
    assert code == 0 and "alice" in out
    code, _, err = await shell(
        f"{sys.executable} -m gateway usage --config {config} --period 2026-1", env=env
    )
    assert code == 1 and err.count("\n") == 1
