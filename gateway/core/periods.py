"""Budget periods: which calendar window an instant falls in, in the configured time zone."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

PeriodKind = Literal["monthly", "daily", "total"]
PERIOD_KINDS: tuple[PeriodKind, ...] = ("monthly", "daily", "total")
PERIOD_LABEL = re.compile(r"[0-9]{4}-[0-9]{2}(-[0-9]{2})?")


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


def period_label(key: str) -> str:
    """``monthly:2026-11`` -> ``2026-11``: a period as people (and ``--period``) write it."""
    return key.partition(":")[2] or key


def window(label: str, tz: ZoneInfo) -> tuple[datetime | None, datetime | None]:
    """The time window ``[start, end)`` that ``YYYY-MM``, ``YYYY-MM-DD`` or ``total`` names,
    cut at midnight in ``tz`` as budget periods are; ValueError for anything else."""
    if label == "total":
        return None, None
    if not PERIOD_LABEL.fullmatch(label):
        raise ValueError(f"{label!r} is not a period: use YYYY-MM, YYYY-MM-DD or total")
    parts = label.split("-")
    try:
        if len(parts) == 2:
            start = datetime(int(parts[0]), int(parts[1]), 1, tzinfo=tz)
            return start, period_at("monthly", start, tz).end
        start = datetime(int(parts[0]), int(parts[1]), int(parts[2]), tzinfo=tz)
        return start, period_at("daily", start, tz).end
    except (ValueError, OverflowError):  # no such day, or its end is past the year 9999
        raise ValueError(f"{label!r} is not a date the gateway can count") from None


def local_day(ts: float, tz: str) -> str:
    """``YYYY-MM-DD`` of a Unix time in an IANA zone: the day a daily budget counts it in."""
    return datetime.fromtimestamp(ts, ZoneInfo(tz)).date().isoformat()
