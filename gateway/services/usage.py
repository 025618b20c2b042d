"""The usage report: per team, a period's budget, spend and images, optionally broken down by key,
end user, day or quality. The current period reads the counters; any other period is summed
from the ledger's entries (``ledger verify`` proves the two agree).

A team's standing in its current period (``Standing``) is computed in one place, so the report,
the team's own ``GET /v1/gateway/usage`` and the ``X-Gateway-Budget-Remaining`` header agree."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, get_args

from gateway.core.config import KeyConfig, Settings, TeamConfig
from gateway.core.ledger import Grouping, Usage
from gateway.core.money import units_to_cny
from gateway.core.normalize import QUALITIES
from gateway.core.periods import Period, period_at, period_label, window
from gateway.core.pricing import remaining
from gateway.core.tables import aligned
from gateway.store.base import ReportRow
from gateway.store.manager import Store

GROUPINGS: tuple[str, ...] = get_args(Grouping)
NO_KEY = "(none)"


@dataclass(frozen=True, slots=True)
class Standing:
    """A team's money in one of its periods and, for a capped key, the key's."""

    team: TeamConfig
    period: Period
    usage: Usage
    key: KeyConfig | None = None
    key_usage: Usage | None = None  # only for a key with its own budget

    @property
    def remaining(self) -> int:
        return remaining(self.team, self.usage)

    @property
    def key_remaining(self) -> int | None:
        if self.key is None or self.key.budget is None or self.key_usage is None:
            return None
        return self.key.budget - self.key_usage.committed

    def as_json(self) -> dict[str, Any]:
        """The team route's answer (every amount in CNY; the key's fields null when uncapped)."""
        key_budget = self.key.budget if self.key is not None else None
        key_left = self.key_remaining
        return {
            "team": self.team.name,
            "key": self.key.identity if self.key is not None else None,
            "period": period_label(self.period.key),
            "budget_cny": units_to_cny(self.team.budget),
            "spent_cny": units_to_cny(self.usage.spent),
            "reserved_cny": units_to_cny(self.usage.reserved),
            "uncertain_cny": units_to_cny(self.usage.uncertain),
            "remaining_cny": units_to_cny(self.remaining),
            "resets_at": self.period.end.isoformat() if self.period.end else None,
            "key_budget_cny": units_to_cny(key_budget) if key_budget is not None else None,
            "key_remaining_cny": units_to_cny(key_left) if key_left is not None else None,
        }


async def standing(
    db: Store,
    settings: Settings,
    team: TeamConfig,
    now: datetime,
    *,
    key: KeyConfig | None = None,
    usage: Usage | None = None,
) -> Standing:
    """The team's standing in its period at ``now``: from the counters, or from ``usage``
    when the caller already has it (a hold's answer says the usage it left)."""
    period = period_at(team.period, now, settings.server.tz)
    if usage is None:
        usage = await db.usage(team.name, period.key)
    key_usage = None
    if key is not None and key.budget is not None:
        key_usage = await db.key_usage(team.name, key.fingerprint, period.key)
    return Standing(team, period, usage, key, key_usage)


def check_report_args(period: str | None, by: str | None, settings: Settings) -> None:
    """ValueError naming what is wrong with ``--period`` or ``--by``."""
    if by is not None and by not in GROUPINGS:
        raise ValueError(f"by must be one of {', '.join(GROUPINGS)}")
    if period is not None:
        window(period, settings.server.tz)


async def usage_report(
    db: Store,
    settings: Settings,
    now: datetime,
    only: str | None = None,
    *,
    period: str | None = None,
    by: Grouping | None = None,
) -> dict[str, Any]:
    """``{"teams": {name: {...}}}`` with every figure in CNY; ``only`` limits it to one team."""
    check_report_args(period, by, settings)
    teams: dict[str, Any] = {}
    for name, team in settings.teams.items():
        if only is None or name == only:
            teams[name] = await _team_report(db, settings, team, now=now, period=period, by=by)
    return {"teams": teams}


async def _team_report(
    db: Store,
    settings: Settings,
    team: TeamConfig,
    *,
    now: datetime,
    period: str | None,
    by: Grouping | None,
) -> dict[str, Any]:
    tz = settings.server.tz
    current = period_at(team.period, now, tz)
    if period is None or period == period_label(current.key):
        start, end = current.start, current.end
        figures = await standing(db, settings, team, now)
        usage = figures.usage
        spent, reserved, uncertain, overrun = (
            usage.spent, usage.reserved, usage.uncertain, usage.overrun,
        )  # fmt: skip
        left: int | None = figures.remaining
    else:
        start, end = window(period, tz)
        totals = await _rows(db, team, start, end, by=None, settings=settings)
        spent, reserved, uncertain, overrun = _sum(totals)
        left = None  # a budget belongs to the team's own periods
    since, until = _ts(start), _ts(end)
    qualities = await db.report(team.name, since=since, until=until, by="quality", tz=tz.key)
    images = {row.group: row.images for row in qualities}
    report: dict[str, Any] = {
        "budget_cny": units_to_cny(team.budget),
        "spent_cny": units_to_cny(spent),
        "reserved_cny": units_to_cny(reserved),
        "uncertain_cny": units_to_cny(uncertain),
        "remaining_cny": units_to_cny(left) if left is not None else None,
        "overrun_cny": units_to_cny(overrun),
        "images": {quality: images.get(quality, 0) for quality in QUALITIES},
        "period": team.period,
        "period_start": start.isoformat() if start else None,
        "period_end": end.isoformat() if end else None,
    }
    if by is not None:
        rows = await _rows(db, team, start, end, by=by, settings=settings)
        report["by"] = await _breakdown(db, settings, team, rows, by, now=now)
    return report


async def _rows(
    db: Store,
    team: TeamConfig,
    start: datetime | None,
    end: datetime | None,
    *,
    by: Grouping | None,
    settings: Settings,
) -> list[ReportRow]:
    return await db.report(
        team.name, since=_ts(start), until=_ts(end), by=by, tz=settings.server.tz.key
    )


async def _breakdown(
    db: Store,
    settings: Settings,
    team: TeamConfig,
    rows: list[ReportRow],
    by: Grouping,
    *,
    now: datetime,
) -> dict[str, Any]:
    keys = {key.fingerprint: key for key in team.all_keys()}
    last_used = await db.key_last_used() if by == "key" else {}
    found: dict[str, Any] = {}
    for row in rows:
        entry: dict[str, Any] = {
            "spent_cny": units_to_cny(row.spent),
            "reserved_cny": units_to_cny(row.reserved),
            "uncertain_cny": units_to_cny(row.uncertain),
            "images": row.images,
            "requests": row.requests,
        }
        label = row.group if row.group is not None else NO_KEY
        if by == "key":
            key = keys.get(row.group or "")
            label = key.identity if key else (row.key_id or NO_KEY)
            used = last_used.get(row.group or "")
            entry["last_used"] = rfc3339(used) if used is not None else None
            if key is not None and key.budget is not None:
                figures = await standing(db, settings, team, now, key=key)
                entry["budget_cny"] = units_to_cny(key.budget)
                entry["remaining_cny"] = units_to_cny(figures.key_remaining or 0)
        found[label] = entry
    return found


def _sum(rows: list[ReportRow]) -> tuple[int, int, int, int]:
    return (
        sum(r.spent for r in rows),
        sum(r.reserved for r in rows),
        sum(r.uncertain for r in rows),
        sum(r.overrun for r in rows),
    )


def _ts(moment: datetime | None) -> float | None:
    return moment.timestamp() if moment is not None else None


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def format_report(report: dict[str, Any]) -> str:
    """The report as an aligned text table for a terminal (and each breakdown under its team)."""
    header = ("team", "budget", "spent", "reserved", "uncertain", "remaining", "images", "period")
    rows = [header]
    breakdowns: list[tuple[str, dict[str, Any]]] = []
    for name, t in report["teams"].items():
        images = " ".join(f"{q}={n}" for q, n in t["images"].items() if n) or "0"
        span = f"{t['period_start'] or '-'} .. {t['period_end'] or '-'}"
        figures = (
            "-" if t[key] is None else f"{t[key]:.4f}"
            for key in ("budget_cny", "spent_cny", "reserved_cny", "uncertain_cny", "remaining_cny")
        )
        rows.append((name, *figures, images, f"{t['period']} {span}"))
        if "by" in t:
            breakdowns.append((name, t["by"]))
    text = aligned(rows)
    for name, groups in breakdowns:
        lines = [("  " + name, "spent", "reserved", "uncertain", "images", "requests", "last_used")]
        for label, g in groups.items():
            lines.append(
                (
                    "  " + label,
                    f"{g['spent_cny']:.4f}",
                    f"{g['reserved_cny']:.4f}",
                    f"{g['uncertain_cny']:.4f}",
                    str(g["images"]),
                    str(g["requests"]),
                    g.get("last_used") or "",
                )
            )
        text += "\n" + aligned(lines)
    return text
