"""What a request costs and how a refusal explains itself; pure, money in integer units."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime

from gateway.core.config import KeyConfig, TeamConfig
from gateway.core.errors import BudgetExceeded
from gateway.core.ledger import Hold, Usage
from gateway.core.money import format_cny
from gateway.core.normalize import ImageRequest
from gateway.core.periods import Period


def unit_price(prices: Mapping[str, int], quality: str) -> int:
    return prices[quality]


def hold_price(tables: Iterable[Mapping[str, int]], quality: str) -> int:
    """What an image is held at: the highest price among the upstreams a request may reach,
    so that whichever serves it (after any failover) costs no more than its hold."""
    return max(unit_price(prices, quality) for prices in tables)


def hold_for(
    *,
    request_id: str,
    team: TeamConfig,
    request: ImageRequest,
    price: int,
    period: Period,
    now: datetime,
    mode: str,
    fingerprint: str,
    key: KeyConfig | None = None,
) -> Hold:
    """The exact amount to reserve: ``n`` images at ``price`` (see ``hold_price``), against the
    team's budget and, for a capped key, the key's own."""
    return Hold(
        request_id=request_id,
        team=team.name,
        period=period.key,
        created_at=now.timestamp(),
        endpoint=request.endpoint,
        mode="async" if mode == "async" else "sync",
        quality=request.quality,
        n=request.n,
        unit_price=price,
        budget=team.budget,
        fingerprint=fingerprint,
        key_id=key.identity if key is not None else None,
        key_fp=key.fingerprint if key is not None else None,
        key_budget=key.budget if key is not None else None,
        end_user=request.end_user,
    )


def budget_refusal(
    team: TeamConfig,
    period: Period,
    usage: Usage,
    cost: int,
    key: KeyConfig | None = None,
) -> BudgetExceeded:
    """The 402 naming the cap that refused (the key's when ``key`` is given) and its figures."""
    resets = f"It resets at {period.end.isoformat()}." if period.end else "It never resets."
    if key is not None and key.budget is not None:
        who, budget, code = f"Key '{key.identity}'", key.budget, "key_budget_exceeded"
    else:
        who, budget, code = f"Team '{team.name}'", team.budget, "budget_exceeded"
    left = max(0, budget - usage.committed)
    return BudgetExceeded(
        f"{who} has not enough budget left for this request in its {period.kind} "
        f"period: budget {format_cny(budget)}, spent {format_cny(usage.spent)}, "
        f"reserved {format_cny(usage.reserved)}, uncertain {format_cny(usage.uncertain)}, "
        f"remaining {format_cny(left)}; this request costs {format_cny(cost)}. {resets}",
        code=code,
    )


def remaining(team: TeamConfig, usage: Usage) -> int:
    """Budget not yet spent, reserved or uncertain (negative if a capture overran its hold)."""
    return team.budget - usage.committed
