"""Opening the configured store: for the gateway itself, or for a tool beside it."""

from __future__ import annotations

from typing import Literal

from gateway.core.config import Settings
from gateway.store.base import Store
from gateway.store.postgres import PostgresStore
from gateway.store.sqlite import SQLiteStore

Role = Literal["gateway", "reader", "writer"]


async def open_store(
    settings: Settings, role: Role = "gateway", *, instance: str | None = None
) -> Store:
    """``gateway``: migrated, registered (PostgreSQL, as ``instance``) or locked (SQLite).
    ``reader`` and ``writer`` are for tools: they never migrate, and a SQLite reader never
    writes."""
    storage = settings.storage
    if storage.backend == "postgres":
        assert storage.dsn is not None, "validated by the config"
        return await PostgresStore.open(
            storage.dsn.reveal(),
            migrate=role == "gateway",
            register=role == "gateway",
            lease_s=storage.instance_lease_s,
            name=instance,
        )
    if role == "reader":
        return await SQLiteStore.open_read_only(settings.database)
    if role == "writer":
        return await SQLiteStore.open(settings.database, exclusive=False, migrate=False)
    return await SQLiteStore.open(settings.database)
