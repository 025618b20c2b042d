"""Failed console sign-ins slow their client address down, without slowing anyone else.

After a failure, each attempt from that address waits its turn: turns are spaced by a delay that
doubles with every failure (up to ``max_s``), so guesses sent in parallel queue instead of
racing, and an address whose queue is longer than ``max_wait_s`` is refused at once. Only that
request's answer waits (an ``asyncio.sleep`` in its handler). The table is bounded (least
recently failed addresses go first) and forgets an address ``forget_s`` after its last failure.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv6Address, ip_address, ip_network


@dataclass(slots=True)
class _Record:
    failures: int
    next_turn: float
    last_failure: float


class SignInThrottle:
    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        capacity: int = 10_000,
        first_s: float = 0.25,
        max_s: float = 4.0,
        max_wait_s: float = 10.0,
        forget_s: float = 900.0,
    ) -> None:
        self._clock = clock
        self._capacity = capacity
        self._first_s, self._max_s = first_s, max_s
        self._max_wait_s, self._forget_s = max_wait_s, forget_s
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def turn(self, address: str) -> float | None:
        """Seconds this attempt waits before it is checked, or None: refuse it now."""
        now = self._clock()
        record = self._records.get(_bucket(address))
        if record is None:
            return 0.0
        if now - record.last_failure > self._forget_s:
            del self._records[_bucket(address)]
            return 0.0
        start = max(now, record.next_turn)
        if start - now > self._max_wait_s:
            return None
        record.next_turn = start + self._delay(record.failures)
        return start - now

    def failed(self, address: str) -> None:
        now = self._clock()
        bucket = _bucket(address)
        record = self._records.pop(bucket, None) or _Record(0, now, now)
        record.failures += 1
        record.last_failure = now
        record.next_turn = max(record.next_turn, now + self._delay(record.failures))
        self._records[bucket] = record
        while len(self._records) > self._capacity:
            self._records.popitem(last=False)

    def succeeded(self, address: str) -> None:
        self._records.pop(_bucket(address), None)

    def __len__(self) -> int:
        return len(self._records)

    def _delay(self, failures: int) -> float:
        return min(self._first_s * 2.0 ** min(failures - 1, 30), self._max_s)


def _bucket(address: str) -> str:
    """An IPv6 client is its /64 (one host's share of a network); anything else as it is."""
    try:
        ip = ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ip_network(f"{ip}/64", strict=False))
    return str(ip)
