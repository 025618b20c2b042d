"""Reading a body without ever holding more than a limit of it."""

from __future__ import annotations

import aiohttp


class TooLarge(Exception):
    """The stream had more than the limit; reading stopped at the limit."""


async def read_capped(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """All of ``stream``, or TooLarge as soon as it passes ``limit`` bytes."""
    parts: list[bytes] = []
    total = 0
    async for chunk in stream.iter_any():
        total += len(chunk)
        if total > limit:
            raise TooLarge(limit)
        parts.append(chunk)
    return b"".join(parts)
