"""The release gate: an instance older than the database's oldest served release takes no
requests (README, "Upgrading"). Health, readiness and metrics still answer, so the load balancer
and Prometheus see why."""

from __future__ import annotations

from collections.abc import Awaitable

from aiohttp import web

from gateway.core.errors import UpgradeRequired
from gateway.http.keys import WATCH
from gateway.http.middleware import Handler

ALWAYS_ANSWERED = frozenset({"/healthz", "/readyz", "/metrics"})


@web.middleware
def release_gate(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
    """Hands back the handler's own awaitable rather than awaiting it: no frame of its own
    stays alive for as long as a request is held (a refusal raises all the same)."""
    watch = request.app.get(WATCH)
    floor = None if watch is None else watch.upgrade_required
    if floor is not None and request.path not in ALWAYS_ANSWERED:
        assert watch is not None
        raise UpgradeRequired(
            f"This gateway instance (image-gateway {watch.version}) is older than the database "
            f"now serves (image-gateway {floor} and newer); nothing was sent or charged. Retry: "
            "another instance can answer, and an administrator must upgrade this one."
        )
    return handler(request)
