"""A generation request's answer: its outcome shaped for the client and for its log line.

Which body and headers a client gets follows from the outcome's case
(``gateway.services.outcomes``) and the request's ``response_format``: images converted to
``b64_json`` from their result URLs, result URLs pointed through the gateway
(``proxy_results``), the upstream's own bytes passed on when nothing changes them, and the
team's remaining budget in a header.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, assert_never

from aiohttp import web

from gateway.core.config import Settings, TeamConfig
from gateway.core.errors import StorageUnavailable
from gateway.core.money import decimal_cny, units_to_cny
from gateway.core.normalize import ImageRequest
from gateway.core.pricing import remaining
from gateway.http.keys import DB, METRICS, RECORD, RESULTS, ROUTING
from gateway.http.responses import error_response, json_response
from gateway.http.results import as_b64_json, through_gateway
from gateway.ops.accesslog import result_id, short_id
from gateway.services.outcomes import (
    Answer,
    Dedupe,
    Failed,
    Fresh,
    Outcome,
    Replay,
    Retryable,
    Reused,
    Task,
    Trace,
)
from gateway.services.reuse import STATUS_HEADER as CACHE_STATUS_HEADER
from gateway.services.usage import standing

log = logging.getLogger("gateway")

BUDGET_HEADER = "X-Gateway-Budget-Remaining"


@dataclass(frozen=True, slots=True)
class _Shown:
    """An outcome as this request answers it: the outcome whose body is given, what this
    request's log line says of it, the upstream's bytes if they can be passed on, and where
    the answer came from."""

    given: Fresh
    trace: Trace
    raw: bytes | None
    dedupe_of: str | None = None
    replayed: bool = False


def _shown(outcome: Outcome) -> _Shown:
    """A dedupe or replay gives its original's body; it held, cost and tried nothing itself."""
    match outcome:
        case Answer(raw=raw) | Task(raw=raw):
            return _Shown(outcome, outcome.trace, raw)
        case Failed() | Retryable():
            return _Shown(outcome, outcome.trace, None)
        case Dedupe(of=of):
            trace = replace(of.trace, reserved=0, usage=None, attempts=0, upstream=None,
                            failovers=())  # fmt: skip
            return _Shown(of, trace, None, dedupe_of=of.request_id)
        case Reused(of=of):  # nothing of this request's own to log
            return _Shown(of, of.trace, None)
        case Replay(of=of):
            earlier = _shown(of)
            trace = replace(earlier.trace, reserved=0, usage=None, attempts=0)
            return replace(earlier, trace=trace, raw=None, replayed=True)
        case _:
            assert_never(outcome)


def _ids(given: Fresh) -> tuple[str | None, str | None]:
    """The upstream id and task id the answer names."""
    match given:
        case (
            Answer(upstream_id=upstream_id, task_id=task_id)
            | Task(upstream_id=upstream_id, task_id=task_id)
        ):
            return upstream_id, task_id
        case Failed(task_id=task_id):
            return None, task_id
        case Retryable():
            return None, None
        case _:
            assert_never(given)


async def respond(
    request: web.Request,
    outcome: Outcome,
    req: ImageRequest,
    team: TeamConfig,
    settings: Settings,
    *,
    now: datetime,
) -> web.Response:
    """The response to a generation request, its access-log record filled in."""
    record = request[RECORD]
    shown = _shown(outcome)
    trace, given = shown.trace, shown.given
    if trace.usage is not None:
        record["budget_remaining_cny"] = units_to_cny(remaining(team, trace.usage))
    upstream_id, task_id = _ids(given)
    record.update(
        upstream_status=trace.upstream_status,
        upstream_ms=round(trace.upstream_ms, 2) if trace.upstream_ms is not None else None,
        reserved_cny=units_to_cny(trace.reserved),
        upstream_id=short_id(upstream_id),
        task_id=short_id(task_id),
        attempts=trace.attempts or None,
        dedupe_of=shown.dedupe_of,
        upstream=trace.upstream,
        failovers=list(trace.failovers) if trace.upstream is not None else None,
    )
    headers = {"Idempotent-Replayed": "true"} if shown.replayed else {}
    if record["cache"] is not None:
        headers[CACHE_STATUS_HEADER] = record["cache"]
    if req.ignored:
        headers["X-Gateway-Ignored-Params"] = ", ".join(req.ignored)
    if shown.dedupe_of is not None:
        headers["X-Gateway-Deduplicated"] = shown.dedupe_of
        request.app[METRICS].deduped.labels(team.name).inc()
    if isinstance(given, Failed | Retryable):
        return error_response(given.error, record, headers)
    headers.update(await _budget_header(request, team, settings, now, trace))
    payload = given.payload
    record["result_ids"] = _result_ids(payload)
    if isinstance(given, Answer) and req.response_format != "url" and "task_id" not in payload:
        keep_url = req.response_format == "both"
        payload, warning = await as_b64_json(payload, request.app[RESULTS].image, keep_url=keep_url)
        headers.update(warning)
    proxied = _through_gateway(request, payload)
    if proxied is not None:
        payload = proxied
    elif shown.raw is not None and req.response_format == "url":
        # the upstream's own bytes: no need to serialize them again
        return web.Response(
            body=shown.raw, status=given.status, content_type="application/json", headers=headers
        )
    return json_response(payload, given.status, headers)


def respond_task(request: web.Request, answer: dict[str, Any]) -> web.Response:
    """A task's answer as its owner polls it, its log record's result ids filled in."""
    request[RECORD]["result_ids"] = _result_ids(answer)
    proxied = _through_gateway(request, answer)
    return json_response(answer if proxied is None else proxied)


def _through_gateway(request: web.Request, payload: dict[str, Any]) -> dict[str, Any] | None:
    """``payload`` with its result URLs through the gateway; None when no upstream (current,
    or kept for its tasks) proxies its results."""
    configs = list(request.app[ROUTING].known_configs())
    if not any(c.proxy_results for c in configs):
        return None
    return through_gateway(payload, f"{request.scheme}://{request.host}", configs)


async def _budget_header(
    request: web.Request, team: TeamConfig, settings: Settings, now: datetime, trace: Trace
) -> dict[str, str]:
    """The team's remaining budget once this request's hold was placed (for an answer that
    placed none, a replay, as it stands now). Never costs a paid answer: a ledger that cannot
    be read just leaves the header out."""
    try:
        figures = await standing(request.app[DB], settings, team, now, usage=trace.usage)
    except StorageUnavailable:
        log.warning("%s left out: the ledger cannot be read", BUDGET_HEADER)
        return {}
    return {BUDGET_HEADER: decimal_cny(figures.remaining)}


def _result_ids(payload: dict[str, Any]) -> list[str] | None:
    """A short hash of each result URL an answer carries (``data[].url``)."""
    items = payload.get("data")
    return [
        result_id(item["url"])
        for item in (items if isinstance(items, list) else [])
        if isinstance(item, dict) and isinstance(item.get("url"), str)
    ] or None
