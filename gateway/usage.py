"""The usage report: per team, the current period's budget, spend and images, from the ledger."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from gateway.config import Settings
from gateway.money import units_to_cny
from gateway.normalize import QUALITIES
from gateway.periods import period_at
from gateway.pricing import remaining
from gateway.store.base import Store


async def usage_report(
    db: Store, settings: Settings, now: datetime, only: str | None = None
) -> dict[str, Any]:
    """``{"teams": {name: {...}}}`` with every figure in CNY; ``only`` limits it to one team."""
    teams: dict[str, Any] = {}
    for name, team in settings.teams.items():
        if only is not None and name != only:
            continue
        period = period_at(team.period, now, settings.server.tz)
        usage = await db.usage(name, period.key)
        images = await db.images_by_quality(name, period.key)
        teams[name] = {
            "budget_cny": units_to_cny(team.budget),
            "spent_cny": units_to_cny(usage.spent),
            "reserved_cny": units_to_cny(usage.reserved),
            "uncertain_cny": units_to_cny(usage.uncertain),
            "remaining_cny": units_to_cny(remaining(team, usage)),
            "overrun_cny": units_to_cny(usage.overrun),
            "images": {quality: images.get(quality, 0) for quality in QUALITIES},
            "period": team.period,
            "period_start": period.start.isoformat() if period.start else None,
            "period_end": period.end.isoformat() if period.end else None,
        }
    return {"teams": teams}


def format_report(report: dict[str, Any]) -> str:
    """The report as an aligned text table for a terminal."""
    header = ("team", "budget", "spent", "reserved", "uncertain", "remaining", "images", "period")
    rows = [header]
    for name, t in report["teams"].items():
        images = " ".join(f"{q}={n}" for q, n in t["images"].items() if n) or "0"
        span = f"{t['period_start'] or '-'} .. {t['period_end'] or '-'}"
        rows.append(
            (
                name,
                *(
                    f"{t[key]:.4f}"
                    for key in (
                        "budget_cny",
                        "spent_cny",
                        "reserved_cny",
                        "uncertain_cny",
                        "remaining_cny",
                    )
                ),
                images,
                f"{t['period']} {span}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines) + "\n"
