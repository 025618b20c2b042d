"""The aiohttp internals that ``gateway/http/protocol.py`` overrides or reads, checked against
the installed aiohttp: a new aiohttp that renames or reshapes one fails here, loudly, instead
of silently dropping a connection limit, a header deadline or the content-free error answer.

pyproject.toml bounds aiohttp to the minor versions these were checked against; raise the
bound only with this file passing (and protocol.py reviewed against the new release's
``web_protocol.py``, ``web_server.py`` and ``web_runner.py``).
"""

from __future__ import annotations

import inspect
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.http_parser import RawRequestMessage
from aiohttp.web_protocol import RequestHandler

from gateway.http.protocol import GatewayRequestHandler, GatewayServer

CHECKED = ((3, 14),)  # the minor versions protocol.py was checked against


def parameters(function: Any) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_the_installed_aiohttp_is_one_protocol_py_was_checked_against() -> None:
    major, minor = (int(part) for part in aiohttp.__version__.split(".")[:2])
    assert (major, minor) in CHECKED, (
        f"aiohttp {aiohttp.__version__}: review gateway/http/protocol.py against it, then add "
        "it to CHECKED here and to the bound in pyproject.toml"
    )


@pytest.mark.parametrize(
    ("owner", "name", "expected"),
    [
        (web.AppRunner, "_make_server", ["self"]),
        (web.Server, "__init__", ["self", "handler", "request_factory", "handler_cancellation",
                                  "loop", "kwargs"]),
        (web.Server, "connection_made", ["self", "handler", "transport"]),
        (web.Server, "connection_lost", ["self", "handler", "exc"]),
        (web.Server, "_make_request", ["self", "message", "payload", "protocol", "writer",
                                       "task"]),  # the request_factory protocol.py wraps
        (RequestHandler, "__init__", None),  # (manager, *, loop, ...keyword settings)
        (RequestHandler, "connection_made", ["self", "transport"]),
        (RequestHandler, "connection_lost", ["self", "exc"]),
        (RequestHandler, "finish_response", ["self", "request", "resp", "start_time"]),
        (RequestHandler, "handle_error", ["self", "request", "status", "exc", "message"]),
        (RequestHandler, "force_close", ["self"]),
    ],
)  # fmt: skip
def test_the_methods_protocol_py_overrides_or_calls_keep_their_signatures(
    owner: type, name: str, expected: list[str] | None
) -> None:
    method = getattr(owner, name, None)
    assert method is not None, f"aiohttp's {owner.__name__}.{name} is gone"
    if expected is not None:
        assert parameters(method) == expected, f"{owner.__name__}.{name} changed its parameters"
    else:
        first = parameters(method)[:3]
        assert first == ["self", "manager", "loop"], f"RequestHandler.__init__ is now {first}"
    assert inspect.iscoroutinefunction(method) == (name in ("_make_server", "finish_response"))


async def test_the_attributes_protocol_py_reads_exist_on_a_real_server() -> None:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response()

    server = web.Server(handler)
    for name in ("request_handler", "request_factory", "handler_cancellation", "_loop",
                 "_kwargs"):  # fmt: skip
        assert hasattr(server, name), f"aiohttp's Server has no {name} now"
    assert isinstance(server._kwargs, dict)
    protocol = server()
    for name in ("_loop", "transport", "_request_handler", "_manager"):
        assert hasattr(protocol, name), f"aiohttp's RequestHandler has no {name} now"


def test_a_raw_request_message_can_be_copied_with_cleaned_fields() -> None:
    """clean_message: ``message._replace(headers=..., raw_headers=..., path=..., url=...)``
    (a named tuple with the pure-Python parser, a C class with the same fields otherwise)."""
    assert hasattr(RawRequestMessage, "_replace")
    for field in ("method", "path", "version", "headers", "raw_headers", "url"):
        assert hasattr(RawRequestMessage, field), f"RawRequestMessage has no {field} now"


def test_the_gateway_classes_still_override_what_they_mean_to() -> None:
    for name in ("connection_made", "connection_lost", "finish_response", "handle_error"):
        assert name in vars(GatewayRequestHandler), name
        assert name in vars(RequestHandler), f"aiohttp's RequestHandler has no {name} to override"
    for name in ("__call__", "connection_made", "connection_lost"):
        assert name in vars(GatewayServer) and name in vars(web.Server), name
