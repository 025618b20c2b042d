"""Who did what (issue 21): named admin keys, the actor of every resolution (over HTTP and from
the CLI) in the ledger and the access log, the client address behind trusted proxies, and the
instance that wrote each line and answered each response; the schema step that allows named
actors, on a 0.1 database."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import sqlite3
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.core.auth import key_digest
from gateway.core.ledger import Uncertain
from gateway.core.settlement import admin_resolution
from gateway.http.keys import DB
from gateway.store import migrations
from gateway.store.base import LedgerQuery
from gateway.store.manager import Store
from gateway.store.postgres import PostgresEngine
from gateway.store.sqlite import SQLiteEngine
from tests.conftest import (
    ADMIN_KEY,
    NAMED_ADMIN_KEYS,
    TEAM_KEYS,
    Gateway,
    Upstream,
    base_config,
    books_balance,
    merge,
)
from tests.fakes import hang
from tests.process import GatewayProcess, to_toml

FIXTURE_01 = Path(__file__).parent / "fixtures" / "ledger" / "gateway-0.1.0.db"
UNNAMED_ADMIN = f"sha256:{key_digest(ADMIN_KEY)[:8]}"
ADMINS = {  # the unnamed admin key of base_config, and a named one
    "keys_sha256": [key_digest(ADMIN_KEY)],
    "keys": [{"name": "alice", "sha256": key_digest(NAMED_ADMIN_KEYS["alice"])}],
}


async def call(
    gateway: Gateway, method: str, path: str, key: str, **kwargs: Any
) -> tuple[int, Any, dict[str, str]]:
    async with aiohttp.ClientSession() as http:
        async with http.request(
            method, gateway.url + path, headers={"Authorization": f"Bearer {key}"}, **kwargs
        ) as resp:
            return resp.status, await resp.json(), dict(resp.headers)


async def uncertain_entries(gateway: Gateway, upstream: Upstream, count: int) -> list[str]:
    """``count`` generations whose answers never came: uncertain, to be resolved."""
    for _ in range(count):
        upstream.faults.add(hang())
        status, _, _ = await call(
            gateway, "POST", "/v1/images/generations", TEAM_KEYS["design"], json={"prompt": "x"}
        )
        assert status == 504
    await gateway.settled()
    return [e.request_id for e in await gateway.db.entries(LedgerQuery(state="uncertain"))]


async def cli(gateway: Gateway, tmp_path: Path, *args: str, **env: str) -> tuple[int, str, str]:
    config = gateway.config_file(tmp_path / "cli.toml")
    environment = {k: v for k, v in gateway.cli_env().items() if k != "SUDO_USER"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args, "--config", str(config),
        env={**environment, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def logged(gateway: Gateway, count: int, seconds: float = 20) -> list[dict[str, Any]]:
    """The access log once it has ``count`` settle lines (a CLI's resolutions are written by
    the gateway's next pass)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        lines = await gateway.log_lines()
        if sum(line["endpoint"] == "settle" for line in lines) >= count:
            return lines
        assert loop.time() < deadline, lines
        await asyncio.sleep(0.05)


async def test_a_resolution_over_http_records_the_admin_keys_name(
    start_gateway, upstream: Upstream
) -> None:
    gateway = await start_gateway(upstream={"timeout_s": 0.5}, admin=ADMINS)
    first, second = await uncertain_entries(gateway, upstream, 2)
    for request_id, key in ((first, NAMED_ADMIN_KEYS["alice"]), (second, ADMIN_KEY)):
        status, resolved, _ = await call(
            gateway, "POST", f"/admin/ledger/{request_id}/resolve", key,
            json={"state": "released", "reason": "not in the usage details"},
        )  # fmt: skip
        assert status == 200, resolved
    status, listed, _ = await call(gateway, "GET", "/admin/ledger", ADMIN_KEY)
    actors = {e["request_id"]: e["resolution"]["actor"] for e in listed["entries"]}
    assert actors == {first: "alice", second: UNNAMED_ADMIN}
    lines = await gateway.log_lines()
    settled = [(line["ledger_id"], line["actor"]) for line in lines if line["endpoint"] == "settle"]
    assert settled == [(first, "alice"), (second, UNNAMED_ADMIN)]
    admin_lines = [line["actor"] for line in lines if line["endpoint"] == "admin"]
    assert admin_lines == ["alice", UNNAMED_ADMIN, UNNAMED_ADMIN]  # who asked, on each request
    await books_balance(gateway, upstream)


async def test_a_resolution_from_the_cli_records_the_actor_or_the_os_user(
    start_gateway, upstream: Upstream, tmp_path: Path
) -> None:
    gateway = await start_gateway(upstream={"timeout_s": 0.5}, tasks={"settle_interval_s": 0.1})
    first, second = await uncertain_entries(gateway, upstream, 2)
    resolve = ("ledger", "resolve")
    code, out, err = await cli(gateway, tmp_path, *resolve, first, "--released", "--reason",
                               "not billed", "--actor", "bob")  # fmt: skip
    assert (code, err) == (0, ""), out
    code, _, err = await cli(gateway, tmp_path, *resolve, second, "--released", "--reason",
                             "not billed either", LOGNAME="carol")  # fmt: skip
    assert (code, err) == (0, "")
    code, out, _ = await cli(gateway, tmp_path, "ledger", "list", "--json", "--period", "total")
    actors = {e["request_id"]: e["resolution"]["actor"] for e in json.loads(out)["entries"]}
    assert actors == {first: "bob", second: "carol"}
    code, out, _ = await cli(gateway, tmp_path, "ledger", "list", "--period", "total")
    header, *rows = out.splitlines()
    assert "by" in header.split()
    assert sorted(word for row in rows for word in row.split() if word in actors.values()) == [
        "bob",
        "carol",
    ]
    for actor, why in (("gateway", "the gateway's own"), ("", "1 to 64 printable")):
        code, _, err = await cli(gateway, tmp_path, *resolve, first, "--released", "--reason",
                                 "x", "--actor", actor)  # fmt: skip
        assert code == 1 and why in err and err.count("\n") == 1, err
    lines = await logged(gateway, 2)  # the running gateway writes the CLI's lines
    settled = [(line["ledger_id"], line["actor"]) for line in lines if line["endpoint"] == "settle"]
    assert sorted(settled) == sorted([(first, "bob"), (second, "carol")])
    await books_balance(gateway, upstream)


async def test_every_line_and_response_names_the_instance(
    start_gateway, upstream: Upstream, backend: str
) -> None:
    gateway = await start_gateway(
        server={"instance_name": "gw-a"}, tasks={"settle_interval_s": 0.1}
    )
    status, task, headers = await call(
        gateway, "POST", "/v1/images/generations?async=1", TEAM_KEYS["design"], json={"prompt": "x"}
    )
    assert (status, headers["X-Gateway-Instance"]) == (202, "gw-a")
    upstream.sim.finish_task(task["task_id"])
    gateway.clock.advance(seconds=30)  # the settler's next pass finds it: a settle line
    lines = await logged(gateway, 1)
    status, _, headers = await call(gateway, "GET", "/v1/nowhere", TEAM_KEYS["design"])
    assert (status, headers["X-Gateway-Instance"]) == (404, "gw-a")  # errors too
    lines = await gateway.log_lines()
    assert {line["instance"] for line in lines} == {"gw-a"}
    assert [line["client_ip"] for line in lines] == [
        None if line["endpoint"] == "settle" else "127.0.0.1" for line in lines
    ]
    if backend == "postgres":  # the fleet's table knows it by the same name
        rows = await gateway.app[DB].engine._fetch("SELECT instance_id FROM instances")  # type: ignore[attr-defined]
        assert [row[0].split(":")[0] for row in rows] == ["gw-a"]
    await books_balance(gateway, upstream)


async def test_x_forwarded_for_counts_only_from_a_trusted_proxy(start_gateway) -> None:
    direct = await start_gateway(server={"instance_name": "direct"})
    proxied = await start_gateway(
        server={"instance_name": "proxied", "trusted_proxies": ["127.0.0.0/8", "10.0.0.0/8"]}
    )
    sent = [
        (direct, "203.0.113.7"),  # from a peer that is no trusted proxy: ignored
        (proxied, "6.6.6.6, 203.0.113.7, 10.1.2.3"),  # rightmost untrusted hop; 6.6.6.6 is made up
        (proxied, None),  # no header: the proxy itself
        (proxied, "not-an-address"),  # a hop that is no address: the last trusted one
        (proxied, "10.0.0.9"),  # every hop trusted: the leftmost
    ]
    for gateway, forwarded in sent:
        headers = {"X-Forwarded-For": forwarded} if forwarded else {}
        async with aiohttp.ClientSession() as http:
            async with http.get(gateway.url + "/healthz", headers=headers) as resp:
                assert resp.status == 200
    lines = await direct.log_lines()
    assert [(line["instance"], line["client_ip"]) for line in lines] == [
        ("direct", "127.0.0.1"),
        ("proxied", "203.0.113.7"),
        ("proxied", "127.0.0.1"),
        ("proxied", "127.0.0.1"),
        ("proxied", "10.0.0.9"),
    ]


@pytest.mark.process
async def test_a_gateway_process_is_named_after_its_host_and_port(
    tmp_path: Path, upstream: Upstream
) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(to_toml(merge(base_config(tmp_path, upstream.url), {})))
    process = GatewayProcess(path)
    try:
        url = await process.start()
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/readyz") as resp:
                name = resp.headers["X-Gateway-Instance"]
    finally:
        await process.close()
    assert name == f"{socket.gethostname()}:{url.rsplit(':', 1)[1]}"  # the port really bound


# -- the schema: named actors on a database that only knew 'admin' and 'gateway' ---------------


def alice_releases(entry: Any) -> Any:
    return admin_resolution(entry, "released", None, "checked", actor="alice")


async def test_a_0_1_database_keeps_its_resolutions_triggers_and_view_when_actors_get_names(
    tmp_path: Path,
) -> None:
    path = tmp_path / "gateway.db"
    shutil.copy(FIXTURE_01, path)
    relaxing = next(m.version for m in migrations.load("sqlite") if m.name == "audit")
    with sqlite3.connect(path, isolation_level=None) as old:  # the schema before the step
        old.execute("PRAGMA foreign_keys=ON")
        for step in migrations.load("sqlite")[1 : relaxing - 1]:
            old.executescript(f"BEGIN;\n{step.sql}\n;\nCOMMIT;")
        old.execute(f"UPDATE meta SET value = '{relaxing - 1}' WHERE key = 'schema_version'")
        (request_id,) = old.execute(
            "SELECT request_id FROM ledger WHERE state = 'uncertain'"
        ).fetchone()
        resolution = (
            "INSERT INTO resolutions (request_id, state, images, amount, overrun, reason, actor,"
            " resolved_at) VALUES (?, 'released', 0, 0, 0, 'checked', ?, 1.0)"
        )
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            old.execute(resolution, (request_id, "alice"))  # before the step: admin or gateway
        old.execute(resolution, (request_id, "admin"))
        old.execute("INSERT INTO resolution_log VALUES (?, 2.0)", (request_id,))
        before = old.execute("SELECT * FROM ledger ORDER BY request_id").fetchall()
        triggers = old.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' ORDER BY name"
        ).fetchall()

    store = Store(await SQLiteEngine.open(path))  # the gateway's start migrates it
    try:
        with contextlib.closing(sqlite3.connect(path)) as new:  # as it was, after the step
            after = new.execute("SELECT * FROM ledger ORDER BY request_id").fetchall()
            width = len(before[0])  # later steps may add columns (6: corrections), not change
            assert [row[:width] for row in after] == before
            trigger_sql = "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' ORDER BY name"
            assert set(triggers) <= set(new.execute(trigger_sql).fetchall())  # resolutions' too
            assert new.execute("PRAGMA foreign_key_check").fetchall() == []
            assert new.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            tables = {row[0] for row in new.execute("SELECT name FROM sqlite_master")}
            assert "resolutions_relaxed" not in tables and "resolution_log_kept" not in tables
        assert (await store.verify()).mismatches == ()
        entry = await store.find_entry(request_id)
        assert entry is not None and entry.resolution is not None
        assert (entry.resolution.actor, entry.state) == ("admin", "released")
        assert await store.unlogged_resolutions() == []  # its log row came along
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            await store.engine._write("DELETE FROM resolutions")
        held = await store.find_entry("req_inflight_at_kill")
        assert held is not None and held.state == "held"
        await store.settle(held.request_id, Uncertain(held.held, "stuck"), 3.0)
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            await store.engine._write(resolution, (held.request_id, ""))
        resolved = await store.resolve(held.request_id, alice_releases, 4.0, logged=False)
        assert resolved.resolution is not None and resolved.resolution.actor == "alice"
        assert [e.request_id for e in await store.unlogged_resolutions()] == [held.request_id]
        with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
            await store.engine._write("INSERT INTO resolution_log VALUES ('req_nobody', 5.0)")
        assert (await store.verify()).mismatches == ()
    finally:
        await store.close()


async def test_postgres_accepts_named_actors_and_refuses_an_empty_one(postgres_dsn: str) -> None:
    store = Store(await PostgresEngine.open(postgres_dsn))
    try:
        rows = await store.engine._fetch(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE conname = 'resolutions_actor_check'"
        )
        assert [row[0] for row in rows] == [
            "CHECK (((actor <> ''::text) AND (length(actor) <= 64)))"
        ]
    finally:
        await store.close()


def test_os_user_is_the_sudo_user_under_sudo(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.cli.resolve import os_user

    monkeypatch.setenv("SUDO_USER", "dana")
    assert os_user() == "dana"
    monkeypatch.delenv("SUDO_USER")
    monkeypatch.setenv("LOGNAME", "erin")
    assert os_user() == "erin"
