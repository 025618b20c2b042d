"""Opening the configured store: for the gateway itself, or for a tool beside it."""

from __future__ import annotations

from typing import Literal

from gateway.core.config import Settings
from gateway.store.engine import Engine
from gateway.store.manager import Store

Role = Literal["gateway", "reader", "writer"]


async def open_store(
    settings: Settings, role: Role = "gateway", *, instance: str | None = None
) -> Store:
    """``gateway``: migrated, registered (PostgreSQL, as ``instance``) or locked (SQLite).
    ``reader`` and ``writer`` are for tools: they never migrate, and a SQLite reader never
    writes."""
    return Store(await open_engine(settings, role, instance=instance))


async def open_engine(
    settings: Settings, role: Role = "gateway", *, instance: str | None = None
) -> Engine:
    # Each engine is imported when it is used: a command on SQLite never loads asyncpg.
    storage = settings.storage
    if storage.backend == "postgres":
        from gateway.store.postgres import PostgresEngine  # noqa: PLC0415

        assert storage.dsn is not None, "validated by the config"
        return await PostgresEngine.open(
            storage.dsn.reveal(),
            migrate=role == "gateway",
            register=role == "gateway",
            lease_s=storage.instance_lease_s,
            name=instance,
        )
    from gateway.store.sqlite import SQLiteEngine  # noqa: PLC0415

    if role == "reader":
        return await SQLiteEngine.open_read_only(settings.database)
    if role == "writer":
        return await SQLiteEngine.open(settings.database, exclusive=False, migrate=False)
    return await SQLiteEngine.open(settings.database)
