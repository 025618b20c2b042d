"""``image-gateway db copy``: a SQLite history moved whole into PostgreSQL, verified there."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.core.auth import key_digest
from gateway.core.settlement import admin_expiry
from gateway.http.keys import DB
from gateway.store.base import LedgerQuery
from gateway.store.manager import Store
from gateway.store.postgres import PostgresEngine
from gateway.store.sqlite import SQLiteEngine
from tests.client import post
from tests.conftest import (
    ADMIN_KEY,
    NAMED_KEYS,
    PG_URL_ENV,
    UPSTREAM_KEY,
    Gateway,
    Upstream,
    base_config,
    merge,
)
from tests.fakes import hang, json_error, respond
from tests.process import to_toml

pytestmark = [
    pytest.mark.sqlite_only,  # the history is written on SQLite, whichever the param
    pytest.mark.new_ledger,  # the file copied is one a gateway made from nothing
]

KEYS = {"teams": {"design": {"keys": [
    {"name": "web-app", "sha256": key_digest(NAMED_KEYS["web-app"]), "budget_cny": 5.0},
]}}}  # fmt: skip


async def copy(source: Path, config: Path, dsn: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "db", "copy", "--from", str(source), "--config",
        str(config), env={**os.environ, PG_URL_ENV: dsn, "TEST_UPSTREAM_KEY": UPSTREAM_KEY},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, (out + err).decode()


async def test_db_copy_moves_every_entry_and_counter_and_verifies(
    start_gateway, upstream: Upstream, tmp_path: Path, postgres_dsn: str
) -> None:
    gateway = await start_gateway(upstream={"timeout_s": 0.5}, **KEYS)
    assert (await post(gateway, quality="high", n=2))[0] == 200
    assert (await post(gateway, key=NAMED_KEYS["web-app"], user="alice"))[0] == 200
    upstream.faults.add(json_error(500, "server_error", "failed"))
    assert (await post(gateway))[0] == 500
    upstream.faults.add(hang())
    assert (await post(gateway))[0] == 504
    await gateway.settled()
    (lost,) = [e for e in await gateway.db.entries(LedgerQuery()) if e.state == "uncertain"]
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{gateway.url}/admin/ledger/{lost.request_id}/resolve",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            json={"state": "released", "reason": "not in the provider's usage"},
        ) as resp:
            assert resp.status == 200
    _, task, _ = await post(gateway, suffix="?async=1")
    upstream.faults.add(
        respond({"task_id": task["task_id"], "status": "completed", "cost": 9.9}), kind="TASK"
    )
    async with aiohttp.ClientSession() as http:
        async with http.get(
            f"{gateway.url}/v1/images/tasks/{task['task_id']}", headers=gateway.headers()
        ) as resp:
            assert resp.status == 200  # an overrun
    await post(gateway, suffix="?async=1", quality="low")  # still pending
    _, stuck, _ = await post(gateway, suffix="?async=1", quality="medium")  # pending, then expired
    await gateway.settled()
    await expire_by_alice(gateway, stuck["task_id"])
    sqlite_path = tmp_path / "gateway.db"
    before = await gateway.db.entries(LedgerQuery())
    await gateway.server.close()

    config = merge(base_config(tmp_path, upstream.url), KEYS)
    config["storage"] = {"backend": "postgres", "dsn_env": PG_URL_ENV}
    (tmp_path / "pg.toml").write_text(to_toml(config))
    code, out = await copy(sqlite_path, tmp_path / "pg.toml", postgres_dsn)
    assert code == 0, out
    assert out.splitlines()[-1] == f"consistent ({len(before)} entries)"

    target = Store(await PostgresEngine.open(postgres_dsn, register=False, migrate=False))
    source = Store(await SQLiteEngine.open_read_only(sqlite_path))
    try:
        assert await target.entries(LedgerQuery()) == await source.entries(LedgerQuery())
        for entry in before:
            assert await target.usage(entry.team, entry.period) == await source.usage(
                entry.team, entry.period
            )
        fp = key_digest(NAMED_KEYS["web-app"])[:16]
        period = before[0].period
        assert (await target.key_usage("design", fp, period)).spent == 2000
        assert (await target.verify()).mismatches == ()
        assert (await target.task(task["task_id"])).status == "completed"
        expiries = "SELECT request_id, actor, expired_at, logged_at FROM expiries"
        assert [tuple(r) for r in await target.engine._fetch(expiries)] == [
            tuple(r) for r in await source.engine._rows(expiries)
        ]
        assert len(await source.engine._rows(expiries)) == 1
    finally:
        await target.close()
        await source.close()
    code, out = await copy(sqlite_path, tmp_path / "pg.toml", postgres_dsn)
    assert code == 1 and "not empty" in out


async def expire_by_alice(gateway: Gateway, entry_id: str) -> None:
    """An admin's expiry of a held entry, as `ledger expire` makes it (past the max age)."""
    max_age = gateway.settings.tasks.max_pending_age_s
    entry = await gateway.db.find_entry(entry_id)
    assert entry is not None
    now = entry.created_at + max_age + 1

    def decide(found: Any, gone: bool) -> Any:
        return admin_expiry(
            found, now=now, max_pending_age_s=max_age, instance_gone=gone, reason="stuck",
            actor="alice",
        )  # fmt: skip

    await gateway.app[DB].expire(entry_id, decide, now, actor="alice")


async def test_db_copy_refuses_a_database_a_running_gateway_holds(
    gateway: Gateway, upstream: Upstream, tmp_path: Path, postgres_dsn: str
) -> None:
    assert (await post(gateway))[0] == 200
    config = base_config(tmp_path, upstream.url)
    config["storage"] = {"backend": "postgres", "dsn_env": PG_URL_ENV}
    (tmp_path / "pg.toml").write_text(to_toml(config))
    code, out = await copy(tmp_path / "gateway.db", tmp_path / "pg.toml", postgres_dsn)
    assert code == 1
    assert out.strip().splitlines() == [
        f"image-gateway: {tmp_path / 'gateway.db'} is in use by a running gateway: stop it "
        "first, so that nothing is written to it after the copy"
    ]
    target = Store(await PostgresEngine.open(postgres_dsn, register=False))
    try:
        assert await target.entries(LedgerQuery()) == []  # nothing was copied
    finally:
        await target.close()


async def test_db_copy_reads_a_long_history_in_batches(
    start_gateway, upstream: Upstream, tmp_path: Path, postgres_dsn: str, monkeypatch
) -> None:
    from gateway.store import dbcopy

    gateway = await start_gateway()
    for quality in ("low", "medium", "high", "low", "medium"):
        assert (await post(gateway, quality=quality))[0] == 200
    await gateway.settled()
    before = await gateway.db.entries(LedgerQuery())
    await gateway.server.close()
    await gateway.db.close()
    await (await PostgresEngine.open(postgres_dsn, register=False)).close()  # migrated, empty
    monkeypatch.setattr(dbcopy, "BATCH_ROWS", 2)  # five holds: three batches
    copied = await dbcopy.copy_sqlite_to_postgres(tmp_path / "gateway.db", postgres_dsn)
    assert copied.entries == 5 and copied.rows["holds"] == 5 == copied.rows["settlements"]
    target = Store(await PostgresEngine.open(postgres_dsn, register=False, migrate=False))
    try:
        assert await target.entries(LedgerQuery()) == before
        assert (await target.verify()).mismatches == ()
    finally:
        await target.close()
    assert len(upstream.sim.generation_requests()) == 5
