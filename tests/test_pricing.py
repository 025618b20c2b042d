"""Money with several upstreams (gateway.core.pricing, gateway.core.settlement): a hold at the
dearest upstream a request may reach, every settlement at the price of the one that served it."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gateway.core.ledger import Capture, Hold, LedgerEntry
from gateway.core.pricing import hold_price
from gateway.core.settlement import (
    Correct,
    Resolve,
    admin_resolution,
    capture_reply,
    interrupted,
    late_outcome,
    task_settlement,
    uncertain,
)

CHEAP = {"low": 800, "medium": 1500, "high": 3000, "auto": 1500}
DEAR = {"low": 1000, "medium": 2000, "high": 4000, "auto": 2000}


def hold(n: int = 2, unit_price: int = 4000) -> Hold:
    return Hold(
        request_id="r1", team="design", period="2026-11", created_at=0.0, endpoint="generations",
        mode="sync", quality="high", n=n, unit_price=unit_price, budget=10**9, fingerprint="f",
    )  # fmt: skip


def entry(upstream_price: int | None) -> LedgerEntry:
    return LedgerEntry(
        request_id="r1", team="design", period="2026-11", created_at=0.0, mode="sync",
        quality="high", n=2, unit_price=4000, held=8000, settled_state="uncertain",
        settled_amount=8000, images=0, overrun=0, upstream_id=None, task_id=None, reason="x",
        settled_at=1.0, resolution=None, upstream="backup", upstream_unit_price=upstream_price,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("tables", "quality", "price"),
    [([CHEAP, DEAR], "high", 4000), ([CHEAP], "low", 800), ([DEAR, CHEAP], "medium", 2000)],
)
def test_a_hold_is_priced_at_the_dearest_reachable_upstream(
    tables: list[dict[str, int]], quality: str, price: int
) -> None:
    assert hold_price(tables, quality) == price


def test_a_capture_is_at_the_serving_upstreams_price_never_above_the_hold() -> None:
    served = capture_reply(hold(), 2, "g1", "{}", upstream="backup", price=3000)
    assert (served.amount, served.unit_price, served.upstream) == (6000, 3000, "backup")
    assert capture_reply(hold(), 1, "g1", "{}", upstream="b", price=3000).amount == 3000
    assert capture_reply(hold(), 2, "g1", "{}", upstream="x", price=9999).amount == 8000
    assert capture_reply(hold(), 2, "g1", "{}").amount == 8000  # one upstream: the hold's price


def test_an_uncertain_hold_stays_whole_and_remembers_its_upstreams_price() -> None:
    kept = uncertain(hold(), "upstream_timeout", upstream="backup", price=3000)
    assert (kept.amount, kept.unit_price, kept.upstream) == (8000, 3000, "backup")
    cut = interrupted(hold(), sent=True, upstream="backup", price=3000)
    assert (cut.amount, cut.unit_price) == (8000, 3000)
    assert interrupted(hold(), sent=False, upstream="backup").upstream == "backup"


@pytest.mark.parametrize(("upstream_price", "amount"), [(3000, 3000), (None, 4000)])
def test_an_admin_capture_is_at_the_upstreams_price(
    upstream_price: int | None, amount: int
) -> None:
    resolution = admin_resolution(entry(upstream_price), "captured", 1, "billed", actor="ops")
    assert (resolution.images, resolution.amount) == (1, amount)


def test_an_unreadable_task_cost_is_charged_at_its_upstreams_price_table() -> None:
    answer = {"status": "completed", "data": [{"url": "u"}, {"url": "v"}], "cost": "n/a"}
    settled, warning = task_settlement(8000, 2, "t1", answer, "{}", upstream="backup", price=3000)
    assert isinstance(settled, Capture)
    assert (settled.amount, settled.upstream, settled.unit_price) == (6000, "backup", 3000)
    assert warning is not None and "0.6000 CNY" in warning
    reported = {**answer, "cost": 0.6}
    settled, warning = task_settlement(8000, 2, "t1", reported, "{}", upstream="b", price=3000)
    assert (settled.amount, settled.overrun, warning) == (6000, 0, None)
    failed, _ = task_settlement(8000, 2, "t1", {"status": "failed"}, "{}", upstream="b", price=1)
    assert (failed.state, failed.upstream) == ("released", "b")


def test_an_outcome_learned_late_keeps_its_upstream_and_price() -> None:
    served = capture_reply(hold(), 2, "g1", "{}", upstream="backup", price=3000)
    resolved = late_outcome(entry(None), served)  # uncertain, unresolved: resolved to it
    assert isinstance(resolved, Resolve)
    assert (resolved.resolution.amount, resolved.resolution.upstream) == (6000, "backup")
    released = replace(entry(None), settled_state="released", settled_amount=0)
    corrected = late_outcome(released, served)  # closed without it: the difference appended
    assert isinstance(corrected, Correct)
    assert (corrected.correction.amount, corrected.correction.upstream) == (6000, "backup")
