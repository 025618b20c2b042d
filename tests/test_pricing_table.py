"""What a request holds and how a refusal explains itself, as a table (``core/pricing.py``;
per-upstream prices: ``test_pricing.py``)."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from gateway.core.config import KeyConfig, TeamConfig
from gateway.core.ledger import Usage
from gateway.core.normalize import ImageRequest
from gateway.core.periods import period_at
from gateway.core.pricing import budget_refusal, hold_for, remaining

PRICES = {"low": 500, "medium": 2000, "high": 4000}
TEAM = TeamConfig("design", (), budget=100_000)
KEY = KeyConfig("design", "ab" * 32, name="web", budget=10_000)
NOW = datetime(2026, 11, 30, 23, 30, tzinfo=UTC)


def request(n: int, quality: str) -> ImageRequest:
    return ImageRequest("generations", "gpt-image-2", "gpt-image-2", "x", n, "1024x1024", "1k",
                        quality, (), "url", (), end_user="u1")  # fmt: skip


@pytest.mark.parametrize(
    ("n", "quality", "key", "unit", "amount", "key_budget"),
    [
        (1, "low", None, 500, 500, None),
        (4, "medium", None, 2000, 8000, None),
        (10, "high", KEY, 4000, 40_000, 10_000),
    ],
)
def test_a_hold_is_n_images_at_the_quality_price(
    n: int, quality: str, key: KeyConfig | None, unit: int, amount: int, key_budget: int | None
) -> None:
    period = period_at("daily", NOW, ZoneInfo("Asia/Shanghai"))
    hold = hold_for(request_id="r1", team=TEAM, request=request(n, quality), price=PRICES[quality],
                    period=period, now=NOW, mode="async", fingerprint="fp", key=key)  # fmt: skip
    assert (hold.unit_price, hold.amount, hold.budget, hold.key_budget) == (
        unit, amount, 100_000, key_budget,
    )  # fmt: skip
    assert (hold.period, hold.mode, hold.end_user) == ("daily:2026-12-01", "async", "u1")
    assert hold.key_fp == (KEY.fingerprint if key else None)


@pytest.mark.parametrize(
    ("usage", "key", "code", "says"),
    [
        (Usage(spent=90_000, reserved=5000, uncertain=4000), None, "budget_exceeded",
         "Team 'design' has not enough budget left for this request in its monthly period: "
         "budget 10.0000 CNY, spent 9.0000 CNY, reserved 0.5000 CNY, uncertain 0.4000 CNY, "
         "remaining 0.1000 CNY; this request costs 0.2000 CNY. It resets at "
         "2026-12-01T00:00:00+00:00."),
        (Usage(spent=9000), KEY, "key_budget_exceeded",
         "Key 'design/web' has not enough budget left"),
        (Usage(spent=200_000), None, "budget_exceeded", "remaining 0.0000 CNY"),  # overrun: 0
    ],
)  # fmt: skip
def test_a_refusal_names_the_cap_and_its_figures(
    usage: Usage, key: KeyConfig | None, code: str, says: str
) -> None:
    period = period_at("monthly", NOW, ZoneInfo("UTC"))
    refusal = budget_refusal(TEAM, period, usage, 2000, key)
    assert refusal.code == code and says in refusal.message


@pytest.mark.parametrize(
    ("usage", "left"),
    [(Usage(), 100_000), (Usage(10, 20, 30), 99_940), (Usage(spent=100_500), -500)],
)
def test_remaining_is_the_budget_less_all_committed(usage: Usage, left: int) -> None:
    assert remaining(TEAM, usage) == left
