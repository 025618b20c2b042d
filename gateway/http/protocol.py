"""The HTTP connection layer under the app: aiohttp's RequestHandler with the gateway's limits.

What aiohttp 3.14 does on its own, and what this module changes:

- Header values (and, with the pure-Python parser, the request target) are decoded with
  ``surrogateescape``; the app then holds strings no UTF-8 writer accepts. Here every request
  reaches the app with those bytes replaced by U+FFFD (``clean_message``).
- A request that does not parse is answered by ``RequestHandler.handle_error``, which logs the
  parser's exception to ``aiohttp.server`` and echoes its message in a text/plain body; that
  message quotes the offending line (an ``Authorization`` header with its key, a request line
  with a result path). Here it is answered with the gateway's JSON error and logged as one line
  naming the problem, never the request's bytes; ``install_log_filter`` strips exception text
  from anything aiohttp's own loggers still emit.
- The only clock on a connection's first request head is ``keepalive_timeout`` (default 3630 s),
  armed when the connection is made. Here the first head must arrive within
  ``header_timeout_s``; after a response, ``keepalive_timeout_s`` (aiohttp's timer, a deadline
  that trickled bytes do not extend) bounds the idle time and the next head.
- Nothing bounds the number of connections: past the open-file limit, ``accept()`` fails with
  EMFILE and nothing else (not the upstream call of a paying request) gets a descriptor either.
  Here at most ``max_connections`` client connections are kept; a new one beyond that closes
  the oldest connection that is not in the middle of a request (idle keep-alive, or a head that
  has not arrived), or, when every connection is busy, is itself refused: its request is
  answered 503 ``too_many_connections`` with ``Connection: close`` (its body read and dropped,
  so the close is a FIN and the client reads the answer, not a reset). At most ``refusing``
  refused connections wait for their heads at once (they hold a descriptor but no upstream
  one); past that a newcomer is closed unanswered.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
)
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.core.errors import InternalError, InvalidRequest, NoRoom
from gateway.http.responses import json_response
from gateway.ops.safe_log import clean, is_clean

log = logging.getLogger("gateway.http")

RESERVED_FDS = 64  # database, access log, listening and notify sockets, stdio, epoll, imports
MIN_CONNECTIONS = 8
REFUSING_AT_ONCE = 64  # refused connections answered 503 at once (one descriptor each)
REPORT_EVERY_S = 60.0
AIOHTTP_LOGGERS = ("aiohttp.server", "aiohttp.access", "aiohttp.web", "aiohttp.internal")
KNOWN_HEADERS = frozenset(
    value.lower() for name, value in vars(hdrs).items() if name.isupper() and isinstance(value, str)
) | {"x-request-id", "idempotency-key", "x-stainless-retry-count", "openai-organization"}
_BEFORE_QUOTE = re.compile(r"""\n\n|b?['"]""")
_QUOTED = re.compile(r"""b?(['"])(.*?)(?<!\\)\1""", re.DOTALL)
_SAFE_REASON = re.compile(r"[A-Za-z][A-Za-z0-9 ,.:()-]{0,99}")
MAX_WORD = 24  # longer words could be a key that a parser quoted without quotes
PLAIN_REASONS: dict[type[HttpProcessingError], str] = {  # most specific first
    InvalidURLError: "Invalid request target",
    BadHttpMethod: "Invalid method",
    BadStatusLine: "Invalid request line",
    InvalidHeader: "Invalid HTTP header",
    LineTooLong: "Line too long",
}


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float
    keepalive_timeout_s: float
    max_connections: int
    refusing: int = REFUSING_AT_ONCE


def max_connections(open_files: int, backlog: int) -> int:
    """Client connections that fit in ``open_files`` descriptors, each with an upstream one.

    Kept free besides: one accept burst (asyncio accepts up to ``backlog`` sockets per wakeup
    before any protocol sees them), the refused connections being answered, and RESERVED_FDS
    for what the process holds anyway.
    """
    burst = min(backlog, open_files // 4)
    refusing = min(REFUSING_AT_ONCE, open_files // 16)
    return max(MIN_CONNECTIONS, (open_files - burst - refusing - RESERVED_FDS) // 2)


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` whose connections are ``GatewayRequestHandler``s under ``limits``."""

    def __init__(self, app: web.Application, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(app, keepalive_timeout=limits.keepalive_timeout_s, **kwargs)
        self.limits = limits

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # the app's startup runs here
        return GatewayServer(plain, self.limits)


class GatewayServer(web.Server):
    """The protocol factory: aiohttp's ``Server`` for the app, plus connection bookkeeping."""

    def __init__(self, plain: web.Server, limits: ConnectionLimits) -> None:
        super().__init__(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=plain._loop,
            **plain._kwargs,
        )
        self.limits = limits
        self._app_request_factory = self.request_factory
        self.request_factory = self._make_clean_request
        self._live: set[GatewayRequestHandler] = set()
        self._idle: dict[GatewayRequestHandler, None] = {}  # oldest first
        self.shed = 0  # idle or slow connections closed to make room
        self.refused = 0  # new connections refused because every other one was busy
        self._refusing = 0  # refused connections still waiting for their 503
        self.slow_heads = 0  # connections closed because their first head came too late
        self._reported_at = float("-inf")
        self._reported = (0, 0)

    def __call__(self) -> RequestHandler:
        return GatewayRequestHandler(
            self, loop=self._loop, header_timeout=self.limits.header_timeout_s, **self._kwargs
        )

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if not isinstance(handler, GatewayRequestHandler):
            return
        self._live.add(handler)
        self._idle[handler] = None
        if len(self._live) > self.limits.max_connections:
            self._make_room(handler)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        self._forget(handler)

    def request_started(self, handler: GatewayRequestHandler) -> None:
        self._idle.pop(handler, None)

    def request_finished(self, handler: GatewayRequestHandler) -> None:
        if handler in self._live and handler.transport is not None:
            self._idle[handler] = None  # now the newest idle connection

    def _make_room(self, newcomer: GatewayRequestHandler) -> None:
        victim = next(iter(self._idle))  # the newcomer is idle, so there is one
        self._forget(victim)
        if victim is not newcomer:
            self.shed += 1
            victim.force_close()
        elif self._refusing < self.limits.refusing:
            self.refused += 1
            self._refusing += 1
            newcomer.refuse()
        else:
            self.refused += 1
            newcomer.force_close()
        self._report()

    def refusal_done(self) -> None:
        self._refusing -= 1

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (aiohttp's)
        """Stop, and say how many connections were closed or refused in all (the warning
        above comes at most once a minute)."""
        if self.shed or self.refused or self.slow_heads:
            log.info(
                "connections closed to make room: %d; refused (503 or closed) while every "
                "connection was busy: %d; closed for a first request head later than %ss: %d",
                self.shed,
                self.refused,
                self.limits.header_timeout_s,
                self.slow_heads,
            )
        await super().shutdown(timeout)

    def _forget(self, handler: RequestHandler) -> None:
        self._live.discard(handler)
        self._idle.pop(handler, None)  # type: ignore[call-overload]

    def _report(self) -> None:
        now = time.monotonic()
        if now - self._reported_at < REPORT_EVERY_S:
            return
        shed, refused = self.shed - self._reported[0], self.refused - self._reported[1]
        self._reported_at, self._reported = now, (self.shed, self.refused)
        log.warning(
            "connection limit (%d) reached: closed %d idle or slow connection(s) and refused %d "
            "while every connection was busy (reported at most once a minute)",
            self.limits.max_connections,
            shed,
            refused,
        )

    def _make_clean_request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        if isinstance(protocol, GatewayRequestHandler):
            protocol.request_started()
        return self._app_request_factory(clean_message(message), payload, protocol, writer, task)


class GatewayRequestHandler(RequestHandler):
    """One connection: a deadline for the first request head, and errors without content."""

    __slots__ = ("_head_timer", "_header_timeout", "_refused", "_requests", "_server")

    def __init__(self, manager: GatewayServer, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._server = manager  # aiohttp drops its own reference when the connection is lost
        self._header_timeout = header_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        self._requests = 0
        self._refused = False

    def refuse(self) -> None:
        """No room for this connection: answer its first request 503 and close it."""
        self._refused = True
        self._request_handler = _answer_no_room

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # may have closed it already: no room
        if self.transport is not None and self._requests == 0:
            self._head_timer = self._loop.call_later(self._header_timeout, self._head_too_slow)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        if self._refused:
            self._refused = False
            self._server.refusal_done()
        super().connection_lost(exc)

    def request_started(self) -> None:
        """A whole request head has arrived (called as aiohttp turns it into a request)."""
        self._requests += 1
        self._cancel_head_timer()
        self._server.request_started(self)

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self._server.request_finished(self)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Like aiohttp's, minus the request's content in the log and in the answer."""
        if isinstance(exc, HttpProcessingError):
            problem = describe(exc)
            first_garbage = self._requests == 1 and isinstance(exc, BadHttpMethod)
            log.log(  # scanners and TLS on the HTTP port are noise, as aiohttp itself judges
                logging.DEBUG if first_garbage else logging.WARNING,
                "malformed request from %s: %s",
                request.remote,
                problem,
            )
            error: InvalidRequest | InternalError = InvalidRequest(
                f"Malformed HTTP request: {problem}.", code="bad_request"
            )
        else:
            log.error(
                "request from %s failed outside the app (%s)%s",
                request.remote,
                type(exc).__name__ if exc is not None else f"status {status}",
                _frames(exc),
            )
            error = InternalError("The gateway failed unexpectedly; the error was logged.")
        if request.writer.output_size > 0:
            raise ConnectionError(
                "Response is sent already, cannot send another response with the error message"
            )
        response = json_response(error.body(), status, error.response_headers())
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        """aiohttp's words (fixed texts and the peer's address), the frames, not the message."""
        exc = kwargs.pop("exc_info", None)
        if not isinstance(exc, BaseException):
            exc = sys.exc_info()[1]
        message, *values = args or ("unhandled error",)
        try:
            text = str(message) % tuple(values) if values else str(message)
        except (TypeError, ValueError):
            text = str(message)
        self.logger.error("%s%s", text, _frames(exc))

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._requests == 0 and self.transport is not None:
            self._server.slow_heads += 1
            log.debug(
                "closing a connection whose first request head took over %ss", self._header_timeout
            )
            self.force_close()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None


async def _answer_no_room(request: web.BaseRequest) -> web.StreamResponse:
    """The answer on a refused connection; aiohttp then reads and drops the request's body
    (up to its lingering time) and closes with a FIN, so the client reads this, not a reset."""
    error = NoRoom(
        "The gateway has no room for another connection right now; nothing was sent or "
        "charged. Retry in a moment."
    )
    response = json_response(
        error.body(), error.status, {**error.response_headers(), "Retry-After": "1"}
    )
    response.force_close()
    return response


def clean_message(message: RawRequestMessage) -> RawRequestMessage:
    """``message`` with lone surrogates replaced in header values and the request target."""
    headers = message.headers
    clean_headers = all(is_clean(value) for value in headers.values())
    if clean_headers and is_clean(message.path):
        return message
    changes: dict[str, Any] = {}
    if not clean_headers:
        changes["headers"] = CIMultiDictProxy(
            CIMultiDict((name, clean(value)) for name, value in headers.items())
        )
    if not is_clean(message.path):
        changes["path"] = clean(message.path)
        changes["url"] = URL(clean(str(message.url)))
    return message._replace(**changes)


def describe(exc: HttpProcessingError) -> str:
    """What was wrong with a request, in words from the parser, without any of its bytes.

    Both parsers quote the offending bytes (``repr``) after a fixed description; the pure-Python
    one gives a bad request target unquoted. So: the text before the first quote, if it looks
    like words, plus the header's name if it is a well-known one; else words for its type.
    """
    message = exc.message if isinstance(exc.message, str) else ""
    head = _BEFORE_QUOTE.split(message, maxsplit=1)[0]
    reason = " ".join(head.split()).rstrip(" :.")
    if not _SAFE_REASON.fullmatch(reason) or any(len(w) > MAX_WORD for w in reason.split()):
        reason = next(
            (words for kind, words in PLAIN_REASONS.items() if isinstance(exc, kind)),
            "Malformed request",
        )
    quoted = _QUOTED.search(message)
    if quoted is not None:
        name = quoted.group(2).split(":", 1)[0].strip().lower()
        if name in KNOWN_HEADERS:
            return f"{reason} (in the {name} header)"
    return reason


def _frames(exc: BaseException | None) -> str:
    """A traceback's frames (file, line, source) and the exception's type, not its message."""
    if exc is None or exc.__traceback__ is None:
        return ""
    frames = "".join(traceback.format_tb(exc.__traceback__))
    return f"\nTraceback (most recent call last):\n{frames}{type(exc).__name__}"


class _NoRequestContent(logging.Filter):
    """For aiohttp's loggers: exception text replaced by its frames and type; no access lines.

    The gateway writes its own access log; aiohttp's (off in ``serve``) would print request
    lines, which for ``/v1/images/files/...`` hold a credential.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "aiohttp.access":
            return False
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            record.exc_info = None
            record.exc_text = _frames(exc).lstrip("\n") or type(exc).__name__
        return True


_FILTER = _NoRequestContent()


def install_log_filter() -> None:
    for name in AIOHTTP_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
