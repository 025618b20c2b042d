"""The release gate: an instance older than the database's oldest served release takes no
requests (README, "Upgrading"). Health, readiness and metrics still answer, so the load balancer
and Prometheus see why."""

from __future__ import annotations

from aiohttp import web

from gateway.core.errors import UpgradeRequired
from gateway.http.keys import WATCH
from gateway.http.middleware import Handler

ALWAYS_ANSWERED = frozenset({"/healthz", "/readyz", "/metrics"})


@web.middleware
async def release_gate(request: web.Request, handler: Handler) -> web.StreamResponse:
    watch = request.app.get(WATCH)
    floor = None if watch is None else watch.upgrade_required
    if floor is not None and request.path not in ALWAYS_ANSWERED:
        assert watch is not None
        raise UpgradeRequired(
            f"This gateway instance (image-gateway {watch.version}) is older than the database "
            f"now serves (image-gateway {floor} and newer); nothing was sent or charged. Retry: "
            "another instance can answer, and an administrator must upgrade this one."
        )
    return await handler(request)
