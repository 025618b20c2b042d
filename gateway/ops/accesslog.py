"""The access log: one JSON object per request, the monitoring dashboard's contract.

Every record carries every field in ``FIELDS`` (null when it does not apply), so a reader never
has to guess. Records are built from chosen values only, never from headers or bodies wholesale,
which is what keeps keys, prompts, base64 data and result URLs out of them. Upstream and task
ids are logged shortened: with the full id, the date and the image count a result URL could be
rebuilt (the ledger keeps them whole, and ``ledger list`` finds an entry by its full id).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import IO, Any

from gateway.ops.safe_log import scrub

FIELDS: tuple[str, ...] = (
    "ts", "request_id", "team", "method", "path", "endpoint", "mode", "model", "n", "size",
    "resolution", "quality", "refs", "status", "error_type", "upstream_status", "upstream_ms",
    "latency_ms", "cost_cny", "reserved_cny", "budget_remaining_cny", "task_id", "upstream_id",
    "ignored_params", "client", "retry_count",
    # Added fields (never renamed, only added to):
    "error_code", "requested_model", "images", "attempts", "idempotency", "dedupe_of",
    "result_ids", "gateway_ms", "prompt", "ledger_id", "ledger_state", "key", "end_user",
    "queued_ms", "client_ip", "instance", "actor", "upstream", "failovers", "cache",
)  # fmt: skip
MAX_CLIENT_CHARS = 200
ROTATION_CHECK_S = 1.0
SHORT_ID_CHARS = 8
FILES_PATH = "/v1/images/files/"
LONG_SEGMENT = 24  # longer than any route's own segment: an id, logged short
TASK_PATHS = ("/v1/images/tasks/", "/images/tasks/")

log = logging.getLogger("gateway")


class Record(dict[str, Any]):
    """A request's record while it runs: only the fields set so far (a held request has about
    20 of the 49), any other reads as None; ``whole()`` for its line."""

    __slots__ = ()

    def __missing__(self, key: str) -> None:
        return None

    def whole(self) -> dict[str, Any]:
        """Every field in ``FIELDS`` order, null where none was set (then any others)."""
        record = dict.fromkeys(FIELDS)
        record.update(self)
        return record


def new_record(method: str, path: str, request_id: str, client: str | None) -> Record:
    record = Record()
    record.update(
        request_id=request_id,
        method=method,
        path=redact_path(path),
        client=safe_text(client or "", MAX_CLIENT_CHARS) or None,
        cost_cny=0.0,
        reserved_cny=0.0,
    )
    return record


def settle_record(request_id: str, now: float) -> dict[str, Any]:
    """A line for money moved outside any request (the settler, a resolution, recovery)."""
    record = dict.fromkeys(FIELDS)
    record.update(
        ts=timestamp(now),
        request_id=request_id,
        ledger_id=request_id,
        endpoint="settle",
        cost_cny=0.0,
        reserved_cny=0.0,
    )
    return record


def short_id(value: str | None) -> str | None:
    """Enough of an upstream or task id to correlate, too little to rebuild a result URL."""
    if value is None:
        return None
    if len(value) > 2 * SHORT_ID_CHARS:
        return value[:SHORT_ID_CHARS] + "…"
    return "#" + hashlib.sha256(value.encode()).hexdigest()[:SHORT_ID_CHARS]


def redact_path(path: str) -> str:
    """A request path fit for a log: result-file paths are credentials, task ids shortened, and
    so is any long segment of another path (a mistyped result path is a credential too)."""
    if path.startswith(FILES_PATH):
        return FILES_PATH + "…"
    for prefix in TASK_PATHS:
        if path.startswith(prefix) and len(path) > len(prefix):
            return prefix + (short_id(path[len(prefix) :]) or "")
    text = safe_text(path, 256)
    if len(text) <= LONG_SEGMENT:  # every route's path: nothing to shorten
        return text
    return "/".join(
        (short_id(part) or "") if len(part) > LONG_SEGMENT else part for part in text.split("/")
    )


def safe_text(value: str, limit: int) -> str:
    """Printable text for a log or a header: aiohttp decodes header bytes with surrogateescape,
    and a lone surrogate cannot be written as UTF-8."""
    cut = value[:limit]
    if cut.isprintable() and cut.isascii():
        return cut
    return "".join(
        ch if ch.isprintable() and not 0xD800 <= ord(ch) <= 0xDFFF else "?" for ch in cut
    )


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
    """Appends lines to stdout or a file, reopened on ``reopen()`` or when rotated away. Every
    line names the ``instance`` that wrote it.

    ``write`` never raises into the request it describes: a record that cannot be encoded is
    written cleaned (lone surrogates replaced), and a write that fails anyway (disk full, file
    gone) is reported on stderr once, the lost lines counted, and the file reopened so that the
    next line has a chance; when writing works again that is reported too.

    Inside an event loop, the lines of one loop iteration are written together, with one write
    and one flush, at the start of the next iteration (a write syscall per request was 1 of ~5
    on the event loop's thread at concurrency 32). ``reopen`` and ``close`` write what is
    pending first, so every line is written once, to the file it was due in, and a graceful
    shutdown (which closes the log last) loses none. Outside a loop a line is written at once.
    """

    def __init__(
        self,
        target: str,
        monotonic: Callable[[], float] = time.monotonic,
        *,
        instance: str | None = None,
    ) -> None:
        self._target = target
        self._instance = instance
        self._monotonic = monotonic
        self._stream: IO[str] = sys.stdout
        self._identity: tuple[int, int] | None = None
        self._checked = 0.0
        self.lost = 0
        self._failing = False
        self._pending: list[str] | None = None  # lines of this loop iteration, not yet written
        if target != "-":
            self._open()

    def write(self, record: dict[str, Any]) -> None:
        """One line of ``record``; a request's ``Record`` with every field."""
        if isinstance(record, Record):
            record = record.whole()
        if self._instance is not None:
            record["instance"] = self._instance
        try:
            line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
            try:
                line.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate would fail half-way through the write
                line = json.dumps(scrub(record), ensure_ascii=False, separators=(",", ":")) + "\n"
        except Exception as exc:
            self._failed(exc)
            return
        if self._pending is not None:
            self._pending.append(line)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write_out([line])
            return
        self._pending = [line]
        loop.call_soon(self.flush)

    def flush(self, *, follow_rotation: bool = True) -> None:
        """Write the lines still pending (called once per loop iteration that wrote any)."""
        lines, self._pending = self._pending, None
        if lines:
            self._write_out(lines, follow_rotation=follow_rotation)

    def _write_out(self, lines: list[str], *, follow_rotation: bool = True) -> None:
        try:
            if self._identity is not None and follow_rotation:
                self._reopen_if_rotated()
            self._stream.write("".join(lines))
            self._stream.flush()
        except Exception as exc:
            self._failed(exc, len(lines))
            return
        if self._failing:
            self._failing = False
            log.warning("access log writable again; %d line(s) were lost", self.lost)

    def reopen(self) -> None:
        self.flush(follow_rotation=False)  # lines of before the reopen, to the file of before
        if self._target == "-":
            return
        with contextlib.suppress(OSError):  # the last buffered line could not be flushed
            self._stream.close()
        try:
            self._open()
        except OSError as exc:
            self._failed(exc)

    def close(self) -> None:
        self.flush(follow_rotation=False)
        if self._target != "-":
            with contextlib.suppress(OSError):
                self._stream.close()

    def _failed(self, exc: Exception, lines: int = 1) -> None:
        self.lost += lines
        if not self._failing:
            self._failing = True
            log.error(
                "access log write failed (%s: %s); requests are still answered, lost lines are "
                "counted and reported once writing works again",
                type(exc).__name__,
                getattr(exc, "strerror", None) or exc,
            )
        if self._target != "-":
            with contextlib.suppress(Exception):  # drop whatever the failed stream still buffers
                self._stream.close()
                self._open()

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
