"""The web console (``/console/``): a team's budget, spend and images; the admins' view of
every team, the uncertain money, the upstreams and the fleet.

Server-rendered HTML (Jinja2 through aiohttp-jinja2), charts as inline SVG, one small stylesheet
served by the gateway, no script at all. A key is exchanged once for a signed session cookie.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from importlib import resources

from aiohttp import web

from gateway.http.console.render import secure_headers, setup_templates
from gateway.http.console.state import CONSOLE, ConsoleState
from gateway.http.keys import CONFIG


def setup_console(app: web.Application) -> None:
    """Templates, the per-process state (made at start) and the headers of every answer."""
    setup_templates(app)
    app.cleanup_ctx.append(_console_ctx)
    app.on_response_prepare.append(secure_headers)


async def _console_ctx(app: web.Application) -> AsyncIterator[None]:
    css = resources.files("gateway.http").joinpath("static/console.css").read_bytes()
    app[CONSOLE] = ConsoleState.of(app[CONFIG].current.settings.console, css)
    yield
