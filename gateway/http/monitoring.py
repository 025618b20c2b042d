"""Health, readiness and Prometheus metrics: what load balancers and scrapers ask.

``/metrics`` never waits on the database for long: it renders what the storage watch
(``services.storage_watch``) last found, after asking it for a fresh check."""

from __future__ import annotations

import logging

from aiohttp import web

from gateway.core.errors import NotFound
from gateway.http.admin import require_admin
from gateway.http.keys import CONFIG, DB, METRICS, RECORD, ROUTING, SIMULATED, WATCH
from gateway.http.responses import json_response
from gateway.ops.metrics import CONTENT_TYPE

log = logging.getLogger("gateway")

SCRAPE_WAIT_S = 0.5  # a scrape waits this long at most for fresh money figures, then takes the last


async def healthz(request: web.Request) -> web.Response:
    request[RECORD]["endpoint"] = "health"
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready: config loaded, database the configured one and writable, central key present.
    A simulated upstream is named in the checks, so a rehearsal cannot pass for production."""
    request[RECORD]["endpoint"] = "health"
    settings = request.app[CONFIG].current.settings
    checks: dict[str, str] = {"config": "ok"}
    watch = request.app[WATCH]
    try:
        await request.app[DB].check_ready()
        watch.observe(await request.app[DB].schema_state())
        checks["database"] = "ok"
    except Exception as exc:
        log.warning("readiness: the database is not usable: %s", exc)
        checks["database"] = f"error: {type(exc).__name__}"
    keys = all(upstream.api_key.reveal() for upstream in settings.upstreams)
    checks["central_key"] = "ok" if keys else "missing"
    if watch.upgrade_required is not None:
        checks["release"] = f"upgrade_required: the database serves {watch.upgrade_required}+"
    ready = all(value == "ok" for value in checks.values())
    if request.app[SIMULATED]:
        checks["upstream"] = "simulated"
    status = "ready" if ready else "not ready"
    if watch.upgrade_required is not None:
        status = "upgrade_required"
    return json_response(
        {"status": status, "version": watch.version, "checks": checks}, 200 if ready else 503
    )


async def metrics_handler(request: web.Request) -> web.Response:
    request[RECORD]["endpoint"] = "metrics"
    snapshot = request.app[CONFIG].current
    if not snapshot.settings.metrics.enabled:
        raise NotFound("Metrics are disabled.")
    if snapshot.settings.metrics.require_admin:
        require_admin(request, snapshot)
    await request.app[WATCH].fresh(SCRAPE_WAIT_S)
    _refresh_upstreams(request.app)
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE})


def _refresh_upstreams(app: web.Application) -> None:
    """``gateway_upstream_up`` per configured upstream, as this instance sees it now."""
    gauge = app[METRICS].upstream_up
    gauge.clear()  # an upstream removed by a reload is no longer reported
    for upstream in app[ROUTING].status():
        gauge.labels(upstream.name).set(1 if upstream.state == "healthy" else 0)
