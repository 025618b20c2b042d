"""The app factory: validated settings in, a complete aiohttp application out.

Nothing here does I/O until the app starts: each long-lived resource (access log, database,
upstream session, background settler) is opened and closed by its own cleanup context.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from datetime import datetime

from aiohttp import web

from gateway import handlers
from gateway.accesslog import AccessLog
from gateway.config import Settings
from gateway.db import Database
from gateway.errors import NotFound
from gateway.generation import Generations
from gateway.idempotency import Idempotency
from gateway.keys import (
    ACCESS_LOG,
    CLOCK,
    CONFIG,
    DB,
    GENERATIONS,
    IDEMPOTENCY,
    LIMITER,
    METRICS,
    RECORD,
    TASKS,
    UPSTREAM,
)
from gateway.limits import TeamLimiter
from gateway.live import LiveConfig
from gateway.metrics import CONTENT_TYPE, Metrics
from gateway.middleware import gateway_middleware
from gateway.money import units_to_cny
from gateway.periods import period_at, utc_now
from gateway.pricing import remaining
from gateway.tasks import TaskTracker
from gateway.upstream import UpstreamClient

log = logging.getLogger("gateway")

PURGE_EVERY_S = 3600.0


def create_app(settings: Settings, *, clock: Callable[[], datetime] = utc_now) -> web.Application:
    app = web.Application(
        middlewares=[gateway_middleware], client_max_size=settings.server.max_body_bytes
    )
    app[CONFIG] = LiveConfig(settings)
    app[CLOCK] = clock
    app[METRICS] = Metrics()
    app[LIMITER] = TeamLimiter(lambda: clock().timestamp())
    app.cleanup_ctx.extend([_access_log_ctx, _database_ctx, _upstream_ctx, _services_ctx])
    app.on_shutdown.append(_begin_drain)
    for prefix in ("/v1", ""):
        app.router.add_post(f"{prefix}/images/generations", handlers.create_image)
        app.router.add_post(f"{prefix}/images/edits", handlers.create_image)
        app.router.add_get(f"{prefix}/images/tasks/{{task_id}}", handlers.get_task)
        app.router.add_get(f"{prefix}/models", handlers.list_models)
    app.router.add_get("/v1/images/files/{path:.+}", handlers.result_file)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    app.router.add_get("/admin/usage", handlers.admin_usage)
    if settings.metrics.enabled and settings.metrics.port == 0:
        app.router.add_get("/metrics", metrics_handler)
    return app


def create_metrics_app(main: web.Application) -> web.Application:
    """A separate listener for ``/metrics`` ([metrics] port), sharing the main app's registry."""
    metrics_app = web.Application(middlewares=[gateway_middleware])
    for key in (CONFIG, CLOCK, METRICS, ACCESS_LOG, DB):
        metrics_app[key] = main[key]
    metrics_app.router.add_get("/metrics", metrics_handler)
    return metrics_app


async def metrics_handler(request: web.Request) -> web.Response:
    request[RECORD]["endpoint"] = "metrics"
    snapshot = request.app[CONFIG].current
    if not snapshot.settings.metrics.enabled:
        raise NotFound("Metrics are disabled.")
    if snapshot.settings.metrics.require_admin:
        handlers.require_admin(request, snapshot)
    await _refresh_budgets(request.app)
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE})


async def _refresh_budgets(app: web.Application) -> None:
    """Budget remaining per team, read when scraped rather than kept up to date per request."""
    settings = app[CONFIG].current.settings
    now = app[CLOCK]()
    gauge = app[METRICS].budget_remaining
    for team in settings.teams.values():
        period = period_at(team.period, now, settings.server.tz)
        usage = await app[DB].usage(team.name, period.key)
        gauge.labels(team.name).set(units_to_cny(remaining(team, usage)))


async def _access_log_ctx(app: web.Application) -> AsyncIterator[None]:
    access_log = AccessLog(app[CONFIG].current.settings.log.access)
    app[ACCESS_LOG] = access_log
    yield
    access_log.close()


async def _database_ctx(app: web.Application) -> AsyncIterator[None]:
    db = await Database.open(app[CONFIG].current.settings.database)
    recovered = await db.recover_in_flight(app[CLOCK]().timestamp())
    if recovered:
        log.warning(
            "%d request(s) were in flight when the gateway last stopped: their holds are now "
            "uncertain (kept, never released)",
            recovered,
        )
    app[DB] = db
    yield
    await db.close()


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG].current.settings.upstream
    session = UpstreamClient.new_session(config)
    app[UPSTREAM] = UpstreamClient(config, session)
    yield
    await session.close()


async def _services_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[CONFIG].current.settings
    db, clock, metrics = app[DB], app[CLOCK], app[METRICS]
    tasks = TaskTracker(db, app[UPSTREAM], metrics, clock, settings.tasks)
    generations = Generations(db, app[UPSTREAM], tasks, metrics, clock)
    app[TASKS] = tasks
    app[GENERATIONS] = generations
    app[IDEMPOTENCY] = Idempotency(
        db, generations.is_running, clock, settings.idempotency.keep_hours
    )
    background = [
        asyncio.create_task(tasks.run_settler(), name="task settler"),
        asyncio.create_task(_purge_idempotency(app), name="idempotency purge"),
    ]
    yield
    left = await generations.drain(settings.server.drain_s)
    if left:
        log.warning("%d generation(s) did not finish within drain_s: holds kept as uncertain", left)
    for task in background:
        task.cancel()
    for task in background:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _begin_drain(app: web.Application) -> None:
    app[GENERATIONS].begin_drain()


async def _purge_idempotency(app: web.Application) -> None:
    """Forget Idempotency-Key outcomes older than keep_hours, hourly."""
    while True:
        settings = app[CONFIG].current.settings
        before = app[CLOCK]().timestamp() - settings.idempotency.keep_hours * 3600
        try:
            await app[DB].purge_idempotency(before)
        except Exception:  # retried at the next turn; the loop must not die
            log.exception("purging old Idempotency-Key outcomes failed")
        await asyncio.sleep(PURGE_EVERY_S)
