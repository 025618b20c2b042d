"""Issue 12's remaining defects, each with a test that failed before the fix: a hostile upstream
(huge or gzip-bomb answers, the central key echoed anywhere, redirects), path tricks on the
result proxy, concurrent replays of a finished Idempotency-Key, and start-up failures."""

from __future__ import annotations

import asyncio
import ctypes
import gzip
import os
import socket
import sqlite3
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.core.periods import period_at
from gateway.store.base import LedgerQuery
from tests.client import post
from tests.conftest import UPSTREAM_KEY, Gateway, Upstream, base_config, books_balance
from tests.fakes import json_error, respond
from tests.process import to_toml

pytestmark = pytest.mark.engines("memory")  # services above the store; engines: test_store.py


def gzip_bomb(megabytes: int):
    """An answer of a few dozen KB that inflates to ``megabytes`` of JSON-ish bytes."""
    inflated = b'{"created": 1, "data": [{"url": "https://x.test/' + b"a" * (megabytes << 20)
    body = gzip.compress(inflated, compresslevel=9)

    async def fault(request: web.Request, handler: Any) -> web.Response:
        await request.read()
        return web.Response(
            body=body, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
        )

    return fault, len(body)


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_an_oversized_upstream_answer_is_a_clear_502_and_held_uncertain(
    gateway: Gateway, upstream: Upstream, mode: str
) -> None:
    fault, sent = gzip_bomb(64)
    assert sent < 200_000
    upstream.faults.add(fault)
    status, body, headers = await post(gateway, suffix="?async=1" if mode == "async" else "")
    assert (status, body["error"]["code"]) == (502, "upstream_answer_too_large")
    assert headers["x-should-retry"] == "false"  # it was sent: the image may exist
    await gateway.settled()
    (entry,) = await gateway.db.entries(LedgerQuery())
    assert (entry.state, entry.reason) == ("uncertain", "upstream_answer_too_large")
    await books_balance(gateway)


async def test_an_oversized_task_answer_leaves_the_task_pending(
    gateway: Gateway, upstream: Upstream
) -> None:
    _, task, _ = await post(gateway, suffix="?async=1")
    fault, _ = gzip_bomb(16)
    upstream.faults.add(fault, kind="TASK")
    async with aiohttp.ClientSession() as http:
        async with http.get(
            f"{gateway.url}/v1/images/tasks/{task['task_id']}", headers=gateway.headers()
        ) as resp:
            assert resp.status == 502
            assert (await resp.json())["error"]["code"] == "upstream_answer_too_large"
    assert (await gateway.db.task(task["task_id"])).status == "pending"


@pytest.mark.parametrize("field", ["type", "code", "param"])
async def test_the_central_key_is_scrubbed_from_every_upstream_error_field(
    gateway: Gateway, upstream: Upstream, field: str
) -> None:
    error = {"type": "invalid_request_error", "message": "refused", field: f"key={UPSTREAM_KEY}"}

    async def fault(request: web.Request, handler: Any) -> web.Response:
        await request.read()
        return web.json_response({"error": error}, status=400)

    upstream.faults.add(fault)
    status, body, _ = await post(gateway)
    assert status == 400
    assert body["error"][field] == "key=sk_…"  # the secret guard checks the log lines too
    await gateway.settled()
    assert UPSTREAM_KEY not in str([await gateway.ledger(), await gateway.stored_results()])


async def test_the_central_key_is_scrubbed_from_answers_and_task_bodies(
    gateway: Gateway, upstream: Upstream
) -> None:
    upstream.faults.add(
        respond({"created": 1, "id": f"id-{UPSTREAM_KEY}",
                 "data": [{"url": "https://api.icodeeasy.cc/v1/images/files/a-1.png",
                           "revised_prompt": f"echo {UPSTREAM_KEY}"}]})
    )  # fmt: skip
    status, body, _ = await post(gateway)
    assert status == 200 and UPSTREAM_KEY not in str(body)
    _, task, _ = await post(gateway, suffix="?async=1")
    upstream.faults.add(
        respond({"task_id": task["task_id"], "status": "completed", "cost": 0.2,
                 "note": f"for {UPSTREAM_KEY}", "result_url": "https://api.icodeeasy.cc/x.png"}),
        kind="TASK",
    )  # fmt: skip
    async with aiohttp.ClientSession() as http:
        async with http.get(
            f"{gateway.url}/v1/images/tasks/{task['task_id']}", headers=gateway.headers()
        ) as resp:
            answer = await resp.json()
    assert answer["note"] == "for sk_…"
    await gateway.settled()
    entries = await gateway.ledger()
    tasks = [await gateway.db.task(e.task_id) for e in entries if e.task_id]
    stored = [entries, await gateway.stored_results(), [t.result for t in tasks if t]]
    assert tasks and UPSTREAM_KEY not in str(stored)


async def test_a_redirect_on_the_generation_post_is_never_followed(
    gateway: Gateway, upstream: Upstream, aiohttp_server: Any
) -> None:
    hits: list[str] = []

    async def elsewhere(request: web.Request) -> web.Response:
        hits.append(request.method)
        return web.json_response({"created": 1, "data": [{"url": "https://x.test/1.png"}]})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", elsewhere)
    other = await aiohttp_server(app)

    async def redirect(request: web.Request, handler: Any) -> web.Response:
        await request.read()
        raise web.HTTPTemporaryRedirect(str(other.make_url("/v1/images/generations")))

    upstream.faults.add(redirect)
    status, body, _ = await post(gateway)
    assert (status, body["error"]["code"]) == (502, "upstream_bad_response")
    assert hits == []  # the paid request (and the central key) never went elsewhere


async def test_result_downloads_check_the_port_as_well_as_the_host(
    start_gateway, upstream: Upstream, aiohttp_server: Any
) -> None:
    hits: list[str] = []

    async def image(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(body=b"\x89PNG\r\n\x1a\n", content_type="image/png")

    app = web.Application()
    app.router.add_get("/{tail:.*}", image)
    other = await aiohttp_server(app)  # same host (127.0.0.1), another port
    gateway = await start_gateway()
    upstream.faults.add(
        respond({"created": 1, "id": "g1", "data": [{"url": str(other.make_url("/x.png"))}]})
    )
    status, body, headers = await post(gateway, response_format="b64_json")
    assert status == 200 and body["data"][0]["url"]  # the URL, not its download
    assert "not an upstream host" in headers["X-Gateway-Warning"]
    assert hits == []


@pytest.mark.parametrize(
    "path",
    [
        "/v1/images/files/%2e%2e/%2e%2e/admin",
        "/v1/images/files/gpt-image-2/%2e%2e/secret.png",
        "/v1/images/files/gpt-image-2/20261201/..%2fx.png",
        "/v1/images/files/gpt-image-2/./x.png",
        "/v1/images/files/a%00b.png",
        "/v1/images/files/gpt-image-2/x.png?redirect=https://evil",
    ],
)
async def test_the_result_proxy_refuses_path_tricks(
    start_gateway, upstream: Upstream, path: str
) -> None:
    gateway = await start_gateway(upstream={"proxy_results": True})
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.server.port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    head = (await reader.read(4096)).split(b"\r\n", 1)[0]
    writer.close()
    assert head.split()[1] in (b"404", b"400"), head
    assert [r.path for r in upstream.sim.received] == []  # nothing was fetched


async def test_concurrent_replays_of_a_finished_key_all_replay(
    gateway: Gateway, upstream: Upstream
) -> None:
    key = {"Idempotency-Key": "finished-once"}
    status, first, _ = await post(gateway, headers=key)
    assert status == 200
    replays = await asyncio.gather(*(post(gateway, headers=key) for _ in range(20)))
    assert [(s, b == first, h.get("Idempotent-Replayed")) for s, b, h in replays] == [
        (200, True, "true")
    ] * 20
    assert len(upstream.sim.generation_requests()) == 1
    await books_balance(gateway, upstream)


async def test_the_upstream_payment_refusal_is_not_a_team_budget_refusal(
    gateway: Gateway, upstream: Upstream
) -> None:
    upstream.faults.add(json_error(402, "payment_required", "balance too low"))
    status, body, headers = await post(gateway)
    assert (status, body["error"]["code"]) == (502, "upstream_quota_exhausted")
    assert headers["x-should-retry"] == "false"
    period = period_at("monthly", gateway.clock(), gateway.settings.server.tz)
    await gateway.settled()
    assert (await gateway.db.usage("design", period.key)).committed == 0


# -- start-up failures: one line naming the thing, exit 1 ------------------------------------


async def serve(config: Path) -> tuple[int, list[str]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--config", str(config),
        env={**os.environ, "TEST_UPSTREAM_KEY": UPSTREAM_KEY},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:  # it started after all: never leave it running
            proc.kill()
            await proc.wait()
    lines = [line for line in err.decode().splitlines() if " INFO " not in line]
    return proc.returncode or 0, lines


def write_config(tmp_path: Path, upstream: Upstream, **overrides: Any) -> Path:
    config = base_config(tmp_path, upstream.url)
    for table, values in overrides.items():
        config.setdefault(table, {}).update(values)
    path = tmp_path / "gateway.toml"
    path.write_text(to_toml(config))
    return path


@pytest.mark.process
async def test_a_port_in_use_is_one_line(tmp_path: Path, upstream: Upstream) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, lines = await serve(write_config(tmp_path, upstream, server={"port": port}))
    assert code == 1
    assert lines == [f"image-gateway: cannot start: cannot listen on 127.0.0.1:{port}: "
                     "address already in use"]  # fmt: skip


@pytest.mark.process
@pytest.mark.parametrize(
    "problem", ["corrupt", "unwritable directory", "not a ledger", "parent is a file"]
)
async def test_a_database_that_cannot_be_used_is_one_line_naming_it(
    tmp_path: Path, upstream: Upstream, problem: str
) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    database = folder / "gateway.db"
    if problem == "corrupt":
        database.write_bytes(b"garbage" * 1000)
    elif problem == "not a ledger":
        with sqlite3.connect(database) as other:
            other.execute("CREATE TABLE notes (text TEXT)")
    elif problem == "parent is a file":
        (folder / "plain").write_text("")
        database = folder / "plain" / "gateway.db"
    elif os.geteuid() == 0:
        pytest.skip("root writes through directory permissions (the parent-is-a-file case runs)")
    else:
        folder.chmod(0o500)
    try:
        code, lines = await serve(
            write_config(tmp_path, upstream, storage={"database": str(database)})
        )
    finally:
        folder.chmod(0o700)
    assert code == 1
    assert len(lines) == 1, lines
    assert lines[0].startswith("image-gateway: cannot start: ") and str(database) in lines[0]
    assert "Traceback" not in lines[0]


PR_CAPBSET_DROP, CAP_NET_BIND_SERVICE = 24, 10  # <linux/prctl.h>, <linux/capability.h>


def privileged_port() -> int:
    """A port this machine refuses to unprivileged users (Linux: below
    ip_unprivileged_port_start, 1024 by default)."""
    try:
        start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        start = 1024
    if start == 0:
        pytest.skip("every port is open to unprivileged users here")
    return start - 1


def without_bind_privilege() -> None:
    """In the child before exec: root without CAP_NET_BIND_SERVICE, as the systemd unit runs
    the gateway (no capabilities). Dropped from the bounding set, so exec cannot regain it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_CAPBSET_DROP, CAP_NET_BIND_SERVICE, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.mark.process
async def test_permission_denied_on_the_port_is_one_line(
    tmp_path: Path, upstream: Upstream
) -> None:
    port = privileged_port()
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except PermissionError:
            pass  # an unprivileged user: the gateway will be refused as well
        else:
            if os.geteuid() != 0:
                pytest.skip("this user may bind privileged ports (CAP_NET_BIND_SERVICE)")
    config = write_config(tmp_path, upstream, server={"port": port})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--config", str(config),
        env={**os.environ, "TEST_UPSTREAM_KEY": UPSTREAM_KEY},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        preexec_fn=without_bind_privilege if os.geteuid() == 0 else None,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    lines = [line for line in err.decode().splitlines() if " INFO " not in line]
    assert proc.returncode == 1
    assert lines == [
        f"image-gateway: cannot start: cannot listen on 127.0.0.1:{port}: permission denied "
        "(ports below 1024 need privileges: use a higher port behind a front proxy)"
    ]
    assert not (tmp_path / "gateway.db").exists()


@pytest.mark.process
@pytest.mark.parametrize("where", ["a missing folder", "/proc"])
async def test_an_access_log_that_cannot_be_written_is_one_line_naming_it(
    tmp_path: Path, upstream: Upstream, where: str
) -> None:
    access = tmp_path / "no-such-folder" / "access.log" if where != "/proc" else None
    target = str(access) if access is not None else "/proc/image-gateway-access.log"
    code, lines = await serve(write_config(tmp_path, upstream, log={"access": target}))
    assert code == 1
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        f"image-gateway: cannot start: cannot open the access log {target}: "
    )
    assert not (tmp_path / "gateway.db").exists()  # refused before the ledger was touched


@pytest.mark.process
async def test_an_invalid_config_is_one_line_naming_the_key(
    tmp_path: Path, upstream: Upstream
) -> None:
    config = write_config(tmp_path, upstream)
    config.write_text(config.read_text().replace("budget_cny", "budget", 1))
    code, lines = await serve(config)
    assert code == 1
    assert lines == [
        f"image-gateway: {config}: invalid config (2 problems):",
        "  - teams.design.budget_cny is required",
        "  - teams.design.budget is not a known setting; did you mean budget_cny?",
    ]
