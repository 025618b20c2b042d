"""Request rate (``rpm``) and concurrency (``max_concurrent``) limits per team and per key.

A request is admitted only if every scope it belongs to (its team, its key) has room, and it
counts against all of them; a refusal counts against none. The storage engine keeps the counts:
in memory for SQLite (one process), in the database for PostgreSQL (the whole fleet).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from gateway.core.config import KeyConfig, TeamConfig
from gateway.core.errors import RateLimited

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


class Limiter:
    """Admits a request or refuses it with 429 and ``Retry-After``, before anything is reserved;
    in this process's memory (the SQLite engine's; the PostgreSQL one shares them)."""

    def __init__(self) -> None:
        self._recent: dict[str, deque[float]] = {}
        self._in_flight: dict[str, int] = {}

    def admit(self, request_id: str, checked: list[Scope], now: float) -> None:
        for scope in checked:
            full = (
                scope.max_concurrent is not None
                and self.in_flight(scope.id) >= scope.max_concurrent
            )
            if full:
                raise concurrency_refusal(scope)
        for scope in checked:
            if scope.rpm is not None:
                recent = self._recent.setdefault(scope.id, deque())
                while recent and recent[0] <= now - WINDOW_S:
                    recent.popleft()
                if len(recent) >= scope.rpm:
                    raise rate_refusal(scope, recent[0], now)
        for scope in checked:
            if scope.rpm is not None:
                self._recent[scope.id].append(now)
            self._in_flight[scope.id] = self.in_flight(scope.id) + 1

    def release(self, request_id: str, checked: list[Scope]) -> None:
        for scope in checked:
            self._in_flight[scope.id] -= 1

    def in_flight(self, scope_id: str) -> int:
        return self._in_flight.get(scope_id, 0)


def concurrency_refusal(scope: Scope) -> RateLimited:
    return RateLimited(
        f"{scope.label} already has {scope.max_concurrent} requests in flight "
        "(its max_concurrent limit).",
        headers={"Retry-After": "1"},
    )


def rate_refusal(scope: Scope, oldest: float, now: float) -> RateLimited:
    wait = max(1, math.ceil(oldest + WINDOW_S - now))
    return RateLimited(
        f"{scope.label} is over its limit of {scope.rpm} requests per minute.",
        headers={"Retry-After": str(wait)},
    )
