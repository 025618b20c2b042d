"""The one middleware every request passes: request id, error rendering, timing, log, metrics.

Errors of every origin (ours, the upstream's, aiohttp's router, bugs) leave here as the same
OpenAI-shaped JSON. The access-log line is written once the request's money is committed: at
once for most requests, and for a sync generation right after its settlement (which follows
the answer), so that the line carries what was really charged.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.core.errors import (
    GatewayError,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
)
from gateway.core.forwarded import client_ip
from gateway.http.keys import BOOKS, CONFIG, LEDGER_ID, METRICS, RECORD, SETTLING, SLOT
from gateway.http.queueing import queued_ms
from gateway.http.responses import error_response
from gateway.ops.accesslog import new_record, timestamp
from gateway.services.books import LogSlot

log = logging.getLogger("gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


@web.middleware
async def gateway_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    offered = request.headers.get("X-Request-ID", "")
    own_id = new_request_id()
    request_id = offered if CLIENT_REQUEST_ID.fullmatch(offered) else own_id
    request[LEDGER_ID] = own_id  # unique even when a client reuses its X-Request-ID
    record = new_record(request.method, request.path, request_id, request.headers.get("User-Agent"))
    record["queued_ms"] = queued_ms(request)  # the wait before this handler; see gateway/queueing
    record["client_ip"] = client_ip(
        request.remote,
        request.headers.getall("X-Forwarded-For", ()),
        request.app[CONFIG].current.settings.server.trusted_proxies,
    )
    request[RECORD] = record
    slot = LogSlot(record)
    request[SLOT] = slot
    metrics = request.app[METRICS]
    metrics.in_flight.inc()
    try:
        response = await _handle(request, handler, record)
    except asyncio.CancelledError:  # shutdown past the drain, or the client gone: still a line
        record.update(status=499, error_code=record["error_code"] or "cancelled",
                      ts=timestamp(time.time()))  # fmt: skip
        request.app[BOOKS].write(slot)
        raise
    finally:
        metrics.in_flight.dec()
    elapsed = time.perf_counter() - started
    elapsed_ms = elapsed * 1000
    upstream_ms = record["upstream_ms"] or 0.0
    gateway_ms = max(0.0, elapsed_ms - upstream_ms)
    if not response.prepared:  # a streamed response sent its own headers already
        response.headers["X-Request-ID"] = request_id
        response.headers["Server-Timing"] = (
            f"gateway;dur={gateway_ms:.2f}, upstream;dur={upstream_ms:.2f}"
        )
    record.update(
        status=response.status,
        latency_ms=round(elapsed_ms, 3),
        gateway_ms=round(gateway_ms, 3),
        ts=timestamp(time.time()),
    )
    endpoint = record["endpoint"] or "-"
    metrics.requests.labels(
        record["team"] or "-", endpoint, str(response.status), record["key"] or "-"
    ).inc()
    metrics.request_seconds.labels(endpoint, record["mode"] or "-").observe(elapsed)
    books = request.app[BOOKS]
    settling = request.get(SETTLING)
    if settling is not None and not settling.done():
        settling.add_done_callback(lambda _: books.write(slot))
    else:
        books.write(slot)
    return response


async def _handle(
    request: web.Request, handler: Handler, record: dict[str, Any]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as exc:
        error: GatewayError = exc
    except web.HTTPException as exc:
        if exc.status < 400:
            return exc
        error = _from_http_exception(request, exc, record)
    except Exception:
        # record["path"], not request.path: a result file's path is a credential.
        log.exception("unhandled error in %s %s", request.method, record["path"])
        error = InternalError("The gateway failed unexpectedly; the error was logged.")
    return error_response(error, record)


def _from_http_exception(
    request: web.Request, exc: web.HTTPException, record: dict[str, Any]
) -> GatewayError:
    # record["path"] is the redacted path: a result file's path is a credential, even in a 404.
    if exc.status == 404:
        return NotFound(f"Unknown route: {request.method} {record['path']}")
    if exc.status == 405:
        return MethodNotAllowed(f"{request.method} is not allowed on {record['path']}")
    if exc.status == 413:
        return PayloadTooLarge("The request body is too large.")
    error = GatewayError(exc.reason or "HTTP error")
    error.status = exc.status
    error.type = "invalid_request_error" if exc.status < 500 else "server_error"
    return error
