"""Ledgers for tests: none at all, as a first start finds it, or one already at this code's schema.

Migrating a new ledger through every step costs about 15 ms of CPU on SQLite and 35 ms on
PostgreSQL (server and client), and most tests only need a working ledger. So once per session
(per xdist worker) one ledger per engine is migrated by the gateway's own code, on the path a
gateway's start takes (``SQLiteEngine.open``, ``PostgresEngine.open``), and such tests get a
copy of it: the closed SQLite file copied (closed, it has no ``-wal``), a PostgreSQL database
made with ``CREATE DATABASE ... TEMPLATE``. A migration change still runs in every session, and
the copies are exactly what it made.

Which one a test gets:

- ``start_gateway`` (tests/conftest.py): its first gateway starts on a copy, on the fixture's
  own ledger (the default SQLite file, or the test's PostgreSQL database), unless the test or
  its module is marked ``new_ledger``: then there is no ledger until the gateway makes one, as
  at a first start (the NEW LEDGER warning, the migration log, a file that did not exist).
- ``postgres_dsn``: an empty database. ``migrated_postgres_dsn``: a copy.
- ``migrated_sqlite(template, path)``: a copy at ``path``; ``migrated_store(engine, ...)``: a
  ``Store`` on a copy (or in memory), for the store's own contract tests.

Anything that tests creating, migrating, upgrading, refusing a schema, restoring, copying a
database or the previous release must start from nothing: mark it ``new_ledger`` or use
``postgres_dsn`` and a path of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from gateway.store.manager import Store
from gateway.store.memory import MemoryEngine
from gateway.store.postgres import PostgresEngine
from gateway.store.sqlite import SQLiteEngine
from tests.postgres import (
    CONNECT_TIMEOUT,
    PostgresServer,
    create_database,
    drop_database,
    fresh_database,
    quote_ident,
)

T = TypeVar("T")
NEW_LEDGER = "new_ledger"  # the marker


def wants_new_ledger(request: pytest.FixtureRequest) -> bool:
    return request.node.get_closest_marker(NEW_LEDGER) is not None


def _apart(work: Coroutine[Any, Any, T]) -> T:
    """``work`` run to its end on an event loop of its own, in a thread: a session fixture is
    synchronous, and the test that first asks for it may be inside its own loop already.

    Its INFO lines (each migration step) are left out: they would land in the logs of
    whichever test happened to ask first."""
    logger = logging.getLogger("gateway.store")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, work).result()
    finally:
        logger.setLevel(level)


# -- SQLite ----------------------------------------------------------------------------------


async def _migrate_sqlite(path: Path) -> None:
    engine = await SQLiteEngine.open(path)  # what a gateway's first start runs
    await engine.close()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A closed SQLite ledger migrated once per session, read-only: copy it, never open it."""
    path = tmp_path_factory.mktemp("template") / "ledger.db"
    _apart(_migrate_sqlite(path))
    leftovers = [p.name for p in path.parent.iterdir() if p != path]
    assert leftovers == [], f"closing the template left {leftovers}: not a whole file"
    path.chmod(0o444)
    return path


def migrated_sqlite(template: Path, path: Path) -> Path:
    """A copy of ``template`` at ``path`` (which must not exist: a ledger is never replaced)."""
    if path.exists():
        raise FileExistsError(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, path)
    path.chmod(0o640)  # as the gateway makes its file
    return path


# -- PostgreSQL ------------------------------------------------------------------------------


async def _make_postgres_template(server: PostgresServer, name: str) -> None:
    dsn = await create_database(server.dsn, name)
    engine = await PostgresEngine.open(dsn, register=False)  # migrates, as a start does
    await engine.close()
    conn = await asyncpg.connect(server.dsn, timeout=CONNECT_TIMEOUT)
    try:  # no one may change it after this: a test that connects to it fails
        await conn.execute(
            f"ALTER DATABASE {quote_ident(name)} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false"
        )
    finally:
        await conn.close()


async def _drop_postgres_template(server: PostgresServer, name: str) -> None:
    """Drop it, made or half made (a template must be unmarked first)."""
    conn = await asyncpg.connect(server.dsn, timeout=CONNECT_TIMEOUT)
    try:
        if await conn.fetchval("SELECT datistemplate FROM pg_database WHERE datname = $1", name):
            await conn.execute(f"ALTER DATABASE {quote_ident(name)} WITH IS_TEMPLATE false")
    finally:
        await conn.close()
    await drop_database(server.dsn, name)


@pytest.fixture(scope="session")
def postgres_template(postgres_server: PostgresServer) -> Iterator[str]:
    """The name of a database on the session's server migrated once per session, which no one
    may connect to: ``CREATE DATABASE ... TEMPLATE`` it."""
    name = f"template_{os.getpid()}_{secrets.token_hex(4)}"
    try:
        _apart(_make_postgres_template(postgres_server, name))
        yield name
    finally:
        _apart(_drop_postgres_template(postgres_server, name))


@pytest.fixture
async def migrated_postgres_dsn(
    postgres_server: PostgresServer, postgres_template: str
) -> AsyncIterator[str]:
    """A fresh database at this code's schema (a copy of the session's template), dropped
    after the test."""
    async with fresh_database(postgres_server, template=postgres_template) as dsn:
        yield dsn


# -- either ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def migrated_store(
    engine: str, request: pytest.FixtureRequest, path: Path
) -> AsyncIterator[Store]:
    """A ``Store`` on ``engine`` ("memory", "sqlite" or "postgres") whose ledger is at this
    code's schema (SQLite: a copy at ``path``; PostgreSQL: a database of the session's server),
    opened as a gateway opens it (the open still checks the schema, and finds nothing to do);
    closed afterwards (if the test has not), its database dropped."""
    async with contextlib.AsyncExitStack() as stack:
        if engine == "memory":
            store = Store(MemoryEngine())
        elif engine == "sqlite":
            migrated_sqlite(request.getfixturevalue("sqlite_template"), path)
            store = Store(await SQLiteEngine.open(path))
        else:
            server = request.getfixturevalue("postgres_server")
            template = request.getfixturevalue("postgres_template")
            dsn = await stack.enter_async_context(fresh_database(server, template))
            store = Store(await PostgresEngine.open(dsn))
        try:
            yield store
        finally:
            if not store.closed:
                await store.close()
