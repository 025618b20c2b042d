"""Request rate and concurrency limits as a table (``core/limits.py``): one process's
``Limiter``; the fleet's shared version runs the same rules on PostgreSQL (test_fleet.py)."""

from __future__ import annotations

import pytest

from gateway.core.config import KeyConfig, TeamConfig
from gateway.core.errors import RateLimited
from gateway.core.limits import Limiter, Scope, scopes

TEAM = Scope("team:t", "Team 't'", rpm=2, max_concurrent=None)
BUSY = Scope("team:b", "Team 'b'", rpm=None, max_concurrent=1)


@pytest.mark.parametrize(
    ("steps", "outcomes"),
    [
        # (what, scope, at) -> admitted? / Retry-After
        ([("admit", TEAM, 0.0), ("admit", TEAM, 1.0), ("admit", TEAM, 2.0)], [None, None, "58"]),
        ([("admit", TEAM, 0.0), ("admit", TEAM, 1.0), ("admit", TEAM, 60.0)], [None, None, None]),
        ([("admit", TEAM, 0.0), ("admit", TEAM, 59.5), ("admit", TEAM, 59.9)], [None, None, "1"]),
        ([("admit", BUSY, 0.0), ("admit", BUSY, 0.0)], [None, "1"]),
        ([("admit", BUSY, 0.0), ("release", BUSY, 0.0), ("admit", BUSY, 0.0)], [None, None, None]),
    ],
)
def test_limits(steps: list[tuple[str, Scope, float]], outcomes: list[str | None]) -> None:
    limiter = Limiter()
    seen: list[str | None] = []
    for index, (what, scope, at) in enumerate(steps):
        if what == "release":
            limiter.release(f"r{index - 1}", [scope])
            seen.append(None)
            continue
        try:
            limiter.admit(f"r{index}", [scope], at)
        except RateLimited as refused:
            seen.append(refused.headers["Retry-After"])
        else:
            seen.append(None)
    assert seen == outcomes


def test_a_refusal_by_one_scope_counts_against_none() -> None:
    limiter = Limiter()
    limiter.admit("r0", [BUSY], 0.0)
    with pytest.raises(RateLimited, match="Team 'b' already has 1 requests in flight"):
        limiter.admit("r1", [TEAM, BUSY], 0.0)
    assert limiter.in_flight(TEAM.id) == 0
    limiter.admit("r2", [TEAM], 0.0)
    limiter.admit("r3", [TEAM], 0.0)  # the refused request took none of the team's rpm


@pytest.mark.parametrize(
    ("key", "ids"),
    [
        (None, ["team:t"]),
        (KeyConfig("t", "ab" * 32, name="web"), ["team:t"]),  # no limit of its own
        (KeyConfig("t", "ab" * 32, name="web", rpm=5), ["team:t", "key:t/web"]),
        (KeyConfig("t", "ab" * 32, max_concurrent=1), ["team:t", "key:t/sha256:abababab"]),
    ],
)
def test_the_scopes_of_a_request(key: KeyConfig | None, ids: list[str]) -> None:
    team = TeamConfig("t", (), budget=1, rpm=10)
    assert [s.id for s in scopes(team, key)] == ids
