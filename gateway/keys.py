"""Typed keys for what the app holds; each resource is set by the cleanup context that owns it."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from aiohttp import web

from gateway.accesslog import AccessLog
from gateway.db import Database
from gateway.generation import Generations
from gateway.idempotency import Idempotency
from gateway.limits import TeamLimiter
from gateway.live import LiveConfig
from gateway.metrics import Metrics
from gateway.tasks import TaskTracker
from gateway.upstream import UpstreamClient

CONFIG = web.AppKey("config", LiveConfig)
CLOCK = web.AppKey("clock", Callable[[], datetime])
METRICS = web.AppKey("metrics", Metrics)
LIMITER = web.AppKey("limiter", TeamLimiter)
ACCESS_LOG = web.AppKey("access_log", AccessLog)
DB = web.AppKey("db", Database)
UPSTREAM = web.AppKey("upstream", UpstreamClient)
TASKS = web.AppKey("tasks", TaskTracker)
GENERATIONS = web.AppKey("generations", Generations)
IDEMPOTENCY = web.AppKey("idempotency", Idempotency)

RECORD = web.RequestKey("record", dict[str, Any])
LEDGER_ID = web.RequestKey("ledger_id", str)
