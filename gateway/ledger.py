"""The ledger's vocabulary: a hold reserved before the upstream call, and its one settlement."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

HoldState = Literal["held", "captured", "released", "uncertain"]
SettleState = Literal["captured", "released", "uncertain"]


class BudgetRefused(Exception):
    """The hold would take the team past its budget; nothing was written."""

    def __init__(self, usage: Usage) -> None:
        super().__init__("budget_exceeded")
        self.usage = usage


@dataclass(frozen=True, slots=True)
class Hold:
    request_id: str
    team: str
    period: str
    created_at: float
    endpoint: str
    mode: Literal["sync", "async"]
    quality: str
    n: int
    unit_price: int
    budget: int
    fingerprint: str

    @property
    def amount(self) -> int:
        return self.n * self.unit_price


@dataclass(frozen=True, slots=True)
class Settlement:
    state: SettleState
    amount: int
    images: int = 0
    upstream_id: str | None = None
    reason: str | None = None
    result: str | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    spent: int = 0
    reserved: int = 0
    uncertain: int = 0

    @property
    def committed(self) -> int:
        return self.spent + self.reserved + self.uncertain
