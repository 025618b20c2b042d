"""Text that any UTF-8 writer accepts, and an access log whose failures never reach a request.

aiohttp decodes header bytes (and, with its pure-Python parser, the request target) as UTF-8
with ``surrogateescape``, so a byte that is not UTF-8 arrives as a lone surrogate: a ``str``
that ``json.dumps(..., ensure_ascii=False)`` keeps and that a UTF-8 file or stdout refuses.
``clean`` turns those back into their bytes and decodes them with U+FFFD replacement.
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Any

from gateway.accesslog import AccessLog

log = logging.getLogger("gateway")

_SURROGATE = re.compile("[\ud800-\udfff]")


def is_clean(text: str) -> bool:
    return text.isascii() or _SURROGATE.search(text) is None


def clean(text: str) -> str:
    """``text`` with every lone surrogate replaced: escaped bytes by U+FFFD, the same way a
    UTF-8 decoder with ``errors="replace"`` would have treated the original bytes."""
    if is_clean(text):
        return text
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that no decoder put there
        return _SURROGATE.sub("\ufffd", text)
    return raw.decode("utf-8", "replace")


def scrub(value: Any) -> Any:
    """``value`` (a record or anything in one) with every string cleaned."""
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, dict):
        return {key: scrub(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(item) for item in value]
    return value


class GuardedAccessLog(AccessLog):
    """An ``AccessLog`` whose ``write`` never raises into the request it describes.

    A record that cannot be encoded is written cleaned. A write that fails anyway (disk full,
    file gone, closed stdout) is reported to stderr once, the lines lost are counted, and the
    file is reopened so the next line has a chance; when writing works again that is reported
    too, with the count.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lost = 0
        self._failing = False

    def write(self, record: dict[str, Any]) -> None:
        try:
            try:
                super().write(record)
            except UnicodeEncodeError:
                super().write(scrub(record))
        except Exception as exc:
            self._failed(exc)
            return
        if self._failing:
            self._failing = False
            log.warning("access log writable again; %d line(s) were lost", self.lost)

    def reopen(self) -> None:
        try:
            super().reopen()
        except OSError as exc:
            self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        self.lost += 1
        if not self._failing:
            self._failing = True
            log.error(
                "access log write failed (%s: %s); requests are still answered, lost lines are "
                "counted and reported once writing works again",
                type(exc).__name__,
                getattr(exc, "strerror", None) or exc,
            )
        with contextlib.suppress(Exception):  # already reported; the next write tries again
            super().reopen()  # drop whatever the failed stream still buffers
