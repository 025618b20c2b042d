"""Several upstreams (issue 23): billing-safe failover, health, weights, per-upstream prices.

The upstreams are fake upstream processes (``tests.upstream_process``), each checking its own
central key; the gateways run in process, so their clock is the test's (cooldowns end when the
test moves it). On PostgreSQL every scenario runs through two instances sharing one ledger,
requests alternating between them: each instance learns its upstreams' health on its own.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import socket
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.core.config import parse_settings
from gateway.core.money import cny_to_units
from gateway.http.keys import ACCESS_LOG, CONFIG, DB, METRICS, TASKS
from gateway.services.reconcile import rfc3339
from gateway.store.base import LedgerQuery
from tests.conftest import (
    ADMIN_KEY,
    TEAM_KEYS,
    UPSTREAM_KEY,
    UPSTREAM_KEYS,
    Gateway,
    Upstream,
    base_config,
    gateway_log_text,
    merge,
)
from tests.fakes import gate, json_error
from tests.process import GatewayProcess, to_toml
from tests.upstream_process import UpstreamProcess

Fakes = Callable[..., Awaitable[dict[str, UpstreamProcess]]]
Start = Callable[..., Awaitable[Gateway]]
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
REFUSALS: dict[str, tuple[tuple[Any, ...], dict[str, str], int]] = {
    # fault args, kwargs, failures before it is taken out of the rotation
    "402": ((402, "payment_required", "balance too low"), {}, 1),
    "429": ((429, "rate_limit_error", "slow down"), {"retry_after": "20"}, 1),
    "503": ((503, "server_error", "temporarily unavailable"), {}, 3),
}


@pytest.fixture
async def fakes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> AsyncIterator[Fakes]:
    """``await fakes("primary", "backup", prices={"backup": {"high": "0.30"}})``: fake upstream
    processes, each with its own key (in ``tmp_path/key-NAME`` for the config to read)."""
    started: list[UpstreamProcess] = []

    async def start(*names: str, prices: dict[str, dict[str, str]] | None = None) -> Any:
        found = {n: UpstreamProcess(n, UPSTREAM_KEYS[n], (prices or {}).get(n)) for n in names}
        await asyncio.gather(*(fake.start() for fake in found.values()))
        for name, fake in found.items():
            (tmp_path / f"key-{name}").write_text(fake.key)
        started.extend(found.values())
        return found

    yield start
    ids: set[str] = set()
    for fake in started:
        if fake.proc is not None and fake.proc.returncode is None:
            state = await fake.state()
            ids |= {served_id for served_id, _ in state["served"]} | set(state["tasks"])
        await fake.close()
    logs = gateway_log_text(caplog) + "".join(p.read_text() for p in tmp_path.glob("*.log"))
    for whole in ids:  # with the date and count a whole id rebuilds a result URL
        assert whole not in logs, f"upstream id {whole[:8]}... found in a log"


def upstreams(found: dict[str, UpstreamProcess], **tables: dict[str, Any]) -> dict[str, Any]:
    """The ``[upstreams.NAME]`` tables for these fakes (``tables``: more keys per name)."""
    return {
        "upstreams": {
            name: {"base_url": fake.url, "api_key_file": f"key-{name}", "timeout_s": 10,
                   **tables.get(name, {})}
            for name, fake in found.items()
        }
    }  # fmt: skip


async def instances(start_gateway: Start, backend: str, **overrides: Any) -> list[Gateway]:
    """One gateway on SQLite; two sharing one database on PostgreSQL."""
    return [await start_gateway(**overrides) for _ in range(2 if backend == "postgres" else 1)]


async def generate(
    gateway: Gateway, *, mode: str = "sync", quality: str = "medium", prompt: str = "a kite"
) -> tuple[int, dict[str, Any], dict[str, str]]:
    suffix = "?async=1" if mode == "async" else ""
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{gateway.url}/v1/images/generations{suffix}",
            headers=gateway.headers(),
            json={"prompt": prompt, "quality": quality},
        ) as resp:
            return resp.status, await resp.json(), dict(resp.headers)


async def poll(gateway: Gateway, task_id: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(
            f"{gateway.url}/v1/images/tasks/{task_id}", headers=gateway.headers()
        ) as resp:
            assert resp.status == 200
            return dict(await resp.json())


async def spread(gateways: list[Gateway], count: int, **kwargs: Any) -> list[Any]:
    """``count`` requests one after the other, alternating between the instances."""
    return [await generate(gateways[i % len(gateways)], **kwargs) for i in range(count)]


async def health(gateway: Gateway) -> dict[str, dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.url + "/admin/upstreams", headers=ADMIN) as resp:
            assert resp.status == 200
            return {u["name"]: u for u in (await resp.json())["upstreams"]}


async def shared_log(gateways: list[Gateway]) -> list[dict[str, Any]]:
    """The access log the instances share, once every instance has written its lines (each
    flushes its own, so reading through one instance alone can miss another's last line)."""
    for gateway in gateways:
        await gateway.settled()
        gateway.app[ACCESS_LOG].flush()
    return await gateways[0].log_lines()


async def lines(gateways: list[Gateway]) -> list[dict[str, Any]]:
    """Every generation's access-log line, once written."""
    return [
        line for line in await shared_log(gateways) if line["endpoint"] in ("generations", "edits")
    ]


async def ledger(gateways: list[Gateway]) -> list[Any]:
    """The shared ledger's entries, once every instance's settlements are committed (a sync
    answer leaves before its settlement)."""
    for gateway in gateways:
        await gateway.settled()
    return await gateways[0].app[DB].entries(LedgerQuery())


def sample(gateway: Gateway, name: str, **labels: str) -> float:
    return gateway.app[METRICS].registry.get_sample_value(name, labels) or 0.0


async def balanced(gateways: list[Gateway], found: dict[str, UpstreamProcess]) -> None:
    """The ledger verifies, the access log adds up to it, and each fake upstream served exactly
    the images the ledger captured at it (so none was bought twice, or charged elsewhere)."""
    for gateway in gateways:
        await gateway.settled()
    db = gateways[0].app[DB]
    assert (await db.verify()).mismatches == ()
    entries = await db.entries(LedgerQuery())
    spent = Counter[str]()
    captured = Counter[str]()
    for entry in entries:
        spent[entry.team] += entry.charged
        if entry.state == "captured":
            captured[entry.upstream or "?"] += entry.charged_images
    logged = Counter[str]()
    for line in await shared_log(gateways):
        if line["team"] is not None:
            logged[line["team"]] += cny_to_units(line["cost_cny"])
    assert +logged == +spent
    served = {name: (await fake.state())["served_images"] for name, fake in found.items()}
    assert +captured == +Counter(served), (captured, served)


def reloaded(gateway: Gateway, tmp_path: Path, **overrides: Any) -> None:
    """Apply ``overrides`` to the gateway's config as a SIGHUP would."""
    config = {**gateway.config, **overrides}
    env = {"TEST_UPSTREAM_KEY": UPSTREAM_KEY, **gateway.env}
    gateway.app[CONFIG].reload(parse_settings(config, base_dir=tmp_path, env=env))


# -- failover ---------------------------------------------------------------------------------


async def test_a_stopped_upstream_fails_over_charges_once_and_is_probed_back(
    start_gateway: Start, fakes: Fakes, backend: str
) -> None:
    up = await fakes("primary", "backup")
    gateways = await instances(start_gateway, backend, **upstreams(up, backup={"priority": 2}))
    n = len(gateways)
    await up["primary"].kill()
    results = await spread(gateways, 4 * n)
    assert [status for status, _, _ in results] == [200] * 4 * n
    found = await lines(gateways)
    assert {line["upstream"] for line in found} == {"backup"}
    # each instance tries the stopped one until it has failed max_fails (3) times in a row
    assert Counter(tuple(line["failovers"]) for line in found) == {("primary",): 3 * n, (): n}
    assert (await up["backup"].state())["generations"] == 4 * n  # each request sent once
    for gateway in gateways:
        state = (await health(gateway))["primary"]
        assert (state["state"], state["last_error"]) == ("cooling", "unreachable")
        assert (await health(gateway))["backup"]["state"] == "healthy"
        labels = {"from": "primary", "to": "backup", "reason": "unreachable"}
        assert sample(gateway, "gateway_failovers_total", **labels) == 3
        async with aiohttp.ClientSession() as http:
            async with http.get(gateway.url + "/metrics", headers=ADMIN) as resp:
                text = await resp.text()
        assert 'gateway_upstream_up{upstream="primary"} 0.0' in text
        assert 'gateway_upstream_up{upstream="backup"} 1.0' in text

    await up["primary"].restart()  # back, on the same port
    gateways[0].clock.advance(seconds=30)  # the first cooldown is over: the next request probes
    results = await spread(gateways, n)
    assert [status for status, _, _ in results] == [200] * n
    assert [line["upstream"] for line in (await lines(gateways))[-n:]] == ["primary"] * n
    for gateway in gateways:
        assert (await health(gateway))["primary"]["state"] == "healthy"
    entries = await ledger(gateways)
    assert len(entries) == 5 * n and {e.state for e in entries} == {"captured"}
    await balanced(gateways, up)


@pytest.mark.parametrize("refusal", sorted(REFUSALS))
async def test_a_refusal_routes_away_cools_or_disables_and_is_probed_back(
    start_gateway: Start,
    fakes: Fakes,
    backend: str,
    refusal: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    up = await fakes("primary", "backup")
    gateways = await instances(start_gateway, backend, **upstreams(up, backup={"priority": 2}))
    n = len(gateways)
    args, kwargs, strikes = REFUSALS[refusal]
    for _ in range(strikes * n):
        await up["primary"].fault("json_error", *args, **kwargs)
    results = await spread(gateways, strikes * n)
    assert [status for status, _, _ in results] == [200] * strikes * n  # served by backup
    assert {(line["upstream"], tuple(line["failovers"])) for line in await lines(gateways)} == {
        ("backup", ("primary",))
    }
    # taken out of the rotation: the next requests go straight to backup
    await spread(gateways, 2 * n)
    assert (await up["primary"].state())["generations"] == strikes * n
    assert [line["failovers"] for line in (await lines(gateways))[-2 * n :]] == [[]] * 2 * n
    wait = {"402": 3600, "429": 20, "503": 30}[refusal]
    for gateway in gateways:
        state = (await health(gateway))["primary"]
        assert state["state"] == ("disabled" if refusal == "402" else "cooling")
        assert state["last_error"].startswith(f"HTTP {refusal}")
        assert state["until"] == rfc3339((gateway.clock() + timedelta(seconds=wait)).timestamp())
    if refusal == "402":  # one ERROR line per instance, when it disables the upstream
        errors = [r for r in caplog.records if r.levelname == "ERROR" and "HTTP 402" in r.message]
        assert len(errors) == n

    gateways[0].clock.advance(seconds=wait)  # its time is up: one request probes it
    await spread(gateways, n)
    assert [line["upstream"] for line in (await lines(gateways))[-n:]] == ["primary"] * n
    for gateway in gateways:
        assert (await health(gateway))["primary"]["state"] == "healthy"
    await balanced(gateways, up)


async def test_an_upstream_that_hangs_leaves_the_outcome_uncertain_and_never_fails_over(
    start_gateway: Start, fakes: Fakes, backend: str
) -> None:
    up = await fakes("primary", "backup")
    tables = upstreams(up, primary={"timeout_s": 1}, backup={"priority": 2})
    gateways = await instances(start_gateway, backend, **tables)
    n = len(gateways)
    for _ in range(n):
        await up["primary"].fault("hang")  # reads the whole request, then never answers
    results = await spread(gateways, n, quality="high")
    for status, body, headers in results:
        assert (status, body["error"]["code"]) == (504, "upstream_timeout")
        assert headers["x-should-retry"] == "false"
    assert (await up["backup"].state())["generations"] == 0  # never sent anywhere else
    assert (await up["primary"].state())["generations"] == n
    entries = await ledger(gateways)
    assert [(e.state, e.upstream, e.settled_amount) for e in entries] == [
        ("uncertain", "primary", 4000)
    ] * n
    assert {(line["upstream"], tuple(line["failovers"])) for line in await lines(gateways)} == {
        ("primary", ())
    }
    await balanced(gateways, up)


async def test_a_reset_before_the_body_was_all_written_fails_over(
    start_gateway: Start, fakes: Fakes, backend: str
) -> None:
    up = await fakes("primary", "backup")
    gateways = await instances(start_gateway, backend, **upstreams(up, backup={"priority": 2}))
    png = b"\x89PNG\r\n\x1a\n" + bytes(12 << 20)
    big = "data:image/png;base64," + base64.b64encode(png).decode()
    for gateway in gateways:
        await up["primary"].fault("reset_mid_body")  # reads 64 KiB of 16 MiB, then resets
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{gateway.url}/v1/images/generations",
                headers=gateway.headers(),
                json={"prompt": "a heavy kite", "image_urls": [big]},
            ) as resp:
                assert resp.status == 200, await resp.text()
    assert {(line["upstream"], tuple(line["failovers"])) for line in await lines(gateways)} == {
        ("backup", ("primary",))
    }
    n = len(gateways)
    assert [(await f.state())["generations"] for f in up.values()] == [n, n]
    await balanced(gateways, up)


async def test_weights_three_to_one_give_thirty_to_ten_over_forty_requests(
    start_gateway: Start, fakes: Fakes, backend: str
) -> None:
    up = await fakes("primary", "backup")
    tables = upstreams(up, primary={"weight": 3}, backup={"weight": 1})
    gateways = await instances(start_gateway, backend, **tables)
    results = await spread(gateways, 40)
    assert [status for status, _, _ in results] == [200] * 40
    assert (await up["primary"].state())["generations"] == 30
    assert (await up["backup"].state())["generations"] == 10
    assert Counter(line["upstream"] for line in await lines(gateways)) == {
        "primary": 30,
        "backup": 10,
    }
    for gateway in gateways:
        assert {(u["priority"], u["weight"]) for u in (await health(gateway)).values()} == {
            (1, 3),
            (1, 1),
        }
    await balanced(gateways, up)


async def test_every_upstream_out_is_503_with_retry_after_and_reserves_nothing(
    start_gateway: Start, upstream: Upstream, backend: str
) -> None:
    gateways = await instances(start_gateway, backend)
    n = len(gateways)
    for _ in range(n):
        upstream.faults.add(json_error(401, "authentication_error", "Invalid API key."))
    for status, body, _ in await spread(gateways, n):
        assert (status, body["error"]["code"]) == (502, "upstream_auth_failed")
    for status, body, headers in await spread(gateways, 2 * n):
        assert (status, body["error"]["code"]) == (503, "upstream_unavailable")
        assert int(headers["Retry-After"]) >= 1
        assert "x-should-retry" not in headers  # nothing was sent: a retry is safe
    assert upstream.faults.seen == n  # the 503s sent nothing
    entries = await ledger(gateways)
    assert [e.state for e in entries] == ["released"] * n  # the 503s reserved nothing
    for gateway in gateways:  # a reload (the key fixed) tries it again
        gateway.app[CONFIG].reload(gateway.settings)
    assert [s for s, _, _ in await spread(gateways, n)] == [200] * n


# -- async tasks stay with their upstream -------------------------------------------------------


async def test_an_async_task_on_backup_is_polled_and_settled_there_even_once_it_is_removed(
    start_gateway: Start,
    fakes: Fakes,
    backend: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    up = await fakes("primary", "backup", prices={"backup": {"high": "0.30"}})
    tables = upstreams(up, backup={"priority": 2, "prices": {"high": "0.30"}})
    gateways = await instances(start_gateway, backend, **tables)
    first, last = gateways[0], gateways[-1]

    async def submit_on_backup(prompt: str) -> str:
        await up["primary"].fault("json_error", 503, "server_error", "busy")  # once: fails over
        status, body, _ = await generate(first, mode="async", quality="high", prompt=prompt)
        assert status == 202
        assert body["task_id"] in (await up["backup"].state())["tasks"]
        return str(body["task_id"])

    task_id = await submit_on_backup("one")
    assert (await health(first))["primary"]["state"] == "healthy"  # one failure of max_fails
    assert (await poll(last, task_id))["status"] == "pending"
    await up["backup"].finish(task_id)
    last.clock.advance(seconds=3)  # past the poll cache
    assert (await poll(last, task_id))["status"] == "completed"
    assert (await up["backup"].state())["task_polls"][task_id] >= 1
    assert (await up["primary"].state())["task_polls"] == {}
    entry = await first.app[DB].find_entry(task_id)
    assert entry is not None
    assert (entry.state, entry.upstream, entry.held, entry.charged) == (
        "captured",
        "backup",
        4000,  # held at the dearest reachable upstream
        3000,  # charged what backup billed
    )

    task_id = await submit_on_backup("two")
    for gateway in gateways:  # backup leaves the config
        reloaded(gateway, tmp_path, **upstreams({"primary": up["primary"]}))
        assert list(await health(gateway)) == ["primary"]
    last.clock.advance(seconds=10)  # the settler's first poll is due
    for gateway in gateways:  # whichever claims it polls it (and a pass running waits)
        await gateway.app[TASKS].settle_due()
    assert (await up["backup"].state())["task_polls"][task_id] >= 1
    await up["backup"].finish(task_id)
    last.clock.advance(seconds=120)
    for gateway in gateways:
        await gateway.app[TASKS].settle_due()
    entry = await first.app[DB].find_entry(task_id)
    assert entry is not None and (entry.state, entry.upstream, entry.charged) == (
        "captured",
        "backup",
        3000,
    )
    assert (await up["primary"].state())["task_polls"] == {}
    assert (await up["primary"].state())["generations"] == 2  # the two 503s, nothing else
    assert "removed from the config and kept for polling only" in gateway_log_text(caplog)
    await balanced(gateways, up)


# -- prices per upstream ------------------------------------------------------------------------


async def cli(gateway: Gateway, path: Path, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args, "--config", str(path), env=gateway.cli_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, (out + err).decode()


async def test_each_upstream_is_charged_at_its_own_price_and_reported_apart(
    start_gateway: Start, fakes: Fakes, backend: str, tmp_path: Path
) -> None:
    up = await fakes("primary", "backup", prices={"backup": {"high": "0.30"}})
    tables = upstreams(up, backup={"prices": {"high": "0.30"}})  # same priority, weights 1:1
    gateways = await instances(start_gateway, backend, **tables)
    n = len(gateways)
    results = await spread(gateways, 2 * n, quality="high")
    assert [status for status, _, _ in results] == [200] * 2 * n
    tasks = [await generate(gateways[0], mode="async", quality="high") for _ in range(2)]
    for fake in up.values():
        for task_id in (await fake.state())["tasks"]:
            await fake.finish(task_id)
    gateways[0].clock.advance(seconds=3)
    for _, body, _ in tasks:
        assert (await poll(gateways[-1], body["task_id"]))["status"] == "completed"
    found = await lines(gateways)
    assert {line["reserved_cny"] for line in found} == {0.4}  # held at the dearer one
    assert sorted(
        (line["upstream"], line["cost_cny"]) for line in found if line["mode"] == "sync"
    ) == ([("backup", 0.3)] * n + [("primary", 0.4)] * n)

    config = gateways[0].config_file(tmp_path / "gateway.toml")
    code, out = await cli(gateways[0], config, "ledger", "verify")
    assert (code, out.strip()) == (0, f"consistent ({2 * n + 2} entries)")
    code, out = await cli(gateways[0], config, "ledger", "list", "--json", "--period", "total")
    entries = json.loads(out)["entries"]
    assert sorted((e["upstream"], e["held_cny"], e["settled_cny"]) for e in entries) == (
        [("backup", 0.4, 0.3)] * (n + 1) + [("primary", 0.4, 0.4)] * (n + 1)
    )
    code, out = await cli(
        gateways[0], config, "usage", "--by", "upstream", "--json", "--period", "total"
    )
    by = json.loads(out)["teams"]["design"]["by"]
    assert {name: (g["spent_cny"], g["images"]) for name, g in by.items()} == {
        "backup": (pytest.approx(0.3 * (n + 1)), n + 1),
        "primary": (pytest.approx(0.4 * (n + 1)), n + 1),
    }
    code, out = await cli(gateways[0], config, "ledger", "export", "--period", "total")
    header, *rows = out.splitlines()
    assert header.split(",")[-1] == "upstream"  # appended at the end
    columns = header.split(",")
    split = Counter(
        (row[columns.index("upstream")], row[columns.index("unit_price_cny")])
        for row in (line.split(",") for line in rows)
    )
    assert split == {("backup", "0.3"): n + 1, ("primary", "0.4"): n + 1}
    await balanced(gateways, up)


# -- the real process: SIGHUP and `image-gateway upstreams` ------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def upstreams_cli(config: Path, *args: str, key: str | None = None) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "IMAGE_GATEWAY_ADMIN_KEY"}
    if key is not None:
        env["IMAGE_GATEWAY_ADMIN_KEY"] = key
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "upstreams", "--config", str(config), *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


@pytest.mark.process
async def test_sighup_adds_reweights_and_removes_upstreams_and_the_cli_reads_their_health(
    fakes: Fakes, tmp_path: Path, upstream: Upstream
) -> None:
    up = await fakes("primary", "backup")
    port = free_port()
    config = merge(base_config(tmp_path, upstream.url), {"server": {"port": port}})
    del config["upstream"]
    path = tmp_path / "gateway.toml"

    def write(**tables: dict[str, Any]) -> None:
        chosen = {name: up[name] for name in tables}
        path.write_text(to_toml({**config, **upstreams(chosen, **tables)}))

    write(primary={})
    code, out, err = await upstreams_cli(path, "--json")  # nothing runs yet: the config
    assert code == 0 and "no gateway answers" in err
    assert json.loads(out) == {"upstreams": [
        {"name": "primary", "state": None, "until": None, "last_error": None, "priority": 1,
         "weight": 1}
    ]}  # fmt: skip
    process = GatewayProcess(path)
    try:
        await process.start()
        code, _, err = await upstreams_cli(path)
        assert code == 1 and "IMAGE_GATEWAY_ADMIN_KEY" in err
        code, out, _ = await upstreams_cli(path, "--json", key=ADMIN_KEY)
        assert [(u["name"], u["state"]) for u in json.loads(out)["upstreams"]] == [
            ("primary", "healthy")
        ]

        async def served(count: int) -> dict[str, int]:
            before = {n: (await f.state())["generations"] for n, f in up.items()}
            for _ in range(count):
                async with aiohttp.ClientSession() as http:
                    async with http.post(
                        process.url + "/v1/images/generations",
                        headers={"Authorization": f"Bearer {TEAM_KEYS['design']}"},
                        json={"prompt": "a gull"},
                    ) as resp:
                        assert resp.status == 200
            return {n: (await f.state())["generations"] - before[n] for n, f in up.items()}

        assert await served(4) == {"primary": 4, "backup": 0}
        write(primary={"weight": 1}, backup={"weight": 3})  # added, weighted 1:3
        process.signal(signal.SIGHUP)
        await process.expect("READY=1")
        assert await served(8) == {"primary": 2, "backup": 6}
        code, out, _ = await upstreams_cli(path, key=ADMIN_KEY)
        assert re.search(r"backup\s+healthy\s+-\s+1\s+3", out), out
        write(backup={})  # primary removed
        process.signal(signal.SIGHUP)
        await process.expect("READY=1")
        assert await served(3) == {"primary": 0, "backup": 3}
    finally:
        code, stderr = await process.stop()
        await process.close()
    assert code == 0
    assert "upstreams reloaded: backup added, none removed" in stderr
    assert "upstreams reloaded: none added, primary removed" in stderr
    assert "take effect only after a restart" not in stderr


@pytest.mark.process
async def test_a_rehearsal_simulates_each_upstream_apart_and_one_a_reload_adds(
    fakes: Fakes, tmp_path: Path, upstream: Upstream
) -> None:
    up = await fakes("primary", "backup")
    config = merge(base_config(tmp_path, upstream.url), {"admin": {}})
    del config["upstream"]
    path = tmp_path / "rehearsal.toml"

    def write(**tables: dict[str, Any]) -> None:
        chosen = {name: up.get(name, up["primary"]) for name in tables}
        entries = upstreams(chosen, **tables)
        for table in entries["upstreams"].values():
            table["api_key_env"] = table.pop("api_key_file").upper()  # none is read: simulated
        path.write_text(to_toml({**config, **entries}))

    write(primary={"priority": 2}, backup={"priority": 3})
    process = GatewayProcess(path, args=("--simulate-upstream",))
    try:
        url = await process.start()
        banner = await process.stdout_until("Press Ctrl-C to stop.")
        assert "in place of each of [upstreams]: primary, backup" in banner
        assert (await generate_at(url))[0] == 200
        write(primary={"priority": 2}, backup={"priority": 3}, third={"priority": 1})
        process.signal(signal.SIGHUP)
        await process.expect("READY=1")
        assert (await generate_at(url))[0] == 200  # the new first priority: its own simulator
        code, stderr = await process.stop()
    finally:
        await process.close()
    assert code == 0
    warning = next(line for line in stderr.splitlines() if "SIMULATED UPSTREAM" in line)
    simulated = re.findall(r"http://127\.0\.0\.1:(\d+) \((\w+)\)", warning)
    assert [name for _, name in simulated] == ["primary", "backup"]
    assert len({port for port, _ in simulated}) == 2  # one simulator each
    logged = [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()]
    assert [line["upstream"] for line in logged if line["endpoint"] == "generations"] == [
        "primary",
        "third",
    ]
    for fake in up.values():  # the configured upstreams never heard of it
        assert (await fake.state())["generations"] == 0


async def generate_at(url: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            url + "/v1/images/generations",
            headers={"Authorization": f"Bearer {TEAM_KEYS['design']}"},
            json={"prompt": "a rehearsed gull"},
        ) as resp:
            return resp.status, await resp.json()


async def test_result_files_through_the_gateway_come_from_the_upstream_that_made_them(
    start_gateway: Start, fakes: Fakes, backend: str
) -> None:
    up = await fakes("primary", "backup")
    tables = upstreams(
        up, primary={"proxy_results": True}, backup={"priority": 2, "proxy_results": True}
    )
    gateway = await start_gateway(**tables)
    await up["primary"].fault("json_error", 503, "server_error", "busy")
    status, body, _ = await generate(gateway)
    assert status == 200
    proxied = body["data"][0]["url"]
    assert proxied.startswith(gateway.url + "/v1/images/files/") and "upstream=backup" in proxied
    async with aiohttp.ClientSession() as http:
        async with http.get(proxied) as resp:
            assert resp.status == 200
            assert (await resp.read()).startswith(b"\x89PNG\r\n\x1a\n")
        async with http.get(proxied.replace("upstream=backup", "upstream=primary")) as resp:
            assert resp.status == 404  # asked at primary, which never made it
        async with http.get(proxied + "&upstream=backup") as resp:
            assert resp.status == 404
    lines_ = [line for line in await gateway.log_lines() if line["endpoint"] == "files"]
    assert [line["upstream"] for line in lines_] == ["backup", "primary", None]
    await balanced([gateway], up)


async def test_once_its_time_is_up_one_request_probes_it_while_the_others_go_on_elsewhere(
    start_gateway: Start, fakes: Fakes, upstream: Upstream
) -> None:
    up = await fakes("backup")
    tables = upstreams(up, backup={"priority": 2})
    tables["upstreams"]["primary"] = {"base_url": upstream.url, "api_key_env": "TEST_UPSTREAM_KEY"}
    gateway = await start_gateway(**tables)
    upstream.faults.add(json_error(429, "rate_limit_error", "slow down", retry_after="20"))
    assert (await generate(gateway))[0] == 200  # served by backup; primary cools for 20 s
    gateway.clock.advance(seconds=20)
    release, arrived = asyncio.Event(), asyncio.Event()
    upstream.faults.add(gate(release, arrived))
    probe = asyncio.create_task(generate(gateway, prompt="the probe"))
    await arrived.wait()  # the probe is at primary, not answered yet
    assert (await health(gateway))["primary"]["state"] == "cooling"
    others = await spread([gateway], 3, prompt="meanwhile")
    assert [status for status, _, _ in others] == [200] * 3
    assert upstream.faults.seen == 2  # the refusal and the probe: nothing else reached primary
    release.set()
    assert (await probe)[0] == 200
    assert (await health(gateway))["primary"]["state"] == "healthy"
    found = await lines([gateway])  # in the order their money settled
    assert Counter(line["upstream"] for line in found) == {"backup": 4, "primary": 1}
    await spread([gateway], 2)
    assert upstream.faults.seen == 4  # back in rotation
    await gateway.settled()
    captured = Counter[str]()
    for entry in await gateway.app[DB].entries(LedgerQuery()):
        captured[entry.upstream or "?"] += entry.charged_images
    served = (await up["backup"].state())["served_images"]
    assert (
        captured
        == {"backup": served, "primary": upstream.sim.served_images()}
        == {
            "backup": 4,
            "primary": 3,
        }
    )
