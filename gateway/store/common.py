"""What both engines share: the ledger view's columns and the rows they become.

Both schemas define the same ``ledger`` view (holds joined with their settlement, resolution,
corrections and task), so the column lists and the row-to-value mapping are written once; each
engine's module keeps its own statements.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from gateway.core.ledger import (
    CorrectionRecord,
    Hold,
    LedgerEntry,
    Mismatch,
    ResolutionRecord,
    Settlement,
)
from gateway.core.restore import Position
from gateway.store.base import NEVER, TaskRow, Verification

ENTRY_COLUMNS = (
    "request_id, team, period, created_at, mode, quality, n, unit_price, held, settled_state,"
    " settled, images, overrun, upstream_id, task_id, reason, settled_at, resolved_state,"
    " resolved_images, resolved_amount, resolved_overrun, resolved_reason, resolved_by,"
    " resolved_at, key_id, key_fp, end_user, corrections, upstream, upstream_unit_price"
)

IMAGES = (
    "CASE WHEN state = 'captured' THEN COALESCE(resolved_images, images) ELSE 0 END"
    " + corrected_images"
)

# What the counters of a group of ledger rows must be: spent, reserved, uncertain, overrun.
SUMS = (
    "SUM(charged), SUM(CASE WHEN settled_state = 'held' THEN held ELSE 0 END),"
    " SUM(CASE WHEN settled_state = 'uncertain' AND resolved_state IS NULL THEN settled"
    " ELSE 0 END), SUM(overrun + COALESCE(resolved_overrun, 0))"
)

# What a settled hold counts as spent now and its images: the ledger view's ``charged`` and
# ``IMAGES`` on the base tables (holds ``h``, settlements ``s``, resolutions ``r``, and ``c``
# the sums of its corrections), for scans that need nothing else of the view's joins.
CHARGED_NOW = (
    "CASE WHEN r.state = 'captured' THEN r.amount + r.overrun WHEN r.state IS NOT NULL THEN 0"
    " WHEN s.state = 'captured' THEN s.amount + s.overrun ELSE 0 END + COALESCE(c.amount, 0)"
)
IMAGES_NOW = (
    "CASE WHEN COALESCE(r.state, s.state) = 'captured' THEN COALESCE(r.images, s.images) ELSE 0"
    " END + COALESCE(c.images, 0)"
)
CORRECTED = (
    "(SELECT request_id, SUM(images) AS images, SUM(amount) AS amount FROM corrections"
    " GROUP BY request_id)"
)

# An unsettled hold (``h`` joined with its task ``t``) that only its request could settle: no
# task, or one never to be polled again while its hold is open (what a crash could leave between
# recording an instant task and settling it, before the two were one transaction).
IN_FLIGHT = f"(t.task_id IS NULL OR (t.status = 'pending' AND t.next_poll_at >= {NEVER:.0f}))"

TASK_SELECT = (
    "SELECT t.task_id, t.team, t.request_id, t.created_at, t.status, t.result, t.polls,"
    " t.next_poll_at, h.amount, h.unit_price, h.quality, h.n, s.state,"
    " r.request_id IS NOT NULL, t.upstream, t.unit_price FROM tasks t"
    " JOIN holds h USING (request_id) LEFT JOIN settlements s USING (request_id)"
    " LEFT JOIN resolutions r USING (request_id)"
)


def settlement_params(request_id: str, s: Settlement, now: float) -> tuple[Any, ...]:
    """The values of ``INSERT INTO settlements`` (both engines list the columns alike)."""
    return (
        request_id, s.state, s.amount, s.overrun, s.images, s.upstream_id, s.reason, s.result,
        now, s.upstream, s.unit_price,
    )  # fmt: skip


def daily_spend_sql(marks: Sequence[str]) -> str:
    """Spend per (interval, key, quality) of one team. ``marks`` are the numbered placeholders
    of the team and of the ascending bounds (intervals numbered from 0); the bounds are local
    midnights computed by the caller, so no engine needs to know the time zone."""
    team, bounds = marks[0], marks[1:]
    bucket = " ".join(f"WHEN h.created_at < {m} THEN {i}" for i, m in enumerate(bounds[1:]))
    return (
        f"SELECT CASE {bucket} END, h.key_fp, MAX(h.key_id), h.quality, SUM({CHARGED_NOW}),"
        f" SUM({IMAGES_NOW}) FROM holds h JOIN settlements s USING (request_id)"
        f" LEFT JOIN resolutions r USING (request_id) LEFT JOIN {CORRECTED} c"
        " ON c.request_id = h.request_id"
        f" WHERE h.team = {team} AND h.created_at >= {bounds[0]} AND h.created_at < {bounds[-1]}"
        f" GROUP BY 1, 2, 4 HAVING SUM({CHARGED_NOW}) > 0 ORDER BY 1"
    )


def hold_params(hold: Hold) -> tuple[Any, ...]:
    return (
        hold.request_id, hold.team, hold.period, hold.created_at, hold.endpoint, hold.mode,
        hold.quality, hold.n, hold.unit_price, hold.amount, hold.budget, hold.fingerprint,
        hold.key_id, hold.key_fp, hold.key_budget, hold.end_user,
    )  # fmt: skip


def verification(rows: list[Any]) -> Verification:
    """Counters against the sums of their entries, from rows ``(kind, scope, period, spent,
    reserved, uncertain, overrun)``; kinds are stored/summed (teams), key stored/key summed
    (scope ``team key_fp``) and count."""
    tables: dict[str, dict[tuple[str, str], tuple[int, ...]]] = {}
    count = 0
    for kind, scope, period, *figures in rows:
        if kind == "count":
            count = figures[0]
        else:
            tables.setdefault(kind, {})[(scope, period)] = tuple(figures)
    mismatches = compare_counters(tables.get("stored", {}), tables.get("summed", {}))
    for m in compare_counters(tables.get("key stored", {}), tables.get("key summed", {})):
        team, _, key_fp = m.team.partition(" ")
        mismatches.append(replace(m, team=team, counter=f"{m.counter} of key {key_fp[:8]}"))
    return Verification(count, tuple(mismatches))


def compare_counters(
    stored: dict[tuple[str, str], tuple[int, ...]], summed: dict[tuple[str, str], tuple[int, ...]]
) -> list[Mismatch]:
    """Every counter that differs from its entries (a counter row with no entries sums to 0)."""
    names = ("spent", "reserved", "uncertain", "overrun")
    mismatches = []
    for team, period in sorted(set(stored) | set(summed)):
        have = stored.get((team, period), (0, 0, 0, 0))
        want = summed.get((team, period), (0, 0, 0, 0))
        for name, counter, entries in zip(names, have, want, strict=True):
            if counter != entries:
                mismatches.append(Mismatch(team, period, name, counter, entries))
    return mismatches


def to_entry(row: Any) -> LedgerEntry:
    resolution = None
    if row[17] is not None:
        resolution = ResolutionRecord(
            state=row[17],
            images=row[18],
            amount=row[19],
            overrun=row[20],
            reason=row[21],
            actor=row[22],
            resolved_at=row[23],
        )
    return LedgerEntry(
        request_id=row[0],
        team=row[1],
        period=row[2],
        created_at=row[3],
        mode=row[4],
        quality=row[5],
        n=row[6],
        unit_price=row[7],
        held=row[8],
        settled_state=row[9],
        settled_amount=row[10],
        images=row[11],
        overrun=row[12],
        upstream_id=row[13],
        task_id=row[14],
        reason=row[15],
        settled_at=row[16],
        resolution=resolution,
        key_id=row[24],
        key_fp=row[25],
        end_user=row[26],
        corrections=_corrections(row[27]),
        upstream=row[28],
        upstream_unit_price=row[29],
    )


def _corrections(listed: str) -> tuple[CorrectionRecord, ...]:
    """The view's JSON list of an entry's corrections, oldest first."""
    found = [
        CorrectionRecord(int(c["images"]), int(c["amount"]), str(c["reason"]), float(c["at"]))
        for c in json.loads(listed)
    ]
    return tuple(sorted(found, key=lambda c: c.at))


def to_task_row(row: Any) -> TaskRow:
    return TaskRow(
        task_id=row[0],
        team=row[1],
        request_id=row[2],
        created_at=row[3],
        status=row[4],
        result=row[5],
        polls=row[6],
        next_poll_at=row[7],
        hold_amount=row[8],
        unit_price=row[9],
        quality=row[10],
        n=row[11],
        settled=row[12],
        resolved=bool(row[13]),
        upstream=row[14],
        upstream_unit_price=row[15],
    )


# How far the ledger has gone (core.restore.Position), in one statement: one snapshot.
POSITION = (
    "SELECT (SELECT COUNT(*) FROM holds), (SELECT COUNT(*) FROM settlements),"
    " (SELECT COUNT(*) FROM resolutions), (SELECT MAX(created_at) FROM holds),"
    " (SELECT COALESCE(SUM(spent), 0) FROM usage)"
)
RESTORE_PREFIX = "restore_accepted:"


def to_position(row: Sequence[Any]) -> Position:
    holds, settlements, resolutions, last_at, spent = row
    return Position(
        int(holds), int(settlements), int(resolutions),
        None if last_at is None else float(last_at), int(spent),
    )  # fmt: skip
