"""Stuck holds (issue 21): ``image-gateway ledger expire`` turns a ``held`` entry that can no
longer settle by itself (older than ``[tasks] max_pending_age_s``, or whose instance is gone)
into ``uncertain``, to be resolved; it refuses anything else in one line, and a running gateway
writes its access-log line."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.core.ledger import Capture, Hold, LedgerEntry, Uncertain
from gateway.core.settlement import ExpiryRefused, admin_expiry
from gateway.http.keys import DB
from gateway.store.base import Expiry, LedgerQuery, UnknownEntry
from gateway.store.manager import Store
from gateway.store.postgres import PostgresEngine
from tests.conftest import TEAM_KEYS, Gateway, Upstream, books_balance
from tests.fakes import gate
from tests.ledgers import migrated_store

MAX_AGE_S = 3600.0


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with migrated_store(request.param, request, tmp_path / "ledger.db") as store:
        yield store
        assert (await store.verify()).mismatches == ()


def hold(request_id: str, created_at: float) -> Hold:
    return Hold(
        request_id, "t", "monthly:2026-11", created_at, "generations", "sync", "medium", 1,
        2000, 10_000, "fp",
    )  # fmt: skip


def by(actor: str, reason: str = "its instance died with it") -> Any:
    def decide(entry: LedgerEntry, gone: bool) -> Uncertain:
        return admin_expiry(
            entry, now=NOW, max_pending_age_s=MAX_AGE_S, instance_gone=gone, reason=reason,
            actor=actor,
        )  # fmt: skip

    return decide


NOW = 100_000.0


async def test_a_held_entry_past_the_max_age_becomes_uncertain_once(db: Store) -> None:
    await db.reserve(hold("old", NOW - MAX_AGE_S - 1))
    entry = await db.expire("old", by("alice"), NOW, actor="alice")
    assert (entry.state, entry.settled_amount) == ("uncertain", 2000)
    assert entry.reason == "expired by alice: its instance died with it"
    assert (await db.usage("t", "monthly:2026-11")).uncertain == 2000
    (expiry,) = await db.unlogged_expiries()
    assert (expiry.entry.request_id, expiry.actor) == ("old", "alice")
    assert await db.claim_expiry_log("old", NOW)
    assert not await db.claim_expiry_log("old", NOW)  # one line, whichever gateway logs it
    assert await db.unlogged_expiries() == []
    with pytest.raises(ExpiryRefused, match="old is uncertain, not held"):
        await db.expire("old", by("alice"), NOW, actor="alice")
    with pytest.raises(UnknownEntry):
        await db.expire("nobody", by("alice"), NOW, actor="alice")


async def test_a_young_hold_of_a_live_gateway_and_a_settled_one_are_refused(db: Store) -> None:
    await db.reserve(hold("young", NOW - 600))
    with pytest.raises(ExpiryRefused, match=r"held for 10 min, less than .* \(60 min\)"):
        await db.expire("young", by("alice"), NOW, actor="alice")
    await db.reserve(hold("done", NOW - MAX_AGE_S - 1))
    await db.settle("done", Capture(images=1, amount=2000), NOW - 5)
    with pytest.raises(ExpiryRefused, match="done is captured, not held"):
        await db.expire("done", by("alice"), NOW, actor="alice")
    with pytest.raises(ExpiryRefused, match="a reason is required"):
        await db.expire("young", by("alice", reason=" "), NOW, actor="alice")
    assert (await db.find_entry("young")).state == "held"  # type: ignore[union-attr]
    assert await db.unlogged_expiries() == []


async def test_pg_a_young_hold_whose_instance_is_gone_can_be_expired(postgres_dsn: str) -> None:
    db = Store(await PostgresEngine.open(postgres_dsn))
    try:
        await db.reserve(hold("orphan", NOW - 60))
        with pytest.raises(ExpiryRefused, match="its gateway is alive"):
            await db.expire("orphan", by("alice"), NOW, actor="alice")
        await db.engine._execute("DELETE FROM instances WHERE instance_id = $1", db.instance_id)  # type: ignore[attr-defined]
        entry = await db.expire("orphan", by("alice"), NOW, actor="alice")
        assert entry.state == "uncertain"
        assert await db.unlogged_expiries() == [Expiry(entry, "alice")]
    finally:
        await db.close()


# -- the command, beside a running gateway ---------------------------------------------------


async def cli(gateway: Gateway, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    config = gateway.config_file(tmp_path / "cli.toml")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args, "--config", str(config), env=gateway.cli_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def post(gateway: Gateway) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway.url + "/v1/images/generations",
            headers={"Authorization": f"Bearer {TEAM_KEYS['design']}"},
            json={"prompt": "stuck"},
        ) as resp:
            return resp.status, await resp.json()


async def held(gateway: Gateway) -> list[LedgerEntry]:
    """Held entries, read without waiting for settlements (these are in flight, gated)."""
    return await gateway.app[DB].entries(LedgerQuery(state="held"))


async def settle_lines(gateway: Gateway, count: int) -> list[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while True:  # read as it is: gateway.log_lines() would wait for the gated requests
        text = gateway.access_log.read_text() if gateway.access_log.exists() else ""
        lines = [json.loads(line) for line in text.splitlines()]
        lines = [line for line in lines if line["endpoint"] == "settle"]
        if len(lines) >= count:
            return lines
        assert loop.time() < deadline, lines
        await asyncio.sleep(0.05)


async def test_ledger_expire_frees_a_stuck_hold_for_resolution_while_the_gateway_runs(
    start_gateway, upstream: Upstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = await start_gateway(  # its clock: 2026-11-26
        tasks={"settle_interval_s": 0.1}, upstream={"timeout_s": 120}
    )
    release, arrived = asyncio.Event(), asyncio.Event()
    upstream.faults.add(gate(release, arrived))
    stuck = asyncio.create_task(post(gateway))
    await arrived.wait()
    (entry,) = await held(gateway)
    request_id = entry.request_id

    gateway.clock.now = datetime.now(UTC)  # a hold made now, by the CLI's clock
    young_release, young_arrived = asyncio.Event(), asyncio.Event()
    upstream.faults.add(gate(young_release, young_arrived))
    young = asyncio.create_task(post(gateway))
    await young_arrived.wait()
    (young_id,) = {e.request_id for e in await held(gateway)} - {request_id}

    expire = ("ledger", "expire")
    code, out, err = await cli(gateway, tmp_path, *expire, request_id, "--reason",
                               "the upstream never answered", "--actor", "bob")  # fmt: skip
    assert (code, err) == (0, ""), out
    assert out == (
        f"{request_id} (design): expired, 0.2000 CNY moved from reserved to uncertain; resolve "
        "it with `image-gateway ledger resolve`\n"
    )
    for args, message in (
        ((request_id,), f"cannot expire {request_id}: {request_id} is uncertain, not held"),
        (("req_nobody",), "no ledger entry has the id 'req_nobody'"),
        ((young_id,), "less than [tasks] max_pending_age_s (6.0 h), and its gateway is alive"),
        ((young_id, "--actor", "gateway"), "--actor: 'gateway' names the gateway's own"),
    ):
        code, _, err = await cli(gateway, tmp_path, *expire, *args, "--reason", "x")
        assert code == 1 and message in err and err.count("\n") == 1, err
    (line,) = await settle_lines(gateway, 1)  # the running gateway writes the CLI's line
    assert (line["ledger_id"], line["ledger_state"], line["cost_cny"], line["actor"]) == (
        request_id, "uncertain", 0.0, "bob",
    )  # fmt: skip

    release.set()  # it answers after all: the outcome resolves the expired hold (issue 19)
    assert (await stuck)[0] == 200
    young_release.set()
    assert (await young)[0] == 200
    await gateway.settled()
    assert (
        f"ledger id {request_id} (team design): its outcome came after its hold went uncertain: "
        "resolved automatically as captured" in caplog.text
    )
    code, out, _ = await cli(gateway, tmp_path, "ledger", "list", "--json", "--period", "total",
                             "--id", request_id)  # fmt: skip
    (listed,) = json.loads(out)["entries"]
    assert (listed["state"], listed["reason"], listed["resolution"]["actor"]) == (
        "captured", "expired by bob: the upstream never answered", "gateway",
    )  # fmt: skip
    code, _, err = await cli(gateway, tmp_path, "ledger", "resolve", request_id, "--captured",
                             "--reason", "in the usage details", "--actor", "bob")  # fmt: skip
    assert code == 1 and "already resolved" in err, err
    lines = await settle_lines(gateway, 1)  # the resolution is on the request's own line
    assert [(line["ledger_state"], line["cost_cny"], line["actor"]) for line in lines] == [
        ("uncertain", 0.0, "bob"),
    ]
    (own,) = [x for x in await gateway.log_lines() if x["ledger_id"] == request_id
              and x["endpoint"] != "settle"]  # fmt: skip
    assert (own["ledger_state"], own["cost_cny"]) == ("captured", 0.2)
    await books_balance(gateway, upstream)
