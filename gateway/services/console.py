"""What the web console shows, as plain data: each page renders it, and its ``.json`` twin
returns it as is.

A team's money is its standing (``gateway.services.usage.standing``: the period's counters, the
one computation behind ``GET /v1/gateway/usage``, ``usage --json``'s current period and the
budget header), so the console cannot disagree with them, and reading it costs the same with
ten entries or ten thousand. Result URLs never appear here: an entry says how many images it
has, and the console serves them through its own route.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, time, timedelta
from typing import Any

from gateway.core.config import KeyConfig, Settings
from gateway.core.ledger import LedgerEntry
from gateway.core.money import units_to_cny
from gateway.core.normalize import QUALITIES
from gateway.core.periods import period_at
from gateway.core.results import result_urls
from gateway.ops.accesslog import short_id
from gateway.services.keylist import key_listing
from gateway.services.reconcile import counted, rfc3339
from gateway.services.usage import NO_KEY, standing
from gateway.store.base import DaySpend, LedgerQuery
from gateway.store.manager import Store

RECENT = 50
CHART_DAYS = 30
OPEN_TASKS = 100
UNCERTAIN = 200
SORTS = ("remaining", "-remaining", "team", "-team", "spent", "-spent")


async def team_view(
    db: Store, settings: Settings, now: datetime, team: str, key: KeyConfig | None = None
) -> dict[str, Any]:
    """One team's period, its spend per day, its last requests, open tasks and keys (read side
    by side: on PostgreSQL each read has a connection of its own). ``key``: the signed-in key,
    whose standing is what ``GET /v1/gateway/usage`` answers it."""
    mine, spend, requests, tasks, keys = await asyncio.gather(
        standing(db, settings, settings.teams[team], now, key=key),
        _spend_by_day(db, settings, now, team),
        _requests(db, team),
        db.open_tasks(team, OPEN_TASKS),
        _keys(db, settings, now, team),
    )
    return {
        "team": team,
        "now": now.isoformat(),
        "period_kind": settings.teams[team].period,
        "standing": mine.as_json(),  # exactly `GET /v1/gateway/usage` for the signed-in key
        "spend_by_day": spend,
        "requests": requests,
        "pending_tasks": [
            {
                "request_id": row.request_id,
                "task": short_id(row.task_id),
                "created_at": rfc3339(row.created_at),
                "age_s": max(0, int(now.timestamp() - row.created_at)),
                "polls": row.polls,
                "quality": row.quality,
                "n": row.n,
                "held_cny": units_to_cny(row.hold_amount),
            }
            for row in tasks
        ],
        "keys": keys,
    }


async def _requests(db: Store, team: str) -> list[dict[str, Any]]:
    entries = await db.entries(LedgerQuery(team=team, limit=RECENT))
    stored = await db.stored_results([e.request_id for e in entries if e.state == "captured"])
    return [_request(e, stored.get(e.request_id)) for e in entries]


async def admin_view(
    db: Store, settings: Settings, now: datetime, sort: str = "remaining"
) -> dict[str, Any]:
    """Every team's period, the uncertain entries to resolve, the instances."""
    standings, uncertain, instances = await asyncio.gather(
        asyncio.gather(*(standing(db, settings, t, now) for t in settings.teams.values())),
        db.entries(LedgerQuery(state="uncertain", limit=UNCERTAIN)),
        db.instances(),
    )
    teams = [
        {
            **s.as_json(),
            "period_kind": s.team.period,
            "committed_cny": units_to_cny(s.usage.committed),
        }
        for s in standings
    ]
    field = sort.lstrip("-")
    figure = "team" if field == "team" else f"{field}_cny"
    teams.sort(key=lambda t: (t[figure], t["team"]), reverse=sort.startswith("-"))
    return {
        "now": now.isoformat(),
        "sort": sort,
        "teams": teams,
        "uncertain": [_uncertain(e, now) for e in uncertain],
        "instances": [
            {
                "instance": row.instance_id,
                "host": row.host,
                "pid": row.pid,
                "started_at": rfc3339(row.started_at),
                "heartbeat_at": rfc3339(row.heartbeat_at),
            }
            for row in instances
        ],
    }


def result_count(entry: LedgerEntry, stored: str | None) -> int:
    """How many of the images an entry was charged for (captured, or corrected after it
    closed) the console can show."""
    return min(len(result_urls(stored)), entry.charged_images)


def _request(entry: LedgerEntry, stored: str | None) -> dict[str, Any]:
    return {
        "request_id": entry.request_id,
        "created_at": rfc3339(entry.created_at),
        "key": entry.key_id,
        "end_user": entry.end_user,
        "mode": entry.mode,
        "quality": entry.quality,
        "n": entry.n,
        "state": entry.state,
        "resolved": entry.resolution is not None,
        "held_cny": units_to_cny(entry.held),
        "cost_cny": units_to_cny(counted(entry)),
        "images": result_count(entry, stored),
    }


def _uncertain(entry: LedgerEntry, now: datetime) -> dict[str, Any]:
    return {
        "request_id": entry.request_id,
        "team": entry.team,
        "key": entry.key_id,
        "created_at": rfc3339(entry.created_at),
        "age_s": max(0, int(now.timestamp() - entry.created_at)),
        "quality": entry.quality,
        "n": entry.n,
        "unit_price_cny": units_to_cny(entry.unit_price),
        "uncertain_cny": units_to_cny(entry.settled_amount),
        "reason": entry.reason,
    }


async def _spend_by_day(db: Store, settings: Settings, now: datetime, team: str) -> dict[str, Any]:
    """The last 30 local days (today included): CNY per day, by key and by quality."""
    tz = settings.server.tz
    today = now.astimezone(tz).date()
    dates = [today - timedelta(days=CHART_DAYS - 1 - i) for i in range(CHART_DAYS + 1)]
    since, until = (datetime.combine(day, time(), tz).timestamp() for day in (dates[0], dates[-1]))
    days = [day.isoformat() for day in dates[:-1]]
    names = {key.fingerprint: key.identity for key in settings.teams[team].all_keys()}
    by_key: dict[str, dict[str, int]] = {}
    by_quality: dict[str, dict[str, int]] = {q: {} for q in QUALITIES}
    spent = await db.daily_spend(team, since=since, until=until, tz=settings.server.timezone)
    for row in spent:
        key, quality = _key_label(row, names), row.quality
        for series in (by_key.setdefault(key, {}), by_quality.setdefault(quality, {})):
            series[row.day] = series.get(row.day, 0) + row.spent
    return {
        "days": days,
        "by_key": _in_cny(by_key),
        "by_quality": _in_cny({q: spent for q, spent in by_quality.items() if spent}),
    }


def _in_cny(series: dict[str, dict[str, int]]) -> dict[str, dict[str, float]]:
    return {name: {d: units_to_cny(v) for d, v in days.items()} for name, days in series.items()}


def _key_label(row: DaySpend, names: dict[str, str]) -> str:
    return names.get(row.key_fp or "") or row.key_id or NO_KEY


async def _keys(db: Store, settings: Settings, now: datetime, team: str) -> list[dict[str, Any]]:
    """The team's keys with their expiry, caps and last use, and this period's spend from the
    keys' own counters (a capped key's remaining as ``usage --by key`` reports it)."""
    config = settings.teams[team]
    period = period_at(config.period, now, settings.server.tz).key
    listed = {k["key"]: k for k in key_listing(settings, now, await db.key_last_used())}
    keys = []
    for key in config.all_keys():
        usage = await db.key_usage(team, key.fingerprint, period)
        left = None if key.budget is None else units_to_cny(key.budget - usage.committed)
        keys.append(
            {**listed[key.identity], "spent_cny": units_to_cny(usage.spent), "remaining_cny": left}
        )
    return keys
