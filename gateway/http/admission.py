"""How many large request bodies are read and checked at once, counted in bytes.

A body over ``LARGE_BODY`` bytes holds its declared length (``max_body_mb`` when it is sent
chunked) from one budget while it is read, checked and normalized; beyond the budget the next
one waits its turn, first come first served, its bytes left in the kernel (TCP backpressure
slows its client). That bounds both the memory in flight and the share of the event loop that
big uploads take from small requests. Small bodies never wait here.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

LARGE_BODY = 1024 * 1024


def body_cost(content_length: int | None, max_body_bytes: int) -> int:
    """The bytes a body holds from the budget: 0 for a small one."""
    if content_length is None:
        return max_body_bytes
    return content_length if content_length > LARGE_BODY else 0


class ByteBudget:
    """A FIFO semaphore counted in bytes; a request larger than the whole budget takes all of it."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    @asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[None]:
        """Hold ``nbytes`` (at most the capacity) for the block; 0 passes at once."""
        amount = min(nbytes, self.capacity)
        if amount:
            await self._acquire(amount)
        try:
            yield
        finally:
            if amount:
                self.in_use -= amount
                self._wake()

    async def _acquire(self, amount: int) -> None:
        if not self._waiting and self.in_use + amount <= self.capacity:
            self.in_use += amount
            return
        turn = asyncio.get_running_loop().create_future()
        self._waiting.append((amount, turn))
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # granted as we were cancelled: give it back
                self.in_use -= amount
            else:
                self._waiting.remove((amount, turn))
            self._wake()
            raise

    def _wake(self) -> None:
        while self._waiting and self.in_use + self._waiting[0][0] <= self.capacity:
            amount, turn = self._waiting.popleft()
            self.in_use += amount
            turn.set_result(None)
