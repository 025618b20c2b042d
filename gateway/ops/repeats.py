"""Repeated identical log lines, once: a database outage must not write one ERROR per request.

A handler filter: the first WARNING-or-worse record with a given logger, level and message goes
through; identical ones within ``window_s`` are held back and counted, and the first one after
the window goes through carrying that count. So an outage logs each distinct error at most once
every ``window_s``, with how often it happened.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

WINDOW_S = 10.0
MAX_TRACKED = 1000  # distinct messages remembered; older windows are forgotten past this


class RepeatFilter(logging.Filter):
    def __init__(
        self, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self._window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()  # records arrive from the SQLite writer thread too
        self._seen: dict[tuple[str, int, str], list[float]] = {}  # key -> [window start, held]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        message = record.getMessage()
        key = (record.name, record.levelno, message)
        now = self._clock()
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None and now - seen[0] < self._window_s:
                seen[1] += 1
                return False
            held = int(seen[1]) if seen is not None else 0
            if len(self._seen) >= MAX_TRACKED:
                self._forget(now)
            self._seen[key] = [now, 0]
        if held:
            record.msg = f"{message} (and {held} more like it in the last {self._window_s:g} s)"
            record.args = None
        return True

    def _forget(self, now: float) -> None:
        for key in [k for k, (start, _) in self._seen.items() if now - start >= self._window_s]:
            del self._seen[key]
        if len(self._seen) >= MAX_TRACKED:  # a flood of distinct messages: start afresh
            self._seen.clear()
