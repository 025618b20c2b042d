"""The ledger's vocabulary: a hold reserved before the upstream call, its one settlement, at
most one resolution of an uncertain settlement, and corrections of a closed entry that turned
out to have been served. Plain immutable values; no I/O.

    hold (held) ──settle──> captured | released | uncertain ──resolve──> captured | released
    closed (settled, not uncertain; or resolved) ──correct──> + images and amount served late

Amounts are integer units of 1/10,000 CNY (``gateway.core.money``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

HoldState = Literal["held", "captured", "released", "uncertain"]
SettleState = Literal["captured", "released", "uncertain"]
ResolvedState = Literal["captured", "released"]
Mode = Literal["sync", "async"]
# What a usage report breaks a team down by (`usage --by`).
Grouping = Literal["key", "end_user", "day", "quality", "upstream"]
GATEWAY_ACTOR = "gateway"  # the gateway's own resolutions (a task that ended after all)
ACTOR_CHARS = 64


class BudgetRefused(Exception):
    """The hold would take the team (or its key) past a budget; nothing was written."""

    def __init__(self, usage: Usage, *, scope: Literal["team", "key"] = "team") -> None:
        super().__init__("budget_exceeded")
        self.usage = usage
        self.scope = scope


@dataclass(frozen=True, slots=True)
class Hold:
    request_id: str
    team: str
    period: str
    created_at: float
    endpoint: str
    mode: Mode
    quality: str
    n: int
    unit_price: int
    budget: int
    fingerprint: str
    key_id: str | None = None  # the key's identity when the request was made
    key_fp: str | None = None  # the key's hash prefix: its spend stays its own across renames
    key_budget: int | None = None  # the key's own cap, checked in the same step as the team's
    end_user: str | None = None

    @property
    def amount(self) -> int:
        return self.n * self.unit_price


@dataclass(frozen=True, slots=True)
class Capture:
    """Images served and paid for: ``amount`` (at most the hold) plus an explicit ``overrun``
    when the upstream billed more than was held (async tasks only)."""

    images: int
    amount: int
    overrun: int = 0
    upstream_id: str | None = None
    reason: str | None = None
    result: str | None = None
    upstream: str | None = None  # the name of the upstream that served it
    unit_price: int | None = None  # that upstream's price per image (at most the hold's)
    state: ClassVar[SettleState] = "captured"

    @property
    def charged(self) -> int:
        return self.amount + self.overrun


@dataclass(frozen=True, slots=True)
class Release:
    """Nothing was generated (or nothing was sent): the hold is freed in full."""

    reason: str
    upstream_id: str | None = None
    result: str | None = None
    upstream: str | None = None  # the last upstream that refused it, if any was asked
    unit_price: ClassVar[int | None] = None
    state: ClassVar[SettleState] = "released"
    images: ClassVar[int] = 0
    amount: ClassVar[int] = 0
    overrun: ClassVar[int] = 0
    charged: ClassVar[int] = 0


@dataclass(frozen=True, slots=True)
class Uncertain:
    """The outcome cannot be known: the whole hold stays counted until it is resolved."""

    amount: int
    reason: str
    upstream_id: str | None = None
    result: str | None = None
    upstream: str | None = None  # where it was sent, when known
    unit_price: int | None = None  # that upstream's price per image, for its resolution
    state: ClassVar[SettleState] = "uncertain"
    images: ClassVar[int] = 0
    overrun: ClassVar[int] = 0
    charged: ClassVar[int] = 0


Settlement = Capture | Release | Uncertain


@dataclass(frozen=True, slots=True)
class Resolution:
    """How an uncertain settlement was closed, by an admin or by the gateway itself once the
    task's true outcome became known. ``actor`` says who: an admin key's name, the CLI's
    ``--actor``, or ``gateway``."""

    state: ResolvedState
    images: int
    amount: int
    reason: str
    actor: str
    overrun: int = 0
    upstream_id: str | None = None  # learned with the outcome (an uncertain hold had none)
    upstream: str | None = None  # the upstream's name, likewise

    @property
    def charged(self) -> int:
        return self.amount + self.overrun if self.state == "captured" else 0


@dataclass(frozen=True, slots=True)
class Correction:
    """Images the upstream delivered (and billed) for an entry that was already closed without
    them: released by a timeout or an admin, or resolved for fewer. Appended, counted in spent,
    never above what the upstream reported."""

    images: int
    amount: int
    reason: str
    upstream_id: str | None = None
    upstream: str | None = None  # the name of the upstream that delivered them


@dataclass(frozen=True, slots=True)
class Usage:
    spent: int = 0
    reserved: int = 0
    uncertain: int = 0
    overrun: int = 0  # the part of ``spent`` billed above holds

    @property
    def committed(self) -> int:
        return self.spent + self.reserved + self.uncertain


@dataclass(frozen=True, slots=True)
class ResolutionRecord:
    state: ResolvedState
    images: int
    amount: int
    overrun: int
    reason: str
    actor: str
    resolved_at: float


@dataclass(frozen=True, slots=True)
class CorrectionRecord:
    images: int
    amount: int
    reason: str
    at: float


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One request as the ledger knows it: its hold, settlement and resolution joined.

    ``state`` is where the money is now (a resolved entry shows the resolution's state), and
    ``charged`` what it counts as spent, overrun and corrections included.
    """

    request_id: str
    team: str
    period: str
    created_at: float
    mode: str
    quality: str
    n: int
    unit_price: int
    held: int
    settled_state: HoldState
    settled_amount: int
    images: int
    overrun: int
    upstream_id: str | None
    task_id: str | None
    reason: str | None
    settled_at: float | None
    resolution: ResolutionRecord | None
    key_id: str | None = None
    key_fp: str | None = None
    end_user: str | None = None
    corrections: tuple[CorrectionRecord, ...] = ()
    upstream: str | None = None  # the upstream that served (or was last asked), when known
    upstream_unit_price: int | None = None  # its price per image

    @property
    def price(self) -> int:
        """The price per image this entry is charged at: its upstream's, else the hold's."""
        return self.upstream_unit_price if self.upstream_unit_price is not None else self.unit_price

    @property
    def state(self) -> HoldState:
        return self.resolution.state if self.resolution is not None else self.settled_state

    @property
    def closed_charge(self) -> int:
        """What its settlement or resolution charged, corrections aside."""
        if self.resolution is not None:
            r = self.resolution
            return r.amount + r.overrun if r.state == "captured" else 0
        return self.settled_amount + self.overrun if self.settled_state == "captured" else 0

    @property
    def charged(self) -> int:
        return self.closed_charge + self.corrected

    @property
    def charged_images(self) -> int:
        closed = self.resolution.images if self.resolution is not None else self.images
        return closed + sum(c.images for c in self.corrections)

    @property
    def corrected(self) -> int:
        return sum(c.amount for c in self.corrections)

    @property
    def overrun_total(self) -> int:
        return self.overrun + (self.resolution.overrun if self.resolution is not None else 0)


def actor_problem(actor: str) -> str | None:
    """Why ``actor`` cannot name who resolved or expired an entry (None if it can)."""
    if not actor or len(actor) > ACTOR_CHARS or not actor.isprintable() or actor != actor.strip():
        return f"the actor must be 1 to {ACTOR_CHARS} printable characters"
    if actor == GATEWAY_ACTOR:
        return f"{GATEWAY_ACTOR!r} names the gateway's own resolutions; choose another actor"
    return None


@dataclass(frozen=True, slots=True)
class Mismatch:
    """A stored counter that disagrees with the sum of the entries behind it."""

    team: str
    period: str
    counter: str
    stored: int
    entries: int
