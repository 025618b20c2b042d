"""Money as integers: CNY amounts are counted in units of 1/10000 CNY.

Floats never hold money here. Config values arrive as TOML floats and are converted
once, through their decimal text, so ``0.1`` is exactly 1000 units.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

UNITS_PER_CNY = 10_000


class MoneyError(ValueError):
    """A value that cannot be an amount of CNY."""


def cny_to_units(value: object) -> int:
    """Convert a CNY amount (int, float, str or Decimal) to units, refusing sub-unit precision."""
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise MoneyError(f"expected a number of CNY, got {type(value).__name__}")
    try:
        amount = Decimal(str(value))
    except InvalidOperation as exc:
        raise MoneyError(f"not a number: {value!r}") from exc
    if not amount.is_finite():
        raise MoneyError(f"not a finite amount: {value!r}")
    units = amount * UNITS_PER_CNY
    if units != units.to_integral_value():
        raise MoneyError(f"{value} has more than 4 decimal places")
    return int(units)


def units_to_cny(units: int) -> float:
    """Units to CNY for display and JSON (exact for every amount up to 2**53 units)."""
    return units / UNITS_PER_CNY


def decimal_cny(units: int) -> str:
    """The exact decimal text of an amount, such as ``12.3400``: fixed four places, so nothing
    is rounded away (what a header carries)."""
    sign = "-" if units < 0 else ""
    whole, frac = divmod(abs(units), UNITS_PER_CNY)
    return f"{sign}{whole}.{frac:04d}"


def format_cny(units: int) -> str:
    """Human text such as ``12.3400 CNY``."""
    return f"{decimal_cny(units)} CNY"
