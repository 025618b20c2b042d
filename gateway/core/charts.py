"""Charts as geometry for server-side SVG: numbers in, shapes out (the templates draw them).

No script and no style attribute reaches the page: every colour is a CSS class (``s0``..``s7``,
or a segment's name) in the console's own stylesheet.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

SERIES_CLASSES = 8  # s0..s7 in console.css; more series than that are summed as "other"
OTHER = "other"


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    series: int
    title: str


@dataclass(frozen=True, slots=True)
class Label:
    x: float
    y: float
    text: str


@dataclass(frozen=True, slots=True)
class LegendItem:
    series: int
    name: str
    total: float


@dataclass(frozen=True, slots=True)
class BarChart:
    width: int
    height: int
    bars: tuple[Bar, ...]
    gridlines: tuple[Label, ...]  # y of each horizontal line, with its amount
    days: tuple[Label, ...]
    legend: tuple[LegendItem, ...]
    left: float
    right: float


@dataclass(frozen=True, slots=True)
class Arc:
    kind: str
    path: str


def stacked_bars(
    days: Sequence[str],
    series: Mapping[str, Mapping[str, float]],
    *,
    width: int = 720,
    height: int = 200,
) -> BarChart:
    """One bar per day, stacked by series (``{series: {day: amount}}``), largest series first."""
    left, right, top, bottom = 52.0, float(width - 8), 8.0, float(height - 22)
    named = _fold_small(series)
    highest = max((sum(s.get(day, 0.0) for s in named.values()) for day in days), default=0.0)
    scale_max = nice_ceiling(highest)
    slot = (right - left) / max(len(days), 1)
    bars = []
    for index, day in enumerate(days):
        y = bottom
        for number, (name, amounts) in enumerate(named.items()):
            amount = amounts.get(day, 0.0)
            if amount <= 0:
                continue
            h = (bottom - top) * amount / scale_max
            y -= h
            bars.append(
                Bar(
                    x=round(left + index * slot + slot * 0.15, 2),
                    y=round(y, 2),
                    width=round(slot * 0.7, 2),
                    height=round(h, 2),
                    series=number,
                    title=f"{day} {name}: {amount:.2f} CNY",
                )
            )
    grid = tuple(
        Label(left, round(bottom - (bottom - top) * step / 4, 2), f"{scale_max * step / 4:g}")
        for step in range(5)
    )
    every = max(1, math.ceil(len(days) / 6))
    labels = tuple(
        Label(round(left + i * slot + slot / 2, 2), float(height - 6), day[5:])
        for i, day in enumerate(days)
        if (len(days) - 1 - i) % every == 0
    )
    legend = tuple(
        LegendItem(number, name, round(sum(amounts.values()), 4))
        for number, (name, amounts) in enumerate(named.items())
    )
    return BarChart(width, height, tuple(bars), grid, labels, legend, left, right)


def _fold_small(series: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    ranked = sorted(series.items(), key=lambda item: (-sum(item[1].values()), item[0]))
    kept = {name: dict(amounts) for name, amounts in ranked[: SERIES_CLASSES - 1]}
    rest = ranked[SERIES_CLASSES - 1 :]
    if len(rest) == 1:
        kept[rest[0][0]] = dict(rest[0][1])
    elif rest:
        other: dict[str, float] = {}
        for _, amounts in rest:
            for day, amount in amounts.items():
                other[day] = other.get(day, 0.0) + amount
        kept[OTHER] = other
    return kept


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k at or above ``value`` (1 for nothing)."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * power + 1e-12:
            return step * power
    return 10 * power


def gauge(
    parts: Sequence[tuple[str, float]], total: float, *, cx: float = 110, cy: float = 104,
    r: float = 86,
) -> tuple[Arc, ...]:  # fmt: skip
    """A half ring from left to right: each ``(kind, amount)`` a segment of ``total``, in order,
    over a ``track`` arc for the whole."""
    arcs = [Arc("track", _arc(0.0, 1.0, cx, cy, r))]
    start = 0.0
    for kind, amount in parts:
        share = min(max(amount / total, 0.0), 1.0 - start) if total > 0 else 0.0
        if share > 0:
            arcs.append(Arc(kind, _arc(start, start + share, cx, cy, r)))
            start += share
    return tuple(arcs)


def _arc(start: float, end: float, cx: float, cy: float, r: float) -> str:
    """The SVG path of the half ring between two fractions (0 = left end, 1 = right end),
    drawn in pieces of at most a quarter turn so no arc flag is ever ambiguous."""
    at = start
    x0, y0 = _point(at, cx, cy, r)
    path = [f"M {x0} {y0}"]
    while at < end - 1e-9:
        nxt = min(end, at + 0.5)
        x1, y1 = _point(nxt, cx, cy, r)
        path.append(f"A {r} {r} 0 0 1 {x1} {y1}")
        at = nxt
    return " ".join(path)


def _point(fraction: float, cx: float, cy: float, r: float) -> tuple[float, float]:
    angle = math.pi * (1 - fraction)
    return round(cx + r * math.cos(angle), 2), round(cy - r * math.sin(angle), 2)
