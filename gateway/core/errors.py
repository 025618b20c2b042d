"""Every error the gateway answers with, and the one OpenAI-shaped body they all render to.

    GatewayError                      status  type
    ├── InvalidRequest                 400    invalid_request_error
    ├── Unauthorized                   401    authentication_error
    ├── PermissionDenied               403    permission_error
    ├── BudgetExceeded                 402    insufficient_quota
    ├── NotFound                       404    invalid_request_error
    ├── Gone                           410    invalid_request_error (a deleted result)
    ├── MethodNotAllowed               405    invalid_request_error
    ├── Conflict                       409    invalid_request_error
    │   └── IdempotencyConflict
    ├── PayloadTooLarge                413    invalid_request_error
    ├── UnsupportedMediaType           415    invalid_request_error
    ├── IdempotencyMismatch            422    invalid_request_error
    ├── ClientClosedRequest            499    invalid_request_error (only logged)
    ├── RateLimited                    429    rate_limit_error
    ├── UpstreamRejected               (the upstream's status and type)
    ├── UpstreamFailure                502/504 upstream_error
    ├── UpstreamUnavailable            503    upstream_error (every upstream cooling or disabled)
    ├── StorageUnavailable             503    server_error (the ledger cannot be written)
    ├── UpgradeRequired                503    server_error (the database needs a newer release)
    ├── NoRoom                         503    server_error (the connection cap is reached)
    ├── ShuttingDown                   503    server_error (stopped before it was sent)
    └── InternalError                  500    server_error

``should_retry`` becomes the ``x-should-retry`` header that the OpenAI SDKs obey: False where a
retry cannot help or could buy the same image twice.
"""

from __future__ import annotations

import math
from typing import Any


class GatewayError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None
    should_retry: bool | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.should_retry is not None:
            headers["x-should-retry"] = "true" if self.should_retry else "false"
        return headers


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_value"
    should_retry = False


class Unauthorized(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"
    should_retry = False


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    code = "forbidden"
    should_retry = False


class BudgetExceeded(GatewayError):
    status = 402
    type = "insufficient_quota"
    code = "budget_exceeded"
    should_retry = False


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"
    should_retry = False


class Gone(GatewayError):
    status = 410
    type = "invalid_request_error"
    code = "result_expired"
    should_retry = False


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"
    should_retry = False


class Conflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"
    should_retry: bool | None = False


class IdempotencyConflict(Conflict):
    code = "idempotency_key_in_use"
    should_retry: bool | None = None


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"
    should_retry = False


class UnsupportedMediaType(GatewayError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"
    should_retry = False


class IdempotencyMismatch(GatewayError):
    status = 422
    type = "invalid_request_error"
    code = "idempotency_key_reused"
    should_retry = False


class ClientClosedRequest(GatewayError):
    """The client went away while sending its request: nobody reads this answer, the log does.

    499 is nginx's status for it; nothing was sent upstream, nothing is charged.
    """

    status = 499
    type = "invalid_request_error"
    code = "client_closed_request"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class UpstreamRejected(GatewayError):
    """The upstream answered with its own JSON error: nothing was generated, nothing is charged."""

    attempts = 1
    upstream_status: int | None = None
    upstream_ms: float | None = None
    retry_after: float | None = None  # the upstream's Retry-After, in seconds

    def __init__(
        self,
        status: int,
        type_: str,
        message: str,
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code)
        self.status = status
        self.type = type_
        if status in (400, 401, 402, 404, 413, 422):
            self.should_retry = False


class UpstreamFailure(GatewayError):
    """The upstream could not be reached or its answer was lost.

    ``uncertain`` means the request was sent, so the image may have been generated and paid for:
    the client must not retry blindly.
    """

    type = "upstream_error"
    attempts = 1
    upstream_status: int | None = None
    upstream_ms: float | None = None

    def __init__(self, message: str, *, status: int = 502, code: str, uncertain: bool) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.uncertain = uncertain
        self.should_retry = False if uncertain else None


class UpstreamUnavailable(GatewayError):
    """Every upstream is cooling down or disabled: nothing was sent, nothing reserved. A retry
    after ``Retry-After`` is safe."""

    status = 503
    type = "upstream_error"
    code = "upstream_unavailable"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))})


class StorageUnavailable(GatewayError):
    """The ledger cannot be written (disk full, file gone, database down): nothing was sent.

    ``x-should-retry: false``: an SDK retrying at once would only fail again, and a request
    that did reach the upstream must never be bought twice.
    """

    status = 503
    type = "server_error"
    code = "storage_unavailable"
    should_retry = False


class UpgradeRequired(GatewayError):
    """The database serves only newer releases than this instance (README, "Upgrading")."""

    status = 503
    type = "server_error"
    code = "upgrade_required"


class NoRoom(GatewayError):
    """Every connection the open-file limit has room for is busy: this one is answered and
    closed before its request is read. Nothing was reserved or sent, so a later retry is safe."""

    status = 503
    type = "server_error"
    code = "too_many_connections"
    should_retry = True


class ShuttingDown(GatewayError):
    """The gateway stopped while this request waited for an identical one (the opt-in cache):
    nothing was reserved or sent for it, so a retry (at another instance) is safe."""

    status = 503
    type = "server_error"
    code = "shutting_down"
    should_retry = True


class InternalError(GatewayError):
    status = 500
    type = "server_error"
    code = "internal_error"
