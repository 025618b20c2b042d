"""Telling a restored (older) ledger from the one this gateway last saw; pure.

A gateway keeps, outside the database, a *watermark*: how far the ledger had gone when it last
looked (rows in the append-only tables, the newest hold's time). A ledger behind its watermark
on any count was restored from a backup (or deleted): the spend between the two is missing from
it, and budgets would hand it out a second time. Counts, not times, decide; times only say from
when to when.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from gateway.core.money import format_cny


@dataclass(frozen=True, slots=True)
class Position:
    """How far a ledger has gone. Each count only grows (the tables are append-only)."""

    holds: int = 0
    settlements: int = 0
    resolutions: int = 0
    last_at: float | None = None  # the newest hold's created_at
    spent: int = 0  # spent over every period, in units (it never goes down)

    def behind(self, other: Position) -> bool:
        return (
            self.holds < other.holds
            or self.settlements < other.settlements
            or self.resolutions < other.resolutions
        )


@dataclass(frozen=True, slots=True)
class Watermark:
    """A position as last seen by a gateway, and when it wrote it down (Unix time)."""

    position: Position
    written_at: float

    def to_json(self) -> str:
        return json.dumps({"position": asdict(self.position), "written_at": self.written_at})

    @classmethod
    def from_json(cls, text: str) -> Watermark:
        """ValueError for anything but what ``to_json`` writes."""
        try:
            data = json.loads(text)
            seen = data["position"]
            position = Position(
                holds=int(seen["holds"]),
                settlements=int(seen["settlements"]),
                resolutions=int(seen["resolutions"]),
                last_at=None if seen["last_at"] is None else float(seen["last_at"]),
                spent=int(seen["spent"]),
            )
            return cls(position, float(data["written_at"]))
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a watermark ({type(exc).__name__}: {exc})") from None


def further(a: Watermark | None, b: Watermark) -> Watermark:
    """The watermark to keep when two writers (instances sharing a state folder) race."""
    if a is None or a.position.behind(b.position) or not b.position.behind(a.position):
        return b
    return a


@dataclass(frozen=True, slots=True)
class Gap:
    """Spend a restored ledger lacks: from its newest entry to the watermark's."""

    ledger: Position
    watermark: Watermark

    @property
    def requests(self) -> int:
        return max(self.watermark.position.holds - self.ledger.holds, 0)

    @property
    def cny(self) -> int:
        return max(self.watermark.position.spent - self.ledger.spent, 0)

    def describe(self, where: str) -> str:
        """One line: what is missing, from when to when, and the two ways on."""
        since = when(self.ledger.last_at) if self.ledger.last_at else "its beginning"
        until = when(self.watermark.position.last_at or self.watermark.written_at)
        return (
            f"the ledger {where} is older than what this gateway had committed: spend from "
            f"{since} to {until} is missing ({self.requests} request(s), {format_cny(self.cny)} "
            "spent), and budgets would grant it again; restore "
            "a newer backup, or accept the loss by starting once with "
            "`serve --accept-restored-ledger`"
        )

    def record(self, now: float, who: str) -> str:
        """What the ledger keeps of an accepted restore (JSON)."""
        return json.dumps(
            {
                "accepted_at": now,
                "by": who,
                "ledger": asdict(self.ledger),
                "watermark": json.loads(self.watermark.to_json()),
                "missing_requests": self.requests,
                "missing_spent_units": self.cny,
            }
        )


def gap(ledger: Position, watermark: Watermark | None) -> Gap | None:
    """The missing spend, or None when the ledger is at or past the watermark."""
    if watermark is None or not ledger.behind(watermark.position):
        return None
    return Gap(ledger, watermark)


def when(ts: float) -> str:
    """A Unix time as the one-line messages show it."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
