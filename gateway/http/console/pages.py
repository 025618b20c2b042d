"""The console's pages: sign in and out, a team's view, the admin view and its resolve form.

Every page is its data (``gateway.services.console``) rendered by one helper; the same URL with
``.json`` returns the data. Every form is a POST carrying its CSRF token. A key is only ever
read from a sign-in form's body, exchanged for a session cookie, and forgotten.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from gateway.core.auth import check_expiry, key_digest
from gateway.core.charts import gauge, stacked_bars
from gateway.core.config import Settings
from gateway.core.errors import (
    GatewayError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    RateLimited,
    Unauthorized,
    UnsupportedMediaType,
)
from gateway.core.sessions import link_digest
from gateway.http.admin import apply_resolution, upstreams_json
from gateway.http.console.render import error_page, render
from gateway.http.console.session import (
    SESSION_COOKIE,
    Viewer,
    check_form,
    check_signin_form,
    end_session,
    set_signin_cookie,
    signin_form_token,
    start_session,
    viewer,
)
from gateway.http.console.state import CONSOLE, Holder, admin_name
from gateway.http.handlers import MAX_ID_CHARS, path_id
from gateway.http.keys import CLOCK, CONFIG, DB, METRICS, RECORD, ROUTING
from gateway.services.console import SORTS, admin_view, team_view
from gateway.services.reconcile import resolved_line

MAX_FORM_BYTES = 16 * 1024
NOTICES = {
    "out": "You are signed out.",
    "ended": "Your session ended (signed out elsewhere, the key was removed or expired, or the "
    "gateway restarted). Sign in again.",
}
TEAM_HOME, ADMIN_HOME, SIGN_IN = "/console/team", "/console/admin", "/console/"

Page = Callable[[web.Request, Viewer | None], Awaitable[web.StreamResponse]]


class SignInFirst(Exception):
    """A page needs a session: off to the sign-in form (saying so if one just ended)."""

    def __init__(self, *, ended: bool) -> None:
        super().__init__("sign in first")
        self.ended = ended


def page(handler: Page) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A console handler: logged as ``console``; its errors rendered as pages."""

    async def run(request: web.Request) -> web.StreamResponse:
        request[RECORD]["endpoint"] = "console"
        who = viewer(request)
        try:
            return await handler(request, who)
        except GatewayError as exc:
            return error_page(request, exc, who)
        except SignInFirst as away:
            response = see_other(SIGN_IN + ("?m=ended" if away.ended else ""))
            end_session(response)
            return response

    return run


@page
async def signin_form(request: web.Request, who: Viewer | None) -> web.StreamResponse:
    """GET /console/: the sign-in form, or straight on to the viewer's own page."""
    if who is not None:
        return see_other(ADMIN_HOME if who.is_admin else TEAM_HOME)
    return _signin(request, NOTICES.get(request.query.get("m", "")), status=200)


@page
async def sign_in(request: web.Request, who: Viewer | None) -> web.StreamResponse:
    """POST /console/signin with ``key`` and ``csrf``: a session cookie, never the key."""
    form = await _form(request)
    check_signin_form(request, form.get("csrf"))
    address = await _turn(request)
    holder = _holder_of(request, form.get("key", "").strip())
    if holder is None:
        return _failed(request, address, "That key is not valid here (unknown or expired).")
    request.app[CONSOLE].throttle.succeeded(address)
    return _signed_in(request, holder)


@page
async def sign_in_link(request: web.Request, who: Viewer | None) -> web.StreamResponse:
    """GET /console/link?token=...: a one-time link (the demo's) signs its key in, once."""
    address = await _turn(request)
    key_sha256 = request.app[CONSOLE].use_link(link_digest(request.query.get("token", "")))
    holder = _holder_by_digest(request, key_sha256) if key_sha256 is not None else None
    if holder is None:
        return _failed(request, address, "That sign-in link was used already or is not valid.")
    request.app[CONSOLE].throttle.succeeded(address)
    return _signed_in(request, holder)


@page
async def sign_out(request: web.Request, who: Viewer | None) -> web.StreamResponse:
    """POST /console/signout with ``csrf``."""
    form = await _form(request)
    if who is not None:
        check_form(who, form.get("csrf"))
    response = see_other(SIGN_IN + "?m=out")
    end_session(response)
    return response


@page
async def team_page(request: web.Request, who: Viewer | None) -> web.StreamResponse:
    """GET /console/team[.json][?team=NAME]: a team's own view (any team's, for an admin)."""
    who = _signed_in_or_away(request, who)
    teams = request.app[CONFIG].current.settings.teams
    asked = request.query.get("team")
    if who.team is not None:
        if asked not in (None, who.team.name):
            raise PermissionDenied("A team key sees its own team only.")
        team = who.team.name
    elif asked is None and teams:
        team = next(iter(teams))
    elif asked is not None and asked in teams:
        team = asked
    else:
        raise NotFound("No team has that name.", param="team")
    settings = request.app[CONFIG].current.settings
    async with request.app[CONSOLE].pages:
        data = await team_view(
            request.app[DB], settings, request.app[CLOCK](), team, who.holder.key
        )
    usage, spend = data["standing"], data["spend_by_day"]
    return render(
        request,
        "team.html",
        data,
        viewer=who,
        teams=list(teams),
        gauge=gauge(
            [(kind, usage[f"{kind}_cny"]) for kind in ("spent", "reserved", "uncertain")],
            usage["budget_cny"],
        ),
        by_key=stacked_bars(spend["days"], spend["by_key"]),
        by_quality=stacked_bars(spend["days"], spend["by_quality"]),
    )


@page
async def admin_page(request: web.Request, who: Viewer | None) -> web.StreamResponse:
    """GET /console/admin[.json][?sort=...]: every team, the uncertain money, the fleet."""
    return await _admin(request, _admin_only(request, who))


@page
async def resolve(request: web.Request, who: Viewer | None) -> web.StreamResponse:
    """POST /console/admin/ledger/{request_id}/resolve: what the admin API's resolve does."""
    admin = _admin_only(request, who)
    form = await _form(request)
    check_form(admin, form.get("csrf"))
    entry_id = path_id(request, "request_id", "No ledger entry has that id.")
    try:
        entry = await apply_resolution(
            request.app, entry_id, _resolution(form), actor=admin.holder.name
        )
    except GatewayError as exc:  # shown above the form it came from
        request[RECORD]["error_type"], request[RECORD]["error_code"] = exc.type, exc.code
        return await _admin(request, admin, problem=exc)
    return see_other(f"{ADMIN_HOME}?resolved={entry.request_id}")


def _resolution(form: dict[str, str]) -> dict[str, Any]:
    """The resolve form as the admin API's JSON body (``images`` empty: all held)."""
    images = form.get("images", "").strip()
    if images and not (images.isascii() and images.isdigit() and len(images) <= 3):
        raise InvalidRequest("images must be a whole number.", param="images")
    return {
        "state": form.get("state"),
        "images": int(images) if images else None,
        "reason": form.get("reason", ""),
    }


async def to_signin(request: web.Request) -> web.Response:
    """GET /console: the console lives under /console/."""
    request[RECORD]["endpoint"] = "console"
    return see_other(SIGN_IN)


async def static_css(request: web.Request) -> web.Response:
    request[RECORD]["endpoint"] = "console"
    return web.Response(
        body=request.app[CONSOLE].css,
        content_type="text/css",
        headers={"Cache-Control": "public, max-age=3600"},
    )


async def _admin(
    request: web.Request, admin: Viewer, problem: GatewayError | None = None
) -> web.Response:
    sort = request.query.get("sort", "remaining")
    settings = request.app[CONFIG].current.settings
    async with request.app[CONSOLE].pages:
        data = await admin_view(
            request.app[DB], settings, request.app[CLOCK](), sort if sort in SORTS else "remaining"
        )
    data["upstreams"] = upstream_rows(request.app, settings)
    notice = None
    resolved = request.query.get("resolved", "")
    if resolved and resolved.isprintable() and len(resolved) <= MAX_ID_CHARS and not problem:
        entry = await request.app[DB].find_entry(resolved)
        if entry is not None and entry.resolution is not None:
            notice = resolved_line(entry)
    return render(
        request,
        "admin.html",
        data,
        viewer=admin,
        status=problem.status if problem else 200,
        problem=problem,
        notice=notice,
    )


def _signin(request: web.Request, message: str | None, *, status: int) -> web.Response:
    token, cookie = signin_form_token(request)
    response = render(
        request, "signin.html", {}, viewer=None, status=status, message=message, csrf=token
    )
    if cookie is not None:
        set_signin_cookie(request, response, cookie)
    return response


def _failed(request: web.Request, address: str, message: str) -> web.Response:
    request.app[METRICS].console_signin_failures.inc()
    request.app[CONSOLE].throttle.failed(address)
    return _signin(request, message, status=401)


def _signed_in(request: web.Request, holder: Holder) -> web.StreamResponse:
    response = see_other(ADMIN_HOME if holder.role == "admin" else TEAM_HOME)
    start_session(request, response, holder)
    return response


def upstream_rows(app: web.Application, settings: Settings) -> list[dict[str, Any]]:
    """The upstreams as ``GET /admin/upstreams`` shows them (this instance's view of their
    health), each with its base URL while it is configured."""
    urls = {upstream.name: upstream.base_url for upstream in settings.upstreams}
    return [
        {**row, "base_url": urls.get(row["name"])} for row in upstreams_json(app[ROUTING].status())
    ]


def see_other(location: str) -> web.Response:
    """A 303 to another console page (returned, not raised, like every other answer)."""
    return web.Response(status=303, headers={"Location": location})


async def _turn(request: web.Request) -> str:
    """Wait this client address's turn after failed sign-ins (429 beyond the bound)."""
    address = request[RECORD]["client_ip"] or "-"  # behind trusted proxies: their client
    wait = request.app[CONSOLE].throttle.turn(address)
    if wait is None:
        raise RateLimited(
            "Too many failed sign-ins from your address; wait a minute.",
            headers={"Retry-After": "60"},
        )
    if wait > 0:
        await asyncio.sleep(wait)  # this request's answer only
    return address


def _holder_of(request: web.Request, key: str) -> Holder | None:
    """Who ``key`` is under the config in force (an expired team key is nobody)."""
    snapshot = request.app[CONFIG].current
    team_key = snapshot.team_keys.owner(key)
    if team_key is not None:
        try:
            check_expiry(team_key, request.app[CLOCK]())
        except Unauthorized:
            return None
        return Holder("team", team_key.sha256, team_key, team_key.identity)
    admin = snapshot.admin_keys.owner(key)
    if admin is None:
        return None
    return Holder("admin", key_digest(key), None, admin_name(admin))


def _holder_by_digest(request: web.Request, digest: str) -> Holder | None:
    snapshot = request.app[CONFIG].current
    for found, key in snapshot.team_keys.entries():
        if found == digest:
            if key.expires is not None and request.app[CLOCK]() >= key.expires:
                return None
            return Holder("team", digest, key, key.identity)
    return None


def _signed_in_or_away(request: web.Request, who: Viewer | None) -> Viewer:
    if who is not None:
        return who
    if request.path.endswith(".json"):
        raise Unauthorized("Sign in to the console first.", code="not_signed_in")
    raise SignInFirst(ended=SESSION_COOKIE in request.cookies)


def _admin_only(request: web.Request, who: Viewer | None) -> Viewer:
    who = _signed_in_or_away(request, who)
    if not who.is_admin:
        raise PermissionDenied("The admin view needs an admin key.")
    return who


async def _form(request: web.Request) -> dict[str, str]:
    """A small urlencoded form (the first value of each field)."""
    if request.content_type != "application/x-www-form-urlencoded":
        raise UnsupportedMediaType("Send the form as application/x-www-form-urlencoded.")
    raw = await request.content.read(MAX_FORM_BYTES + 1)
    if len(raw) > MAX_FORM_BYTES:
        raise PayloadTooLarge("The form is too large.")
    try:
        pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, max_num_fields=20)
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequest("The form could not be read.") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        form.setdefault(name, value)
    return form
