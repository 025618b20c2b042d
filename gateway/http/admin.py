"""Admin routes over the ledger (list entries, resolve an uncertain one) and the upstreams'
health. Admin key required."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from gateway.core.config import AdminKey
from gateway.core.errors import Conflict, InvalidRequest, NotFound
from gateway.core.ledger import LedgerEntry
from gateway.core.live import Snapshot
from gateway.core.settlement import REASON_TEXT, NotResolvable, ResolutionRefused
from gateway.http.handlers import path_id
from gateway.http.keys import BOOKS, CLOCK, CONFIG, DB, RECORD, ROUTING
from gateway.http.responses import json_response
from gateway.services.reconcile import entry_json, queries, rfc3339
from gateway.services.resolutions import resolve
from gateway.services.routing import UpstreamStatus
from gateway.services.usage import check_report_args, usage_report
from gateway.store.base import UnknownEntry

MAX_BODY = 64 * 1024


async def list_ledger(request: web.Request) -> web.Response:
    """GET /admin/ledger?state=&team=&period=: the same JSON as ``ledger list --json``."""
    request[RECORD]["endpoint"] = "admin"
    snapshot = request.app[CONFIG].current
    require_admin(request, snapshot)
    settings = snapshot.settings
    team = request.query.get("team") or None
    if team is not None and team not in settings.teams:
        raise InvalidRequest(f"Unknown team {team!r}.", param="team")
    try:
        found = queries(
            settings.teams,
            team=team,
            state=request.query.get("state") or None,
            period=request.query.get("period") or None,
            now=request.app[CLOCK](),
            tz=settings.server.tz,
        )
    except ValueError as exc:
        raise InvalidRequest(
            str(exc), param="period" if "period" in str(exc) else "state"
        ) from None
    entries = []
    for query in found:
        entries.extend(await request.app[DB].entries(query))
    entries.sort(key=lambda e: (e.created_at, e.request_id), reverse=True)
    return json_response({"entries": [entry_json(e) for e in entries]})


async def resolve_entry(request: web.Request) -> web.Response:
    """POST /admin/ledger/{request_id}/resolve with ``{"state", "images", "reason"}``."""
    request[RECORD]["endpoint"] = "admin"
    admin = require_admin(request, request.app[CONFIG].current)
    body = await _json_body(request)
    entry_id = path_id(request, "request_id", "No ledger entry has that id.")
    entry = await apply_resolution(request.app, entry_id, body, actor=admin.identity)
    return json_response(entry_json(entry))


async def apply_resolution(
    app: web.Application, entry_id: str, body: Any, *, actor: str
) -> LedgerEntry:
    """Resolve an uncertain entry as ``body`` (``{"state", "images", "reason"}``) says, in the
    name of the admin key ``actor``: the one path of the admin API and the console's resolve
    form, with the same errors."""
    state, images, reason = _resolution_body(body)
    try:
        return await resolve(
            app[DB],
            entry_id,
            state=state,
            images=images,
            reason=reason,
            actor=actor,
            now=app[CLOCK]().timestamp(),
            books=app[BOOKS],
        )
    except UnknownEntry:
        raise NotFound("No ledger entry has that id.", param="request_id") from None
    except NotResolvable as exc:
        raise Conflict(str(exc), code="not_uncertain") from None
    except ResolutionRefused as exc:
        raise InvalidRequest(str(exc), param="images") from None


async def _json_body(request: web.Request) -> Any:
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise InvalidRequest("The body is too large for a resolution.", code="invalid_json")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidRequest("The body must be a JSON object.", code="invalid_json") from None


def _resolution_body(body: Any) -> tuple[Any, int | None, str]:
    if not isinstance(body, dict):
        raise InvalidRequest("The body must be a JSON object.", code="invalid_json")
    unknown = sorted(set(body) - {"state", "images", "reason"})
    if unknown:
        raise InvalidRequest(f"Unknown field {unknown[0]!r}.", param=unknown[0][:40])
    state = body.get("state")
    if state not in ("captured", "released"):
        raise InvalidRequest('state must be "captured" or "released".', param="state")
    images = body.get("images")
    if images is not None and (
        isinstance(images, bool) or not isinstance(images, int) or images < 0
    ):
        raise InvalidRequest("images must be a non-negative integer.", param="images")
    reason = body.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise InvalidRequest("reason is required: say who resolved it and why.", param="reason")
    if not reason.isprintable():
        raise InvalidRequest(f"{REASON_TEXT[0].upper()}{REASON_TEXT[1:]}.", param="reason")
    return state, images, reason


async def admin_usage(request: web.Request) -> web.Response:
    """GET /admin/usage[?team=NAME]: the usage report, for holders of an admin key."""
    request[RECORD]["endpoint"] = "admin"
    snapshot = request.app[CONFIG].current
    require_admin(request, snapshot)
    team = request.query.get("team")
    if team is not None and team not in snapshot.settings.teams:
        raise InvalidRequest(f"Unknown team {team!r}.", param="team")
    period, by = request.query.get("period") or None, request.query.get("by") or None
    try:
        check_report_args(period, by, snapshot.settings)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="by" if "by must" in str(exc) else "period") from None
    report = await usage_report(
        request.app[DB],
        snapshot.settings,
        request.app[CLOCK](),
        only=team,
        period=period,
        by=by,  # type: ignore[arg-type]
    )
    return json_response(report)


async def list_upstreams(request: web.Request) -> web.Response:
    """GET /admin/upstreams: each configured upstream's health, as this instance sees it."""
    request[RECORD]["endpoint"] = "admin"
    require_admin(request, request.app[CONFIG].current)
    return json_response({"upstreams": upstreams_json(request.app[ROUTING].status())})


def upstreams_json(found: list[UpstreamStatus]) -> list[dict[str, Any]]:
    return [
        {
            "name": u.name,
            "state": u.state,
            "until": rfc3339(u.until) if u.until is not None else None,
            "last_error": u.last_error,
            "priority": u.priority,
            "weight": u.weight,
        }
        for u in found
    ]


def require_admin(request: web.Request, snapshot: Snapshot) -> AdminKey:
    """The admin key of the request (401 otherwise); its line in the access log names it."""
    key = snapshot.admin_keys.require(request.headers.get("Authorization"))
    request[RECORD]["actor"] = key.identity
    return key
