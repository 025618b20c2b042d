"""What ``deploy/`` ships besides Prometheus (issue 21): the nginx example really skips a dead
instance after one failure and never sends a POST twice, and the Alertmanager example is valid
and routes every alert the gateway ships to a deliberate receiver.

They need ``nginx`` and ``amtool`` (Debian: ``apt-get install nginx prometheus-alertmanager``;
``.ci/run`` installs both): without them they skip, and under CI they fail instead."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
NGINX_EXAMPLE = ROOT / "deploy" / "nginx" / "image-gateway.conf"
FAIL_TIMEOUT_S = 10  # the example's fail_timeout
ALERTMANAGER = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

# Alerts other parts of the gateway add (issue 21) that the routing must already place.
NEW_ALERTS = {
    "GatewayStorageDown": "critical",
    "GatewayConfigDrift": "warning",
    "GatewayVersionDrift": "warning",
    "GatewayUpstreamDown": "critical",
}
PAGER, CHAT, BUDGETS = "platform-pager", "platform-chat", "budget-owners"
ROUTED = {  # where each alert goes, and why it is there
    "GatewayDown": PAGER,
    "GatewayStorageDown": PAGER,
    "GatewayUnsettledResults": PAGER,
    "GatewayUpstreamDown": PAGER,
    "GatewayUpstreamRefusesAccount": PAGER,
    "GatewayUpstreamErrorRatioHigh": PAGER,
    "GatewayTeamBudget80Percent": BUDGETS,
    "GatewayTeamBudgetExhausted": BUDGETS,
    "GatewayUncertainMoney": BUDGETS,
    "GatewayLedgerOverrun": BUDGETS,
    "GatewayConfigDrift": CHAT,
    "GatewayVersionDrift": CHAT,
    "GatewayUpstreamSlow": CHAT,
    "GatewayPendingTasksGrowing": CHAT,
    "GatewayKeyExpiresSoon": CHAT,
}


def tool(name: str, package: str) -> str:
    path = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name,) if p.exists()), None
    )
    if path is not None:
        return path
    message = f"{name} is not installed (apt-get install {package})"
    if os.environ.get("CI"):
        pytest.fail(message + "; under CI it must run, not skip")
    pytest.skip(message)


# -- Alertmanager ----------------------------------------------------------------------------


def shipped_alerts() -> dict[str, str]:
    """Every alert of alerts.yml with its severity, and the ones being added beside it."""
    rules = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    found = {
        rule["alert"]: rule["labels"]["severity"]
        for group in rules["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    return {**NEW_ALERTS, **found}


def test_the_alertmanager_example_is_valid() -> None:
    amtool = tool("amtool", "prometheus-alertmanager")
    proc = subprocess.run(
        [amtool, "check-config", str(ALERTMANAGER)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


@pytest.mark.parametrize("alert", sorted(ROUTED))
def test_every_alert_is_routed_where_it_belongs(alert: str) -> None:
    amtool = tool("amtool", "prometheus-alertmanager")
    severity = shipped_alerts()[alert]
    proc = subprocess.run(
        [amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER}",
         f"alertname={alert}", f"severity={severity}", "team=design", "instance=gw-a:8080"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [ROUTED[alert]], (alert, proc.stdout)


def test_every_shipped_alert_has_a_route_of_its_own() -> None:
    """An alert added to alerts.yml must be placed here too (not left to the fallback)."""
    assert set(shipped_alerts()) == set(ROUTED)
    text = ALERTMANAGER.read_text(encoding="utf-8")
    for alert in ROUTED:
        assert re.search(rf"\b{alert}\b", text), alert
    config = yaml.safe_load(text)
    receivers = {r["name"] for r in config["receivers"]}
    assert set(ROUTED.values()) <= receivers
    inhibited = {
        (i["source_matchers"][0], i["target_matchers"][0]) for i in config["inhibit_rules"]
    }
    assert (
        "alertname = GatewayTeamBudgetExhausted",
        "alertname = GatewayTeamBudget80Percent",
    ) in inhibited  # the README's inhibit rule


# -- nginx -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def dying_instance() -> Iterator[tuple[int, list[int]]]:
    """An instance that takes connections and drops them before answering (it is crashing):
    the port, and a list that grows by one per connection it took."""
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    accepted: list[int] = []
    loop = asyncio.get_running_loop()

    def drop() -> None:
        with contextlib.suppress(BlockingIOError):
            conn, _ = server.accept()
            accepted.append(1)
            conn.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            conn.close()  # a reset: the request was sent, no answer ever comes

    loop.add_reader(server.fileno(), drop)
    try:
        yield server.getsockname()[1], accepted
    finally:
        loop.remove_reader(server.fileno())
        server.close()


@contextlib.asynccontextmanager
async def live_instance() -> AsyncIterator[tuple[int, list[str]]]:
    """A stand-in gateway that answers everything: its port, and the methods it served."""
    served: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        served.append(request.method)
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1], served
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def nginx_in_front(tmp_path: Path, first: int, second: int) -> AsyncIterator[str]:
    """The shipped example as it is, with its two instances' ports and listen address swapped
    for ours, run in the foreground by a real nginx."""
    nginx = tool("nginx", "nginx")
    port = free_port()
    example = NGINX_EXAMPLE.read_text(encoding="utf-8")
    example = example.replace("127.0.0.1:8081", f"127.0.0.1:{first}")
    example = example.replace("127.0.0.1:8082", f"127.0.0.1:{second}")
    example = example.replace("listen 80;", f"listen 127.0.0.1:{port};")
    conf = tmp_path / "image-gateway.conf"
    conf.write_text(example, encoding="utf-8")
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"daemon off;\nmaster_process off;\npid {tmp_path}/nginx.pid;\n"
        f"error_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{\n access_log off;\n client_body_temp_path {tmp_path};\n"
        f" proxy_temp_path {tmp_path};\n include {conf};\n}}\n",
        encoding="utf-8",
    )
    proc = await asyncio.create_subprocess_exec(
        nginx, "-p", str(tmp_path), "-c", str(main),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while True:  # nginx is up once its port takes connections
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                assert proc.returncode is None, await proc.stderr.read()  # type: ignore[union-attr]
                assert loop.time() < deadline, "nginx did not start"
                await asyncio.sleep(0.05)
                continue
            writer.close()
            break
        yield url
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 20)


async def send(url: str, method: str) -> int:
    async with aiohttp.ClientSession() as http:
        async with http.request(method, url + "/v1/images/generations", json={}) as resp:
            return resp.status


async def test_nginx_skips_a_dying_instance_after_one_failure_and_never_resends_a_post(
    tmp_path: Path,
) -> None:
    async with live_instance() as (live, served):
        with dying_instance() as (dying, accepted):
            async with nginx_in_front(tmp_path, dying, live) as url:
                loop = asyncio.get_running_loop()
                started = loop.time()
                statuses = [await send(url, "POST") for _ in range(12)]
                windows = 1 + int((loop.time() - started) // FAIL_TIMEOUT_S)
    # A POST that reached the dying instance may have been bought, so it is not sent again
    # (502 to that client); from then on the instance is out for fail_timeout and every request
    # goes to the live one, instead of every other one failing as least_conn would send them.
    # (On a machine so loaded that the twelve take longer than fail_timeout, nginx probes the
    # dying instance once per window: still never twice in a row, never a resent POST.) A reset
    # that beats nginx's write of the request means it never reached the instance: that POST
    # goes on to the live one, the only resend nginx allows.
    assert len(accepted) >= 1 and statuses.count(502) <= len(accepted), statuses
    assert len(accepted) <= windows, (statuses, windows)
    assert served == ["POST"] * statuses.count(200) and len(statuses) == 12


async def test_nginx_sends_a_post_to_the_next_instance_when_it_never_reached_one(
    tmp_path: Path,
) -> None:
    dead = free_port()  # nothing listens: the connection is refused, nothing was sent
    async with live_instance() as (live, served):
        async with nginx_in_front(tmp_path, dead, live) as url:
            statuses = [await send(url, "POST") for _ in range(6)]
    assert statuses == [200] * 6
    assert served == ["POST"] * 6  # each sent once, to the live instance
