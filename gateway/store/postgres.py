"""The PostgreSQL engine: one shared ledger for a fleet of gateway instances.

- The reservation is one statement: inserting the hold fires a trigger whose conditional
  ``UPDATE usage ... WHERE spent + reserved + uncertain + amount <= budget`` takes the team's
  row lock and moves the money, committed before the upstream is called. Under READ
  COMMITTED a waiting UPDATE re-checks its condition on the row as committed, so no spread of
  a burst over instances can overspend. A capped key's row is checked in the same statement.
- Instances heartbeat. The holds of one silent for ``instance_lease_s`` become uncertain (by
  whichever instance notices first); a live instance's holds are never touched, so start-up
  does not recover anything by itself.
- Limits, in-flight Idempotency-Key claims and the task poll cache are rows every instance
  sees; the settler claims due tasks with ``FOR UPDATE SKIP LOCKED``.
- Migrations run at start under an advisory lock, one transaction each, so several instances
  may start at once.
- The statements are in ``sql/postgres/queries.sql``. A script of the store runs on one pooled
  connection, inside one transaction when it is atomic (else each statement commits alone: a
  reservation is one round trip).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import cache, partial
from typing import Any, TypeVar

import asyncpg

from gateway.core.errors import StorageUnavailable
from gateway.store import common, migrations, queries
from gateway.store.base import Refused, Verification
from gateway.store.common import verification
from gateway.store.engine import Script, Step, count, drive, only
from gateway.store.errors import PostgresOpenError

T = TypeVar("T")
log = logging.getLogger("gateway.store")

MIGRATION_LOCK = 0x1A6E_6A7E  # pg_advisory_lock key: one migrating instance at a time
CONNECT_TIMEOUT_S = 10.0
COMMAND_TIMEOUT_S = 30.0
DEFAULT_LEASE_S = 30.0
UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    # A session the server terminated can leave asyncpg's protocol stuck mid-operation
    # ("cannot switch to state ..."), MagicStack/asyncpg#1069: a dead connection, not a bug here.
    asyncpg.InternalClientError,
)


# SQLSTATE classes meaning "the database cannot be used now", not "this statement is wrong":
# connection exception, insufficient resources (disk full, too many connections), operator
# intervention (shutdown), system error (I/O), object not in prerequisite state (connections
# disallowed).
UNAVAILABLE_CLASSES = frozenset({"08", "53", "57", "58", "55"})


class PostgresEngine:
    """Open with ``await PostgresEngine.open(dsn)``; see the module docstring."""

    shared = True

    def __init__(self, pool: asyncpg.Pool, instance_id: str, lease_s: float) -> None:
        self._pool = pool
        self.instance_id = instance_id
        self.lease_s = lease_s
        self.created = False
        self.closed = False
        self.failures = 0  # times the database could not be used, ever
        self._sql = _queries()

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        migrate: bool = True,
        register: bool = True,
        lease_s: float = DEFAULT_LEASE_S,
        max_connections: int = 20,
        name: str | None = None,
    ) -> PostgresEngine:
        """Connect, migrate (unless a tool), and register this instance in the fleet (its id
        starts with ``name``, the instance's name in the access log, when given)."""
        # min_size 0: a pool with a floor restores it in the background while the database is
        # away, logging a warning with a traceback at every try (asyncpg >= 0.31). Connections
        # are made as requests need them; the first one, here, proves the database is there.
        pool = asyncpg.create_pool(
            dsn,
            min_size=0,
            max_size=max_connections,
            timeout=CONNECT_TIMEOUT_S,
            command_timeout=COMMAND_TIMEOUT_S,
            server_settings={"application_name": "image-gateway"},
            reset=_leaves_no_session_state,
        )
        try:
            await pool
            conn = await pool.acquire()
        except BaseException as exc:
            with contextlib.suppress(asyncpg.InterfaceError):  # a pool that never initialized
                await pool.close()
            if isinstance(exc, (*UNAVAILABLE, asyncpg.PostgresError)):
                raise PostgresOpenError(f"cannot connect to PostgreSQL: {_why(exc)}") from None
            if isinstance(exc, ValueError | OverflowError):  # it may quote the URL: not repeated
                raise PostgresOpenError(
                    "the PostgreSQL URL is malformed (asyncpg cannot parse it)"
                ) from None
            raise
        try:
            try:
                was = await _migrate(conn, migrate=migrate)
            except asyncpg.PostgresError as exc:  # e.g. a role without CREATE
                raise PostgresOpenError(
                    f"cannot prepare the PostgreSQL database: {_why(exc)}"
                ) from None
            finally:
                await pool.release(conn)
            instance_id = f"{name or socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
            engine = cls(pool, instance_id, lease_s)
            engine.created = was == 0 and migrate
            if register:
                await engine.write(only(common.heartbeat(instance_id, lease_s, lost=False)))
        except BaseException:
            await pool.close()
            raise
        return engine

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(StorageUnavailable):  # else the others find it silent
            await self.write(only(count("deregister", instance_id=self.instance_id)))
        try:
            await asyncio.wait_for(self._pool.close(), 10)
        except TimeoutError:
            self._pool.terminate()

    async def check_ready(self) -> None:
        """Nothing of its own: the store's heartbeat, a write, proves it."""

    async def read(self, script: Script[T]) -> T:
        return await self.write(script)

    async def write(self, script: Script[T], *, atomic: bool = False, defer: bool = False) -> T:
        async with self._connection() as conn:
            execute = partial(self._step, conn)
            if not atomic:
                return await drive(script, execute)
            async with conn.transaction():
                return await drive(script, execute)

    # -- plumbing ----------------------------------------------------------------------------

    async def _step(self, conn: asyncpg.Connection, step: Step) -> Any:
        query = self._sql[step.query]
        args = [step.params[name] for name in query.names]
        try:
            if step.want == "one":
                return await conn.fetchrow(query.sql, *args)
            if step.want == "all":
                return await conn.fetch(query.sql, *args)
            status = await conn.execute(query.sql, *args)  # e.g. "INSERT 0 1", "UPDATE 3"
        except (asyncpg.IntegrityConstraintViolationError, asyncpg.RaiseError) as exc:
            raise Refused(str(exc)) from exc  # the message only: a DETAIL may name whole ids
        return int(status.rsplit(" ", 1)[-1])

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection; the database being unreachable is StorageUnavailable, whether
        on connecting (any failure) or during a statement (the server's connection, resource
        and shutdown error classes)."""
        try:
            conn = await self._pool.acquire(timeout=CONNECT_TIMEOUT_S)
        except (*UNAVAILABLE, asyncpg.PostgresError) as exc:
            raise self._unavailable(exc) from None
        try:
            yield conn
        except asyncpg.InternalClientError as exc:
            _discard(conn)  # stuck mid-protocol: the pool's (no-op) reset would not notice
            raise self._unavailable(exc) from None
        except UNAVAILABLE as exc:
            raise self._unavailable(exc) from None
        except asyncpg.PostgresError as exc:
            if str(getattr(exc, "sqlstate", "") or "")[:2] in UNAVAILABLE_CLASSES:
                raise self._unavailable(exc) from None
            raise
        finally:
            # Release waits for a timed-out statement's cancellation to reach the server (so
            # it cannot commit after the caller moved on) and drops a closed connection.
            try:
                await self._pool.release(conn)
            except (*UNAVAILABLE, asyncpg.PostgresError) as exc:
                raise self._unavailable(exc) from None

    def _unavailable(self, exc: BaseException) -> StorageUnavailable:
        self.failures += 1  # this instance was cut off: its view of the fleet starts again
        return _unavailable(exc)

    async def _execute(self, sql: str, *args: Any) -> str:
        """For tests and tools: one statement of their own."""
        async with self._connection() as conn:
            return str(await conn.execute(sql, *args))

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """For tests and tools: the rows of a statement of their own."""
        async with self._connection() as conn:
            return list(await conn.fetch(sql, *args))

    async def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """For tests and tools: ``?`` placeholders, as on SQLite, and rows as tuples."""
        parts = sql.split("?")
        numbered = parts[0] + "".join(f"${i}{part}" for i, part in enumerate(parts[1:], 1))
        return [tuple(row) for row in await self._fetch(numbered, *params)]


@cache
def _queries() -> dict[str, queries.Query]:
    return {name: queries.numbered(sql) for name, sql in queries.load("postgres").items()}


def _discard(conn: asyncpg.Connection) -> None:
    """Never hand this connection out again. Only for a stuck protocol: terminating a
    connection whose statement timed out would cancel asyncpg's pending cancel request, and
    the statement could still commit. One asyncpg already detached says so (InterfaceError)."""
    with contextlib.suppress(asyncpg.InterfaceError):
        conn.terminate()


async def _leaves_no_session_state(conn: asyncpg.Connection) -> None:
    """The pool's reset of a released connection, after asyncpg's own rollback of any open
    transaction (which always runs first): nothing more.

    asyncpg's default would send ``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL`` on every release: one more round trip and transaction per statement, twice per
    request (reservation and settlement). This store leaves no session state to undo: settings
    are ``SET LOCAL``, cursors live inside transactions, nothing LISTENs, and the one
    session-level advisory lock (migrations) is released in a ``finally`` on a connection
    whose pool is closed if that fails. That query also probed the connection: one left stuck
    mid-protocol is now terminated by ``_connection`` instead, so it is never handed out again.
    """


async def verify_on(conn: asyncpg.Connection) -> Verification:
    """Every counter against its entries, on this connection (and in its transaction)."""
    return verification(await conn.fetch(_queries()["verify"].sql))


# -- migrations ------------------------------------------------------------------------------


async def _migrate(conn: asyncpg.Connection, *, migrate: bool) -> int:
    """Migrate to this code's schema under the advisory lock; the step it was at."""
    steps, sql = migrations.load("postgres"), _queries()
    await conn.execute(sql["lock_migrations"].sql, MIGRATION_LOCK)
    try:
        current = was = await _schema_state(conn)
        if not migrate:
            migrations.require_current(current, steps, where="the PostgreSQL database")
            return was.step
        for step in migrations.pending(current, steps, where="the PostgreSQL database"):
            records = migrations.records_after(step, steps, current)
            async with conn.transaction():
                await conn.execute(step.sql)
                await conn.executemany(sql["set_meta"].sql, list(records.items()))
            current = migrations.state_of(records)
            log.info("database migrated to schema step %d (%s)", step.version, step.name)
    finally:
        await conn.execute(sql["unlock_migrations"].sql, MIGRATION_LOCK)
    return was.step


async def _schema_state(conn: asyncpg.Connection) -> migrations.SchemaState:
    sql = _queries()
    if not await conn.fetchval(sql["has_meta"].sql):
        if await conn.fetchval(sql["public_tables"].sql):
            raise PostgresOpenError(
                "the PostgreSQL database has tables but is not an image-gateway database"
            )
        return migrations.SchemaState(0, 0)
    rows = await conn.fetch(sql["schema_meta"].sql)
    return migrations.state_of({row["key"]: row["value"] for row in rows})


def _unavailable(exc: BaseException) -> StorageUnavailable:
    log.error("PostgreSQL cannot be used: %s", _why(exc))
    return StorageUnavailable(
        "The gateway's database cannot be reached right now; nothing was sent or charged. "
        "An administrator must bring PostgreSQL back."
    )


def _why(exc: BaseException) -> str:
    """What went wrong, without the DSN (which may hold a password)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc) or type(exc).__name__
    return text if "postgres://" not in text and "postgresql://" not in text else type(exc).__name__
