"""Per-team request rate (``rpm``) and concurrency (``max_concurrent``) limits, in memory."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from gateway.config import TeamConfig
from gateway.errors import RateLimited

WINDOW_S = 60.0


class TeamLimiter:
    """Admits a request or refuses it with 429 and ``Retry-After``, before anything is reserved."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._recent: dict[str, deque[float]] = {}
        self._in_flight: dict[str, int] = {}

    @contextmanager
    def admit(self, team: TeamConfig) -> Iterator[None]:
        self._check_concurrency(team)
        self._check_rate(team)
        self._in_flight[team.name] = self._in_flight.get(team.name, 0) + 1
        try:
            yield
        finally:
            self._in_flight[team.name] -= 1

    def in_flight(self, team: str) -> int:
        return self._in_flight.get(team, 0)

    def _check_concurrency(self, team: TeamConfig) -> None:
        if team.max_concurrent is not None and self.in_flight(team.name) >= team.max_concurrent:
            raise RateLimited(
                f"Team '{team.name}' already has {team.max_concurrent} requests in flight "
                "(its max_concurrent limit).",
                headers={"Retry-After": "1"},
            )

    def _check_rate(self, team: TeamConfig) -> None:
        if team.rpm is None:
            return
        now = self._clock()
        recent = self._recent.setdefault(team.name, deque())
        while recent and recent[0] <= now - WINDOW_S:
            recent.popleft()
        if len(recent) >= team.rpm:
            wait = max(1, math.ceil(recent[0] + WINDOW_S - now))
            raise RateLimited(
                f"Team '{team.name}' is over its limit of {team.rpm} requests per minute.",
                headers={"Retry-After": str(wait)},
            )
        recent.append(now)
