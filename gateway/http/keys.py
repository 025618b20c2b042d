"""Typed keys for what the app holds; each resource is set by the cleanup context that owns it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol

from aiohttp import web

from gateway.core.config import Settings
from gateway.core.live import LiveConfig
from gateway.http.admission import ByteBudget
from gateway.ops.accesslog import AccessLog
from gateway.ops.metrics import Metrics
from gateway.services.books import Books, LogSlot
from gateway.services.durable import Durable
from gateway.services.generation import Generations
from gateway.services.idempotency import Idempotency
from gateway.services.results import Results
from gateway.services.reuse import Reuse
from gateway.services.routing import Routing
from gateway.services.storage_watch import StorageWatch
from gateway.services.tasks import TaskTracker
from gateway.store.manager import Store
from gateway.upstream.downloader import Downloader

CONFIG = web.AppKey("config", LiveConfig)
CLOCK = web.AppKey[Callable[[], datetime]]("clock")
METRICS = web.AppKey("metrics", Metrics)
ACCESS_LOG = web.AppKey("access_log", AccessLog)
BOOKS = web.AppKey("books", Books)
DB = web.AppKey("db", Store)
ROUTING = web.AppKey("routing", Routing)  # every upstream: routing, failover, health


class OpenStore(Protocol):
    """How the app opens its ledger at start (``store.factory.open_store``)."""

    async def __call__(self, settings: Settings, *, instance: str | None = None) -> Store: ...


OPEN_STORE = web.AppKey[OpenStore]("open_store")
DOWNLOADER = web.AppKey("downloader", Downloader)
TASKS = web.AppKey("tasks", TaskTracker)
GENERATIONS = web.AppKey("generations", Generations)
IDEMPOTENCY = web.AppKey("idempotency", Idempotency)
DURABLE = web.AppKey("durable", Durable)
RESULTS = web.AppKey("results", Results)  # the store of paid result images
REUSE = web.AppKey("reuse", Reuse)  # the opt-in cache
BODIES = web.AppKey("bodies", ByteBudget)
SIMULATED = web.AppKey("simulated", bool)  # the upstream is the embedded simulator
ACCEPT_RESTORED = web.AppKey("accept_restored", bool)  # serve --accept-restored-ledger
WATCH = web.AppKey("storage_watch", StorageWatch)
INSTANCE = web.AppKey("instance", str)  # this instance's name: X-Gateway-Instance, the log

RECORD = web.RequestKey("record", dict[str, Any])
SLOT = web.RequestKey("slot", LogSlot)
SETTLING = web.RequestKey("settling", asyncio.Task[None])
LEDGER_ID = web.RequestKey("ledger_id", str)
