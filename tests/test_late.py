"""Outcomes learned after an entry stopped being held (issue 19), on a real gateway and both
engines: an uncertain entry is resolved to what happened, a released or resolved one that
was served after all is corrected, a contradicting outcome is said out loud and refunds
nothing; every correction is counted, logged, listed, exported and verified."""

from __future__ import annotations

import asyncio
import csv
import io
import logging
from typing import Any

import aiohttp
import pytest

from gateway.core.errors import StorageUnavailable
from gateway.core.ledger import Usage
from gateway.core.settlement import recovered
from gateway.http.keys import DB, METRICS, TASKS
from gateway.services.reconcile import entry_json, export_csv
from gateway.store.base import LedgerQuery
from tests.conftest import ADMIN_KEY, Gateway, Upstream, books_balance
from tests.fakes import gate
from tests.test_tasks import poll, submit, usage

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


async def resolve(gateway: Gateway, request_id: str, **body: Any) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{gateway.url}/admin/ledger/{request_id}/resolve", headers=ADMIN, json=body
        ) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()


async def expire(gateway: Gateway, task_id: str) -> str:
    """The task outlives max_pending_age_s: its hold turns uncertain. Its ledger id."""
    gateway.clock.advance(hours=7)
    await gateway.app[TASKS].settle_due()
    entry = await gateway.db.find_entry(task_id)
    assert entry is not None and entry.state == "uncertain"
    return entry.request_id


def corrections(gateway: Gateway) -> float | None:
    return gateway.app[METRICS].registry.get_sample_value(
        "gateway_ledger_corrections_total", {"team": "design"}
    )


async def test_a_task_completing_after_an_admin_released_it_is_corrected(
    gateway: Gateway, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 19, scenario 1: the README's reconciliation step released it ("not in the
    provider's usage details yet"), then the task completed and the client got both images."""
    task_id = (await submit(gateway, quality="high", n=2))["task_id"]
    ledger_id = await expire(gateway, task_id)
    await resolve(gateway, ledger_id, state="released", reason="not in the usage details yet")
    assert await usage(gateway) == Usage()
    upstream.sim.finish_task(task_id)
    gateway.clock.advance(seconds=10)  # past the cached pending answer
    with caplog.at_level(logging.WARNING):
        status, answer = await poll(gateway, task_id)
    assert (status, answer["status"], len(answer["data"])) == (200, "completed", 2)
    assert await usage(gateway) == Usage(spent=8000)  # the 0.80 the provider billed
    entry = await gateway.db.find_entry(ledger_id)
    assert entry is not None and entry.state == "released"  # where the hold went; plus:
    listed = entry_json(entry)
    assert listed["settled_cny"] == 0.8 and listed["images"] == 2
    assert [(c["images"], c["amount_cny"]) for c in listed["corrections"]] == [(2, 0.8)]
    assert "after the entry was resolved released by sha256:" in listed["corrections"][0]["reason"]
    (row,) = csv.DictReader(io.StringIO(export_csv([entry]), newline=""))
    assert (row["amount_cny"], row["corrected_cny"]) == ("0.8", "0.8")
    (warning,) = [r.getMessage() for r in caplog.records if "CORRECTION" in r.getMessage()]
    assert ledger_id in warning and "design" in warning and "0.8000 CNY" in warning
    (line,) = [x for x in await gateway.log_lines() if x["ledger_state"] == "corrected"]
    assert (line["endpoint"], line["cost_cny"], line["images"]) == ("settle", 0.8, 2)
    assert line["ledger_id"] == ledger_id and line["task_id"] is not None
    assert corrections(gateway) == 1
    # The same outcome again (another poll, a retry) adds nothing.
    gateway.clock.advance(seconds=10)
    await poll(gateway, task_id)
    assert await usage(gateway) == Usage(spent=8000)
    await books_balance(gateway, upstream)


async def test_the_settler_finds_a_released_task_that_completed_without_any_poll(
    gateway: Gateway, upstream: Upstream
) -> None:
    """A released task is still polled until it ends: a client that never polls again must
    not keep a billed task out of the ledger."""
    task_id = (await submit(gateway))["task_id"]
    ledger_id = await expire(gateway, task_id)
    await resolve(gateway, ledger_id, state="released", reason="not billed yet")
    upstream.sim.finish_task(task_id)
    gateway.clock.advance(hours=1)
    await gateway.app[TASKS].settle_due()
    assert await usage(gateway) == Usage(spent=2000)
    assert corrections(gateway) == 1
    await books_balance(gateway, upstream)


async def test_a_task_failing_after_an_admin_captured_it_refunds_nothing_loudly(
    gateway: Gateway, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    task_id = (await submit(gateway))["task_id"]
    ledger_id = await expire(gateway, task_id)
    await resolve(gateway, ledger_id, state="captured", reason="billed in usage details")
    upstream.sim.finish_task(task_id, "failed")
    gateway.clock.advance(seconds=10)
    with caplog.at_level(logging.WARNING):
        status, answer = await poll(gateway, task_id)
    assert (status, answer["status"]) == (200, "failed")
    assert await usage(gateway) == Usage(spent=2000)  # never refunded on the upstream's word
    assert any(
        ledger_id in r.getMessage() and "nothing refunded" in r.getMessage() for r in caplog.records
    )
    assert corrections(gateway) is None
    await books_balance(gateway)  # the simulator served nothing: the admin's call stands


async def closed_under_it(
    gateway: Gateway, upstream: Upstream, *, then_released: bool, **body: Any
) -> tuple[asyncio.Task[tuple[int, dict[str, Any]]], str, asyncio.Event]:
    """A sync request the upstream is still answering when its hold is made uncertain, as a
    reaper does to an instance it took for dead (and, optionally, an admin then releases it)."""
    release, arrived = asyncio.Event(), asyncio.Event()
    upstream.faults.add(gate(release, arrived))

    async def call() -> tuple[int, dict[str, Any]]:
        async with aiohttp.ClientSession() as http:
            async with http.post(
                gateway.url + "/v1/images/generations",
                headers=gateway.headers(),
                json={"prompt": "late", **body},
            ) as resp:
                return resp.status, await resp.json()

    request = asyncio.create_task(call())
    await arrived.wait()
    (entry,) = await gateway.app[DB].entries(LedgerQuery(state="held"))
    assert await gateway.app[DB].settle(
        entry.request_id, recovered(entry.held), gateway.clock().timestamp()
    )
    if then_released:
        await resolve(gateway, entry.request_id, state="released", reason="not billed yet")
    return request, entry.request_id, release


async def test_a_sync_answer_after_its_hold_went_uncertain_resolves_it(
    gateway: Gateway, upstream: Upstream
) -> None:
    """Issue 19, scenarios 3 and 4: the settlement that did not land was dropped without a
    word; the image was served, the entry stayed uncertain, nothing named it."""
    request, ledger_id, release = await closed_under_it(gateway, upstream, then_released=False)
    release.set()
    status, body = await request
    assert status == 200 and len(body["data"]) == 1
    entry = await gateway.db.find_entry(ledger_id)
    assert entry is not None and entry.state == "captured"
    assert entry.resolution is not None and entry.resolution.actor == "gateway"
    assert entry.upstream_id == body["id"]  # reconcilable: the upstream id is kept
    assert await usage(gateway) == Usage(spent=2000)
    line = next(x for x in await gateway.log_lines() if x["ledger_id"] == ledger_id
                and x["endpoint"] == "generations")  # fmt: skip
    assert (line["cost_cny"], line["ledger_state"]) == (0.2, "captured")  # on its own line
    await books_balance(gateway, upstream)


async def test_a_sync_answer_after_an_admin_released_its_entry_is_corrected(
    gateway: Gateway, upstream: Upstream
) -> None:
    request, ledger_id, release = await closed_under_it(
        gateway, upstream, then_released=True, quality="high", n=2
    )
    release.set()
    assert (await request)[0] == 200
    entry = await gateway.db.find_entry(ledger_id)
    assert entry is not None and entry.state == "released" and entry.corrected == 8000
    assert [(c.images, c.amount) for c in entry.corrections] == [(2, 8000)]
    assert await usage(gateway) == Usage(spent=8000)
    assert corrections(gateway) == 1
    await books_balance(gateway, upstream)


async def test_a_correction_whose_acknowledgement_was_lost_is_reported_once(
    gateway: Gateway, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write committed, its answer did not arrive: the retry finds its own correction by
    its time and reports it, once (never a second correction, never a missing log line)."""
    store = gateway.app[DB]
    settle_late = store.settle_late
    lost = []

    async def commit_then_lose(*args: Any, **kwargs: Any) -> Any:
        closed = await settle_late(*args, **kwargs)
        if not lost:
            lost.append(closed)
            raise StorageUnavailable("the acknowledgement was lost")
        return closed

    monkeypatch.setattr(store, "settle_late", commit_then_lose)
    request, ledger_id, release = await closed_under_it(gateway, upstream, then_released=True)
    release.set()
    assert (await request)[0] == 200
    entry = await gateway.db.find_entry(ledger_id)
    assert lost and entry is not None and len(entry.corrections) == 1
    assert [x["ledger_state"] for x in await gateway.log_lines()].count("corrected") == 1
    assert corrections(gateway) == 1
    await books_balance(gateway, upstream)
