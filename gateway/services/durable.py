"""Writes that must land: a settlement or stored outcome after the client has its answer.

The result is paid for by then, so a failing write (disk full, database unreachable) is retried
with a bounded backoff for as long as the process lives, loudly, while the caller keeps the
result in memory. Only ``StorageUnavailable`` is retried: any other failure is a bug that a
retry cannot fix, and is logged with its traceback (the hold then recovers as uncertain).
Operations must be safe to repeat, since a try may commit and still lose its acknowledgement.

``later`` is for writes nobody waits for (releasing a hold or an admission nothing else will
close): one worker retries them all, so an outage costs one loop, not one per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from gateway.core.errors import StorageUnavailable
from gateway.ops.metrics import Metrics

T = TypeVar("T")
log = logging.getLogger("gateway.durable")

FIRST_BACKOFF_S = 0.2
MAX_BACKOFF_S = 30.0
LOG_EVERY_S = 30.0


class Durable:
    def __init__(
        self, metrics: Metrics, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    ) -> None:
        self._metrics = metrics
        self._sleep = sleep
        self._later: dict[str, Callable[[], Awaitable[object]]] = {}
        self._worker: asyncio.Task[None] | None = None
        self._closed = False

    async def write(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        """``operation()`` until it commits; ``what`` names it in the log (no secrets)."""
        try:
            return await operation()
        except StorageUnavailable as exc:
            first_error = exc
        self._metrics.unsettled_results.inc()
        try:
            return await self._retry(what, operation, first_error)
        finally:
            self._metrics.unsettled_results.dec()

    async def _retry(
        self, what: str, operation: Callable[[], Awaitable[T]], error: StorageUnavailable
    ) -> T:
        backoff, attempts, logged_at = FIRST_BACKOFF_S, 1, 0.0
        while True:
            now = time.monotonic()
            if now - logged_at >= LOG_EVERY_S:
                logged_at = now
                log.error(
                    "could not store the %s (%d attempts, %s); the result is kept in memory "
                    "and the write retried until it lands",
                    what,
                    attempts,
                    error.message,
                )
            await self._sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)
            attempts += 1
            self._metrics.write_retries.inc()
            try:
                value = await operation()
            except StorageUnavailable as exc:
                error = exc
                continue
            log.warning("stored the %s after %d attempts", what, attempts)
            return value

    def later(self, what: str, operation: Callable[[], Awaitable[object]]) -> None:
        """Retry ``operation()`` in the background until it lands; ``what`` is unique."""
        if what not in self._later:
            self._metrics.unsettled_results.inc()
        self._later[what] = operation
        if self._closed:  # shutting down: named by close(), else left to start-up recovery
            log.error("the %s could not be stored before shutdown", what)
            return
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work_later(), name="background writes")

    async def close(self, last_try_s: float = 5.0) -> None:
        """At shutdown: one last bounded try of each background write (the worker may be in
        a long backoff), then what is still unwritten is named and left to start-up recovery."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self._later:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(last_try_s):
                    await self._try_each()
        if self._later:
            log.error("shutting down with %d write(s) not stored: %s", len(self._later),
                      ", ".join(self._later))  # fmt: skip

    async def _try_each(self) -> None:
        for what, operation in list(self._later.items()):
            try:
                await operation()
            except StorageUnavailable:
                continue
            except Exception:
                log.exception("the %s failed and is given up", what)
            del self._later[what]
            self._metrics.unsettled_results.dec()

    async def _work_later(self) -> None:
        backoff, logged_at = FIRST_BACKOFF_S, time.monotonic()
        while self._later:
            await self._sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)
            self._metrics.write_retries.inc()
            await self._try_each()
            if self._later and time.monotonic() - logged_at >= LOG_EVERY_S:
                logged_at = time.monotonic()
                log.error("%d write(s) waiting for the database, retried until they land",
                          len(self._later))  # fmt: skip
