"""Budget periods: which calendar window an instant falls in, in the configured time zone."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

PeriodKind = Literal["monthly", "daily", "total"]
PERIOD_KINDS: tuple[PeriodKind, ...] = ("monthly", "daily", "total")


@dataclass(frozen=True, slots=True)
class Period:
    """One budget window. ``key`` names it in the database; ``end`` is None for ``total``."""

    kind: PeriodKind
    key: str
    start: datetime | None
    end: datetime | None


def period_at(kind: PeriodKind, now: datetime, tz: ZoneInfo) -> Period:
    """The period of ``kind`` that contains ``now`` (an aware datetime)."""
    if kind == "total":
        return Period(kind, "total", None, None)
    local = now.astimezone(tz)
    if kind == "daily":
        start = datetime(local.year, local.month, local.day, tzinfo=tz)
        nxt = start.date() + timedelta(days=1)
        end = datetime(nxt.year, nxt.month, nxt.day, tzinfo=tz)
        return Period(kind, f"daily:{start.date().isoformat()}", start, end)
    start = datetime(local.year, local.month, 1, tzinfo=tz)
    year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
    end = datetime(year, month, 1, tzinfo=tz)
    return Period(kind, f"monthly:{local.year:04d}-{local.month:02d}", start, end)


def utc_now() -> datetime:
    """The default clock; the app takes any zero-argument callable returning an aware datetime."""
    return datetime.now(UTC)
