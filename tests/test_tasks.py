"""Async tasks: ownership, SQLite result cache, coalesced polling, settlement without polling."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import httpx2
import openai
import pytest

from gateway.core.ledger import Usage
from gateway.core.periods import utc_now
from gateway.http.keys import DB, TASKS
from tests.client import usage
from tests.conftest import Gateway, Upstream
from tests.fakes import json_error

pytestmark = pytest.mark.engines("memory")  # services above the store; engines: test_store.py


async def submit(gateway: Gateway, team: str = "design", **payload: Any) -> dict[str, Any]:
    """Submit with the real SDK: ``images.generate`` plus ``?async=1``, read raw (a 202 task)."""
    client = gateway.async_openai(team)
    raw = await client.images.with_raw_response.generate(
        prompt=payload.pop("prompt", "a lighthouse"), extra_query={"async": "1"}, **payload
    )
    assert raw.status_code == 202
    return json.loads(raw.content)


async def poll(gateway: Gateway, task_id: str, team: str = "design") -> tuple[int, dict[str, Any]]:
    client = gateway.async_openai(team)
    try:
        response = await client.get(f"/images/tasks/{task_id}", cast_to=httpx2.Response)
    except openai.APIStatusError as exc:
        response = exc.response
    return response.status_code, response.json()


async def test_submit_records_the_task_and_reserves(gateway: Gateway, upstream: Upstream) -> None:
    task = await submit(gateway, quality="high", n=2)
    assert task["status"] == "pending"
    (received,) = upstream.sim.generation_requests()
    assert received.query == {"async": "1"}
    row = await gateway.db.task(task["task_id"])
    assert (row.team, row.status, row.hold_amount) == ("design", "pending", 8000)
    assert (await usage(gateway)).reserved == 8000


async def test_async_spellings_are_forwarded_as_the_upstreams_own(
    gateway: Gateway, upstream: Upstream
) -> None:
    async with aiohttp.ClientSession() as http:
        for value in ("true", "YES", "True"):
            async with http.post(
                gateway.url + f"/images/edits?async={value}",
                headers=gateway.headers(),
                json={"prompt": "x"},
            ) as resp:
                assert resp.status == 202
    assert [r.query for r in upstream.sim.generation_requests()] == [{"async": "1"}] * 3


async def test_completed_task_is_served_from_sqlite_and_settled_once(
    gateway: Gateway, upstream: Upstream
) -> None:
    task = await submit(gateway)
    task_id = task["task_id"]
    upstream.sim.finish_task(task_id)
    status, answer = await poll(gateway, task_id)
    assert status == 200
    assert answer["status"] == "completed"
    assert answer["data"] == [{"url": answer["result_url"]}]
    assert set(answer) >= {"task_id", "status", "model", "cost", "result_url", "data"}
    polls = len(upstream.sim.task_polls(task_id))
    for _ in range(5):
        assert (await poll(gateway, task_id))[1] == answer
    await gateway.app[TASKS].settle_due()
    assert len(upstream.sim.task_polls(task_id)) == polls == 1
    final = await usage(gateway)
    assert (final.spent, final.reserved) == (2000, 0)


async def test_completed_task_survives_a_restart(start_gateway, upstream: Upstream) -> None:
    first = await start_gateway()
    task_id = (await submit(first))["task_id"]
    upstream.sim.finish_task(task_id)
    _, answer = await poll(first, task_id)
    await first.server.close()
    second = await start_gateway()
    assert await poll(second, task_id) == (200, answer)
    assert len(upstream.sim.task_polls(task_id)) == 1


async def test_other_teams_and_unknown_tasks_get_the_same_404(
    gateway: Gateway, upstream: Upstream
) -> None:
    task_id = (await submit(gateway))["task_id"]
    other = await poll(gateway, task_id, team="ops")
    unknown = await poll(gateway, "0000-not-a-task")
    assert other[0] == unknown[0] == 404
    assert other[1]["error"]["message"].replace(task_id, "ID") == unknown[1]["error"][
        "message"
    ].replace("0000-not-a-task", "ID")
    assert upstream.sim.task_polls() == []


async def test_concurrent_polls_share_one_upstream_request(
    gateway: Gateway, upstream: Upstream
) -> None:
    task_id = (await submit(gateway))["task_id"]
    results = await asyncio.gather(*(poll(gateway, task_id) for _ in range(50)))
    assert {status for status, _ in results} == {200}
    assert {answer["status"] for _, answer in results} == {"pending"}
    assert len(upstream.sim.task_polls(task_id)) == 1
    gateway.clock.advance(seconds=2.5)  # past the 2 s cache TTL: one more upstream request
    await asyncio.gather(*(poll(gateway, task_id) for _ in range(50)))
    assert len(upstream.sim.task_polls(task_id)) == 2


async def test_concurrent_polls_and_the_settler_settle_once(
    gateway: Gateway, upstream: Upstream
) -> None:
    task_id = (await submit(gateway, quality="low", n=3))["task_id"]
    upstream.sim.finish_task(task_id)
    gateway.clock.advance(minutes=1)
    tracker = gateway.app[TASKS]
    results = await asyncio.gather(
        tracker.settle_due(), *(poll(gateway, task_id) for _ in range(20))
    )
    assert {answer["status"] for _, answer in results[1:]} == {"completed"}
    entries = await gateway.ledger()
    assert [(e.state, e.settled_amount) for e in entries] == [("captured", 3000)]
    assert (await usage(gateway)).spent == 3000


async def test_settles_with_no_client_polling(gateway: Gateway, upstream: Upstream) -> None:
    # The background settler may run any of these passes itself (it wakes on the submit and
    # reads the same clock): settle_due() waits for it, so the state is asserted, not which
    # pass did the work.
    task_id = (await submit(gateway, quality="high"))["task_id"]
    tracker = gateway.app[TASKS]

    async def state() -> tuple[str, int]:
        await tracker.settle_due()
        row = await gateway.db.task(task_id)
        return row.status, row.polls

    assert await state() == ("pending", 0)  # not due yet: the first poll waits settle_interval_s
    gateway.clock.advance(seconds=6)
    assert await state() == ("pending", 1)  # due, still pending upstream: rescheduled
    upstream.sim.finish_task(task_id)
    gateway.clock.advance(seconds=4)
    assert await state() == ("pending", 1)  # backoff: next poll after 10 s, not 5
    gateway.clock.advance(seconds=7)
    assert await state() == ("completed", 2)
    final = await usage(gateway)
    assert (final.spent, final.reserved) == (4000, 0)


async def test_background_settler_runs_by_itself(start_gateway, upstream: Upstream) -> None:
    gateway = await start_gateway(with_clock=utc_now, tasks={"settle_interval_s": 0.05})
    settled = asyncio.Event()
    database = gateway.app[DB]
    finish = database.finish_task

    async def spy(*args: Any, **kwargs: Any) -> Any:
        done = await finish(*args, **kwargs)
        settled.set()
        return done

    database.finish_task = spy  # type: ignore[method-assign]
    task_id = (await submit(gateway))["task_id"]
    upstream.sim.finish_task(task_id)
    await asyncio.wait_for(settled.wait(), timeout=10)
    assert (await gateway.db.task(task_id)).status == "completed"
    assert upstream.sim.task_polls(task_id)[0].headers["Authorization"].startswith("Bearer sk_")


async def test_failed_task_is_released(gateway: Gateway, upstream: Upstream) -> None:
    task_id = (await submit(gateway))["task_id"]
    upstream.sim.finish_task(task_id, "failed")
    status, answer = await poll(gateway, task_id)
    assert (status, answer["status"]) == (200, "failed")
    assert "data" not in answer
    final = await usage(gateway)
    assert final.committed == 0
    assert (await gateway.db.hold_state((await gateway.db.task(task_id)).request_id))[
        0
    ] == "released"


async def test_over_age_task_becomes_uncertain_then_resolves_to_its_true_outcome(
    gateway: Gateway, upstream: Upstream
) -> None:
    task_id = (await submit(gateway))["task_id"]
    gateway.clock.advance(hours=7)
    await gateway.app[TASKS].settle_due()
    final = await usage(gateway)
    assert (final.reserved, final.uncertain, final.spent) == (0, 2000, 0)
    upstream.sim.finish_task(task_id)  # completes late: resolved to what really happened
    gateway.clock.advance(seconds=3)  # past the cached pending answer
    _, answer = await poll(gateway, task_id)
    assert answer["status"] == "completed"
    assert await usage(gateway) == Usage(spent=2000, reserved=0, uncertain=0)
    assert (await gateway.db.task(task_id)).status == "completed"
    entry = await gateway.db.find_entry(task_id)
    assert entry.state == "captured" and entry.resolution.actor == "gateway"
    assert "resolved automatically" in entry.resolution.reason


async def test_async_submit_over_budget_and_upstream_refusal(
    start_gateway, upstream: Upstream
) -> None:
    gateway = await start_gateway(teams={"design": {"budget_cny": 0.2}})
    await submit(gateway)
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway.url + "/v1/images/generations?async=1",
            headers=gateway.headers(),
            json={"prompt": "x"},
        ) as resp:
            assert resp.status == 402
        upstream.faults.add(json_error(400, "invalid_request_error", "rejected"))
        async with http.post(
            gateway.url + "/v1/images/generations?async=1",
            headers=gateway.headers("ops"),
            json={"prompt": "x"},
        ) as resp:
            assert resp.status == 400
    assert (await usage(gateway, "ops")).committed == 0


async def test_sync_results_are_recorded_for_admins(gateway: Gateway) -> None:
    result = await gateway.async_openai().images.generate(prompt="x", n=2)
    await gateway.settled()
    (entry,), (result_text,) = await gateway.ledger(), await gateway.stored_results()
    stored = json.loads(result_text)
    assert [item["url"] for item in stored["data"]] == [item.url for item in result.data]
    assert entry.images == 2 and entry.upstream_id == stored["id"]


@pytest.mark.parametrize("path", ["/v1/images/tasks/{id}", "/images/tasks/{id}"])
async def test_poll_routes_need_team_auth(gateway: Gateway, path: str) -> None:
    task_id = (await submit(gateway))["task_id"]
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.url + path.format(id=task_id)) as resp:
            assert resp.status == 401
        async with http.get(
            gateway.url + path.format(id=task_id), headers=gateway.headers()
        ) as resp:
            assert resp.status == 200


async def test_a_task_submitted_during_a_settler_pass_is_not_missed(
    start_gateway, upstream: Upstream
) -> None:
    gateway = await start_gateway(
        with_clock=utc_now, tasks={"settle_interval_s": 0.05, "settle_max_interval_s": 600}
    )
    database = gateway.app[DB]
    entered, resume, settled = asyncio.Event(), asyncio.Event(), asyncio.Event()
    next_due, finish = database.next_task_due, database.finish_task
    calls = 0

    async def stale_next_due() -> float | None:
        nonlocal calls
        calls += 1
        due = await next_due()
        if calls == 1:  # the pass that started before the task existed
            entered.set()
            await resume.wait()
        return due

    async def spy_finish(*args: Any, **kwargs: Any) -> Any:
        done = await finish(*args, **kwargs)
        settled.set()
        return done

    database.next_task_due = stale_next_due  # type: ignore[method-assign]
    database.finish_task = spy_finish  # type: ignore[method-assign]
    await entered.wait()
    task_id = (await submit(gateway))["task_id"]  # wakes the settler mid-pass
    upstream.sim.finish_task(task_id)
    resume.set()
    await asyncio.wait_for(settled.wait(), timeout=10)  # not after settle_max_interval_s (600 s)
    assert (await gateway.db.task(task_id)).status == "completed"
