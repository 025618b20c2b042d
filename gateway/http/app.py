"""The app factory: validated settings in, a complete aiohttp application out.

Nothing here does I/O until the app starts: each long-lived resource (access log, database,
upstream session, background loops) is opened and closed by its own cleanup context.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime

from aiohttp import web

from gateway import __version__
from gateway.core.config import Settings
from gateway.core.errors import StorageUnavailable
from gateway.core.live import LiveConfig
from gateway.core.money import format_cny
from gateway.core.periods import utc_now
from gateway.http.admission import ByteBudget
from gateway.http.console import setup_console
from gateway.http.keys import (
    ACCEPT_RESTORED,
    ACCESS_LOG,
    BODIES,
    BOOKS,
    CLOCK,
    CONFIG,
    DB,
    DOWNLOADER,
    DURABLE,
    GENERATIONS,
    IDEMPOTENCY,
    INSTANCE,
    METRICS,
    OPEN_STORE,
    RESULTS,
    REUSE,
    ROUTING,
    SIMULATED,
    TASKS,
    WATCH,
    OpenStore,
)
from gateway.http.middleware import gateway_middleware
from gateway.http.release import release_gate
from gateway.http.routes import add_metrics_routes, add_routes
from gateway.ops.accesslog import AccessLog
from gateway.ops.metrics import Metrics
from gateway.services.books import Books, MoneyMoved
from gateway.services.durable import Durable
from gateway.services.generation import Generations
from gateway.services.idempotency import Idempotency
from gateway.services.resolutions import log_outside
from gateway.services.restores import KEEP_EVERY_S, RestoredLedger, WatermarkKeeper, check_restored
from gateway.services.results import Results, open_blobs
from gateway.services.reuse import Reuse
from gateway.services.routing import Routing
from gateway.services.storage_watch import StorageWatch
from gateway.services.tasks import TaskTracker
from gateway.store import migrations
from gateway.store.factory import open_store
from gateway.store.manager import Store
from gateway.upstream.client import HttpUpstream
from gateway.upstream.pool import UpstreamPool

log = logging.getLogger("gateway")

PURGE_EVERY_S = 3600.0
RESULTS_SWEEP_S = 60.0  # the result store's retention pass (index queries; files only if due)
LARGE_BODIES_AT_ONCE = 2  # max_body_mb-sized bodies read and checked at the same time
INSTANCE_HEADER = "X-Gateway-Instance"
NOT_IN_A_NAME = re.compile(r"[^A-Za-z0-9_.:@-]")


class StartupError(Exception):
    """The gateway cannot start; the message is one line naming what and why."""


def create_app(
    settings: Settings,
    *,
    clock: Callable[[], datetime] = utc_now,
    simulated: bool = False,
    accept_restored_ledger: bool = False,
    instance: str | None = None,
    store: OpenStore = open_store,
) -> web.Application:
    """``simulated``: ``settings.upstreams`` are embedded simulators (``/readyz`` says so).
    ``accept_restored_ledger``: start on a ledger behind the watermark, recording that.
    ``instance``: this instance's name (default: ``instance_name(settings)``).
    ``store`` opens the ledger at start (tests pass one that opens the in-memory engine)."""
    app = web.Application(
        middlewares=[gateway_middleware, release_gate],
        client_max_size=settings.server.max_body_bytes,
    )
    app[CONFIG] = LiveConfig(settings)
    app[CLOCK] = clock
    app[SIMULATED] = simulated
    app[ACCEPT_RESTORED] = accept_restored_ledger
    app[INSTANCE] = instance or instance_name(settings)
    app[OPEN_STORE] = store
    app.on_response_prepare.append(_name_instance)
    app[METRICS] = Metrics()
    app[BODIES] = ByteBudget(LARGE_BODIES_AT_ONCE * settings.server.max_body_bytes)
    app.cleanup_ctx.extend(
        [_access_log_ctx, _database_ctx, _watch_ctx, _upstream_ctx, _services_ctx]
    )
    app.on_shutdown.append(_begin_drain)
    add_routes(app, settings)
    if settings.console.enabled:
        setup_console(app)
    return app


def create_metrics_app(main: web.Application) -> web.Application:
    """A separate listener for ``/metrics`` ([metrics] port), sharing the main app's registry."""
    metrics_app = web.Application(middlewares=[gateway_middleware])
    metrics_app[CONFIG], metrics_app[CLOCK] = main[CONFIG], main[CLOCK]
    metrics_app[INSTANCE] = main[INSTANCE]
    metrics_app.on_response_prepare.append(_name_instance)
    metrics_app[METRICS], metrics_app[ACCESS_LOG] = main[METRICS], main[ACCESS_LOG]
    metrics_app[BOOKS], metrics_app[DB] = main[BOOKS], main[DB]
    metrics_app[WATCH] = main[WATCH]
    metrics_app[ROUTING] = main[ROUTING]
    add_metrics_routes(metrics_app)
    return metrics_app


def instance_name(settings: Settings, port: int | None = None) -> str:
    """``[server] instance_name``, else this host's name and the port it listens on (``port``:
    the one really bound, when ``[server] port`` is 0)."""
    if settings.server.instance_name:
        return settings.server.instance_name
    host = NOT_IN_A_NAME.sub("-", socket.gethostname()) or "localhost"
    return f"{host}:{settings.server.port if port is None else port}"


async def _name_instance(request: web.Request, response: web.StreamResponse) -> None:
    """Every response says which instance answered it (a fleet behind one address)."""
    response.headers[INSTANCE_HEADER] = request.app[INSTANCE]


async def _access_log_ctx(app: web.Application) -> AsyncIterator[None]:
    target = app[CONFIG].current.settings.log.access
    try:
        access_log = AccessLog(target, instance=app[INSTANCE])
    except OSError as exc:
        raise StartupError(f"cannot open the access log {target}: {exc.strerror}") from None
    app[ACCESS_LOG] = access_log
    app[BOOKS] = Books(access_log, app[METRICS], time.time)
    yield
    access_log.close()


async def _database_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[CONFIG].current.settings
    db = await app[OPEN_STORE](settings, instance=app[INSTANCE])
    if db.created:
        where = settings.database if settings.storage.backend == "sqlite" else "PostgreSQL"
        log.warning(
            "NEW LEDGER: no database existed at %s, so an empty one was created; every team's "
            "spend starts from zero. If this gateway ran before, stop it and restore the "
            "database: a lost ledger lets teams spend their budgets a second time.",
            where,
        )
    try:
        await _check_release(db)
        where = (
            f"at {settings.database}" if settings.storage.backend == "sqlite" else "in PostgreSQL"
        )
        if db.created:
            where += " (none existed: a new, empty one was made)"
        assert settings.storage.watermark is not None, "set by the config parser"
        await check_restored(
            db, settings.storage.watermark, accept=app[ACCEPT_RESTORED], where=where
        )
        now = app[CLOCK]().timestamp()
        recovered = await db.recover_in_flight(now)
        recovered += await db.reap_silent_instances(now, settings.storage.instance_lease_s)
    except RestoredLedger as exc:
        await db.close()
        raise StartupError(str(exc)) from None
    except BaseException:
        await db.close()
        raise
    for entry in recovered:
        app[BOOKS].moved(MoneyMoved.of_entry(entry))
    if recovered:
        log.warning(
            "%d request(s) were in flight when the gateway last stopped; their holds are now "
            "uncertain (kept, never released) until resolved with `image-gateway ledger "
            "resolve`: %s",
            len(recovered),
            ", ".join(
                f"{e.request_id} ({e.team}, {format_cny(e.settled_amount)})" for e in recovered
            ),
        )
    app[DB] = db
    yield
    await db.close()


async def _check_release(db: Store) -> None:
    state = await db.schema_state()
    if migrations.too_old(__version__, state):
        raise StartupError(
            f"upgrade required: the database serves image-gateway {state.min_release} and "
            f"newer; this is {__version__}"
        )


async def _watch_ctx(app: web.Application) -> AsyncIterator[None]:
    """The storage check behind /metrics and the release gate, and the watermark, each in a
    loop of its own; the watermark is written once more after the services drained."""
    db, settings = app[DB], app[CONFIG].current.settings
    watch = StorageWatch(db, app[METRICS], app[CONFIG], app[CLOCK], __version__)
    app[METRICS].build_info.labels(__version__, str(_schema_step(settings))).set(1)
    app[WATCH] = watch
    assert settings.storage.watermark is not None, "set by the config parser"
    keeper = WatermarkKeeper(db, settings.storage.watermark)
    loops = [
        asyncio.create_task(watch.run(), name="storage watch"),
        asyncio.create_task(
            _every(KEEP_EVERY_S, "writing the watermark", keeper.keep), name="watermark"
        ),
    ]
    yield
    for task in loops:
        task.cancel()
    for task in loops:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    try:
        await keeper.keep()
    except Exception as exc:  # the database is gone: the last periodic write stands
        log.warning("could not write the watermark at shutdown: %s", exc)


def _schema_step(settings: Settings) -> int:
    return migrations.load(settings.storage.backend)[-1].version


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    session = HttpUpstream.new_session()
    pool = UpstreamPool(session)
    live = app[CONFIG]
    app[ROUTING] = Routing(
        pool=pool,
        settings=lambda: live.current.settings,  # a reload makes new ones
        metrics=app[METRICS],
        clock=app[CLOCK],
    )
    app[DOWNLOADER] = pool.downloader
    yield
    await session.close()


async def _services_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[CONFIG].current.settings
    db, clock, metrics, books = app[DB], app[CLOCK], app[METRICS], app[BOOKS]
    durable = Durable(metrics)
    live = app[CONFIG]
    results = Results(
        index=db.results,
        blobs=await asyncio.to_thread(open_blobs, settings.results.directory),
        downloader=app[DOWNLOADER],
        metrics=metrics,
        clock=clock,
        settings=lambda: live.current.settings,
    )
    tasks = TaskTracker(
        db=db,
        routing=app[ROUTING],
        metrics=metrics,
        books=books,
        clock=clock,
        config=settings.tasks,
        on_paid=results.paid,
    )
    generations = Generations(
        db=db,
        routing=app[ROUTING],
        tasks=tasks,
        metrics=metrics,
        books=books,
        durable=durable,
        clock=clock,
        on_paid=results.paid,
    )
    idempotency = Idempotency(
        db, generations.is_running, clock, settings.idempotency.keep_hours, durable
    )
    app[TASKS], app[GENERATIONS], app[IDEMPOTENCY] = tasks, generations, idempotency
    app[DURABLE] = durable
    app[RESULTS], app[REUSE] = results, Reuse(db, metrics)
    background = [
        asyncio.create_task(tasks.run_settler(), name="task settler"),
        asyncio.create_task(
            _every(PURGE_EVERY_S, "purging old Idempotency-Key outcomes", lambda: _purge(app)),
            name="idempotency purge",
        ),
        asyncio.create_task(
            _every(
                settings.tasks.settle_interval_s,
                "logging resolutions made outside the gateway",
                lambda: log_outside(db, books, clock().timestamp()),
            ),
            name="resolution log",
        ),
        asyncio.create_task(
            _every(RESULTS_SWEEP_S, "the result store's retention pass", results.sweep),
            name="result retention",
        ),
    ]
    if settings.storage.backend == "postgres":
        lease = settings.storage.instance_lease_s
        background += [
            asyncio.create_task(_every(lease / 3, "heartbeat", db.heartbeat), name="heartbeat"),
            asyncio.create_task(
                _every(lease / 3, "closing silent instances' holds", lambda: _reap(app, lease)),
                name="reaper",
            ),
        ]
    yield
    left = await generations.drain(settings.server.drain_s)
    if left:
        log.warning(
            "%d generation(s) did not finish within drain_s: those already sent are kept as "
            "uncertain, the others released",
            left,
        )
    await idempotency.drain()
    await results.close()  # images not stored yet stay at the upstream
    await durable.close()
    for task in background:
        task.cancel()
    for task in background:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _reap(app: web.Application, lease_s: float) -> None:
    """Holds of instances silent past their lease become uncertain, each with its line."""
    for entry in await app[DB].reap_silent_instances(app[CLOCK]().timestamp(), lease_s):
        app[BOOKS].moved(MoneyMoved.of_entry(entry))


async def _begin_drain(app: web.Application) -> None:
    app[GENERATIONS].begin_drain()


async def _purge(app: web.Application) -> None:
    """Forget Idempotency-Key outcomes older than keep_hours."""
    settings = app[CONFIG].current.settings
    before = app[CLOCK]().timestamp() - settings.idempotency.keep_hours * 3600
    await app[DB].purge_idempotency(before)


async def _every(interval_s: float, what: str, step: Callable[[], Awaitable[object]]) -> None:
    """Run ``step`` now and every ``interval_s``; a failing turn is logged, the loop goes on."""
    while True:
        try:
            await step()
        except StorageUnavailable as exc:  # an outage: one line (repeats are counted), no stack
            log.error("%s failed: %s; retrying in %ss", what, exc, interval_s)
        except Exception:  # retried at the next turn; the loop must not die
            log.exception("%s failed; retrying in %ss", what, interval_s)
        await asyncio.sleep(interval_s)
