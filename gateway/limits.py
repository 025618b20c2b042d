"""Request rate (``rpm``) and concurrency (``max_concurrent``) limits per team and per key.

Held in this process's memory: one gateway process per SQLite database. A request is admitted
only if every scope it belongs to (its team, its key) has room, and it counts against all of
them; a refusal counts against none.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from gateway.config import KeyConfig, TeamConfig
from gateway.errors import RateLimited

WINDOW_S = 60.0


@dataclass(frozen=True, slots=True)
class Scope:
    """What a limit applies to, as its refusal names it."""

    id: str
    label: str
    rpm: int | None
    max_concurrent: int | None


def scopes(team: TeamConfig, key: KeyConfig | None) -> list[Scope]:
    found = [Scope(f"team:{team.name}", f"Team '{team.name}'", team.rpm, team.max_concurrent)]
    if key is not None and (key.rpm is not None or key.max_concurrent is not None):
        found.append(
            Scope(f"key:{key.identity}", f"Key '{key.identity}'", key.rpm, key.max_concurrent)
        )
    return found


class TeamLimiter:
    """Admits a request or refuses it with 429 and ``Retry-After``, before anything is reserved."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._recent: dict[str, deque[float]] = {}
        self._in_flight: dict[str, int] = {}

    @contextmanager
    def admit(self, team: TeamConfig, key: KeyConfig | None = None) -> Iterator[None]:
        checked = scopes(team, key)
        now = self._clock()
        for scope in checked:
            self._check_concurrency(scope)
        for scope in checked:
            self._check_rate(scope, now)
        for scope in checked:
            if scope.rpm is not None:
                self._recent.setdefault(scope.id, deque()).append(now)
            self._in_flight[scope.id] = self._in_flight.get(scope.id, 0) + 1
        try:
            yield
        finally:
            for scope in checked:
                self._in_flight[scope.id] -= 1

    def in_flight(self, scope_id: str) -> int:
        return self._in_flight.get(scope_id, 0)

    def _check_concurrency(self, scope: Scope) -> None:
        if scope.max_concurrent is not None and self.in_flight(scope.id) >= scope.max_concurrent:
            raise RateLimited(
                f"{scope.label} already has {scope.max_concurrent} requests in flight "
                "(its max_concurrent limit).",
                headers={"Retry-After": "1"},
            )

    def _check_rate(self, scope: Scope, now: float) -> None:
        if scope.rpm is None:
            return
        recent = self._recent.setdefault(scope.id, deque())
        while recent and recent[0] <= now - WINDOW_S:
            recent.popleft()
        if len(recent) >= scope.rpm:
            wait = max(1, math.ceil(recent[0] + WINDOW_S - now))
            raise RateLimited(
                f"{scope.label} is over its limit of {scope.rpm} requests per minute.",
                headers={"Retry-After": str(wait)},
            )
