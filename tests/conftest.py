"""Shared fixtures: a simulated upstream and a real gateway, both listening on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import inspect
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from openai import AsyncOpenAI, OpenAI

from gateway.core.auth import key_digest
from gateway.core.config import Settings, parse_settings
from gateway.core.ledger import LedgerEntry
from gateway.core.money import cny_to_units
from gateway.http.app import create_app
from gateway.http.keys import ACCESS_LOG, DB, GENERATIONS, IDEMPOTENCY
from gateway.store.base import LedgerQuery
from gateway.store.factory import open_store
from gateway.store.manager import Store
from gateway.store.memory import MemoryDatabase, MemoryEngine
from gateway.upstream.simulator import Simulator
from tests.browser import browser  # noqa: F401 (fixture)
from tests.fakes import FakeClock, FaultPlan
from tests.ledgers import (  # noqa: F401 (fixtures)
    migrated_postgres_dsn,
    migrated_sqlite,
    postgres_template,
    sqlite_template,
    wants_new_ledger,
)
from tests.postgres import fresh_database, postgres_dsn, postgres_server  # noqa: F401 (fixtures)

UPSTREAM_KEY = "sk_test_central_0123456789abcdef"
TEAM_KEYS = {
    "design": "igw_design_key_for_tests_0000000000",
    "ops": "igw_ops_key_for_tests_111111111111111",
}
ADMIN_KEY = "igw_admin_key_for_tests_22222222222222"
NAMED_ADMIN_KEYS = {"alice": "igw_admin_alice_key_for_tests_666666666"}  # [[admin.keys]]
NAMED_KEYS = {  # more keys of the design team, for named-key tests
    "web-app": "igw_design_web_app_key_3333333333333",
    "batch": "igw_design_batch_key_44444444444444444",
    "contractor": "igw_design_contractor_555555555555555",
}


@dataclass
class Upstream:
    sim: Simulator
    faults: FaultPlan
    url: str


@dataclass
class Gateway:
    url: str
    app: web.Application
    server: TestServer
    settings: Settings
    clock: FakeClock
    access_log: Path
    clients: list[OpenAI | AsyncOpenAI] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)  # the config it was started with
    env: dict[str, str] = field(default_factory=dict)  # what its config reads (a database URL)
    # every gateway of the test: they share the access log, each buffering its own lines
    siblings: list[Gateway] = field(default_factory=list, repr=False, compare=False)

    def config_file(self, path: Path) -> Path:
        """This gateway's own config as a TOML file, for the CLI to run against its ledger."""
        from tests.process import to_toml

        path.write_text(to_toml(self.config))
        return path

    def cli_env(self) -> dict[str, str]:
        return {**os.environ, "TEST_UPSTREAM_KEY": UPSTREAM_KEY, **self.env}

    @property
    def db(self) -> Store:
        """The ledger as a test should see it: each call first waits for pending settlements.

        A sync response leaves before its settlement commits (see Generations.run), so a test
        asserting on money waits for that commit, not for time to pass.
        """
        return SettledReads(self.app)  # type: ignore[return-value]

    async def settled(self) -> None:
        await self.app[GENERATIONS].settled()
        await self.app[IDEMPOTENCY].stored()

    def headers(self, team: str = "design", **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {TEAM_KEYS[team]}", **extra}

    async def ledger(self) -> list[LedgerEntry]:
        """Every ledger entry, oldest first, once the settlements due so far are in."""
        await self.settled()
        return list(reversed(await self.app[DB].entries(LedgerQuery())))

    async def stored_results(self) -> list[str | None]:
        """The result stored with each entry's settlement, oldest entry first."""
        states = [await self.app[DB].hold_state(e.request_id) for e in await self.ledger()]
        return [state[1] if state else None for state in states]

    async def log_lines(self) -> list[dict[str, Any]]:
        """The access log once every line due so far is written: a sync generation's line
        follows its settlement, which follows the answer, and the lines of one loop iteration
        are written at the start of the next (flushed here, by every gateway of the test that
        shares the file, rather than waited for)."""
        await self.settled()
        for gateway in {id(g): g for g in [self, *self.siblings]}.values():
            if gateway.access_log == self.access_log and not gateway.server.closed:
                gateway.app[ACCESS_LOG].flush()
        if not self.access_log.exists():
            return []
        return [json.loads(line) for line in self.access_log.read_text().splitlines()]

    def openai(self, team: str = "design", *, v1: bool = True, **kwargs: Any) -> OpenAI:
        kwargs.setdefault("max_retries", 0)
        client = OpenAI(
            base_url=self.url + ("/v1" if v1 else ""), api_key=TEAM_KEYS[team], **kwargs
        )
        self.clients.append(client)
        return client

    def async_openai(self, team: str = "design", *, v1: bool = True, **kwargs: Any) -> AsyncOpenAI:
        kwargs.setdefault("max_retries", 0)
        return AsyncOpenAI(
            base_url=self.url + ("/v1" if v1 else ""), api_key=TEAM_KEYS[team], **kwargs
        )


async def books_balance(gateway: Gateway, upstream: Upstream | None = None) -> None:
    """Where every money test ends: the ledger's counters equal what its entries say, each
    team's access-log lines add up to its spend, and the fake upstream served exactly the
    images the ledger captured or corrected."""
    await gateway.settled()
    db = gateway.app[DB]
    result = await db.verify()
    assert result.mismatches == (), result.mismatches
    entries = await db.entries(LedgerQuery())
    spent: dict[str, int] = {}
    for entry in entries:
        spent[entry.team] = spent.get(entry.team, 0) + entry.charged
    logged: dict[str, int] = {}
    for line in await gateway.log_lines():
        if line["team"] is not None:
            logged[line["team"]] = logged.get(line["team"], 0) + cny_to_units(line["cost_cny"])
    assert {t: v for t, v in logged.items() if v} == {t: v for t, v in spent.items() if v}
    if upstream is not None:
        charged = sum(e.charged_images for e in entries)  # captured, plus corrections
        assert charged == upstream.sim.served_images(), (charged, upstream.sim.served)


class SettledReads:
    def __init__(self, app: web.Application) -> None:
        self._app = app

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._app[DB], name)
        if not inspect.iscoroutinefunction(attribute):
            return attribute

        async def call(*args: Any, **kwargs: Any) -> Any:
            await self._app[GENERATIONS].settled()
            return await attribute(*args, **kwargs)

        return call


def base_config(tmp_path: Path, upstream_url: str) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": 0, "drain_s": 5},
        "upstream": {"base_url": upstream_url, "api_key_env": "TEST_UPSTREAM_KEY", "timeout_s": 10},
        "storage": {"database": "gateway.db"},
        "log": {"access": "access.log"},
        "teams": {
            "design": {"keys_sha256": [key_digest(TEAM_KEYS["design"])], "budget_cny": 100.0},
            "ops": {
                "keys_sha256": [key_digest(TEAM_KEYS["ops"])],
                "budget_cny": 100.0,
                "period": "daily",
            },
        },
        "admin": {"keys_sha256": [key_digest(ADMIN_KEY)]},
    }


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def build_settings(
    tmp_path: Path, upstream_url: str, env: dict[str, str] | None = None, **overrides: Any
) -> Settings:
    data = merge(base_config(tmp_path, upstream_url), overrides)
    # The in-process gateways' short-idle upstreams close after 1 s (production's after 60 s or
    # more): the POST reuse window scaled with them, well under it as the 2 s default is under
    # 60 s. Not in base_config: the config files it writes are read by the previous release too.
    data["upstream"].setdefault("reuse_idle_s", 0.5)
    if data["storage"].get("backend") == "postgres":
        data["storage"].pop("database", None)  # the SQLite default of base_config
    if "upstreams" in overrides:
        data.pop("upstream")  # [upstreams.NAME] tables replace base_config's [upstream]
    return parse_settings(
        data, base_dir=tmp_path, env={"TEST_UPSTREAM_KEY": UPSTREAM_KEY, **(env or {})}
    )


REAL_ENGINES = ("sqlite", "postgres")
PG_URL_ENV = "TEST_DATABASE_URL"
SETTLE_AT_TEARDOWN_S = 60


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """The storage engines an in-process gateway test runs on (its ``backend``): both real
    ones unless the test or its module says ``@pytest.mark.engines(...)``; ``sqlite_only``
    tests reach into the SQLite file itself, ``postgres_only`` ones run a fleet on one
    database."""
    if "backend" not in metafunc.fixturenames:
        return
    chosen = metafunc.definition.get_closest_marker("engines")
    engines = chosen.args if chosen is not None else REAL_ENGINES
    if metafunc.definition.get_closest_marker("sqlite_only"):
        engines = ("sqlite",)
    if metafunc.definition.get_closest_marker("postgres_only"):
        engines = ("postgres",)
    metafunc.parametrize("backend", engines)


@pytest.fixture
async def upstream(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> Upstream:
    sim = Simulator(UPSTREAM_KEY, task_delay_s=3600)  # tasks finish when a test says so
    faults = FaultPlan()
    server = await aiohttp_server(sim.app(middlewares=[faults.middleware]))
    return Upstream(sim, faults, str(server.make_url("")).rstrip("/"))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


UPSTREAM_KEYS = {  # the fake upstream processes' own central keys (tests/test_upstreams.py)
    "primary": "sk_test_primary_upstream_key_0123456",
    "backup": "sk_test_backup_upstream_key_6543210",
    "third": "sk_test_third_upstream_key_9876543210",
}
SECRETS = (
    UPSTREAM_KEY, *TEAM_KEYS.values(), *NAMED_KEYS.values(), ADMIN_KEY,
    *NAMED_ADMIN_KEYS.values(), *UPSTREAM_KEYS.values(),
)  # fmt: skip
CLIENT_LOGGERS = ("httpx", "httpcore", "openai")


# What no console page, cookie or log line may hold besides the keys: a key's whole SHA-256 (a
# weak key could be guessed from it), base64 image data, and any piece of a result URL.
DIGESTS = tuple(key_digest(secret) for secret in SECRETS)
RESULT_URL_PARTS = ("base64,", "/v1/images/files/", "/objects/")


def secret_guard(
    leaks: list[str], console: list[tuple[str, str]] | None = None
) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Outermost middleware of every test gateway: notes any key found in a response (its
    headers, cookies and body), and keeps the console's answers for the checks at teardown."""

    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        response = await handler(request)
        body = response.body if isinstance(response, web.Response) else b""
        text = (
            str(response.headers)
            + response.cookies.output()
            + (body.decode("latin-1") if isinstance(body, bytes) else "")
        )
        leaks.extend(f"{request.path}: {secret[:8]}..." for secret in SECRETS if secret in text)
        if console is not None and request.path.startswith("/console"):
            console.append((request.path, text))
        return response

    return guard


def console_leaks(pages: list[tuple[str, str]], upstream_ids: set[str]) -> list[str]:
    """Every console answer that holds a key's digest, image data or a result URL (of any team:
    the upstream's ids are in each of its result URLs)."""
    needles = (*DIGESTS, *RESULT_URL_PARTS, *upstream_ids)
    return [
        f"{path}: {needle[:8]}..." for path, text in pages for needle in needles if needle in text
    ]


@pytest.fixture
async def start_gateway(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    upstream: Upstream,
    tmp_path: Path,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
    backend: str,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Callable[..., Awaitable[Gateway]]]:
    """Start a gateway (config overrides as keyword tables) in front of the fake upstream.

    The first gateway finds a ledger already migrated (a copy of the session's: see
    tests/ledgers.py) where the fixture chooses the ledger (the default SQLite file, the test's
    PostgreSQL database); a test marked ``new_ledger`` starts with none, as a first start does.

    At teardown every response, access-log line and diagnostic log record of the test is
    checked for keys and (in logs) base64 data: none may appear.
    """
    started: list[Gateway] = []
    leaks: list[str] = []
    console: list[tuple[str, str]] = []
    stack = contextlib.AsyncExitStack()
    env: dict[str, str] = {}
    new_ledger = wants_new_ledger(request)
    if backend == "postgres":  # one database for the test, shared by its gateways
        server = request.getfixturevalue("postgres_server")
        template = None if new_ledger else request.getfixturevalue("postgres_template")
        env[PG_URL_ENV] = await stack.enter_async_context(fresh_database(server, template))
    sqlite_ledger: Path | None = None  # the session's migrated file, to copy
    if backend == "sqlite" and not new_ledger:
        sqlite_ledger = request.getfixturevalue("sqlite_template")
    in_memory: dict[Path, MemoryDatabase] = {}  # by file: a gateway restarted finds its ledger

    async def open_in_memory(settings: Settings, *, instance: str | None = None) -> Store:
        database = in_memory.setdefault(settings.database, MemoryDatabase())
        return Store(MemoryEngine(database))

    async def start(*, with_clock: Callable[[], Any] | None = None, **overrides: Any) -> Gateway:
        running = sum(1 for g in started if not g.server.closed)
        if backend == "postgres" and "storage" not in overrides:
            overrides["storage"] = {"backend": "postgres", "dsn_env": PG_URL_ENV}
        elif running and "storage" not in overrides:  # one gateway process per SQLite file
            overrides["storage"] = {"database": f"gateway-{len(started)}.db"}
        settings = build_settings(tmp_path, upstream.url, env, **overrides)
        if (
            sqlite_ledger is not None
            and not started
            and "storage" not in overrides  # the fixture's file, not one the test chose
            and not settings.database.exists()
        ):
            migrated_sqlite(sqlite_ledger, settings.database)
        config = merge(base_config(tmp_path, upstream.url), overrides)
        if backend == "postgres":
            config["storage"].pop("database", None)
        if "upstreams" in overrides:
            config.pop("upstream")
        store = open_in_memory if backend == "memory" else open_store
        app = create_app(settings, clock=with_clock or clock, store=store)
        app.middlewares.insert(0, secret_guard(leaks, console))
        server = await aiohttp_server(app)
        gateway = Gateway(
            str(server.make_url("")).rstrip("/"),
            app,
            server,
            settings,
            clock,
            tmp_path / "access.log",
            config=config,
            env=dict(env),
            siblings=started,
        )
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:  # whatever a test did, the books it leaves behind balance
        if not gateway.server.closed and not gateway.app[DB].closed:
            # bounded: a test that failed with its storage broken must not hang the suite
            await asyncio.wait_for(gateway.settled(), SETTLE_AT_TEARDOWN_S)
            assert (await gateway.app[DB].verify()).mismatches == ()
    for gateway in started:
        for client in gateway.clients:
            if isinstance(client, AsyncOpenAI):
                await client.close()
            else:
                client.close()
    assert leaks == [], leaks
    logs = gateway_log_text(caplog) + "".join(
        g.access_log.read_text() for g in started if g.access_log.exists()
    )
    for needle in (*SECRETS, *DIGESTS, "base64,"):
        assert needle not in logs, f"{needle[:8]}... found in a log"
    # Upstream ids whole (with the date and count they rebuild a result URL) are never logged.
    upstream_ids = {*(served.id for served in upstream.sim.served), *upstream.sim.tasks}
    for upstream_id in upstream_ids:
        assert upstream_id not in logs, f"upstream id {upstream_id[:8]}... found in a log"
    assert console_leaks(console, upstream_ids) == []
    for gateway in started:  # the database is dropped after its gateways have closed it
        if not gateway.server.closed:
            await gateway.server.close()
    await stack.aclose()


def gateway_log_text(caplog: pytest.LogCaptureFixture) -> str:
    """Every diagnostic record of the test so far, in all phases (``caplog.text`` alone is
    only the current phase's). Left out: aiohttp's access logger (the gateway turns it off
    when it serves; in tests it is also the fake upstream's) and the test clients' own loggers
    (what a team's SDK logs on its side is the team's business)."""
    records = [*caplog.get_records("setup"), *caplog.get_records("call"), *caplog.records]
    return "\n".join(
        caplog.handler.format(r)
        for r in records
        if r.name != "aiohttp.access" and not r.name.startswith(CLIENT_LOGGERS)
    )


@pytest.fixture
async def gateway(start_gateway: Callable[..., Awaitable[Gateway]]) -> Gateway:
    return await start_gateway()


PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00\x90wS"
    b"\xde\x00\x00\x00\x0cIDATx\x9cc\xf8\xcf\xc0\x00\x00\x03\x01\x01\x00\xc9\xfe\x92\xef\x00\x00"
    b"\x00\x00IEND\xaeB`\x82"
)
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + b"\x00" * 16
WEBP = b"RIFF\x24\x00\x00\x00WEBPVP8 " + b"\x00" * 24
GIF = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"
