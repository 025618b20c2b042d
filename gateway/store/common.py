"""Rows into values, and values into statement parameters, for every engine.

Rows are read by column name (``sqlite3.Row``, ``asyncpg.Record`` and the in-memory engine's
dicts all allow it); a ledger row is a row of the ``ledger`` view both schemas define.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import replace
from typing import Any

from gateway.core.ledger import (
    Correction,
    CorrectionRecord,
    Hold,
    LedgerEntry,
    Mismatch,
    Resolution,
    ResolutionRecord,
    Settlement,
    Usage,
)
from gateway.core.restore import Position
from gateway.store.base import ReportRow, TaskRow, Verification
from gateway.store.engine import Step, one

COUNTERS = ("spent", "reserved", "uncertain", "overrun")
RESTORE_PREFIX = "restore_accepted:"  # meta rows of accepted restores, by time


def hold_params(hold: Hold) -> dict[str, Any]:
    return {
        "request_id": hold.request_id, "team": hold.team, "period": hold.period,
        "created_at": hold.created_at, "endpoint": hold.endpoint, "mode": hold.mode,
        "quality": hold.quality, "n": hold.n, "unit_price": hold.unit_price,
        "amount": hold.amount, "budget": hold.budget, "fingerprint": hold.fingerprint,
        "key_id": hold.key_id, "key_fp": hold.key_fp, "key_budget": hold.key_budget,
        "end_user": hold.end_user,
    }  # fmt: skip


def settlement_params(request_id: str, s: Settlement, now: float) -> dict[str, Any]:
    return {
        "request_id": request_id, "state": s.state, "amount": s.amount, "overrun": s.overrun,
        "images": s.images, "upstream_id": s.upstream_id, "reason": s.reason,
        "result": s.result, "settled_at": now, "upstream": s.upstream,
        "unit_price": s.unit_price,
    }  # fmt: skip


def resolution_params(request_id: str, r: Resolution, now: float) -> dict[str, Any]:
    return {
        "request_id": request_id, "state": r.state, "images": r.images, "amount": r.amount,
        "overrun": r.overrun, "reason": r.reason, "actor": r.actor,
        "upstream_id": r.upstream_id, "resolved_at": now, "upstream": r.upstream,
    }  # fmt: skip


def correction_params(request_id: str, c: Correction, now: float) -> dict[str, Any]:
    return {
        "request_id": request_id, "images": c.images, "amount": c.amount, "reason": c.reason,
        "upstream_id": c.upstream_id, "corrected_at": now, "upstream": c.upstream,
    }  # fmt: skip


def heartbeat(instance_id: str, lease_s: float, *, lost: bool) -> Step:
    """This process is alive, as a member of the fleet (registered again if it was taken for
    dead: the row's ``again``). ``lost``: it could not reach the database since its last
    heartbeat, so its view of the others starts again."""
    return one("heartbeat", instance_id=instance_id, host=socket.gethostname(), pid=os.getpid(),
               lease_s=float(lease_s), lost=lost)  # fmt: skip


def usage_of(row: Any) -> Usage:
    """A usage or key_usage row (None: nothing counted yet)."""
    if row is None:
        return Usage()
    return Usage(row["spent"], row["reserved"], row["uncertain"], row["overrun"])


def report_row(row: Any) -> ReportRow:
    """PostgreSQL sums bigints as numeric: back to integers."""
    spent, reserved, uncertain, overrun, images, requests = (
        int(row[name] or 0) for name in (*COUNTERS, "images", "requests")
    )
    return ReportRow(
        row["grp"], spent, reserved, uncertain, overrun, images, requests, row["last_at"],
        row["key_id"],
    )  # fmt: skip


def verification(rows: list[Any]) -> Verification:
    """Counters against the sums of their entries, from rows of ``kind, scope, period`` and the
    four counters; kinds are stored/summed (teams), key stored/key summed (scope ``team
    key_fp``) and count."""
    tables: dict[str, dict[tuple[str, str], tuple[int, ...]]] = {}
    count = 0
    for row in rows:
        figures = tuple(int(row[name] or 0) for name in COUNTERS)
        if row["kind"] == "count":
            count = figures[0]
        else:
            tables.setdefault(row["kind"], {})[(row["scope"], row["period"])] = figures
    mismatches = compare_counters(tables.get("stored", {}), tables.get("summed", {}))
    for m in compare_counters(tables.get("key stored", {}), tables.get("key summed", {})):
        team, _, key_fp = m.team.partition(" ")
        mismatches.append(replace(m, team=team, counter=f"{m.counter} of key {key_fp[:8]}"))
    return Verification(count, tuple(mismatches))


def compare_counters(
    stored: dict[tuple[str, str], tuple[int, ...]], summed: dict[tuple[str, str], tuple[int, ...]]
) -> list[Mismatch]:
    """Every counter that differs from its entries (a counter row with no entries sums to 0)."""
    mismatches = []
    for team, period in sorted(set(stored) | set(summed)):
        have = stored.get((team, period), (0, 0, 0, 0))
        want = summed.get((team, period), (0, 0, 0, 0))
        for name, counter, entries in zip(COUNTERS, have, want, strict=True):
            if counter != entries:
                mismatches.append(Mismatch(team, period, name, counter, entries))
    return mismatches


def to_entry(row: Any) -> LedgerEntry:
    resolution = None
    if row["resolved_state"] is not None:
        resolution = ResolutionRecord(
            state=row["resolved_state"],
            images=row["resolved_images"],
            amount=row["resolved_amount"],
            overrun=row["resolved_overrun"],
            reason=row["resolved_reason"],
            actor=row["resolved_by"],
            resolved_at=row["resolved_at"],
        )
    return LedgerEntry(
        request_id=row["request_id"],
        team=row["team"],
        period=row["period"],
        created_at=row["created_at"],
        mode=row["mode"],
        quality=row["quality"],
        n=row["n"],
        unit_price=row["unit_price"],
        held=row["held"],
        settled_state=row["settled_state"],
        settled_amount=row["settled"],
        images=row["images"],
        overrun=row["overrun"],
        upstream_id=row["upstream_id"],
        task_id=row["task_id"],
        reason=row["reason"],
        settled_at=row["settled_at"],
        resolution=resolution,
        key_id=row["key_id"],
        key_fp=row["key_fp"],
        end_user=row["end_user"],
        corrections=_corrections(row["corrections"]),
        upstream=row["upstream"],
        upstream_unit_price=row["upstream_unit_price"],
    )


def _corrections(listed: str) -> tuple[CorrectionRecord, ...]:
    """The view's JSON list of an entry's corrections, oldest first."""
    found = [
        CorrectionRecord(int(c["images"]), int(c["amount"]), str(c["reason"]), float(c["at"]))
        for c in json.loads(listed)
    ]
    return tuple(sorted(found, key=lambda c: c.at))


def to_position(row: Any) -> Position:
    last_at = row["last_at"]
    return Position(
        int(row["holds"]), int(row["settlements"]), int(row["resolutions"]),
        None if last_at is None else float(last_at), int(row["spent"]),
    )  # fmt: skip


def to_task_row(row: Any) -> TaskRow:
    return TaskRow(
        task_id=row["task_id"],
        team=row["team"],
        request_id=row["request_id"],
        created_at=row["created_at"],
        status=row["status"],
        result=row["result"],
        polls=row["polls"],
        next_poll_at=row["next_poll_at"],
        hold_amount=row["amount"],
        unit_price=row["unit_price"],
        quality=row["quality"],
        n=row["n"],
        settled=row["settled"],
        resolved=bool(row["resolved"]),
        upstream=row["upstream"],
        upstream_unit_price=row["upstream_unit_price"],
    )
