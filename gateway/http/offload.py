"""CPU-heavy steps moved off the event loop, where that actually helps.

Only a call that releases the GIL can run beside the loop: ``hashlib`` does for buffers over
2 KiB, so hashing a 12 MB reference in a thread costs the loop nothing. ``binascii`` (base64)
and ``json`` hold the GIL throughout; in a thread they would stall the loop just the same, and
a process pool would copy every image twice through a pipe, which costs more than encoding it
(measured for issue 16). Those stay on the loop, in slices small enough to interleave.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from gateway.core.wire import Buffer, sha256_of

OFFLOAD_BYTES = 256 * 1024  # below this a thread hop costs more than hashing in place


async def digest(parts: Sequence[Buffer]) -> bytes:
    """The sha256 of ``parts`` concatenated, computed in a thread when they are large."""
    if sum(len(part) for part in parts) < OFFLOAD_BYTES:
        return sha256_of(parts)
    return await asyncio.to_thread(sha256_of, parts)
