"""The opt-in cache at shutdown: identical ``reuse`` requests waiting on a first one that a
shutdown cancels never start a generation of their own (a review's findings; each failed before)."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.http.keys import GENERATIONS, REUSE
from gateway.services.outcomes import Answer, Outcome, Trace
from tests.client import post
from tests.conftest import Gateway, Upstream, books_balance
from tests.fakes import gate


async def _waiting_on(gateway: Gateway, count: int) -> None:
    """Until ``count`` requests wait on an identical one in flight (polled, with a deadline)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    reuse = gateway.app[REUSE]
    while sum(len(f._callbacks or ()) for f in reuse._in_flight.values()) < count:
        assert loop.time() < deadline, "the identical request never waited"
        await asyncio.sleep(0.005)


async def test_a_reuse_waiter_cancelled_with_its_first_request_stays_cancelled(
    start_gateway: Any,
) -> None:
    """A shutdown cancels every handler: the first of two identical ``reuse`` requests, then
    the one waiting on it (by the time it runs, ``waiting.cancelled()`` is true as well). The
    waiter ends cancelled, and never starts a generation of its own."""
    gateway = await start_gateway()
    reuse = gateway.app[REUSE]
    at_upstream, never = asyncio.Event(), asyncio.Event()
    generated: list[str] = []

    async def first_generates() -> Outcome:
        generated.append("first")
        at_upstream.set()
        await never.wait()
        raise AssertionError("unreachable")

    async def second_generates() -> Outcome:
        generated.append("second")  # a second paid generation
        return Answer(Trace("req_second"), {"data": []})

    async def nothing(_: Outcome) -> None:
        return None

    def run(request_id: str, generate: Any) -> asyncio.Task[Any]:
        return asyncio.create_task(
            reuse.run(request_id, "design", "same-request", 0.0, generate=generate,
                      settled=nothing, kept=nothing)
        )  # fmt: skip

    first = run("req_first", first_generates)
    await at_upstream.wait()
    second = run("req_second", second_generates)
    await _waiting_on(gateway, 1)
    first.cancel()  # in the order aiohttp's shutdown reaches their connections
    second.cancel()
    outcomes = await asyncio.gather(first, second, return_exceptions=True)
    assert generated == ["first"]
    assert isinstance(outcomes[1], asyncio.CancelledError), outcomes[1]


async def test_identical_reuse_requests_send_nothing_more_once_the_drain_cancels_the_first(
    start_gateway: Any, upstream: Upstream
) -> None:
    """Shutdown: the drain time is over and the first of two identical ``reuse`` requests is
    cancelled while at the upstream (its hold goes uncertain). The one waiting on it, not
    cancelled itself, gets a 503 ``shutting_down`` and sends nothing (the first may have been
    generated: a second send would be a second, possibly billed one that nothing drains)."""
    gateway = await start_gateway()
    release, arrived = asyncio.Event(), asyncio.Event()
    upstream.faults.add(gate(release, arrived))
    reuse = {"X-Gateway-Cache": "reuse"}
    first = asyncio.ensure_future(post(gateway, headers=reuse))
    await arrived.wait()
    second = asyncio.ensure_future(post(gateway, headers=reuse))
    await _waiting_on(gateway, 1)
    generations = gateway.app[GENERATIONS]
    generations.begin_drain()
    assert await generations.drain(0.0) == 1  # the first, cancelled past the drain time
    answers = await asyncio.gather(first, second, return_exceptions=True)
    release.set()
    assert upstream.faults.seen == 1, answers  # nothing sent after the drain
    status, body, headers = answers[1]
    assert (status, body["error"]["code"]) == (503, "shutting_down")
    assert headers["x-should-retry"] == "true"
    await books_balance(gateway, upstream)
