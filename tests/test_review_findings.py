"""Regressions for the defects a line-by-line review of the ledger, fleet and hardening work
found (at 513b8f2). Each test failed there; its docstring names the defect as it was."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from gateway.core.ledger import Usage
from gateway.http.keys import TASKS
from gateway.store.base import LedgerQuery
from tests.client import get_task, post, usage
from tests.conftest import Gateway, Upstream, books_balance
from tests.fakes import respond

URL = "https://api.icodeeasy.cc/v1/images/files/gpt-image-2/20261126/x-1.png"


# -- F1: a completed task reporting more images than were held -------------------------------


async def test_a_task_with_more_images_than_held_settles_instead_of_500(
    gateway: Gateway, upstream: Upstream
) -> None:
    """task_settlement counts len(data) unclamped; the schema refuses images > n, so the poll
    is a 500 and the task never settles (capture_reply clamps; task_settlement does not)."""
    _, task, _ = await post(gateway.url, suffix="?async=1")  # n=1, held 0.20
    answer = {"task_id": task["task_id"], "status": "completed", "cost": 0.2,
              "result_url": URL, "data": [{"url": URL}, {"url": URL}]}  # fmt: skip
    upstream.faults.add(respond(answer), kind="TASK")
    status, body, _ = await get_task(gateway, task["task_id"])
    assert status == 200, body
    assert await usage(gateway) == Usage(spent=2000)
    await books_balance(gateway)


# -- F2: PostgreSQL: the settler's expiry racing a task's end leaves the money uncertain ---------


async def test_pg_task_ending_while_its_hold_expires_is_still_resolved(postgres_dsn: str) -> None:
    """finish_task reads the entry as held, then its capture INSERT ... ON CONFLICT DO NOTHING
    waits behind _expire's uncommitted uncertain settlement and silently does nothing; the task
    is marked completed, so no poll will ever resolve it, and TaskClosed('settled') is returned
    for an entry that is uncertain."""
    import asyncpg

    from gateway.core.ledger import Capture, Hold
    from gateway.core.settlement import late_outcome
    from gateway.store.manager import Store
    from gateway.store.postgres import PostgresEngine

    store = Store(await PostgresEngine.open(postgres_dsn))
    try:
        hold = Hold("r1", "t", "p", 0.0, "generations", "async", "medium", 1, 2000, 10_000, "fp")
        await store.reserve(hold)
        await store.record_task("task-1", "t", "r1", 0.0, 0.0)
        row = await store.task("task-1")
        assert row is not None
        expiring = await asyncpg.connect(postgres_dsn)  # the settler's _expire, mid-commit
        tx = expiring.transaction()
        await tx.start()
        await expiring.execute(
            "INSERT INTO settlements (request_id, state, amount, reason, settled_at)"
            " VALUES ('r1', 'uncertain', 2000, 'task still pending after the maximum age', 1)"
        )
        finishing = asyncio.ensure_future(
            store.finish_task(
                row,
                status="completed",
                result="{}",
                settlement=(captured := Capture(images=1, amount=2000, upstream_id="task-1")),
                late=lambda entry: late_outcome(entry, captured),
                now=2.0,
            )
        )
        await _until_a_gateway_waits_on_a_lock(postgres_dsn)  # on the settlement's key
        await tx.commit()
        await expiring.close()
        closed = await finishing
        entry = await store.find_entry("r1")
        assert entry is not None
        task = await store.task("task-1")
        assert task is not None
        # Either the task is still pending (so it is polled and resolved) or it was resolved.
        assert task.status == "pending" or entry.state == "captured", (
            task.status,
            entry.state,
            closed,
        )
    finally:
        await store.close()


# -- F3: an upstream string the database cannot store leaves a refused request held ----------


@pytest.mark.parametrize("text", ["bad size \ud800", "bad size \u0000"])
async def test_an_upstream_refusal_with_unstorable_text_is_released(
    gateway: Gateway, upstream: Upstream, text: str
) -> None:
    """The refusal's message becomes the release reason verbatim (settlement.release). A lone
    surrogate cannot be encoded (UnicodeEncodeError, both engines); a NUL cannot be stored in
    PostgreSQL TEXT (CharacterNotInRepertoireError). Neither is StorageUnavailable, so
    Durable gives up, the generation task dies and the hold stays held on a live process:
    a refused request keeps its money reserved (uncertain after a restart)."""
    upstream.faults.add(
        lambda request, handler: _refuse(request, text)  # type: ignore[arg-type,return-value]
    )
    status, _, _ = await post(gateway.url)
    assert status == 400
    await gateway.settled()
    assert await usage(gateway) == Usage()
    await books_balance(gateway)


async def _refuse(request: Any, text: str) -> Any:
    from aiohttp import web

    await request.read()
    return web.json_response(
        {"error": {"type": "invalid_request_error", "message": text}}, status=400
    )


# -- F4: a write that committed but whose acknowledgement was lost ----------------------------


def _commit_then_fail(store: Any, name: str, times: int = 1) -> None:
    """``store.<name>`` commits, then reports StorageUnavailable (as PostgreSQL does when the
    connection drops or command_timeout fires after the server committed)."""
    from gateway.core.errors import StorageUnavailable

    original = getattr(store, name)
    left = [times]

    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        value = await original(*args, **kwargs)
        if left[0] > 0:
            left[0] -= 1
            raise StorageUnavailable("the connection was lost")
        return value

    setattr(store, name, wrapped)


async def test_a_reservation_whose_ack_was_lost_does_not_stay_held(gateway: Gateway) -> None:
    """generation._generate answers 503 'nothing was reserved' and returns; the committed hold
    is never settled. PostgreSQL's reaper only closes holds of silent instances and SQLite's
    recovery runs only at start, so the team's budget stays reserved while the process lives
    (and turns uncertain, i.e. charged until an admin acts, after it stops)."""
    from gateway.http.keys import DB

    _commit_then_fail(gateway.app[DB], "reserve")
    status, body, _ = await post(gateway.url)
    assert status == 503, body
    await gateway.settled()
    assert await usage(gateway) == Usage()  # nothing was sent: nothing may stay reserved
    await books_balance(gateway)


async def test_a_settlement_whose_ack_was_lost_is_still_logged(gateway: Gateway) -> None:
    """Durable retries the settle; the retry finds it settled and returns False, so
    generation._commit never calls books.moved: the 0.20 spent is on no access-log line."""
    from gateway.http.keys import DB

    _commit_then_fail(gateway.app[DB], "settle")
    status, _, _ = await post(gateway.url)
    assert status == 200
    await gateway.settled()
    assert await usage(gateway) == Usage(spent=2000)
    await books_balance(gateway)


# -- F5: PostgreSQL: an Idempotency-Key released between B's INSERT and its SELECT -----------


async def test_pg_idempotency_claim_survives_a_release_between_its_statements(
    postgres_dsn: str,
) -> None:
    """claim_idempotency_key: INSERT ... ON CONFLICT DO NOTHING finds A's row; A releases it
    (its request failed before spending); the SELECT that follows (READ COMMITTED: a new
    snapshot) returns None and row[0] raises TypeError: a 500 for an ordinary retry. The
    interleaving is forced here; adversarial/idem_race.py hits it ~2% of the time unforced."""
    from gateway.store.manager import Store
    from gateway.store.postgres import PostgresEngine

    a = Store(await PostgresEngine.open(postgres_dsn))
    b = Store(await PostgresEngine.open(postgres_dsn))
    try:
        assert (
            await a.claim_idempotency_key(
                "t", "k", fingerprint="f", request_id="ra", now=1.0, keep_s=86400
            )
            is None
        )
        run = b.engine._step  # type: ignore[attr-defined]

        async def interleaved(conn: Any, step: Any) -> Any:
            if step.query == "idempotency_key":  # B's INSERT found A's row; now its SELECT
                await a.release_idempotency_key("t", "k")  # A's request ends, unspent
            return await run(conn, step)

        b.engine._step = interleaved  # type: ignore[attr-defined]
        claimed = await b.claim_idempotency_key(
            "t", "k", fingerprint="f", request_id="rb", now=1.0, keep_s=86400
        )
        assert claimed is None or claimed.request_id == "rb"
    finally:
        await a.close()
        await b.close()


# -- F6: PostgreSQL: an admin's resolution racing the task's own end is a 500 ----------------


async def test_pg_a_task_poll_racing_an_admin_resolution_is_not_a_500(
    start_gateway: Any, upstream: Upstream, backend: str
) -> None:
    """finish_task (PostgreSQL) reads the entry as uncertain and unresolved, then its
    INSERT INTO resolutions waits behind the admin's uncommitted one and fails with
    UniqueViolationError, which nothing catches (PostgresStore.resolve maps it, finish_task
    does not): the client's poll is a 500."""
    if backend != "postgres":
        pytest.skip("PostgreSQL only: SQLite serializes the two")
    import asyncpg

    from tests.conftest import PG_URL_ENV

    gateway = await start_gateway(tasks={"max_pending_age_s": 60})
    _, task, _ = await post(gateway.url, suffix="?async=1")
    gateway.clock.advance(seconds=120)
    await gateway.app[TASKS].settle_due()  # expired: the hold is uncertain now
    (entry,) = await gateway.db.entries(LedgerQuery())
    assert entry.state == "uncertain"
    upstream.sim.finish_task(task["task_id"])
    gateway.clock.advance(seconds=10)  # past the poll cache
    admin = await asyncpg.connect(gateway.env[PG_URL_ENV])
    tx = admin.transaction()
    await tx.start()
    await admin.execute(
        "INSERT INTO resolutions (request_id, state, images, amount, reason, actor, resolved_at)"
        " VALUES ($1, 'released', 0, 0, 'admin checked', 'admin', 1)",
        entry.request_id,
    )
    polling = asyncio.ensure_future(get_task(gateway, task["task_id"]))
    await _until_a_gateway_waits_on_a_lock(gateway.env[PG_URL_ENV])  # on the resolution's key
    await tx.commit()
    await admin.close()
    status, body, _ = await polling
    assert status != 500, body
    assert body["status"] == "completed"


# -- F7: the central key echoed in a JSON escape form is not scrubbed --------------------------


def _escaped(text: str) -> str:
    return "".join(f"\\u{ord(ch):04x}" for ch in text)


@pytest.mark.parametrize("form", ["unicode", "partial"])
async def test_an_echoed_central_key_never_reaches_the_team(
    gateway: Gateway, upstream: Upstream, form: str
) -> None:
    """upstream.scrub replaces the key's literal and ``\\/`` forms in the raw bytes, then the
    bytes are JSON-decoded: a key echoed as \\u escapes decodes back to the key, into the
    error message the team receives (and the release reason in the ledger)."""
    from aiohttp import web

    from tests.conftest import UPSTREAM_KEY

    echoed = (
        _escaped(UPSTREAM_KEY)
        if form == "unicode"
        else (_escaped(UPSTREAM_KEY[:4]) + UPSTREAM_KEY[4:])
    )

    async def fault(request: web.Request, handler: Any) -> web.Response:
        await request.read()
        body = '{"error": {"type": "authentication_error", "message": "bad key ' + echoed + '"}}'
        return web.Response(text=body, status=400, content_type="application/json")

    upstream.faults.add(fault)
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway.url + "/v1/images/generations",
            headers=gateway.headers(),
            json={"prompt": "a kite"},
        ) as resp:
            text = await resp.text()
    assert UPSTREAM_KEY not in text
    assert UPSTREAM_KEY[8:] not in text
    assert await usage(gateway) == Usage()
    await books_balance(gateway)


# -- F9: the last day of year 9999 as a period is a 500 ----------------------------------------


@pytest.mark.parametrize(
    "path", ["/admin/ledger?period=9999-12-31", "/admin/usage?period=9999-12-31"]
)
async def test_a_period_at_the_end_of_time_is_a_400(gateway: Gateway, path: str) -> None:
    """periods.window: period_at('daily', 9999-12-31).end adds a day outside the try that
    turns ValueError into 'not a date'; OverflowError escapes to the middleware (500), and
    to the CLI as a traceback (`usage --period 9999-12-31`)."""
    from tests.conftest import ADMIN_KEY

    async with aiohttp.ClientSession() as http:
        async with http.get(
            gateway.url + path, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        ) as resp:
            assert resp.status == 400, await resp.text()


# -- F10: PostgreSQL: a NUL in an id from the URL is a 500 -------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/images/tasks/abc%00def"), ("POST", "/admin/ledger/req_%00/resolve")],
)
async def test_a_nul_in_a_path_id_is_not_a_500(gateway: Gateway, method: str, path: str) -> None:
    """PostgreSQL TEXT cannot hold NUL: asyncpg raises CharacterNotInRepertoireError (SQLSTATE
    22021, not an 'unavailable' class), which TaskTracker.poll / resolve do not expect."""
    from tests.conftest import ADMIN_KEY

    key = ADMIN_KEY if path.startswith("/admin") else None
    headers = {"Authorization": f"Bearer {key}"} if key else gateway.headers()
    async with aiohttp.ClientSession() as http:
        async with http.request(
            method,
            gateway.url + path,
            headers=headers,
            json={"state": "released", "reason": "x"} if method == "POST" else None,
        ) as resp:
            assert resp.status in (400, 404), await resp.text()


# -- F11: releasing a max_concurrent admission fails after the image was bought ----------------


async def test_a_failed_admission_release_does_not_turn_a_paid_image_into_a_503(
    start_gateway: Any,
) -> None:
    """handlers._admitted releases the admission in ``finally`` with a bare await: a
    StorageUnavailable there (PostgreSQL briefly unreachable) replaces the 200 and its image
    with 503 'nothing was sent or charged' although 0.20 was charged, and the admission row
    is never deleted (the reaper only deletes rows of dead instances), so each such blip
    permanently eats one of the team's max_concurrent slots."""
    from gateway.core.errors import StorageUnavailable
    from gateway.http.keys import DB, DURABLE

    gateway = await start_gateway(teams={"design": {"max_concurrent": 1}})
    db = gateway.app[DB]
    original = db.release
    failures = [1]

    async def release(request_id: str, scopes: Any) -> None:
        if failures[0]:
            failures[0] -= 1
            raise StorageUnavailable("PostgreSQL went away for a moment")
        await original(request_id, scopes)

    db.release = release
    status, body, _ = await post(gateway.url)
    await gateway.settled()
    assert await usage(gateway) == Usage(spent=2000)
    assert status == 200, body
    worker = gateway.app[DURABLE]._worker  # the release, retried in the background
    assert worker is not None
    await worker
    status, body, _ = await post(gateway.url)  # the team's one slot was given back
    assert status == 200, body
    await gateway.settled()
    assert await usage(gateway) == Usage(spent=4000)
    await books_balance(gateway)


# -- F12: a task id the upstream hands out twice ---------------------------------------------


async def test_an_upstream_reusing_a_task_id_is_neither_a_500_nor_logged_whole(
    gateway: Gateway, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    """record_task hits the tasks primary key (IntegrityError / UniqueViolationError); Durable
    does not retry it, _forward raises, the hold goes uncertain and the client gets a 500.
    On PostgreSQL the traceback logged carries the DETAIL 'Key (task_id)=(<full id>)'."""
    task_id = "d142c93a-5b1e-4c2f-9a77-0123456789ab"
    for _ in range(2):
        upstream.faults.add(respond({"status": "pending", "task_id": task_id}, status=202))
    first, _, _ = await post(gateway.url, suffix="?async=1")
    second, body, _ = await post(gateway.url, suffix="?async=1")
    assert first == 202
    assert second == 502, body
    assert body["error"]["code"] == "upstream_bad_response"
    assert task_id not in caplog.text
    assert await usage(gateway) == Usage(reserved=2000, uncertain=2000)  # the first is pending
    await books_balance(gateway)


# -- F13: a crash inside completed_at_once leaves a hold held for ever -------------------------


async def test_a_crash_between_recording_an_instant_task_and_settling_it_is_recovered(
    tmp_path: Any,
) -> None:
    """TaskTracker.completed_at_once (a 200 to an async request) writes the task with
    next_poll_at = NEVER, then settles it in a second write. A process dying in between
    leaves a held hold with a task: recover_in_flight (and the PostgreSQL reaper) skip holds
    that have a task, and due_tasks never reaches 1e18, so the money stays reserved for
    ever although the images were served."""
    from gateway.core.ledger import Hold
    from gateway.services.tasks import NEVER
    from gateway.store.manager import Store
    from gateway.store.sqlite import SQLiteEngine

    path = tmp_path / "ledger.db"
    store = Store(await SQLiteEngine.open(path))
    hold = Hold("r1", "t", "p", 0.0, "generations", "async", "medium", 1, 2000, 10_000, "fp")
    await store.reserve(hold)
    await store.record_task("up-1", "t", "r1", 0.0, NEVER)
    await store.close()  # the process dies here
    store = Store(await SQLiteEngine.open(path))
    try:
        await store.recover_in_flight(1.0)
        entry = await store.find_entry("r1")
        assert entry is not None
        open_tasks = await store.due_tasks(1e17, 10)  # any time, however late
        assert entry.state != "held" or open_tasks, "held for ever: nothing will settle it"
    finally:
        await store.close()


# -- F14: a PostgreSQL role that cannot create the schema: a traceback, not one line -------------


async def test_pg_a_start_without_create_privilege_is_one_line(
    postgres_server: Any, tmp_path: Any
) -> None:
    """PostgresEngine.open: _migrate's InsufficientPrivilegeError (SQLSTATE 42501) is neither
    caught there nor in STORE_ERRORS, so `serve` dies with a 60-line traceback."""
    import os
    import secrets
    import sys

    import asyncpg

    from tests.conftest import UPSTREAM_KEY, base_config
    from tests.postgres import create_database, drop_database
    from tests.process import to_toml

    name = f"weak_{secrets.token_hex(4)}"
    dsn = await create_database(postgres_server.dsn, name)
    try:
        conn = await asyncpg.connect(dsn)
        role = f"r{secrets.token_hex(4)}"
        await conn.execute(f"CREATE ROLE {role} LOGIN")
        await conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        await conn.close()
        weak = dsn.replace("postgres@", f"{role}@", 1)
        config = base_config(tmp_path, "http://127.0.0.1:9")
        config["storage"] = {"backend": "postgres", "dsn_env": "WEAK_URL"}
        path = tmp_path / "weak.toml"
        path.write_text(to_toml(config))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--config", str(path),
            env={**os.environ, "WEAK_URL": weak, "TEST_UPSTREAM_KEY": UPSTREAM_KEY},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        lines = [line for line in err.decode().splitlines() if "image-gateway:" in line
                 or "Traceback" in line]  # fmt: skip
        assert proc.returncode == 1
        assert lines and lines[0].startswith("image-gateway: cannot start:"), err.decode()[-400:]
    finally:
        await drop_database(postgres_server.dsn, name)


# -- F15: an SDK retry header hands one key's image to another key of the team ---------------


async def test_a_retry_from_another_key_does_not_get_this_keys_image(
    start_gateway: Any, upstream: Upstream
) -> None:
    """Generations.attach and Store.latest_attempt match by (team, fingerprint) only: a
    contractor's key that sends the web app's payload with x-stainless-retry-count: 1 within
    retry_dedupe_minutes receives the web app's image (and result URL) without paying, past
    its own key cap (exhausted here) and outside its own attribution."""
    from tests.conftest import NAMED_KEYS
    from tests.test_keys import design, named

    gateway = await start_gateway(
        **design(keys=[named("web-app"), named("contractor", budget_cny="0")])
    )
    status, original, _ = await post(gateway, key=NAMED_KEYS["web-app"], prompt="secret plan")
    assert status == 200
    status, body, _ = await post(
        gateway,
        key=NAMED_KEYS["contractor"],
        headers={"x-stainless-retry-count": "1"},
        prompt="secret plan",
    )
    assert status == 402, body  # the contractor's own cap: 0
    assert original["data"][0]["url"] not in str(body)
    await books_balance(gateway, upstream)


# -- second review (at 3dedb7d) ----------------------------------------------------------------


async def test_an_admission_whose_ack_was_lost_gives_its_slot_back(start_gateway: Any) -> None:
    """handlers._admitted: an admit that committed but reported StorageUnavailable was never
    released, so the team lost one max_concurrent slot for the life of the instance."""
    from gateway.http.keys import DB

    gateway = await start_gateway(teams={"design": {"max_concurrent": 1}})
    _commit_then_fail(gateway.app[DB], "admit")
    status, body, _ = await post(gateway.url)
    assert (status, body["error"]["code"]) == (503, "storage_unavailable")
    status, body, _ = await post(gateway.url)  # the one slot is free again
    assert status == 200, body
    await gateway.settled()
    assert await usage(gateway) == Usage(spent=2000)
    await books_balance(gateway)


async def test_a_task_record_whose_ack_was_lost_is_not_a_reused_id(
    gateway: Gateway, upstream: Upstream
) -> None:
    """Durable.write retried submitted() after a commit whose acknowledgement was lost; the
    retry hit our own row as DuplicateTask and the client got a 502 without its task id."""
    from gateway.http.keys import DB

    task_id = "d142c93a-5b1e-4c2f-9a77-0123456789ab"
    upstream.faults.add(respond({"status": "pending", "task_id": task_id}, status=202))
    _commit_then_fail(gateway.app[DB], "record_task")
    status, body, _ = await post(gateway.url, suffix="?async=1")
    assert (status, body["task_id"]) == (202, task_id), body
    (entry,) = await gateway.db.entries(LedgerQuery())
    assert (entry.state, entry.task_id) == ("held", task_id)
    await books_balance(gateway, upstream)


async def _until(check: Any, seconds: float = 20) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not await check():
        assert loop.time() < deadline, "condition never held"
        await asyncio.sleep(0.01)


async def _until_a_gateway_waits_on_a_lock(dsn: str) -> None:
    """Until a statement of the gateway is blocked behind another transaction's row: watched
    from a connection of its own, outside any transaction (pg_stat_activity is read once per
    transaction)."""
    import asyncpg

    watcher = await asyncpg.connect(dsn)
    try:

        async def blocked() -> bool:
            return await _gateway_backends(watcher, waiting="Lock") > 0

        await _until(blocked)
    finally:
        await watcher.close()


async def _gateway_backends(admin: Any, waiting: str | None = None) -> int:
    sql = (
        "SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = 'image-gateway'"
        " AND state = 'active'"
    )
    if waiting is not None:
        return int(await admin.fetchval(sql + " AND wait_event_type = $1", waiting))
    return int(await admin.fetchval(sql))


async def test_pg_a_connection_dropped_mid_statement_is_storage_unavailable(
    postgres_dsn: str,
) -> None:
    """_connection terminated the connection asyncpg had already detached: InterfaceError
    instead of StorageUnavailable, so a settlement was not retried."""
    import asyncpg

    from gateway.core.errors import StorageUnavailable
    from gateway.store.manager import Store
    from gateway.store.postgres import PostgresEngine

    store = Store(await PostgresEngine.open(postgres_dsn))
    admin = await asyncpg.connect(postgres_dsn)
    try:
        sleeping = asyncio.create_task(store.engine._fetch("SELECT pg_sleep(30)"))

        async def sleeping_on_server() -> bool:
            return await _gateway_backends(admin, waiting="Timeout") > 0

        await _until(sleeping_on_server)
        await admin.execute(
            "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity"
            " WHERE application_name = 'image-gateway' AND pid <> pg_backend_pid()"
        )
        with pytest.raises(StorageUnavailable):
            await sleeping
        assert await store.usage("t", "p") == Usage()  # the pool recovers
    finally:
        await admin.close()
        await store.close()


async def test_pg_a_timed_out_reservation_does_not_commit_after_its_release(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Terminating a connection whose statement timed out cancelled asyncpg's pending
    CancelRequest: the blocked reservation committed later, held, with nobody to settle it."""
    import asyncpg

    from gateway.core.errors import StorageUnavailable
    from gateway.core.ledger import Hold
    from gateway.store import postgres as pg
    from gateway.store.manager import Store

    monkeypatch.setattr(pg, "COMMAND_TIMEOUT_S", 1.0)
    store = Store(await pg.PostgresEngine.open(postgres_dsn))
    admin = await asyncpg.connect(postgres_dsn)
    try:
        locked = admin.transaction()
        await locked.start()
        await admin.execute("LOCK TABLE holds IN ACCESS EXCLUSIVE MODE")
        hold = Hold("r1", "t", "p", 0.0, "generations", "async", "medium", 1, 2000, 10_000, "fp")
        with pytest.raises(StorageUnavailable):
            await store.reserve(hold)
        await locked.rollback()  # a reservation still waiting would now commit

        async def none_active() -> bool:
            return await _gateway_backends(admin) == 0

        await _until(none_active)
        assert await store.find_entry("r1") is None, "committed after the caller gave up on it"
    finally:
        await admin.close()
        await store.close()
