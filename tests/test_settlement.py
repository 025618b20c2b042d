"""The money rules for outcomes learned late (issue 19): one row per case of
``late_outcome``, the pure decision both engines only apply."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gateway.core.ledger import (
    Capture,
    Correction,
    CorrectionRecord,
    LedgerEntry,
    Release,
    Resolution,
    ResolutionRecord,
    Settlement,
    Uncertain,
)
from gateway.core.settlement import (
    Correct,
    Ignore,
    LateDecision,
    Resolve,
    late_landed,
    late_outcome,
)

UNIT = 4000  # high quality, 0.40 CNY
N = 2
HELD = N * UNIT


def entry(
    state: str,
    *,
    settled: int = 0,
    images: int = 0,
    resolved: tuple[str, int, int, str] | None = None,
    corrections: tuple[CorrectionRecord, ...] = (),
    task: bool = True,
) -> LedgerEntry:
    """An entry of a high n=2 request (held 0.80 CNY), settled ``state``; ``resolved``:
    (state, images, amount, actor)."""
    resolution = None
    if resolved is not None:
        r_state, r_images, r_amount, actor = resolved
        resolution = ResolutionRecord(r_state, r_images, r_amount, 0, "checked", actor, 5.0)  # type: ignore[arg-type]
    return LedgerEntry(
        request_id="req_1", team="design", period="monthly:2026-11", created_at=0.0,
        mode="async" if task else "sync", quality="high", n=N, unit_price=UNIT, held=HELD,
        settled_state=state, settled_amount=settled, images=images, overrun=0,  # type: ignore[arg-type]
        upstream_id=None, task_id="task-1" if task else None, reason=None, settled_at=1.0,
        resolution=resolution, corrections=corrections,
    )  # fmt: skip


DELIVERED = Capture(images=2, amount=HELD, upstream_id="task-1")  # the task: cost 0.80
ABOVE_HOLD = Capture(images=2, amount=HELD, overrun=1000, upstream_id="task-1")  # cost 0.90
ONE = Capture(images=1, amount=UNIT, upstream_id="gen-1")  # a sync answer with 1 of 2 images
FAILED = Release("upstream task failed", upstream_id="task-1")
UNKNOWN = Uncertain(amount=HELD, reason="upstream_timeout")
CORRECTED = (CorrectionRecord(2, HELD, "late", 7.0),)

CASES: list[tuple[str, LedgerEntry, Settlement, LateDecision]] = [
    ("held: not late, the caller settles it", entry("held"), DELIVERED,
     Ignore("req_1 is still held: it is settled, not corrected")),
    ("uncertain + delivered: resolved captured", entry("uncertain", settled=HELD), DELIVERED,
     Resolve(Resolution("captured", 2, HELD, "resolved automatically: the upstream task "
                        "completed after the hold went uncertain", "gateway",
                        upstream_id="task-1"))),
    ("uncertain + billed above the hold: the excess is an overrun",
     entry("uncertain", settled=HELD), ABOVE_HOLD,
     Resolve(Resolution("captured", 2, HELD, "resolved automatically: the upstream task "
                        "completed after the hold went uncertain", "gateway", overrun=1000,
                        upstream_id="task-1"))),
    ("uncertain sync + one image: captured 1, the rest released",
     entry("uncertain", settled=HELD, task=False), ONE,
     Resolve(Resolution("captured", 1, UNIT, "resolved automatically: the upstream request "
                        "completed after the hold went uncertain", "gateway",
                        upstream_id="gen-1"))),
    ("uncertain + nothing generated: resolved released", entry("uncertain", settled=HELD),
     FAILED,
     Resolve(Resolution("released", 0, 0, "resolved automatically: the upstream task generated "
                        "nothing (upstream task failed)", "gateway", upstream_id="task-1"))),
    ("uncertain + still unknown: nothing learned", entry("uncertain", settled=HELD), UNKNOWN,
     Ignore("the outcome of req_1 is still unknown")),
    ("released + delivered: corrected by all of it", entry("released"), DELIVERED,
     Correct(Correction(2, HELD, "the upstream task delivered 2 image(s) for 0.8000 CNY after "
                        "the entry was released", "task-1"))),
    ("released + billed above the hold: corrected by what the upstream billed",
     entry("released"), ABOVE_HOLD,
     Correct(Correction(2, HELD + 1000, "the upstream task delivered 2 image(s) for 0.9000 CNY "
                        "after the entry was released", "task-1"))),
    ("released + nothing generated: nothing new", entry("released"), FAILED,
     Ignore("the upstream task of req_1 delivered 0 image(s) (0.0000 CNY); the entry charges "
            "0 (0.0000 CNY)")),
    ("released + unknown: nothing learned", entry("released"), UNKNOWN,
     Ignore("the outcome of req_1 is still unknown")),
    ("resolved released by admin + delivered: corrected",
     entry("uncertain", settled=HELD, resolved=("released", 0, 0, "admin")), DELIVERED,
     Correct(Correction(2, HELD, "the upstream task delivered 2 image(s) for 0.8000 CNY after "
                        "the entry was resolved released by admin", "task-1"))),
    ("resolved captured 1 of 2 + 2 delivered: corrected by the difference",
     entry("uncertain", settled=HELD, resolved=("captured", 1, UNIT, "admin")), DELIVERED,
     Correct(Correction(1, UNIT, "the upstream task delivered 2 image(s) for 0.8000 CNY after "
                        "the entry was resolved captured by admin", "task-1"))),
    ("resolved captured in full + the same outcome: nothing new",
     entry("uncertain", settled=HELD, resolved=("captured", 2, HELD, "admin")), DELIVERED,
     Ignore("the upstream task of req_1 delivered 2 image(s) (0.8000 CNY); the entry charges 2 "
            "(0.8000 CNY)")),
    ("resolved captured in full + billed more: corrected by the amount alone",
     entry("uncertain", settled=HELD, resolved=("captured", 2, HELD, "admin")), ABOVE_HOLD,
     Correct(Correction(0, 1000, "the upstream task delivered 2 image(s) for 0.9000 CNY after "
                        "the entry was resolved captured by admin", "task-1"))),
    ("resolved captured + task failed: never refunded, said loudly",
     entry("uncertain", settled=HELD, resolved=("captured", 2, HELD, "admin")), FAILED,
     Ignore("the upstream task of req_1 delivered 0 image(s) (0.0000 CNY); the entry charges 2 "
            "(0.8000 CNY): nothing refunded", contradicts=True)),
    ("captured + the same capture (its own earlier try): nothing new",
     entry("captured", settled=HELD, images=2), DELIVERED,
     Ignore("the upstream task of req_1 delivered 2 image(s) (0.8000 CNY); the entry charges 2 "
            "(0.8000 CNY)")),
    ("captured + nothing generated: never refunded, said loudly",
     entry("captured", settled=HELD, images=2), FAILED,
     Ignore("the upstream task of req_1 delivered 0 image(s) (0.0000 CNY); the entry charges 2 "
            "(0.8000 CNY): nothing refunded", contradicts=True)),
    ("released and corrected + the same outcome again: nothing new (no double correction)",
     entry("released", corrections=CORRECTED), DELIVERED,
     Ignore("the upstream task of req_1 delivered 2 image(s) (0.8000 CNY); the entry charges 2 "
            "(0.8000 CNY)")),
]  # fmt: skip


@pytest.mark.parametrize(
    ("now", "learned", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_late_outcome(now: LedgerEntry, learned: Settlement, expected: LateDecision) -> None:
    assert late_outcome(now, learned) == expected


def test_a_correction_never_exceeds_what_the_upstream_reported() -> None:
    for charged in (0, UNIT, HELD):
        decided = late_outcome(
            entry("uncertain", settled=HELD, resolved=("captured", 1, charged, "admin")),
            ABOVE_HOLD,
        )
        assert isinstance(decided, Correct)
        assert decided.correction.amount == ABOVE_HOLD.charged - charged


def test_an_earlier_try_of_a_late_outcome_is_recognized_by_its_time() -> None:
    """A retry whose first try committed but lost its acknowledgement reports that try."""
    corrected = entry("released", corrections=(CorrectionRecord(2, HELD, "late", 9.0),))
    assert late_landed(corrected, 9.0) == Correct(Correction(2, HELD, "late"))
    assert late_landed(corrected, 9.5) is None
    resolved = entry("uncertain", settled=HELD, resolved=("captured", 2, HELD, "gateway"))
    assert isinstance(late_landed(resolved, 5.0), Resolve)
    by_admin = replace(resolved, resolution=replace(resolved.resolution, actor="admin"))  # type: ignore[type-var]
    assert late_landed(by_admin, 5.0) is None
