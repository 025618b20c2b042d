"""The ledger store against real database files: atomic reservations, settle-once, the schema's
caps, resolutions, recovery, verification, migrations and the one-process lock."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import sqlite3
import tempfile
from pathlib import Path

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
from gateway.core.settlement import Correct, NotResolvable, admin_resolution
from gateway.store import migrations
from gateway.store.base import LedgerQuery, Store, UnknownEntry
from gateway.store.migrations import SchemaTooNew, SchemaTooOld
from gateway.store.postgres import PostgresStore
from gateway.store.sqlite import SQLiteStore, StoreLocked, StoreOpenError
from tests.postgres import fresh_database

BUDGET = 10_000
PERIOD = "monthly:2026-11"
FIXTURE_01 = Path(__file__).parent / "fixtures" / "ledger" / "gateway-0.1.0.db"
REFUSED = (sqlite3.IntegrityError, asyncpg.IntegrityConstraintViolationError)


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


@pytest.fixture(params=["sqlite", "postgres"])
async def db(request: pytest.FixtureRequest, tmp_path: Path):
    """The same tests on both engines (PostgreSQL: a fresh database of the test server)."""
    async with contextlib.AsyncExitStack() as stack:
        if request.param == "sqlite":
            store: Store = await SQLiteStore.open(tmp_path / "ledger.db")
        else:
            server = request.getfixturevalue("postgres_server")
            store = await PostgresStore.open(
                await stack.enter_async_context(fresh_database(server))
            )
        yield store
        assert (await store.verify()).mismatches == ()
        await store.close()


async def raw(db: Store, sql: str) -> None:
    """A statement the gateway itself never runs (tampering, to see the schema refuse it)."""
    if isinstance(db, SQLiteStore):
        await db._write(sql)
    else:
        assert isinstance(db, PostgresStore)
        await db._execute(sql)


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


async def test_ledger_is_append_only(db: Store) -> None:
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
        with pytest.raises(REFUSED, match="append-only"):
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
    with pytest.raises(REFUSED, match="settlement_above_hold"):
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

    with pytest.raises(REFUSED, match="resolution_above_hold"):
        await db.resolve("r1", too_much, 2.0, logged=False)
    assert await db.usage("t", PERIOD) == Usage(uncertain=2000)


async def test_recovery_marks_in_flight_holds_uncertain_but_not_tasks(tmp_path: Path) -> None:
    db = await SQLiteStore.open(tmp_path / "ledger.db")  # one process: everything held is left
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
    await db.close()


async def test_a_silent_instances_holds_turn_uncertain_after_its_lease_and_not_before(
    postgres_dsn: str,
) -> None:
    lease = 2.0
    alive = await PostgresStore.open(postgres_dsn, lease_s=lease)
    other = await PostgresStore.open(postgres_dsn, lease_s=lease)
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


async def _watching_for(store: PostgresStore, seconds: float) -> None:
    """As if ``store`` had reached the database without a break for ``seconds`` (it just
    started), on a server up that long (the suite's may have just started: waited for, with a
    deadline)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds + 10
    while (await store._fetch(
        "SELECT pg_postmaster_start_time() < now() - make_interval(secs => $1)", seconds
    ))[0][0] is not True:  # fmt: skip
        assert loop.time() < deadline
        await asyncio.sleep(0.1)
    await store._execute(
        "UPDATE instances SET heartbeat_at = now(),"
        " reachable_since = now() - make_interval(secs => $2) WHERE instance_id = $1",
        store.instance_id,
        seconds + 1,
    )


async def _silent_for(store: PostgresStore, other: PostgresStore, seconds: float) -> None:
    await store._execute(
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
    alive = await PostgresStore.open(postgres_dsn, lease_s=lease)
    other = await PostgresStore.open(postgres_dsn, lease_s=lease)
    await other.reserve(hold("in-flight-elsewhere"))
    await _watching_for(alive, lease)
    await _silent_for(alive, other, lease)
    alive._failures += 1  # what a statement failing for want of the database records
    assert await alive.reap_silent_instances(10.0, lease) == []
    assert (await alive.hold_state("in-flight-elsewhere"))[0] == "held"
    # A heartbeat gap of half a lease (paused, or hung on a dead server) counts the same.
    await _watching_for(alive, lease)
    await alive._execute(
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
    reaper = await PostgresStore.open(postgres_dsn, lease_s=lease)
    paused = await PostgresStore.open(postgres_dsn, lease_s=lease)
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
    store = await SQLiteStore.open(tmp_path / "ledger.db")
    await store.reserve(hold("r1"))
    await store.settle("r1", Capture(images=1, amount=2000), 1.0)
    assert (await store.verify()).mismatches == ()
    await store._write("UPDATE usage SET spent = spent - 1")
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
    store = await SQLiteStore.open(path)
    assert not store.created
    entries = sorted(await store.entries(LedgerQuery()), key=lambda e: e.request_id)
    assert [
        (e.request_id, e.team, e.period, e.state, e.held, e.settled_amount, e.images, e.upstream_id)
        for e in entries
    ] == [(*tuple(row[:6]), row[6] or 0, row[7]) for row in before_entries]
    for team, period, spent, reserved, uncertain in before_usage:
        assert await store.usage(team, period) == Usage(spent, reserved, uncertain, 0)
    assert (await store.verify()).mismatches == ()
    rows = await store._rows("SELECT value FROM meta WHERE key = 'schema_step'")
    assert rows == [(str(migrations.load("sqlite")[-1].version),)]
    await store.close()
    with sqlite3.connect(path) as new:
        tasks = new.execute("SELECT * FROM tasks ORDER BY task_id").fetchall()
        assert [row[: len(before_tasks[0])] for row in tasks] == before_tasks  # columns added
        kept = [row[: len(before_keys[0])] for row in new.execute("SELECT * FROM idempotency")]
        assert kept == before_keys
    again = await SQLiteStore.open(path)  # a second start has nothing left to migrate
    assert len(await again.entries(LedgerQuery())) == 11
    await again.close()


async def test_a_database_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    store = await SQLiteStore.open(path)
    await store._write("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    await store.close()
    with pytest.raises(SchemaTooNew, match="schema version 99"):
        await SQLiteStore.open(path)


async def test_tools_never_migrate(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    shutil.copy(FIXTURE_01, path)
    with pytest.raises(SchemaTooOld, match="Start the gateway once"):
        await SQLiteStore.open_read_only(path)
    with pytest.raises(SchemaTooOld):
        await SQLiteStore.open(path, exclusive=False, migrate=False)
    with sqlite3.connect(path) as db:  # untouched
        assert db.execute("SELECT value FROM meta").fetchall() == [("1",)]


async def test_a_second_gateway_on_the_same_file_is_refused(tmp_path: Path) -> None:
    first = await SQLiteStore.open(tmp_path / "gateway.db")
    with pytest.raises(StoreLocked, match="in use by another gateway process"):
        await SQLiteStore.open(tmp_path / "gateway.db")
    tool = await SQLiteStore.open(tmp_path / "gateway.db", exclusive=False, migrate=False)
    await tool.close()
    await first.close()
    second = await SQLiteStore.open(tmp_path / "gateway.db")  # the lock went with the first
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
        await SQLiteStore.open(path)
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
def test_books_balance_for_any_interleaving(batches: list[list[tuple[str, int, int]]]) -> None:
    asyncio.run(_run_batches(batches))


async def _run_batches(batches: list[list[tuple[str, int, int]]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = await SQLiteStore.open(Path(tmp) / "ledger.db")
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
    rows = await db.daily_spend("t", bounds)
    assert [(r.day, r.quality, r.spent, r.images, r.key_id) for r in rows] == [
        (0, "high", 8000, 2, "t/app"),
        (1, "medium", 2000, 1, "t/app"),
        (2, "low", 1000, 1, "t/app"),
    ]
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
