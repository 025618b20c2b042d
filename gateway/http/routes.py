"""Every route the gateway answers, in one table."""

from __future__ import annotations

from aiohttp import web

from gateway.core.config import Settings
from gateway.http import admin, handlers, monitoring
from gateway.http.console import images, pages


def add_routes(app: web.Application, settings: Settings) -> None:
    """The main listener's routes; ``/metrics`` here unless it has a port of its own."""
    for prefix in ("/v1", ""):
        app.router.add_post(f"{prefix}/images/generations", handlers.create_image)
        app.router.add_post(f"{prefix}/images/edits", handlers.create_image)
        app.router.add_get(f"{prefix}/images/tasks/{{task_id}}", handlers.get_task)
        app.router.add_get(f"{prefix}/models", handlers.list_models)
    app.router.add_get("/v1/images/files/{path:.+}", handlers.result_file)
    app.router.add_delete("/v1/images/results/{request_id}", handlers.delete_result)
    app.router.add_get("/v1/gateway/usage", handlers.team_usage)
    app.router.add_get("/healthz", monitoring.healthz)
    app.router.add_get("/readyz", monitoring.readyz)
    app.router.add_get("/admin/usage", admin.admin_usage)
    app.router.add_get("/admin/ledger", admin.list_ledger)
    app.router.add_post("/admin/ledger/{request_id}/resolve", admin.resolve_entry)
    app.router.add_get("/admin/upstreams", admin.list_upstreams)
    if settings.metrics.enabled and settings.metrics.port == 0:
        add_metrics_routes(app)
    if settings.console.enabled:
        add_console_routes(app)


def add_console_routes(app: web.Application) -> None:
    """The web console; each page also answers as JSON with ``.json``."""
    app.router.add_get("/console", pages.to_signin)
    app.router.add_get("/console/", pages.signin_form)
    app.router.add_post("/console/signin", pages.sign_in)
    app.router.add_get("/console/link", pages.sign_in_link, allow_head=False)  # once: GET only
    app.router.add_post("/console/signout", pages.sign_out)
    for suffix in ("", ".json"):
        app.router.add_get(f"/console/team{suffix}", pages.team_page)
        app.router.add_get(f"/console/admin{suffix}", pages.admin_page)
    app.router.add_post("/console/admin/ledger/{request_id}/resolve", pages.resolve)
    app.router.add_get("/console/images/{request_id}/{index}", images.image)
    app.router.add_get("/console/static/console.css", pages.static_css)


def add_metrics_routes(app: web.Application) -> None:
    app.router.add_get("/metrics", monitoring.metrics_handler)
