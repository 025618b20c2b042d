"""Which upstream a request goes to first, and where it fails over to: pure.

Among the available upstreams of the lowest priority that has one, requests are spread by weight
with nginx's smooth weighted round-robin: each pick adds every candidate's weight to its running
score, takes the highest (the first listed on a tie) and subtracts the total from it. Weights
3:1 then give a a b a, a a b a, ...: exactly 3:1 over any 4k requests, never a burst of one.
After the first choice come the others of the same priority (by weight, then as listed), then
each following priority the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Candidate:
    name: str
    priority: int
    weight: int


def smooth_pick(
    candidates: Sequence[Candidate], scores: Mapping[str, int]
) -> tuple[str, dict[str, int]]:
    """One pick among ``candidates`` (non-empty): the name, and every score after it."""
    after = dict(scores)
    for c in candidates:
        after[c.name] = after.get(c.name, 0) + c.weight
    chosen = max(candidates, key=lambda c: after[c.name])  # max keeps the first on a tie
    after[chosen.name] -= sum(c.weight for c in candidates)
    return chosen.name, after


def route(
    candidates: Sequence[Candidate], scores: Mapping[str, int]
) -> tuple[list[str], dict[str, int]]:
    """The order to try ``candidates`` in, and the scores after this request's pick.

    Only the first choice is a pick (it moves the scores); failover targets are listed without
    one, so a failover does not shift the spread of the next requests.
    """
    if not candidates:
        return [], dict(scores)
    priorities = sorted({c.priority for c in candidates})
    first = [c for c in candidates if c.priority == priorities[0]]
    chosen, after = smooth_pick(first, scores)
    order = [chosen]
    for priority in priorities:
        group = [c for c in candidates if c.priority == priority and c.name != chosen]
        order += [c.name for c in sorted(group, key=lambda c: -c.weight)]  # sorted is stable
    return order, after
