"""The HTTP connection layer under the app: aiohttp's RequestHandler, minus request content.

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
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import traceback
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

from gateway.errors import InternalError, InvalidRequest
from gateway.responses import json_response
from gateway.safe_log import clean, is_clean

log = logging.getLogger("gateway.http")

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


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` whose connections are ``GatewayRequestHandler``s."""

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # the app's startup runs here
        return GatewayServer(plain)


class GatewayServer(web.Server):
    """The protocol factory: aiohttp's ``Server`` for the app, with clean requests."""

    def __init__(self, plain: web.Server) -> None:
        super().__init__(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=plain._loop,
            **plain._kwargs,
        )
        self._app_request_factory = self.request_factory
        self.request_factory = self._make_clean_request

    def __call__(self) -> RequestHandler:
        return GatewayRequestHandler(self, loop=self._loop, **self._kwargs)

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
    """One connection, whose errors are answered and logged without the request's content."""

    def __init__(self, manager: GatewayServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._requests = 0

    def request_started(self) -> None:
        """A whole request head has arrived (called as aiohttp turns it into a request)."""
        self._requests += 1

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
