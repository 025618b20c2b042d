"""Where committed money is reported: Prometheus counters and the access log.

Every settlement, resolution and correction that commits becomes one ``MoneyMoved``. If the
request it belongs to is still open (its access-log line not yet written), that line carries
it; otherwise, and always for a correction, it gets a line of its own with ``endpoint:
"settle"``. Either way each CNY moved into ``spent`` appears on exactly one line, so summing
``cost_cny`` per team gives what ``usage`` reports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gateway.core.ledger import GATEWAY_ACTOR, Correction, Hold, LedgerEntry, Resolution, Settlement
from gateway.core.money import units_to_cny
from gateway.ops.accesslog import AccessLog, Record, settle_record, short_id, timestamp
from gateway.ops.metrics import Metrics


@dataclass(frozen=True, slots=True)
class MoneyMoved:
    ledger_id: str
    team: str
    mode: str
    quality: str
    n: int
    state: str  # captured | released | uncertain | corrected
    charged: int  # moved into spent, overrun included
    images: int
    overrun: int
    upstream_id: str | None
    task_id: str | None
    key: str | None = None
    actor: str | None = None  # who moved it, when a person did (a resolution, an expiry)
    upstream: str | None = None  # the upstream's name (where it was served, sent or polled)

    @classmethod
    def settled(cls, hold: Hold, settlement: Settlement, task_id: str | None = None) -> MoneyMoved:
        return cls(
            hold.request_id, hold.team, hold.mode, hold.quality, hold.n, settlement.state,
            settlement.charged, settlement.images, settlement.overrun, settlement.upstream_id,
            task_id, key=hold.key_id, upstream=settlement.upstream,
        )  # fmt: skip

    @classmethod
    def of_entry(cls, entry: LedgerEntry, resolution: Resolution | None = None) -> MoneyMoved:
        """What an entry's last step did: its resolution if it has one, else its settlement
        (corrections are reported each on its own, ``corrected``)."""
        actor = None
        if resolution is None and entry.resolution is None:
            charged, images, overrun = entry.closed_charge, entry.images, entry.overrun
        else:
            r = resolution or entry.resolution
            assert r is not None
            charged = r.amount + r.overrun if r.state == "captured" else 0
            images, overrun, actor = r.images, r.overrun, r.actor
        return cls(
            entry.request_id, entry.team, entry.mode, entry.quality, entry.n, entry.state,
            charged, images, overrun, entry.upstream_id, entry.task_id, entry.key_id, actor,
            entry.upstream,
        )  # fmt: skip

    @classmethod
    def expired(cls, entry: LedgerEntry, actor: str) -> MoneyMoved:
        """An admin's expiry: the hold moved to uncertain, nothing spent (whatever the entry
        became since)."""
        return cls(
            entry.request_id, entry.team, entry.mode, entry.quality, entry.n, "uncertain", 0, 0,
            0, entry.upstream_id, entry.task_id, entry.key_id, actor, entry.upstream,
        )  # fmt: skip

    @classmethod
    def corrected(cls, entry: LedgerEntry, correction: Correction) -> MoneyMoved:
        return cls(
            entry.request_id, entry.team, entry.mode, entry.quality, entry.n, "corrected",
            correction.amount, correction.images, 0, entry.upstream_id, entry.task_id,
            entry.key_id, GATEWAY_ACTOR,
        )  # fmt: skip


class LogSlot:
    """A request's access-log record while money can still be added to it."""

    __slots__ = ("_cost", "_images", "open", "record")

    def __init__(self, record: Record) -> None:
        self.record = record
        self.open = True
        self._cost = 0
        self._images = 0

    def take(self, moved: MoneyMoved) -> bool:
        if not self.open:
            return False
        self._cost += moved.charged
        self._images += moved.images
        record = self.record
        record["cost_cny"] = units_to_cny(self._cost)
        record["images"] = self._images
        record["ledger_state"] = moved.state
        record["ledger_id"] = record["ledger_id"] or moved.ledger_id
        record["task_id"] = record["task_id"] or short_id(moved.task_id)
        record["upstream_id"] = record["upstream_id"] or short_id(moved.upstream_id)
        record["upstream"] = record["upstream"] or moved.upstream
        return True


class Books:
    def __init__(
        self, access_log: AccessLog, metrics: Metrics, wall_clock: Callable[[], float]
    ) -> None:
        self._access_log = access_log
        self._metrics = metrics
        self._wall_clock = wall_clock

    def moved(self, moved: MoneyMoved, slot: LogSlot | None = None) -> None:
        """Count committed money, on the request's own line if it is still open."""
        if moved.charged:
            self._metrics.spent.labels(moved.team, moved.key or "-").inc(
                units_to_cny(moved.charged)
            )
            self._metrics.images.labels(moved.team, moved.quality).inc(moved.images)
        if moved.overrun:
            self._metrics.overrun.labels(moved.team).inc(units_to_cny(moved.overrun))
        if moved.state == "corrected":
            self._metrics.corrections.labels(moved.team).inc()
            slot = None  # a line of its own: the request's line said what it knew then
        if slot is not None and slot.take(moved):
            return
        record = settle_record(moved.ledger_id, self._wall_clock())
        record.update(
            team=moved.team,
            key=moved.key,
            mode=moved.mode,
            quality=moved.quality,
            n=moved.n,
            cost_cny=units_to_cny(moved.charged),
            images=moved.images,
            ledger_state=moved.state,
            upstream_id=short_id(moved.upstream_id),
            task_id=short_id(moved.task_id),
            actor=moved.actor,
            upstream=moved.upstream,
        )
        self._access_log.write(record)

    def write(self, slot: LogSlot) -> None:
        """The request's line, once nothing more can be added to it."""
        slot.open = False
        if slot.record["ts"] is None:
            slot.record["ts"] = timestamp(self._wall_clock())
        self._access_log.write(slot.record)
