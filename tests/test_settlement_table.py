"""The money rules as tables: every hold and answer, and the settlement or resolution it makes
(outcomes learned late: ``test_settlement.py``).

``gateway.core.settlement`` is pure, so each row is a call and its expected value; the storage
contract (``test_store.py``) checks that every engine stores exactly these and refuses others.
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.core.ledger import Capture, Hold, LedgerEntry, Release, Resolution, Uncertain
from gateway.core.settlement import (
    NotResolvable,
    ResolutionRefused,
    admin_resolution,
    capture_reply,
    expired,
    interrupted,
    landed,
    recovered,
    task_settlement,
)


def hold(n: int = 2, unit_price: int = 2000) -> Hold:
    return Hold("r1", "t", "p", 0.0, "generations", "sync", "medium", n, unit_price, 10**9, "fp")


def entry(state: str = "uncertain", *, n: int = 2, settled: int = 4000, resolved: bool = False):
    from gateway.core.ledger import ResolutionRecord

    resolution = ResolutionRecord("released", 0, 0, 0, "done", "admin", 1.0) if resolved else None
    return LedgerEntry(
        "r1", "t", "p", 0.0, "async", "medium", n, 2000, n * 2000, state, settled,  # type: ignore[arg-type]
        0, 0, None, "task-1", None, 1.0, resolution,
    )  # fmt: skip


# -- a sync reply: images charged as served, never more than held --------------------------


@pytest.mark.parametrize(
    ("n", "served", "expected"),
    [
        (
            2,
            2,
            Capture(
                images=2, amount=4000, upstream_id="up", reason=None, result="{}", unit_price=2000
            ),
        ),
        (
            2,
            1,
            Capture(
                1,
                2000,
                upstream_id="up",
                reason="1 of 2 images returned",
                result="{}",
                unit_price=2000,
            ),
        ),
        (
            2,
            0,
            Capture(
                0,
                0,
                upstream_id="up",
                reason="0 of 2 images returned",
                result="{}",
                unit_price=2000,
            ),
        ),
        (
            2,
            5,
            Capture(2, 4000, upstream_id="up", result="{}", unit_price=2000),
        ),  # never more than held
        (
            1,
            -1,
            Capture(
                0,
                0,
                upstream_id="up",
                reason="0 of 1 images returned",
                result="{}",
                unit_price=2000,
            ),
        ),
    ],
)
def test_a_sync_reply_captures_what_was_served(n: int, served: int, expected: Capture) -> None:
    assert capture_reply(hold(n), served, "up", "{}") == expected


# -- no answer, or no telling --------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        (False, Release("cancelled before the request was sent")),
        (True, Uncertain(4000, "interrupted after the request was sent")),
    ],
)
def test_an_interruption_releases_only_what_never_reached_the_upstream(
    sent: bool, expected: Release | Uncertain
) -> None:
    assert interrupted(hold(), sent=sent) == expected


def test_a_stopped_process_and_an_expired_task_leave_the_whole_hold_uncertain() -> None:
    assert recovered(4000) == Uncertain(4000, "the gateway stopped while the request was in flight")
    assert expired(4000) == Uncertain(4000, "task still pending after the maximum age")


# -- a task's terminal answer: what the upstream billed, an overrun kept explicit -------------

HELD = 4000  # two images at 0.20 CNY


@pytest.mark.parametrize(
    ("answer", "images", "amount", "overrun", "warns"),
    [
        ({"status": "completed", "cost": 0.4, "data": [{}, {}]}, 2, 4000, 0, False),
        ({"status": "completed", "cost": 0.2, "data": [{}]}, 1, 2000, 0, False),
        ({"status": "completed", "cost": "0.4"}, 2, 4000, 0, False),  # no data: n images
        ({"status": "completed", "cost": 0.5, "data": [{}, {}]}, 2, 4000, 1000, True),
        ({"status": "completed", "cost": 0.4, "data": [{}, {}, {}]}, 2, 4000, 0, False),
        ({"status": "completed"}, 2, HELD, 0, True),  # no cost: the price table, loudly
        ({"status": "completed", "cost": -1}, 2, HELD, 0, True),
        ({"status": "completed", "cost": True}, 2, HELD, 0, True),
        ({"status": "completed", "cost": "NaN"}, 2, HELD, 0, True),
        ({"status": "completed", "cost": 10**6}, 2, HELD, 0, True),  # absurd: garbage
    ],
)
def test_a_completed_task_captures_its_reported_cost(
    answer: dict[str, Any], images: int, amount: int, overrun: int, warns: bool
) -> None:
    settled, warning = task_settlement(HELD, 2, "task-1", answer, "{}")
    assert settled == Capture(images, amount, overrun, upstream_id="task-1", result="{}")
    assert (warning is not None) == warns


@pytest.mark.parametrize("status", ["failed", "cancelled", None])
def test_a_task_that_did_not_complete_is_released(status: str | None) -> None:
    settled, warning = task_settlement(HELD, 2, "task-1", {"status": status}, "{}")
    assert settled == Release("upstream task failed", upstream_id="task-1", result="{}")
    assert warning is None


# -- resolutions of uncertain money ----------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "images", "expected"),
    [
        ("captured", None, Resolution("captured", 2, 4000, "checked", "alice")),
        ("captured", 1, Resolution("captured", 1, 2000, "checked", "alice")),
        ("captured", 0, Resolution("captured", 0, 0, "checked", "alice")),
        ("released", None, Resolution("released", 0, 0, "checked", "alice")),
        ("released", 0, Resolution("released", 0, 0, "checked", "alice")),
        ("captured", 3, ResolutionRefused),  # more than held
        ("captured", -1, ResolutionRefused),
        ("released", 1, ResolutionRefused),  # --images goes with --captured
    ],
)
def test_an_admin_resolution(state: str, images: int | None, expected: Any) -> None:
    if isinstance(expected, Resolution):
        resolved = admin_resolution(entry(), state, images, " checked ", actor="alice")  # type: ignore[arg-type]
        assert resolved == expected
    else:
        with pytest.raises(expected):
            admin_resolution(entry(), state, images, "checked", actor="alice")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "reason", "actor"),
    [
        ("held", "checked", "alice"),  # not uncertain
        ("captured", "checked", "alice"),
        ("resolved", "checked", "alice"),  # once only
        ("uncertain", "   ", "alice"),  # a reason is required
        ("uncertain", "a\x00b", "alice"),  # and printable
        ("uncertain", "checked", ""),  # and who did it
    ],
)
def test_an_admin_resolution_is_refused(kind: str, reason: str, actor: str) -> None:
    target = (
        entry(resolved=True)
        if kind == "resolved"
        else entry("uncertain" if kind == "uncertain" else kind)
    )
    with pytest.raises(NotResolvable if kind != "uncertain" else ResolutionRefused):
        admin_resolution(target, "released", None, reason, actor=actor)


def test_a_lost_acknowledgement_is_recognised_by_what_landed() -> None:
    settlement = Capture(2, 4000, reason=None)
    stored = entry("captured", settled=4000)
    assert landed(stored, settlement, 1.0)
    assert not landed(stored, settlement, 2.0)  # stored by another try, at another time
    assert not landed(stored, Capture(1, 2000), 1.0)
    assert not landed(entry("uncertain"), settlement, 1.0)
