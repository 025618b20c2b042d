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
    seen: int = 0  # API requests (generations, edits, task polls), not file downloads

    def add(self, fault: Fault, kind: str = "POST") -> None:
        self.queue.append((kind, fault))

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if _kind(request) != "GET":  # the result store's downloads are not API calls
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


def reset_mid_body(after: int = 64 * 1024) -> Fault:
    """Read the first ``after`` bytes of the body, then drop the connection with a TCP reset:
    the request never arrived whole, so nothing can have been started."""

    async def fault(request: web.Request, handler: Any) -> web.StreamResponse:
        await request.content.readexactly(after)
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
    assert isinstance(transport, asyncio.Transport)
    _abort(transport)


# -- a load balancer with an idle timeout ---------------------------------------------------------


class IdleTimeoutFront:
    """A TCP load balancer in front of an upstream that closes connections idle for ``idle_s``.

    At exactly ``idle_s`` after the last byte in either direction the front closes the
    connection on its side: the backend connection is closed and whatever the client sends
    afterwards is answered with a TCP reset, never forwarded. The client learns of the close
    ``fin_delay_s`` later (the FIN's trip across the network), or never when it is None (a
    load balancer, NAT or firewall that drops idle flows silently, as AWS NLB does). A request
    sent in that window fails after its bytes left, although the upstream never saw it.
    """

    def __init__(
        self, backend_port: int, *, idle_s: float = 1.0, fin_delay_s: float | None = None
    ) -> None:
        self.backend_port = backend_port
        self.idle_s = idle_s
        self.fin_delay_s = fin_delay_s
        self.refused = 0  # POSTs that arrived on a connection the front had closed
        self.refused_gets = 0  # other requests so (a GET is resent by aiohttp: harmless)
        self.connections = 0
        self.sides: set[_FrontSide] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _FrontSide(self), "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for side in list(self.sides):
            side.close()


class _FrontSide(asyncio.Protocol):
    """One client connection of the front, piped to its own backend connection."""

    def __init__(self, front: IdleTimeoutFront) -> None:
        self.front = front
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.backend: asyncio.Transport | None = None
        self.pending: list[bytes] = []
        self.expired = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.front.connections += 1
        self.front.sides.add(self)
        self.touch()
        self.opening = self.loop.create_task(self.open_backend())

    async def open_backend(self) -> None:
        self.backend, _ = await self.loop.create_connection(
            lambda: _BackSide(self), "127.0.0.1", self.front.backend_port
        )
        for data in self.pending:
            self.backend.write(data)
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.expired:  # the front closed this connection; the request goes nowhere
            if data.startswith(b"POST "):
                self.front.refused += 1
            else:
                self.front.refused_gets += 1
            _abort(self.transport)
            return
        self.touch()
        if self.backend is None:
            self.pending.append(data)
        else:
            self.backend.write(data)

    def from_backend(self, data: bytes) -> None:
        assert self.transport is not None
        self.touch()
        self.transport.write(data)

    def touch(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(self.front.idle_s, self.expire)

    def expire(self) -> None:
        self.expired = True
        if self.backend is not None:
            self.backend.close()
        if self.front.fin_delay_s is not None and self.transport is not None:
            self.loop.call_later(self.front.fin_delay_s, self.transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.sides.discard(self)
        self.close()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.backend is not None:
            self.backend.close()
        if self.transport is not None:
            self.transport.close()


class _BackSide(asyncio.Protocol):
    def __init__(self, front_side: _FrontSide) -> None:
        self.front_side = front_side

    def data_received(self, data: bytes) -> None:
        self.front_side.from_backend(data)

    def connection_lost(self, exc: Exception | None) -> None:
        front = self.front_side
        if not front.expired and front.transport is not None:
            front.transport.close()  # the backend itself closed: pass that on at once


def _abort(transport: asyncio.Transport) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a crashed host or a balancer that forgot it does."""
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
