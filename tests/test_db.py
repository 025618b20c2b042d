"""The ledger against real SQLite files: atomic reservations, settle-once, append-only, recovery."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.db import Database
from gateway.ledger import BudgetRefused, Hold, Settlement, Usage

BUDGET = 10_000
PERIOD = "monthly:2026-11"


def hold(
    request_id: str, n: int = 1, unit_price: int = 2000, budget: int = BUDGET, team: str = "t"
) -> Hold:
    return Hold(
        request_id, team, PERIOD, 0.0, "generations", "sync", "medium", n, unit_price, budget, "fp"
    )


@pytest.fixture
async def db(tmp_path: Path):
    database = await Database.open(tmp_path / "ledger.db")
    yield database
    await database.close()


async def test_reservation_refused_past_the_budget(db: Database) -> None:
    for index in range(5):
        await db.reserve(hold(f"r{index}"))
    with pytest.raises(BudgetRefused):
        await db.reserve(hold("r5"))
    assert await db.usage("t", PERIOD) == Usage(spent=0, reserved=10_000, uncertain=0)
    rows = await db._rows("SELECT COUNT(*) FROM holds")
    assert rows[0][0] == 5  # the refused hold left no row


async def test_settle_exactly_once(db: Database) -> None:
    await db.reserve(hold("r1", n=2))
    assert await db.settle("r1", Settlement("captured", 4000, images=2), 1.0)
    assert not await db.settle("r1", Settlement("released", 0), 2.0)
    assert not await db.settle("r1", Settlement("uncertain", 4000), 3.0)
    assert await db.usage("t", PERIOD) == Usage(spent=4000, reserved=0, uncertain=0)


async def test_ledger_is_append_only(db: Database) -> None:
    await db.reserve(hold("r1"))
    await db.settle("r1", Settlement("captured", 2000, images=1), 1.0)
    for sql in (
        "UPDATE holds SET amount = 0",
        "DELETE FROM holds",
        "UPDATE settlements SET amount = 0",
        "DELETE FROM settlements",
    ):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            await db._write(sql)


async def test_recovery_marks_in_flight_holds_uncertain_but_not_tasks(db: Database) -> None:
    await db.reserve(hold("sync-in-flight", n=2))
    await db.reserve(hold("settled"))
    await db.settle("settled", Settlement("captured", 2000, images=1), 1.0)
    await db.reserve(hold("async-task"))
    await db.record_task("task-1", "t", "async-task", 0.0, 5.0)
    assert await db.recover_in_flight(10.0) == 1
    assert await db.hold_state("sync-in-flight") == ("uncertain", None)
    assert (await db.hold_state("async-task"))[0] == "held"
    assert await db.usage("t", PERIOD) == Usage(spent=2000, reserved=2000, uncertain=4000)


async def test_teams_and_periods_are_separate(db: Database) -> None:
    await db.reserve(hold("a", n=5))
    await db.reserve(hold("b", n=5, team="other"))
    with pytest.raises(BudgetRefused):
        await db.reserve(hold("c"))
    other_period = Hold(
        "d", "t", "monthly:2026-12", 0.0, "generations", "sync", "medium", 1, 2000, BUDGET, "fp"
    )
    await db.reserve(other_period)


async def test_a_lower_budget_applies_to_the_next_hold(db: Database) -> None:
    await db.reserve(hold("a", n=3))
    with pytest.raises(BudgetRefused):
        await db.reserve(hold("b", budget=7000))
    await db.reserve(hold("c", budget=8000))


# -- property: any interleaving keeps the books straight ----------------------------------------

operation = st.one_of(
    st.tuples(st.just("reserve"), st.integers(1, 4), st.sampled_from([1000, 2000, 4000])),
    st.tuples(st.just("capture"), st.integers(0, 30), st.integers(0, 100)),
    st.tuples(st.just("release"), st.integers(0, 30), st.just(0)),
    st.tuples(st.just("uncertain"), st.integers(0, 30), st.just(0)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(st.lists(operation, min_size=1, max_size=8), min_size=1, max_size=8))
def test_books_balance_for_any_interleaving(batches: list[list[tuple[str, int, int]]]) -> None:
    asyncio.run(_run_batches(batches))


async def _run_batches(batches: list[list[tuple[str, int, int]]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = await Database.open(Path(tmp) / "ledger.db")
        holds: list[Hold] = []
        settled: set[str] = set()
        ids = itertools.count()

        async def apply(op: str, a: int, b: int) -> None:
            if op == "reserve":
                candidate = hold(f"r{next(ids)}", n=a, unit_price=b)
                try:
                    await db.reserve(candidate)
                except BudgetRefused:
                    return
                holds.append(candidate)
                return
            if not holds:
                return
            target = holds[a % len(holds)]
            if op == "capture":
                served = b * target.n // 100
                settlement = Settlement("captured", served * target.unit_price, images=served)
            elif op == "release":
                settlement = Settlement("released", 0)
            else:
                settlement = Settlement("uncertain", target.amount)
            first = await db.settle(target.request_id, settlement, 1.0)
            assert first == (target.request_id not in settled)
            settled.add(target.request_id)

        try:
            for batch in batches:
                await asyncio.gather(*(apply(*op) for op in batch))
                counters = await db.usage("t", PERIOD)
                audit = await db.ledger_totals("t", PERIOD)
                assert counters == audit
                assert min(counters.spent, counters.reserved, counters.uncertain) >= 0
                assert counters.committed <= BUDGET
                open_holds = sum(h.amount for h in holds if h.request_id not in settled)
                assert counters.reserved == open_holds
        finally:
            await db.close()
