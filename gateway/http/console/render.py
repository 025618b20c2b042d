"""The console's one render helper: a page's data as HTML through its template, or as JSON at
the same URL ending in ``.json``; its error pages; and the headers every console answer carries.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp_jinja2
import jinja2
from aiohttp import web

from gateway.core.errors import GatewayError
from gateway.core.money import UNITS_PER_CNY
from gateway.http.console.session import Viewer
from gateway.http.keys import CONFIG, RECORD
from gateway.http.responses import error_response, json_response

PREFIX = "/console"
# No script at all, styles only from the gateway's own stylesheet, images only from itself.
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
NOTHING = "\u2013"  # an en dash, for a figure that does not apply
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def setup_templates(app: web.Application) -> None:
    """Templates load from the package (``gateway/http/templates``) when first rendered."""
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.PackageLoader("gateway.http", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        auto_reload=False,  # package data: no stat() of each template on every render
        filters=FILTERS,
    )


def render(
    request: web.Request,
    template: str,
    data: dict[str, Any],
    *,
    viewer: Viewer | None,
    status: int = 200,
    **context: Any,
) -> web.Response:
    """``data`` as the page ``template`` (with ``context``), or as JSON for ``.json`` URLs."""
    if request.path.endswith(".json"):
        return json_response(data, status)
    settings = request.app[CONFIG].current.settings
    return aiohttp_jinja2.render_template(
        template,
        request,
        {"data": data, "viewer": viewer, "tz": settings.server.tz, **context},
        status=status,
    )


def error_page(request: web.Request, error: GatewayError, viewer: Viewer | None) -> web.Response:
    """An error as a page (JSON, in the OpenAI shape, for ``.json`` URLs)."""
    record = request[RECORD]
    if request.path.endswith(".json"):
        return error_response(error, record)
    record["error_type"], record["error_code"] = error.type, error.code
    response = render(request, "error.html", {}, viewer=viewer, status=error.status, error=error)
    response.headers.update(error.response_headers())
    return response


async def secure_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every console answer (errors from the router included) gets the strict headers; pages
    and their JSON are never cached."""
    if request.path == PREFIX or request.path.startswith(PREFIX + "/"):
        response.headers.update(HEADERS)
        response.headers.setdefault("Cache-Control", "no-store")


def cny(value: float | None) -> str:
    """Exact money for people: two decimals when the amount is whole fen, else all four."""
    if value is None:
        return NOTHING
    units = round(value * UNITS_PER_CNY)
    sign = "-" if units < 0 else ""
    whole, frac = divmod(abs(units), UNITS_PER_CNY)
    fraction = f"{frac:04d}"
    return f"{sign}{whole:,}.{fraction[:2] if fraction.endswith('00') else fraction}"


def when(value: str | None, tz: ZoneInfo) -> str:
    """An RFC 3339 time as local minutes in the configured zone."""
    if not value:
        return NOTHING
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(tz).strftime("%Y-%m-%d %H:%M")


def age(seconds: int) -> str:
    """A duration for people: seconds, minutes, hours or days."""
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d"


FILTERS: dict[str, Callable[..., str]] = {"cny": cny, "when": when, "age": age}
