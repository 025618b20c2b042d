"""Reading a body without ever holding more than a limit of it, or a second copy of it."""

from __future__ import annotations

import aiohttp


class TooLarge(Exception):
    """The stream had more than the limit; reading stopped at the limit."""


async def read_capped(stream: aiohttp.StreamReader, limit: int) -> bytearray:
    """All of ``stream``, or TooLarge as soon as it passes ``limit`` bytes.

    The chunks are appended to one growing buffer rather than joined at the end, so a large
    body is never held twice (large buffers grow in place: glibc's realloc uses mremap). The
    size the client declares is not trusted for an up-front allocation.
    """
    buffer = bytearray()
    async for chunk in stream.iter_any():
        if len(buffer) + len(chunk) > limit:
            raise TooLarge(limit)
        buffer += chunk
    return buffer
