"""Release numbers (``MAJOR.MINOR.PATCH``) and their order; pure."""

from __future__ import annotations

import re

LEADING_DIGITS = re.compile(r"\d*")

FIRST_RELEASE = "0.1.0"  # the first release: every database serves it until a step contracts


def release_key(version: str) -> tuple[int, ...]:
    """``"0.10.1"`` -> ``(0, 10, 1)``; a suffix after the numbers (``0.2.0.dev1``) is ignored."""
    parts = version.split(".")[:3]
    return tuple(int(LEADING_DIGITS.match(part)[0] or 0) for part in parts)  # type: ignore[index]


def newest(a: str, b: str) -> str:
    return a if release_key(a) >= release_key(b) else b
