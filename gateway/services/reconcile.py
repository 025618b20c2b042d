"""The ledger as admins read it: entry JSON, export rows, tables, verification reports.

Pure: entries in, text and dicts out. ``ledger list``, ``ledger export``, ``ledger verify`` and
``GET /admin/ledger`` all go through here, so the CLI and the HTTP API print the same thing.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from gateway.core.config import TeamConfig
from gateway.core.ledger import LedgerEntry, Mismatch
from gateway.core.money import format_cny, units_to_cny
from gateway.core.periods import period_at, period_label, window
from gateway.core.tables import aligned
from gateway.store.base import LedgerQuery

STATES = ("held", "captured", "released", "uncertain")
EXPORT_FIELDS = (
    "request_id", "team", "created_at", "settled_at", "state", "quality", "n", "images",
    "unit_price_cny", "amount_cny", "upstream_id", "task_id", "reason", "corrected_cny",
    "upstream",
)  # fmt: skip
# OWASP's CSV injection rule: a cell starting with one of these is a formula to a spreadsheet.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def queries(
    teams: Mapping[str, TeamConfig],
    *,
    team: str | None,
    state: str | None,
    period: str | None,
    now: datetime,
    tz: ZoneInfo,
) -> list[LedgerQuery]:
    """What to read for ``--team/--state/--period``. ``period`` (``YYYY-MM``, ``YYYY-MM-DD`` or
    ``total``) is a window of creation times; without it, each team's current period.

    ValueError names a bad ``state`` or ``period``.
    """
    if state is not None and state not in STATES:
        raise ValueError(f"state must be one of {', '.join(STATES)}")
    names = [team] if team is not None else list(teams)
    if period is not None:
        since, until = window(period, tz)
        if team is None:
            return [LedgerQuery(None, state, _ts(since), _ts(until))]
        return [LedgerQuery(name, state, _ts(since), _ts(until)) for name in names]
    found = []
    for name in names:
        current = period_at(teams[name].period, now, tz)
        found.append(LedgerQuery(name, state, _ts(current.start), _ts(current.end)))
    return found


def entry_json(entry: LedgerEntry) -> dict[str, Any]:
    """One entry of ``{"entries": [...]}``: the pinned fields, plus ``overrun_cny`` and
    ``corrections``."""
    resolution = None
    if entry.resolution is not None:
        r = entry.resolution
        resolution = {
            "state": r.state,
            "images": r.images,
            "amount_cny": units_to_cny(r.amount + r.overrun if r.state == "captured" else 0),
            "reason": r.reason,
            "resolved_at": rfc3339(r.resolved_at),
            "actor": r.actor,
        }
    return {
        "request_id": entry.request_id,
        "team": entry.team,
        "period": period_label(entry.period),
        "created_at": rfc3339(entry.created_at),
        "state": entry.state,
        "quality": entry.quality,
        "n": entry.n,
        "held_cny": units_to_cny(entry.held),
        "settled_cny": units_to_cny(counted(entry)),
        "images": entry.charged_images,
        "upstream_id": entry.upstream_id,
        "task_id": entry.task_id,
        "reason": entry.reason,
        "resolution": resolution,
        "overrun_cny": units_to_cny(entry.overrun_total),
        "corrections": [
            {
                "images": c.images,
                "amount_cny": units_to_cny(c.amount),
                "reason": c.reason,
                "at": rfc3339(c.at),
            }
            for c in entry.corrections
        ],
        "upstream": entry.upstream,
    }


def counted(entry: LedgerEntry) -> int:
    """What the entry counts against its budget now, held money aside: spent (overrun and
    corrections included) once captured or released, the whole hold while uncertain."""
    if entry.state == "uncertain":
        return entry.settled_amount
    return entry.charged


def export_row(entry: LedgerEntry) -> dict[str, Any]:
    settled_at = entry.resolution.resolved_at if entry.resolution else entry.settled_at
    return {
        "request_id": entry.request_id,
        "team": entry.team,
        "created_at": rfc3339(entry.created_at),
        "settled_at": rfc3339(settled_at) if settled_at is not None else None,
        "state": entry.state,
        "quality": entry.quality,
        "n": entry.n,
        "images": entry.charged_images,
        "unit_price_cny": units_to_cny(entry.price),
        "amount_cny": units_to_cny(counted(entry)),
        "upstream_id": entry.upstream_id,
        "task_id": entry.task_id,
        "reason": entry.reason,
        "corrected_cny": units_to_cny(entry.corrected),
        "upstream": entry.upstream,
    }


def export_csv(entries: Iterable[LedgerEntry]) -> str:
    """The rows as CSV (RFC 4180: CRLF ends a row, so a field holding a CR or LF is quoted);
    text a spreadsheet would run as a formula (an upstream's error message or id can be
    anything) is prefixed with a quote, so it is shown, not run."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=EXPORT_FIELDS, lineterminator="\r\n")
    writer.writeheader()
    for entry in entries:
        writer.writerow({k: _cell(v) for k, v in export_row(entry).items()})
    return out.getvalue()


def _cell(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def table(entries: Iterable[LedgerEntry]) -> str:
    """One line per entry, as given (newest first), aligned for a terminal."""
    header = ("created_at", "request_id", "team", "state", "quality", "held", "counted", "images",
              "upstream", "upstream_id", "by", "reason")  # fmt: skip
    rows = [header]
    for e in entries:
        reason = e.resolution.reason if e.resolution else (e.reason or "")
        rows.append(
            (
                rfc3339(e.created_at),
                e.request_id,
                e.team,
                e.state
                + (" (resolved)" if e.resolution else "")
                + (" (corrected)" if e.corrections else ""),
                f"{e.quality} x{e.n}",
                f"{units_to_cny(e.held):.4f}",
                f"{units_to_cny(counted(e)):.4f}",
                str(e.charged_images),
                e.upstream or "-",
                e.upstream_id or e.task_id or "-",
                e.resolution.actor if e.resolution else "-",
                reason[:60].replace("\n", " "),
            )
        )
    return aligned(rows)


def resolved_line(entry: LedgerEntry) -> str:
    """What a resolution moved, in one line."""
    r = entry.resolution
    assert r is not None
    freed = entry.settled_amount - r.amount
    if r.state == "released":
        return (
            f"{entry.request_id} ({entry.team}): released, {format_cny(entry.settled_amount)} "
            "moved from uncertain back to the budget"
        )
    return (
        f"{entry.request_id} ({entry.team}): captured {r.images} of {entry.n} images, "
        f"{format_cny(r.amount + r.overrun)} moved from uncertain to spent"
        + (f", {format_cny(freed)} released" if freed else "")
    )


def expired_line(entry: LedgerEntry) -> str:
    """What an expiry moved, in one line."""
    return (
        f"{entry.request_id} ({entry.team}): expired, {format_cny(entry.settled_amount)} moved "
        "from reserved to uncertain; resolve it with `image-gateway ledger resolve`"
    )


def mismatch_line(m: Mismatch) -> str:
    return (
        f"team {m.team}, period {period_label(m.period)}: {m.counter} is {format_cny(m.stored)}, "
        f"its entries sum to {format_cny(m.entries)}"
    )


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ts(moment: datetime | None) -> float | None:
    return moment.timestamp() if moment is not None else None
