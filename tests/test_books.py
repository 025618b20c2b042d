"""What one committed settlement or resolution reports (``services/books.py`` ``MoneyMoved``),
as a table: the access log's cost and images for each way money can move."""

from __future__ import annotations

import pytest

from gateway.core.ledger import (
    Capture,
    Hold,
    LedgerEntry,
    Release,
    ResolutionRecord,
    Settlement,
    Uncertain,
)
from gateway.services.books import MoneyMoved

HOLD = Hold("r1", "t", "p", 0.0, "generations", "async", "high", 2, 4000, 10**9, "fp",
            key_id="t/web")  # fmt: skip


@pytest.mark.parametrize(
    ("settlement", "state", "charged", "images", "overrun"),
    [
        (Capture(2, 8000, upstream_id="up"), "captured", 8000, 2, 0),
        (Capture(2, 8000, overrun=1000), "captured", 9000, 2, 1000),
        (Capture(1, 4000), "captured", 4000, 1, 0),
        (Release("failed"), "released", 0, 0, 0),
        (Uncertain(8000, "timeout"), "uncertain", 0, 0, 0),
    ],
)
def test_a_settlement_moves(
    settlement: Settlement, state: str, charged: int, images: int, overrun: int
) -> None:
    moved = MoneyMoved.settled(HOLD, settlement, task_id="task-1")
    assert (moved.state, moved.charged, moved.images, moved.overrun) == (
        state, charged, images, overrun,
    )  # fmt: skip
    assert (moved.ledger_id, moved.team, moved.key, moved.task_id) == ("r1", "t", "t/web", "task-1")


def entry(settled: str, resolution: ResolutionRecord | None) -> LedgerEntry:
    amount = {"captured": 8000, "uncertain": 8000}.get(settled, 0)
    images = 2 if settled == "captured" else 0
    return LedgerEntry("r1", "t", "p", 0.0, "async", "high", 2, 4000, 8000, settled,  # type: ignore[arg-type]
                       amount, images, 0, None, "task-1", None, 1.0, resolution, key_id="t/web")  # fmt: skip


@pytest.mark.parametrize(
    ("settled", "resolution", "state", "charged", "images", "overrun"),
    [
        ("captured", None, "captured", 8000, 2, 0),
        ("uncertain", None, "uncertain", 0, 0, 0),
        ("uncertain", ResolutionRecord("captured", 1, 4000, 0, "ok", "admin", 2.0),
         "captured", 4000, 1, 0),
        ("uncertain", ResolutionRecord("captured", 2, 8000, 500, "late", "gateway", 2.0),
         "captured", 8500, 2, 500),
        ("uncertain", ResolutionRecord("released", 0, 0, 0, "no", "admin", 2.0),
         "released", 0, 0, 0),
    ],
)  # fmt: skip
def test_an_entrys_last_step_moves(
    settled: str,
    resolution: ResolutionRecord | None,
    state: str,
    charged: int,
    images: int,
    overrun: int,
) -> None:
    moved = MoneyMoved.of_entry(entry(settled, resolution))
    assert (moved.state, moved.charged, moved.images, moved.overrun) == (
        state, charged, images, overrun,
    )  # fmt: skip
