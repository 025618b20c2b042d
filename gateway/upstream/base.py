"""What the gateway needs from an upstream, whatever speaks to it: send a generation, ask about
a task. The HTTP implementation is ``client.HttpUpstream``, one per configured upstream
(``pool.UpstreamPool``); result images are fetched by ``downloader.Downloader``.

Every implementation sorts its failures by one question: could the upstream have generated (and
charged for) the image? ``UpstreamFailure(uncertain=False)`` and ``UpstreamRejected`` promise
that it did not; anything else is uncertain.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.core.errors import UpstreamFailure, UpstreamRejected
from gateway.core.wire import UpstreamBody


@dataclass(frozen=True, slots=True)
class Reply:
    """A successful JSON answer from the upstream."""

    status: int
    payload: dict[str, Any]
    raw: bytes
    upstream_ms: float
    attempts: int


@dataclass(slots=True)
class SendState:
    """Filled in while sending: did any byte of this request leave the gateway, and when?

    The caller keeps it, so that a cancelled generation can tell a request that provably never
    reached the upstream whole (released) from one that may have (uncertain).
    """

    sent: bool = False
    written: int = 0  # body bytes handed to the connection (counted before each write)
    length: int = 0  # the body's length
    attempts: int = 0
    started: float = field(default_factory=time.perf_counter)
    upstream: str | None = None  # the name of the upstream it is being sent to

    @property
    def whole(self) -> bool:
        """Whether all of the request was handed over: only then may the upstream have read it,
        and so started it."""
        return self.sent and self.written >= self.length

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000


class Upstream(Protocol):
    """An upstream the gateway can send paid requests to."""

    async def submit(
        self,
        path: str,
        body: UpstreamBody,
        query: dict[str, str],
        state: SendState | None = None,
        *,
        retry: bool = True,
    ) -> Reply:
        """POST a generation (``path`` as the client called it); retry only what provably never
        started, and only with ``retry``. Raises UpstreamRejected (it said no) or
        UpstreamFailure."""
        ...

    async def get_task(self, task_id: str) -> Reply:
        """Ask about one async task (harmless to repeat)."""
        ...


class DownloadError(Exception):
    """A result image could not be fetched (the generation itself succeeded)."""


def error_label(error: UpstreamFailure | UpstreamRejected) -> str:
    """The ``status`` label of ``gateway_upstream_errors_total``."""
    if error.upstream_status is not None and error.upstream_status >= 400:
        return str(error.upstream_status)
    return {
        "upstream_timeout": "timeout",
        "upstream_connection_lost": "connection_lost",
        "upstream_unreachable": "unreachable",
        "upstream_answer_too_large": "too_large",
    }.get(error.code or "", "bad_response")
