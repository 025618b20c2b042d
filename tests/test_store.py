"""The storage contract on every engine (in memory, SQLite, PostgreSQL): atomic reservations,
settle-once, the schema's caps, resolutions, recovery, verification; and against real database
files: the schema's own refusals, migrations and the one-process lock."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.core.ledger import (
    BudgetRefused,
    Capture,
    Correction,
    Hold,
    LedgerEntry,
    Release,
    Resolution,
    Uncertain,
    Usage,
)
from gateway.core.settlement import (
    Correct,
    Ignore,
    NotResolvable,
    Resolve,
    admin_resolution,
    late_outcome,
)
from gateway.store import migrations, queries
from gateway.store.base import DuplicateTask, LedgerQuery, Refused, UnknownEntry
from gateway.store.errors import StoreLocked, StoreOpenError
from gateway.store.manager import Store
from gateway.store.memory import MemoryDatabase
from gateway.store.migrations import SchemaTooNew, SchemaTooOld
from gateway.store.postgres import PostgresEngine
from gateway.store.sqlite import SQLiteEngine
from tests.ledgers import migrated_sqlite, migrated_store

BUDGET = 10_000
PERIOD = "monthly:2026-11"
FIXTURE_01 = Path(__file__).parent / "fixtures" / "ledger" / "gateway-0.1.0.db"
TAMPERING_REFUSED = (sqlite3.IntegrityError, asyncpg.IntegrityConstraintViolationError)


def hold(
    request_id: str,
    n: int = 1,
    unit_price: int = 2000,
    budget: int = BUDGET,
    team: str = "t",
    mode: str = "sync",
) -> Hold:
    return Hold(
        request_id, team, PERIOD, 0.0, "generations", mode, "medium", n, unit_price, budget, "fp"
    )  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def opened(engine: str, request: pytest.FixtureRequest, tmp_path: Path):
    """A store on ``engine`` (its ledger a copy of the session's migrated one: see
    tests/ledgers.py), its books checked when the test is done."""
    async with migrated_store(engine, request, tmp_path / "ledger.db") as store:
        yield store
        assert (await store.verify()).mismatches == ()


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def db(request: pytest.FixtureRequest, tmp_path: Path):
    """The same contract on every engine."""
    async with opened(request.param, request, tmp_path) as store:
        yield store


@pytest.fixture(params=["memory", "sqlite"])
async def local_db(request: pytest.FixtureRequest, tmp_path: Path):
    """An engine one process owns (no fleet: recovery at start, limits in the process)."""
    async with opened(request.param, request, tmp_path) as store:
        yield store


@pytest.fixture(params=["sqlite", "postgres"])
async def real_db(request: pytest.FixtureRequest, tmp_path: Path):
    """A database, for what its schema itself must refuse."""
    async with opened(request.param, request, tmp_path) as store:
        yield store


async def raw(db: Store, sql: str) -> None:
    """A statement the gateway itself never runs (tampering, to see the schema refuse it)."""
    if isinstance(db.engine, SQLiteEngine):
        await db.engine._write(sql)
    else:
        assert isinstance(db.engine, PostgresEngine)
        await db.engine._execute(sql)


def admin(state: str, images: int | None = None, reason: str = "checked with the provider"):
    return lambda entry: admin_resolution(  # type: ignore[arg-type]
        entry, state, images, reason, actor="alice"
    )


async def test_reservation_refused_past_the_budget(db: Store) -> None:
    for index in range(5):
        await db.reserve(hold(f"r{index}"))
    with pytest.raises(BudgetRefused):
        await db.reserve(hold("r5"))
    assert await db.usage("t", PERIOD) == Usage(spent=0, reserved=10_000, uncertain=0)
    assert len(await db.entries(LedgerQuery())) == 5  # the refused hold left no row


async def test_settle_exactly_once(db: Store) -> None:
    await db.reserve(hold("r1", n=2))
    assert await db.settle("r1", Capture(images=2, amount=4000), 1.0)
    assert not await db.settle("r1", Release("late"), 2.0)
    assert not await db.settle("r1", Uncertain(4000, "late"), 3.0)
    assert await db.usage("t", PERIOD) == Usage(spent=4000, reserved=0, uncertain=0)


async def test_ledger_is_append_only(real_db: Store) -> None:
    db = real_db
    await db.reserve(hold("r1"))
    await db.settle("r1", Uncertain(2000, "timeout"), 1.0)
    await db.resolve("r1", admin("released"), 2.0, logged=True)
    for sql in (
        "UPDATE holds SET amount = 0",
        "DELETE FROM holds",
        "UPDATE settlements SET amount = 0",
        "DELETE FROM settlements",
        "UPDATE resolutions SET amount = 1",
        "DELETE FROM resolutions",
    ):
        with pytest.raises(TAMPERING_REFUSED, match="append-only"):
            await raw(db, sql)


@pytest.mark.parametrize(
    "settlement",
    [
        Capture(images=1, amount=2001),  # above the hold
        Capture(images=2, amount=2000),  # more images than held
        Capture(images=1, amount=2000, overrun=1),  # an overrun without a task
        Uncertain(1999, "less than the hold"),
    ],
)
async def test_the_schema_refuses_a_settlement_above_its_hold(db: Store, settlement) -> None:
    await db.reserve(hold("r1"))
    with pytest.raises(Refused, match="settlement_above_hold"):
        await db.settle("r1", settlement, 1.0)
    assert await db.usage("t", PERIOD) == Usage(reserved=2000)


async def test_only_a_task_may_overrun_its_hold_and_the_overrun_is_counted(
    db: Store,
) -> None:
    await db.reserve(hold("r1", mode="async"))
    await db.record_task("task-1", "t", "r1", 0.0, 5.0)
    assert await db.settle("r1", Capture(images=1, amount=2000, overrun=48_000), 1.0)
    assert await db.usage("t", PERIOD) == Usage(spent=50_000, overrun=48_000)
    entry = await db.find_entry("task-1")
    assert (entry.charged, entry.overrun_total) == (50_000, 48_000)


async def test_resolutions_close_uncertain_money_once(db: Store) -> None:
    await db.reserve(hold("lost", n=2))
    await db.reserve(hold("kept", n=2))
    await db.settle("lost", Uncertain(4000, "timeout"), 1.0)
    await db.settle("kept", Capture(images=2, amount=4000), 1.0)
    assert await db.usage("t", PERIOD) == Usage(spent=4000, uncertain=4000)
    entry = await db.resolve("lost", admin("captured", images=1), 2.0, logged=False)
    assert (entry.state, entry.charged, entry.charged_images) == ("captured", 2000, 1)
    assert await db.usage("t", PERIOD) == Usage(spent=6000)  # 2000 captured, 2000 freed
    with pytest.raises(NotResolvable, match="already resolved"):
        await db.resolve("lost", admin("released"), 3.0, logged=False)
    with pytest.raises(NotResolvable, match="not uncertain"):
        await db.resolve("kept", admin("released"), 3.0, logged=False)
    with pytest.raises(UnknownEntry):
        await db.resolve("nobody", admin("released"), 3.0, logged=False)
    assert [e.request_id for e in await db.unlogged_resolutions()] == ["lost"]
    assert await db.claim_resolution_log("lost", 4.0)
    assert not await db.claim_resolution_log("lost", 5.0)
    assert await db.unlogged_resolutions() == []


async def test_the_schema_refuses_a_resolution_the_rules_would_never_make(
    db: Store,
) -> None:
    await db.reserve(hold("r1"))
    await db.settle("r1", Uncertain(2000, "timeout"), 1.0)

    def too_much(entry: LedgerEntry) -> Resolution:
        return Resolution("captured", 1, 2001, "wrong", "admin")

    with pytest.raises(Refused, match="resolution_above_hold"):
        await db.resolve("r1", too_much, 2.0, logged=False)
    assert await db.usage("t", PERIOD) == Usage(uncertain=2000)


async def test_recovery_marks_in_flight_holds_uncertain_but_not_tasks(local_db: Store) -> None:
    db = local_db  # one process: everything held at start was left by a stopped one
    await db.reserve(hold("sync-in-flight", n=2))
    await db.reserve(hold("settled"))
    await db.settle("settled", Capture(images=1, amount=2000), 1.0)
    await db.reserve(hold("async-task"))
    await db.record_task("task-1", "t", "async-task", 0.0, 5.0)
    recovered = await db.recover_in_flight(10.0)
    assert [(e.request_id, e.state, e.settled_amount) for e in recovered] == [
        ("sync-in-flight", "uncertain", 4000)
    ]
    assert (await db.hold_state("async-task"))[0] == "held"
    assert await db.usage("t", PERIOD) == Usage(spent=2000, reserved=2000, uncertain=4000)


async def test_a_silent_instances_holds_turn_uncertain_after_its_lease_and_not_before(
    postgres_dsn: str,
) -> None:
    lease = 2.0
    alive = Store(await PostgresEngine.open(postgres_dsn, lease_s=lease))
    other = Store(await PostgresEngine.open(postgres_dsn, lease_s=lease))
    await other.reserve(hold("in-flight-elsewhere", n=2))
    await other.reserve(hold("its-task"))
    await other.record_task("task-1", "t", "its-task", 0.0, 5.0)
    await alive.reserve(hold("mine"))
    await _watching_for(alive, lease)
    assert await alive.recover_in_flight(10.0) == []  # a start touches nobody's holds
    await other.heartbeat()
    assert await alive.reap_silent_instances(10.0, lease) == []  # the other is alive
    await _silent_for(alive, other, lease)  # ... until it has been silent for its lease
    reaped = await alive.reap_silent_instances(10.0, lease)
    assert [(e.request_id, e.state) for e in reaped] == [("in-flight-elsewhere", "uncertain")]
    assert (await alive.hold_state("mine"))[0] == "held"
    assert (await alive.hold_state("its-task"))[0] == "held"  # a task is the settler's
    assert await alive.reap_silent_instances(11.0, lease) == []  # once only
    assert (await alive.verify()).mismatches == ()
    await other.close()
    await alive.close()


async def _watching_for(store: Store, seconds: float) -> None:
    """As if ``store`` had reached the database without a break for ``seconds`` (it just
    started), on a server up that long (the suite's may have just started: waited for, with a
    deadline)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds + 10
    while (await store.engine._fetch(  # type: ignore[attr-defined]

        "SELECT pg_postmaster_start_time() < now() - make_interval(secs => $1)", seconds
    ))[0][0] is not True:  # fmt: skip
        assert loop.time() < deadline
        await asyncio.sleep(0.1)
    await store.engine._execute(  # type: ignore[attr-defined]
        "UPDATE instances SET heartbeat_at = now(),"
        " reachable_since = now() - make_interval(secs => $2) WHERE instance_id = $1",
        store.instance_id,
        seconds + 1,
    )


async def _silent_for(store: Store, other: Store, seconds: float) -> None:
    await store.engine._execute(  # type: ignore[attr-defined]
        "UPDATE instances SET heartbeat_at = now() - make_interval(secs => $2)"
        " WHERE instance_id = $1",
        other.instance_id,
        seconds + 1,
    )


async def test_an_instance_cut_off_from_the_database_reaps_nobody_for_a_lease(
    postgres_dsn: str,
) -> None:
    """A database outage stops every heartbeat: silence counts only from when the reaper
    itself could reach the database again (issue 19)."""
    lease = 2.0
    alive = Store(await PostgresEngine.open(postgres_dsn, lease_s=lease))
    other = Store(await PostgresEngine.open(postgres_dsn, lease_s=lease))
    await other.reserve(hold("in-flight-elsewhere"))
    await _watching_for(alive, lease)
    await _silent_for(alive, other, lease)
    alive.engine.failures += 1  # what a statement failing for want of the database records
    assert await alive.reap_silent_instances(10.0, lease) == []
    assert (await alive.hold_state("in-flight-elsewhere"))[0] == "held"
    # A heartbeat gap of half a lease (paused, or hung on a dead server) counts the same.
    await _watching_for(alive, lease)
    await alive.engine._execute(  # type: ignore[attr-defined]
        "UPDATE instances SET heartbeat_at = now() - make_interval(secs => $2)"
        " WHERE instance_id = $1",
        alive.instance_id,
        lease,
    )
    assert await alive.reap_silent_instances(10.0, lease) == []
    # Watching for a whole lease again, it reaps.
    await _watching_for(alive, lease)
    assert [e.request_id for e in await alive.reap_silent_instances(10.0, lease)] == [
        "in-flight-elsewhere"
    ]
    await other.close()
    await alive.close()


async def test_an_instance_taken_for_dead_registers_again_when_it_reserves(
    postgres_dsn: str,
) -> None:
    """Paused past its lease and reaped, an instance's next reservation registers it again in
    the same transaction: its new holds are never orphans, and it never reaps itself."""
    lease = 2.0
    reaper = Store(await PostgresEngine.open(postgres_dsn, lease_s=lease))
    paused = Store(await PostgresEngine.open(postgres_dsn, lease_s=lease))
    await paused.reserve(hold("before-the-pause"))
    await _watching_for(reaper, lease)
    await _silent_for(reaper, paused, lease)
    assert [e.request_id for e in await reaper.reap_silent_instances(10.0, lease)] == [
        "before-the-pause"
    ]
    await paused.reserve(hold("after-the-pause"))  # before its own heartbeat runs
    await _watching_for(paused, lease)
    assert await paused.reap_silent_instances(11.0, lease) == []  # never itself
    assert await reaper.reap_silent_instances(11.0, lease) == []  # registered: alive
    assert (await reaper.hold_state("after-the-pause"))[0] == "held"
    # A stale heartbeat is refreshed by a reservation, so a reaper waiting on it finds it alive.
    await _silent_for(reaper, paused, lease)
    await paused.reserve(hold("stale-heartbeat"))
    assert await reaper.reap_silent_instances(12.0, lease) == []
    await paused.close()
    await reaper.close()


async def test_verify_finds_a_hand_corrupted_counter(tmp_path: Path) -> None:
    store = Store(await SQLiteEngine.open(tmp_path / "ledger.db"))
    await store.reserve(hold("r1"))
    await store.settle("r1", Capture(images=1, amount=2000), 1.0)
    assert (await store.verify()).mismatches == ()
    await store.engine._write("UPDATE usage SET spent = spent - 1")
    result = await store.verify()
    assert [(m.counter, m.stored, m.entries) for m in result.mismatches] == [("spent", 1999, 2000)]
    await store.close()


async def test_teams_and_periods_are_separate(db: Store) -> None:
    await db.reserve(hold("a", n=5))
    await db.reserve(hold("b", n=5, team="other"))
    with pytest.raises(BudgetRefused):
        await db.reserve(hold("c"))
    other_period = Hold(
        "d", "t", "monthly:2026-12", 0.0, "generations", "sync", "medium", 1, 2000, BUDGET, "fp"
    )
    await db.reserve(other_period)


async def test_a_lower_budget_applies_to_the_next_hold(db: Store) -> None:
    await db.reserve(hold("a", n=3))
    with pytest.raises(BudgetRefused):
        await db.reserve(hold("b", budget=7000))
    await db.reserve(hold("c", budget=8000))


async def test_a_capped_key_is_refused_on_its_own_budget_and_counted_apart(db: Store) -> None:
    def keyed(request_id: str, key_budget: int | None) -> Hold:
        return Hold(request_id, "t", PERIOD, 1.0, "generations", "sync", "medium", 1, 2000,
                    BUDGET, "fp", key_id="web", key_fp="kfp", key_budget=key_budget)  # fmt: skip

    await db.reserve(keyed("k1", 4000))
    await db.reserve(keyed("k2", 4000))
    with pytest.raises(BudgetRefused) as refused:
        await db.reserve(keyed("k3", 4000))
    assert refused.value.scope == "key" and refused.value.usage == Usage(reserved=4000)
    await db.reserve(keyed("k3", None))  # no cap of its own: counted, never refused
    await db.settle("k1", Capture(images=1, amount=2000), 2.0)
    assert await db.key_usage("t", "kfp", PERIOD) == Usage(spent=2000, reserved=4000)
    assert await db.usage("t", PERIOD) == Usage(spent=2000, reserved=4000)
    assert await db.key_last_used() == {"kfp": 1.0}


async def test_entries_filter_and_reports_group_the_ledger(db: Store) -> None:
    for index, (quality, user, created) in enumerate(
        [("low", "ann", 10.0), ("high", "bob", 20.0), ("low", None, 90_000.0)]
    ):
        request = Hold(f"r{index}", "t", PERIOD, created, "generations", "sync", quality, 1,
                       1000, BUDGET, "fp", key_id="web", key_fp="kfp", end_user=user)  # fmt: skip
        await db.reserve(request)
    await db.reserve(hold("other-team", team="u"))
    await db.settle("r0", Capture(images=1, amount=1000), 1.0)
    await db.settle("r1", Uncertain(1000, "timeout"), 1.0)
    newest_first = [e.request_id for e in await db.entries(LedgerQuery(team="t"))]
    assert newest_first == ["r2", "r1", "r0"]
    assert [e.request_id for e in await db.entries(LedgerQuery(since=10.0, until=90_000.0))] == [
        "r1", "r0",
    ]  # fmt: skip
    assert [e.request_id for e in await db.entries(LedgerQuery(state="uncertain"))] == ["r1"]
    assert len(await db.entries(LedgerQuery(limit=2))) == 2
    (total,) = await db.report("t", since=None, until=None, by=None, tz="UTC")
    assert (total.spent, total.reserved, total.uncertain, total.images, total.requests) == (
        1000, 1000, 1000, 1, 3,
    )  # fmt: skip
    by_quality = await db.report("t", since=None, until=None, by="quality", tz="UTC")
    assert [(r.group, r.requests, r.spent) for r in by_quality] == [
        ("high", 1, 0),
        ("low", 2, 1000),
    ]
    by_day = await db.report("t", since=0.0, until=100_000.0, by="day", tz="Asia/Shanghai")
    assert [(r.group, r.requests) for r in by_day] == [("1970-01-01", 2), ("1970-01-02", 1)]
    (by_key,) = await db.report("t", since=None, until=None, by="key", tz="UTC")
    assert (by_key.group, by_key.key_id, by_key.requests) == ("kfp", "web", 3)
    users = await db.report("t", since=None, until=None, by="end_user", tz="UTC")
    assert sorted((r.group or "", r.requests) for r in users) == [("", 1), ("ann", 1), ("bob", 1)]
    assert await db.report("t", since=1e9, until=None, by=None, tz="UTC") == []


async def test_a_task_is_recorded_once_polled_and_finished_once(db: Store) -> None:
    await db.reserve(hold("r1", mode="async"))
    await db.record_task("task-1", "t", "r1", 1.0, 5.0)
    with pytest.raises(DuplicateTask):
        await db.record_task("task-1", "t", "r1", 1.0, 5.0)
    assert await db.due_tasks(4.0, 10) == []
    assert await db.next_task_due() == 5.0 and await db.unsettled_task_count() == 1
    (due,) = await db.due_tasks(5.0, 10)
    assert (due.task_id, due.request_id, due.hold_amount, due.settled, due.resolved) == (
        "task-1", "r1", 2000, None, False,
    )  # fmt: skip
    await db.reschedule_task("task-1", 50.0)
    row = await db.task("task-1")
    assert row is not None and (row.polls, row.next_poll_at) == (1, 50.0)

    def never(entry: LedgerEntry) -> Any:
        raise AssertionError("a held hold is settled, not decided late")

    closed = await db.finish_task(row, status="completed", result='{"status": "completed"}',
                                  settlement=Capture(images=1, amount=2000, overrun=500),
                                  late=never, now=60.0)  # fmt: skip
    assert closed is not None and closed.late is None  # settled
    assert (closed.entry.state, closed.entry.charged, closed.entry.task_id) == (
        "captured", 2500, "task-1",
    )  # fmt: skip
    late = await db.finish_task(row, status="failed", result="{}", settlement=Release("late"),
                                late=never, now=61.0)  # fmt: skip
    assert late is None  # the first answer stands
    row = await db.task("task-1")
    assert row is not None and (row.status, row.result, row.settled) == (
        "completed", '{"status": "completed"}', "captured",
    )  # fmt: skip
    assert await db.next_task_due() is None and await db.unsettled_task_count() == 0
    assert await db.usage("t", PERIOD) == Usage(spent=2500, overrun=500)


async def test_a_task_ending_after_its_hold_closed_resolves_or_corrects_it(db: Store) -> None:
    for request_id in ("uncertain", "released", "unknown"):
        await db.reserve(hold(request_id, n=2, mode="async", budget=100_000))
        await db.record_task(f"task-{request_id}", "t", request_id, 1.0, 5.0)
    await db.settle("uncertain", Uncertain(4000, "still pending after the maximum age"), 9.0)
    await db.settle("released", Release("given up"), 9.0)
    await db.settle("unknown", Uncertain(4000, "timeout"), 9.0)
    served = Capture(images=1, amount=2000, upstream_id="up-1")
    due = {r.task_id: r for r in await db.due_tasks(10.0, 10)}  # whatever their money
    assert set(due) == {"task-uncertain", "task-released", "task-unknown"}

    async def finish(request_id: str, learned: Any) -> Any:
        return await db.finish_task(
            due[f"task-{request_id}"], status="completed", result="{}", settlement=learned,
            late=lambda entry: late_outcome(entry, learned), now=11.0,
        )  # fmt: skip

    resolved = await finish("uncertain", served)
    assert isinstance(resolved.late, Resolve)
    assert (resolved.entry.state, resolved.entry.charged, resolved.entry.upstream_id) == (
        "captured", 2000, "up-1",
    )  # fmt: skip
    assert resolved.entry.resolution.actor == "gateway"
    assert await db.unlogged_resolutions() == []  # the gateway writes its line itself
    corrected = await finish("released", served)
    assert isinstance(corrected.late, Correct)
    assert (corrected.entry.state, corrected.entry.charged, corrected.entry.charged_images) == (
        "released", 2000, 1,
    )  # fmt: skip
    assert [(c.images, c.amount) for c in corrected.entry.corrections] == [(1, 2000)]
    ignored = await finish("unknown", Uncertain(4000, "still unknown"))
    assert isinstance(ignored.late, Ignore) and ignored.entry.state == "uncertain"
    assert (await db.task("task-unknown")).status == "completed"  # the answer is kept
    assert await db.usage("t", PERIOD) == Usage(spent=4000, uncertain=4000)
    with pytest.raises(Refused, match="correction_above_hold"):  # never past the hold
        await db.settle_late("released", lambda e: Correct(Correction(2, 4000, "x")), 12.0)
    assert await db.settle_late("nobody", lambda e: Ignore("none"), 12.0) is None
    (report,) = await db.report("t", since=None, until=None, by=None, tz="UTC")
    assert (report.spent, report.images) == (4000, 2)


async def test_a_task_complete_at_once_is_recorded_and_settled_together(db: Store) -> None:
    await db.reserve(hold("r1", mode="async"))
    closed = await db.record_completed_task(
        "up-1",
        "t",
        "r1",
        1.0,
        result="{}",
        settlement=Capture(images=1, amount=2000),
        late=lambda e: Ignore("settled"),
        now=2.0,
    )
    assert closed is not None and closed.late is None
    entry = closed.entry
    assert (entry.state, entry.task_id, entry.settled_at) == (
        "captured", "up-1", 2.0,
    )  # fmt: skip
    await db.reserve(hold("r2", mode="async"))
    with pytest.raises(DuplicateTask):  # the upstream reused the id: nothing of r2 is written
        await db.record_completed_task(
            "up-1",
            "t",
            "r2",
            1.0,
            result="{}",
            settlement=Capture(images=1, amount=2000),
            late=lambda e: Ignore("settled"),
            now=3.0,
        )
    assert (await db.hold_state("r2")) == ("held", None)
    assert (await db.find_entry("up-1")).request_id == "r1"
    assert await db.due_tasks(1e17, 10) == []  # complete: never polled


async def test_an_idempotency_key_is_claimed_once_and_remembers_its_outcome(db: Store) -> None:
    def claim(request_id: str, now: float = 1.0, fingerprint: str = "f1"):
        return db.claim_idempotency_key(
            "t", "k", fingerprint=fingerprint, request_id=request_id, now=now, keep_s=100.0
        )

    assert await claim("r1") is None
    earlier = await claim("r2", fingerprint="f2")
    assert earlier is not None and (earlier.request_id, earlier.fingerprint, earlier.status) == (
        "r1", "f1", None,
    )  # fmt: skip
    assert not earlier.live
    await db.release_idempotency_key("t", "k")  # r1 ended before spending: the key is free
    assert await claim("r3") is None
    await db.store_idempotent_outcome("t", "k", 200, '{"data": []}', {"x-request-id": "r3"})
    await db.release_idempotency_key("t", "k")  # an outcome is kept: not released
    stored = await claim("r4")
    assert stored is not None and (stored.request_id, stored.status, stored.body) == (
        "r3", 200, '{"data": []}',
    )  # fmt: skip
    assert stored.headers == {"x-request-id": "r3"}
    assert await claim("r5", now=102.0) is None  # past keep_s: forgotten, claimed anew
    assert await db.purge_idempotency(103.0) == 1
    assert await claim("r6", now=104.0) is None


async def test_a_retry_finds_its_original_attempt(db: Store) -> None:
    await db.reserve(hold("r1"))
    await db.settle("r1", Capture(images=1, amount=2000, upstream_id="up-9", result="{}"), 1.0)
    attempt = await db.latest_attempt("t", "fp", since=0.0)
    assert attempt is not None and (attempt.request_id, attempt.state, attempt.result) == (
        "r1", "captured", "{}",
    )  # fmt: skip
    assert attempt.live == db.engine.shared  # in a fleet: made by an instance still alive
    assert await db.latest_attempt("t", "fp", since=1.0) is None  # before the window
    assert await db.latest_attempt("t", "other", since=0.0) is None
    assert (await db.find_entry("up-9")).request_id == "r1"
    assert await db.find_entry("nobody") is None
    assert await db.hold_state("nobody") is None


def test_every_engine_answers_the_store_s_named_statements() -> None:
    """The store asks for statements by name: each engine must know every name it may ask
    for (the fleet's are PostgreSQL's own; recovery at start is for one process)."""
    sqlite, postgres = set(queries.load("sqlite")), set(queries.load("postgres"))
    opening = {"ready_probe", "tables"}  # the SQLite engine's own, at open and /readyz
    assert sqlite - opening - {"in_flight_holds"} <= postgres
    missing = [
        n for n in sorted(sqlite - opening) if not callable(getattr(MemoryDatabase, n, None))
    ]
    assert missing == []
    assert all(":" not in name for name in sqlite | postgres)


# -- opening, migrating, locking -------------------------------------------------------------


async def test_a_0_1_database_migrates_with_every_entry_and_counter_intact(
    tmp_path: Path,
) -> None:
    path = tmp_path / "gateway.db"
    shutil.copy(FIXTURE_01, path)
    with sqlite3.connect(path) as old:
        before_entries = old.execute(
            "SELECT request_id, team, period, state, held, settled, images, upstream_id"
            " FROM ledger ORDER BY request_id"
        ).fetchall()
        before_usage = old.execute(
            "SELECT team, period, spent, reserved, uncertain FROM usage ORDER BY 1, 2"
        ).fetchall()
        before_tasks = old.execute("SELECT * FROM tasks ORDER BY task_id").fetchall()
        before_keys = old.execute("SELECT * FROM idempotency").fetchall()
    assert len(before_entries) == 11 and {row[3] for row in before_entries} == {
        "held", "captured", "released", "uncertain",
    }  # fmt: skip
    store = Store(await SQLiteEngine.open(path))
    assert not store.created
    entries = sorted(await store.entries(LedgerQuery()), key=lambda e: e.request_id)
    assert [
        (e.request_id, e.team, e.period, e.state, e.held, e.settled_amount, e.images, e.upstream_id)
        for e in entries
    ] == [(*tuple(row[:6]), row[6] or 0, row[7]) for row in before_entries]
    for team, period, spent, reserved, uncertain in before_usage:
        assert await store.usage(team, period) == Usage(spent, reserved, uncertain, 0)
    assert (await store.verify()).mismatches == ()
    rows = await store.engine._rows("SELECT value FROM meta WHERE key = 'schema_step'")
    assert rows == [(str(migrations.load("sqlite")[-1].version),)]
    await store.close()
    with sqlite3.connect(path) as new:
        tasks = new.execute("SELECT * FROM tasks ORDER BY task_id").fetchall()
        assert [row[: len(before_tasks[0])] for row in tasks] == before_tasks  # columns added
        kept = [row[: len(before_keys[0])] for row in new.execute("SELECT * FROM idempotency")]
        assert kept == before_keys
    again = Store(await SQLiteEngine.open(path))  # a second start has nothing left to migrate
    assert len(await again.entries(LedgerQuery())) == 11
    await again.close()


async def test_a_database_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    store = await SQLiteEngine.open(path)
    await store._write("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    await store.close()
    with pytest.raises(SchemaTooNew, match="schema version 99"):
        await SQLiteEngine.open(path)


async def test_tools_never_migrate(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    shutil.copy(FIXTURE_01, path)
    with pytest.raises(SchemaTooOld, match="Start the gateway once"):
        await SQLiteEngine.open_read_only(path)
    with pytest.raises(SchemaTooOld):
        await SQLiteEngine.open(path, exclusive=False, migrate=False)
    with sqlite3.connect(path) as db:  # untouched
        assert db.execute("SELECT value FROM meta").fetchall() == [("1",)]


async def test_a_settlement_queued_before_a_reservation_frees_its_budget_first(
    local_db: Store,
) -> None:
    """SQLite defers a settlement to the next batch a caller waits for (issue 26): it must still
    run before a reservation queued after it (a failed request's retry finds its budget back),
    and commit on its own when nothing follows."""
    first = hold("req_first", budget=2000)  # one image
    await local_db.reserve(first)
    settling = asyncio.ensure_future(local_db.settle("req_first", Release("failed"), 1.0))
    retrying = asyncio.ensure_future(local_db.reserve(hold("req_retry", budget=2000)))
    assert await settling is True
    assert (await retrying).reserved == 2000  # not BudgetRefused: the release ran first
    assert await asyncio.wait_for(local_db.settle("req_retry", Release("failed"), 2.0), 30)
    assert await local_db.usage("t", PERIOD) == Usage()


async def test_a_second_gateway_on_the_same_file_is_refused(tmp_path: Path) -> None:
    first = await SQLiteEngine.open(tmp_path / "gateway.db")
    with pytest.raises(StoreLocked, match="in use by another gateway process"):
        await SQLiteEngine.open(tmp_path / "gateway.db")
    tool = await SQLiteEngine.open(tmp_path / "gateway.db", exclusive=False, migrate=False)
    await tool.close()
    await first.close()
    second = await SQLiteEngine.open(tmp_path / "gateway.db")  # the lock went with the first
    await second.close()


@pytest.mark.parametrize(
    ("content", "why"),
    [(b"this is not a database" * 100, "not a database"), (None, "not an image-gateway")],
)
async def test_a_file_that_is_not_a_ledger_is_refused_naming_it(
    tmp_path: Path, content: bytes | None, why: str
) -> None:
    path = tmp_path / "other.db"
    if content is None:
        with sqlite3.connect(path) as other:
            other.execute("CREATE TABLE notes (text TEXT)")
    else:
        path.write_bytes(content)
    with pytest.raises(StoreOpenError, match=why) as raised:
        await SQLiteEngine.open(path)
    assert str(path) in str(raised.value)


# -- property: any interleaving keeps the books straight ----------------------------------------

operation = st.one_of(
    st.tuples(st.just("reserve"), st.integers(1, 4), st.sampled_from([1000, 2000, 4000])),
    st.tuples(st.just("capture"), st.integers(0, 30), st.integers(0, 100)),
    st.tuples(st.just("release"), st.integers(0, 30), st.just(0)),
    st.tuples(st.just("uncertain"), st.integers(0, 30), st.just(0)),
    st.tuples(st.just("resolve"), st.integers(0, 30), st.integers(0, 100)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(st.lists(operation, min_size=1, max_size=8), min_size=1, max_size=8))
def test_books_balance_for_any_interleaving(
    batches: list[list[tuple[str, int, int]]], sqlite_template: Path
) -> None:
    asyncio.run(_run_batches(batches, sqlite_template))


async def _run_batches(batches: list[list[tuple[str, int, int]]], template: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = Store(await SQLiteEngine.open(migrated_sqlite(template, Path(tmp) / "ledger.db")))
        holds: list[Hold] = []
        settled: dict[str, str] = {}
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
            if op == "resolve":
                images = b * target.n // 100
                try:
                    await db.resolve(
                        target.request_id, admin("captured", images), 2.0, logged=False
                    )
                except NotResolvable:
                    assert settled.get(target.request_id) != "uncertain"
                else:
                    assert settled.get(target.request_id) == "uncertain"
                    settled[target.request_id] = "resolved"
                return
            if op == "capture":
                served = b * target.n // 100
                settlement = Capture(images=served, amount=served * target.unit_price)
            elif op == "release":
                settlement = Release("failed")
            else:
                settlement = Uncertain(target.amount, "timeout")
            first = await db.settle(target.request_id, settlement, 1.0)
            assert first == (target.request_id not in settled)
            settled.setdefault(target.request_id, settlement.state)

        try:
            for batch in batches:
                await asyncio.gather(*(apply(*op) for op in batch))
                counters = await db.usage("t", PERIOD)
                assert (await db.verify()).mismatches == ()
                assert min(counters.spent, counters.reserved, counters.uncertain) >= 0
                assert counters.committed <= BUDGET
                open_holds = sum(h.amount for h in holds if h.request_id not in settled)
                assert counters.reserved == open_holds
        finally:
            await db.close()


# -- the console's reads ----------------------------------------------------------------------

DAY = 86_400.0


def timed(request_id: str, at: float, quality: str = "medium", n: int = 1) -> Hold:
    price = {"low": 1000, "medium": 2000, "high": 4000}[quality]
    return Hold(request_id, "t", PERIOD, at, "generations", "sync", quality, n, price, 10**9,
                "fp", key_id="t/app", key_fp="f" * 16)  # fmt: skip


async def test_daily_spend_counts_what_the_ledger_counts_by_day(db: Store) -> None:
    bounds = [0.0, DAY, 2 * DAY, 3 * DAY]
    await db.reserve(timed("a", 10.0, "high", 2))
    await db.settle("a", Capture(images=2, amount=8000, result="{}"), 11.0)
    await db.reserve(timed("b", DAY + 5))
    await db.settle("b", Uncertain(2000, "timeout"), DAY + 6)
    await db.resolve("b", admin("captured"), DAY + 7, logged=True)  # resolved: counted
    await db.reserve(timed("c", DAY + 9))
    await db.settle("c", Uncertain(2000, "timeout"), DAY + 10)  # uncertain: not spent
    await db.reserve(timed("d", 2 * DAY + 1, "low"))
    await db.settle("d", Release("refused"), 2 * DAY + 2)
    correction = Correct(Correction(1, 1000, "served after all"))  # a late outcome: counted
    assert await db.settle_late("d", lambda entry: correction, 2 * DAY + 3) is not None
    await db.reserve(timed("e", 2 * DAY + 3, "low", 3))  # held: not spent
    await db.reserve(timed("f", 3 * DAY))  # past the last bound
    await db.settle("f", Capture(images=1, amount=2000), 3 * DAY + 1)
    rows = await db.daily_spend("t", since=bounds[0], until=bounds[-1], tz="UTC")
    assert [(r.day, r.quality, r.spent, r.images, r.key_id) for r in rows] == [
        ("1970-01-01", "high", 8000, 2, "t/app"),
        ("1970-01-02", "medium", 2000, 1, "t/app"),
        ("1970-01-03", "low", 1000, 1, "t/app"),
    ]
    shifted = await db.daily_spend("t", since=bounds[0], until=bounds[-1], tz="Asia/Shanghai")
    assert [(r.day, r.spent) for r in shifted] == [
        ("1970-01-01", 8000), ("1970-01-02", 2000), ("1970-01-03", 1000),
    ]  # fmt: skip
    by_day = await db.report("t", since=0.0, until=3 * DAY, by="day", tz="UTC")
    assert [r.spent for r in by_day if r.spent] == [r.spent for r in rows]


async def test_stored_results_tasks_and_instances(db: Store) -> None:
    await db.reserve(timed("sync", 1.0))
    await db.settle("sync", Capture(images=1, amount=2000, result='{"data": []}'), 2.0)
    await db.reserve(timed("lost", 1.0))
    await db.settle("lost", Uncertain(2000, "timeout", result="partial"), 2.0)
    await db.reserve(hold("task", mode="async"))
    await db.record_task("task-1", "t", "task", 3.0, 60.0)
    await db.reserve(timed("late", 1.0))
    await db.settle("late", Release("refused", result='{"late": 1}'), 2.0)
    assert await db.stored_results(["late"]) == {}  # released: nothing served
    await db.settle_late("late", lambda e: Correct(Correction(1, 2000, "served")), 3.0)
    assert await db.stored_results(["sync", "lost", "task", "late", "nobody"]) == {
        "sync": '{"data": []}',
        "late": '{"late": 1}',
    }
    assert await db.stored_results([]) == {}
    (task,) = await db.open_tasks("t", 10)
    assert (task.task_id, task.request_id) == ("task-1", "task")
    assert await db.open_tasks("other", 10) == []
    await db.settle("task", Release("expired"), 4.0)  # still pending upstream: still listed
    assert [(t.task_id, t.settled) for t in await db.open_tasks("t", 10)] == [
        ("task-1", "released")
    ]
    instances = await db.instances()
    assert [i.instance_id for i in instances] == [db.instance_id]
    assert instances[0].heartbeat_at >= instances[0].started_at
