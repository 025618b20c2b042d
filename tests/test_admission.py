"""The byte budget for large bodies: first come first served, never more than its capacity."""

from __future__ import annotations

import asyncio

from gateway.http.admission import LARGE_BODY, ByteBudget, body_cost


def test_small_bodies_cost_nothing_and_unknown_lengths_the_limit() -> None:
    assert body_cost(1000, 10 * LARGE_BODY) == 0
    assert body_cost(2 * LARGE_BODY, 10 * LARGE_BODY) == 2 * LARGE_BODY
    assert body_cost(None, 10 * LARGE_BODY) == 10 * LARGE_BODY


async def test_waiters_are_admitted_in_order_within_capacity() -> None:
    budget = ByteBudget(100)
    order: list[str] = []
    first_in = asyncio.Event()
    release_first = asyncio.Event()

    async def body(name: str, size: int, until: asyncio.Event | None = None) -> None:
        async with budget.hold(size):
            order.append(name)
            assert budget.in_use <= budget.capacity
            if until is not None:
                first_in.set()
                await until.wait()

    first = asyncio.create_task(body("first", 80, release_first))
    await first_in.wait()
    second = asyncio.create_task(body("second", 50))
    third = asyncio.create_task(body("third", 10))  # would fit, but waits its turn
    small = asyncio.create_task(body("small", 0))
    await small
    assert order == ["first", "small"]
    release_first.set()
    await asyncio.gather(first, second, third)
    assert order == ["first", "small", "second", "third"] and budget.in_use == 0


async def test_a_cancelled_waiter_gives_its_turn_away() -> None:
    budget = ByteBudget(10)
    async with budget.hold(10):
        waiter = asyncio.create_task(budget.hold(10).__aenter__())
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
    async with budget.hold(20):  # more than the capacity takes all of it
        assert budget.in_use == 10
    assert budget.in_use == 0
