"""The console's cookies: who is signed in, and the tokens every form must carry.

The session cookie is checked on every request against the config in force: a key removed
from the config or past its expiry signs its sessions out at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from aiohttp import web

from gateway.core.config import TeamConfig
from gateway.core.errors import PermissionDenied
from gateway.core.sessions import (
    SESSION_S,
    Session,
    csrf_token,
    new_session,
    same_token,
    seal,
    signin_nonce,
    signin_token,
    unseal,
)
from gateway.http.console.state import CONSOLE, Holder
from gateway.http.keys import CLOCK, CONFIG, RECORD
from gateway.http.peer import came_over_tls

SESSION_COOKIE = "igw_console"
SIGNIN_COOKIE = "igw_console_signin"
COOKIE_PATH = "/console"
SIGNIN_FORM_S = 3600


@dataclass(frozen=True, slots=True)
class Viewer:
    session: Session
    holder: Holder
    team: TeamConfig | None  # a team key's own team
    csrf: str

    @property
    def is_admin(self) -> bool:
        return self.holder.role == "admin"


def viewer(request: web.Request) -> Viewer | None:
    """Who the request's session belongs to, or None (no session, forged, older than 8 h,
    signed with another secret, or its key removed or expired)."""
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie:
        return None
    state = request.app[CONSOLE]
    session = unseal(state.secret, cookie, time.time())
    if session is None:
        return None
    snapshot = request.app[CONFIG].current
    holder = state.holder(snapshot, session.key_ref)
    if holder is None or holder.role != session.role:
        return None
    team = None
    if holder.key is not None:
        expires = holder.key.expires
        if expires is not None and request.app[CLOCK]() >= expires:
            return None
        team = snapshot.settings.teams[holder.key.team]
        request[RECORD].update(team=team.name, key=holder.name)
    else:
        request[RECORD]["actor"] = holder.name  # as the admin API's lines name their admin
    return Viewer(session, holder, team, csrf_token(state.secret, session.sid))


def start_session(request: web.Request, response: web.StreamResponse, holder: Holder) -> None:
    """Sign ``holder`` in: a new session cookie, and the sign-in form's cookie gone."""
    state = request.app[CONSOLE]
    session = new_session(state.secret, holder.role, holder.sha256, time.time())
    _set(request, response, SESSION_COOKIE, seal(state.secret, session), SESSION_S)
    response.del_cookie(SIGNIN_COOKIE, path=COOKIE_PATH)


def end_session(response: web.StreamResponse) -> None:
    response.del_cookie(SESSION_COOKIE, path=COOKIE_PATH)


def signin_form_token(request: web.Request) -> tuple[str, str | None]:
    """The token for a sign-in form: the one matching the browser's sign-in cookie, or a new
    one with the cookie value to set (``set_signin_cookie``)."""
    secret = request.app[CONSOLE].secret
    token = signin_token(secret, request.cookies.get(SIGNIN_COOKIE))
    if token is not None:
        return token, None
    cookie, token = signin_nonce(secret)
    return token, cookie


def set_signin_cookie(request: web.Request, response: web.StreamResponse, value: str) -> None:
    _set(request, response, SIGNIN_COOKIE, value, SIGNIN_FORM_S)


def check_signin_form(request: web.Request, token: str | None) -> None:
    """403 unless the sign-in form's token matches this browser's sign-in cookie (a form
    posted from another site cannot sign a victim in as the attacker)."""
    expected = signin_token(request.app[CONSOLE].secret, request.cookies.get(SIGNIN_COOKIE))
    if not same_token(expected, token):
        raise PermissionDenied(FORGED, code="csrf_failed")


def check_form(viewer: Viewer, token: str | None) -> None:
    """403 unless ``token`` is the session's form token."""
    if not same_token(viewer.csrf, token):
        raise PermissionDenied(FORGED, code="csrf_failed")


FORGED = (
    "This form was not sent from this console page (its security token is missing or old). "
    "Reload the page and send it again."
)


def _set(
    request: web.Request, response: web.StreamResponse, name: str, value: str, max_age: int
) -> None:
    secure = came_over_tls(request, request.app[CONFIG].current.settings.server.trusted_proxies)
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=COOKIE_PATH,
        httponly=True,
        samesite="Strict",
        secure=secure,
    )
