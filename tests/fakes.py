"""Test doubles: a controllable clock and fault injection in front of the simulated upstream.

The simulated upstream (``gateway.simulator``) validates like the real one and records what it
receives; ``FaultPlan`` sits in front of it as a middleware and, for the next matching request,
misbehaves the way real networks and upstreams do.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

Fault = Callable[
    [web.Request, Callable[[web.Request], Awaitable[web.StreamResponse]]], Awaitable[Any]
]


class FakeClock:
    """An aware-datetime clock that moves only when a test moves it."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 11, 26, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@dataclass
class FaultPlan:
    """Faults for upcoming upstream requests, applied in order to requests matching ``kind``."""

    queue: deque[tuple[str, Fault]] = field(default_factory=deque)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    seen: int = 0

    def add(self, fault: Fault, kind: str = "POST") -> None:
        self.queue.append((kind, fault))

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        self.seen += 1
        self.arrived.set()
        if self.queue and self.queue[0][0] == _kind(request):
            _, fault = self.queue.popleft()
            return await fault(request, handler)
        return await handler(request)


def _kind(request: web.Request) -> str:
    return "TASK" if "/tasks/" in request.path else request.method


# -- faults -------------------------------------------------------------------------------------


def json_error(status: int, type_: str, message: str, retry_after: str | None = None) -> Fault:
    async def fault(request: web.Request, handler: Any) -> web.Response:
        await request.read()
        headers = {"Retry-After": retry_after} if retry_after is not None else None
        return web.json_response(
            {"error": {"type": type_, "message": message}}, status=status, headers=headers
        )

    return fault


def html_error(status: int, retry_after: str | None = None) -> Fault:
    async def fault(request: web.Request, handler: Any) -> web.Response:
        await request.read()
        headers = {"Retry-After": retry_after} if retry_after is not None else None
        return web.Response(
            text=f"<html><body><h1>{status} Bad Gateway</h1></body></html>",
            status=status,
            content_type="text/html",
            headers=headers,
        )

    return fault


def hang(release: asyncio.Event | None = None) -> Fault:
    """Read the request, then never answer (until ``release`` is set, if given)."""

    async def fault(request: web.Request, handler: Any) -> web.StreamResponse:
        await request.read()
        await (release or asyncio.Event()).wait()
        return await handler(request)

    return fault


def gate(
    release: asyncio.Event,
    arrived: asyncio.Event | None = None,
    answered: asyncio.Event | None = None,
) -> Fault:
    """Hold the request until the test sets ``release``, then let the simulator answer it."""

    async def fault(request: web.Request, handler: Any) -> web.StreamResponse:
        if arrived is not None:
            arrived.set()
        await release.wait()
        response = await handler(request)
        if answered is not None:
            answered.set()
        return response

    return fault


def reset_after_read() -> Fault:
    """Take the whole request, then drop the connection with a TCP reset."""

    async def fault(request: web.Request, handler: Any) -> web.StreamResponse:
        await request.read()
        _reset(request)
        raise asyncio.CancelledError

    return fault


def truncated_body() -> Fault:
    """Promise a long JSON body, send half of it, then close."""

    async def fault(request: web.Request, handler: Any) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.content_length = 1000
        await response.prepare(request)
        await response.write(b'{"created": 1, "data": [{"url": "https://api.icodeeasy.cc/v1/ima')
        _reset(request)
        raise asyncio.CancelledError

    return fault


def malformed_json() -> Fault:
    async def fault(request: web.Request, handler: Any) -> web.Response:
        await request.read()
        return web.Response(body=b'{"created": 1, "data": [', content_type="application/json")

    return fault


def respond(payload: dict[str, Any], status: int = 200) -> Fault:
    async def fault(request: web.Request, handler: Any) -> web.Response:
        await request.read()
        return web.json_response(payload, status=status)

    return fault


def _reset(request: web.Request) -> None:
    transport = request.transport
    assert transport is not None
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    transport.abort()


def as_task(finish: Callable[[str], None]) -> Fault:
    """Answer a sync request as if ``?async=1`` had been asked: a 202 task, finished at once
    (``finish`` is the simulator's ``finish_task``)."""

    async def fault(request: web.Request, handler: Any) -> web.StreamResponse:
        response = await handler(
            request.clone(rel_url=request.rel_url.update_query({"async": "1"}))
        )
        assert isinstance(response, web.Response) and isinstance(response.body, bytes)
        finish(json.loads(response.body)["task_id"])
        return response

    return fault


def lost_answer(served: asyncio.Event) -> Fault:
    """Generate the image, then never answer: paid for upstream, lost on the way back."""

    async def fault(request: web.Request, handler: Any) -> web.StreamResponse:
        await request.read()
        response = await handler(request)
        served.set()
        await asyncio.Event().wait()
        return response

    return fault
