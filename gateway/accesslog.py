"""The access log: one JSON object per request, the monitoring dashboard's contract.

Every record carries every field in ``FIELDS`` (null when it does not apply), so a reader never
has to guess. Records are built from chosen values only, never from headers or bodies wholesale,
which is what keeps keys, prompts, base64 data and result URLs out of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from typing import IO, Any

FIELDS: tuple[str, ...] = (
    "ts", "request_id", "team", "method", "path", "endpoint", "mode", "model", "n", "size",
    "resolution", "quality", "refs", "status", "error_type", "upstream_status", "upstream_ms",
    "latency_ms", "cost_cny", "reserved_cny", "budget_remaining_cny", "task_id", "upstream_id",
    "ignored_params", "client", "retry_count",
    # Added fields (never renamed, only added to):
    "error_code", "requested_model", "images", "attempts", "idempotency", "dedupe_of",
    "result_ids", "gateway_ms", "prompt", "ledger_id",
)  # fmt: skip
MAX_CLIENT_CHARS = 200
ROTATION_CHECK_S = 1.0


def new_record(method: str, path: str, request_id: str, client: str | None) -> dict[str, Any]:
    record: dict[str, Any] = dict.fromkeys(FIELDS)
    record.update(
        request_id=request_id,
        method=method,
        path=path,
        client=(client or "")[:MAX_CLIENT_CHARS] or None,
        cost_cny=0.0,
        reserved_cny=0.0,
    )
    return record


def result_id(url: str) -> str:
    """A short, stable name for a result URL that does not grant access to the image."""
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def timestamp(now: float) -> str:
    """RFC 3339 in UTC with milliseconds, e.g. ``2026-11-26T01:05:06.451Z``.

    strftime costs a tenth of a datetime round trip, and this runs for every request.
    """
    whole = int(now)
    millis = int((now - whole) * 1000)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(whole))}.{millis:03d}Z"


class AccessLog:
    """Appends lines to stdout or a file, reopened on ``reopen()`` or when rotated away."""

    def __init__(self, target: str, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._target = target
        self._monotonic = monotonic
        self._stream: IO[str] = sys.stdout
        self._identity: tuple[int, int] | None = None
        self._checked = 0.0
        if target != "-":
            self._open()

    def write(self, record: dict[str, Any]) -> None:
        if self._identity is not None:
            self._reopen_if_rotated()
        self._stream.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
        self._stream.flush()

    def reopen(self) -> None:
        if self._target != "-":
            self._stream.close()
            self._open()

    def close(self) -> None:
        if self._target != "-":
            self._stream.close()

    def _open(self) -> None:
        fd = os.open(self._target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._stream = os.fdopen(fd, "a", encoding="utf-8")
        info = os.fstat(fd)
        self._identity = (info.st_dev, info.st_ino)

    def _reopen_if_rotated(self) -> None:
        now = self._monotonic()
        if now - self._checked < ROTATION_CHECK_S:
            return
        self._checked = now
        try:
            info = os.stat(self._target)
        except FileNotFoundError:
            self.reopen()
            return
        if (info.st_dev, info.st_ino) != self._identity:
            self.reopen()
