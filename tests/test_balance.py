"""Routing order (gateway.core.balance): smooth weighted round-robin and failover order."""

from __future__ import annotations

from collections import Counter

import pytest

from gateway.core.balance import Candidate, route, smooth_pick


def picks(candidates: list[Candidate], count: int) -> list[str]:
    scores: dict[str, int] = {}
    chosen = []
    for _ in range(count):
        name, scores = smooth_pick(candidates, scores)
        chosen.append(name)
    return chosen


def test_three_to_one_is_exact_over_every_four_requests() -> None:
    sequence = picks([Candidate("a", 1, 3), Candidate("b", 1, 1)], 40)
    assert sequence[:4] == ["a", "a", "b", "a"]  # nginx's order: never a burst of b
    assert Counter(sequence) == {"a": 30, "b": 10}
    for start in range(0, 40, 4):
        assert Counter(sequence[start : start + 4]) == {"a": 3, "b": 1}


@pytest.mark.parametrize(
    ("weights", "count"),
    [({"a": 1, "b": 1}, 10), ({"a": 5, "b": 1, "c": 1}, 70), ({"a": 2, "b": 3}, 25)],
)
def test_shares_follow_the_weights(weights: dict[str, int], count: int) -> None:
    candidates = [Candidate(name, 1, weight) for name, weight in weights.items()]
    total = sum(weights.values())
    assert Counter(picks(candidates, count)) == {
        name: count * weight // total for name, weight in weights.items()
    }


def test_the_route_is_the_pick_then_its_priority_then_the_next() -> None:
    candidates = [
        Candidate("backup", 2, 1),
        Candidate("a", 1, 1),
        Candidate("b", 1, 5),
        Candidate("c", 1, 1),
        Candidate("last", 3, 1),
    ]
    order, scores = route(candidates, {})
    assert order == ["b", "a", "c", "backup", "last"]
    order, _ = route(candidates, scores)
    assert order[0] == "b" and order[1:] == ["a", "c", "backup", "last"]


def test_only_the_first_choice_moves_the_scores() -> None:
    """A failover lists the others without picking them: the spread stays exact."""
    candidates = [Candidate("a", 1, 3), Candidate("b", 1, 1)]
    scores: dict[str, int] = {}
    firsts = []
    for _ in range(8):
        order, scores = route(candidates, scores)
        firsts.append(order[0])
        assert set(order) == {"a", "b"}
    assert firsts == ["a", "a", "b", "a"] * 2


def test_the_lowest_priority_with_an_upstream_takes_the_traffic() -> None:
    order, _ = route([Candidate("backup", 2, 1), Candidate("spare", 2, 1)], {})
    assert order == ["backup", "spare"]
    assert route([], {"a": 3}) == ([], {"a": 3})
