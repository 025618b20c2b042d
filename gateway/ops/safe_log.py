"""Text that any UTF-8 writer accepts.

aiohttp decodes header bytes (and, with its pure-Python parser, the request target) as UTF-8
with ``surrogateescape``, so a byte that is not UTF-8 arrives as a lone surrogate: a ``str``
that ``json.dumps(..., ensure_ascii=False)`` keeps and that a UTF-8 file or stdout refuses.
``clean`` turns those back into their bytes and decodes them with U+FFFD replacement.
"""

from __future__ import annotations

import re
from typing import Any

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
