"""JSON responses, including the one rendering of every error."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from gateway.core.errors import GatewayError


def json_response(
    payload: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=json.dumps(payload, ensure_ascii=False).encode(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_response(
    error: GatewayError, record: dict[str, Any], extra_headers: dict[str, str] | None = None
) -> web.Response:
    """The OpenAI-shaped error body; notes the error in the request's access-log record."""
    record["error_type"] = error.type
    record["error_code"] = error.code
    return json_response(
        error.body(), error.status, {**(extra_headers or {}), **error.response_headers()}
    )
