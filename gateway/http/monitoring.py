"""Health, readiness and Prometheus metrics: what load balancers and scrapers ask."""

from __future__ import annotations

import logging

from aiohttp import web

from gateway.core.errors import NotFound
from gateway.core.money import units_to_cny
from gateway.core.periods import period_at
from gateway.core.pricing import remaining
from gateway.http.admin import require_admin
from gateway.http.keys import CLOCK, CONFIG, DB, METRICS, RECORD, SIMULATED
from gateway.http.responses import json_response
from gateway.ops.metrics import CONTENT_TYPE

log = logging.getLogger("gateway")


async def healthz(request: web.Request) -> web.Response:
    request[RECORD]["endpoint"] = "health"
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready: config loaded, database the configured one and writable, central key present.
    A simulated upstream is named in the checks, so a rehearsal cannot pass for production."""
    request[RECORD]["endpoint"] = "health"
    settings = request.app[CONFIG].current.settings
    checks: dict[str, str] = {"config": "ok"}
    try:
        await request.app[DB].check_ready()
        checks["database"] = "ok"
    except Exception as exc:
        log.warning("readiness: the database is not usable: %s", exc)
        checks["database"] = f"error: {type(exc).__name__}"
    checks["central_key"] = "ok" if settings.upstream.api_key.reveal() else "missing"
    ready = all(value == "ok" for value in checks.values())
    if request.app[SIMULATED]:
        checks["upstream"] = "simulated"
    return json_response(
        {"status": "ready" if ready else "not ready", "checks": checks}, 200 if ready else 503
    )


async def metrics_handler(request: web.Request) -> web.Response:
    request[RECORD]["endpoint"] = "metrics"
    snapshot = request.app[CONFIG].current
    if not snapshot.settings.metrics.enabled:
        raise NotFound("Metrics are disabled.")
    if snapshot.settings.metrics.require_admin:
        require_admin(request, snapshot)
    await _refresh_money(request.app)
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE})


async def _refresh_money(app: web.Application) -> None:
    """Money gauges per team, read from the ledger when scraped (right whoever moved it)."""
    settings = app[CONFIG].current.settings
    now = app[CLOCK]()
    metrics = app[METRICS]
    for gauge in (metrics.budget, metrics.budget_remaining, metrics.reserved, metrics.uncertain):
        gauge.clear()  # a team removed by a reload is no longer reported
    metrics.key_expiry.clear()
    for team in settings.teams.values():
        for key in team.all_keys():
            if key.expires is not None:
                metrics.key_expiry.labels(key.identity).set(key.expires.timestamp())
        period = period_at(team.period, now, settings.server.tz)
        usage = await app[DB].usage(team.name, period.key)
        metrics.budget.labels(team.name).set(units_to_cny(team.budget))
        metrics.budget_remaining.labels(team.name).set(units_to_cny(remaining(team, usage)))
        metrics.reserved.labels(team.name).set(units_to_cny(usage.reserved))
        metrics.uncertain.labels(team.name).set(units_to_cny(usage.uncertain))
