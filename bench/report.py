"""The results: one row per figure, printed as a table and written as JSON.

Each row compares a figure with a reference measured in the same run (``ratio`` = figure /
reference), and says whether the issue's target was met (None when the row is context only).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HEADER = ("scenario", "figure", "value", "reference", "ratio", "target", "met?")


@dataclass
class Row:
    scenario: str
    figure: str
    value: float | None
    unit: str
    reference: str = ""
    ref_value: float | None = None
    target: str = ""
    met: bool | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.ref_value:
            return None
        return self.value / self.ref_value


def _num(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int) or (float(value).is_integer() and abs(value) >= 10):
        text = f"{value:,.0f}"
    elif abs(value) >= 100:
        text = f"{value:,.1f}"
    elif abs(value) >= 1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3f}"
    return f"{text} {unit}".rstrip()


def _cells(row: Row) -> tuple[str, ...]:
    ratio = row.ratio
    reference = f"{row.reference} {_num(row.ref_value, row.unit)}" if row.reference else ""
    met = {True: "yes", False: "NO", None: ""}[row.met]
    return (
        row.scenario,
        row.figure,
        _num(row.value, row.unit),
        reference.strip(),
        f"{ratio:.2f}x" if ratio is not None else "",
        row.target,
        met,
    )


def format_table(rows: list[Row]) -> str:
    """An aligned text table of ``rows``, with notes listed below it."""
    table = [HEADER, *(_cells(row) for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    out = []
    for index, line in enumerate(table):
        out.append("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        if index == 0:
            out.append("  ".join("-" * w for w in widths))
    notes = [f"  [{r.scenario}] {r.figure}: {r.note}" for r in rows if r.note]
    if notes:
        out += ["", "notes:", *notes]
    return "\n".join(out)


def row_dict(row: Row) -> dict[str, Any]:
    return {**asdict(row), "ratio": row.ratio}


def write_json(path: Path, meta: dict[str, Any], rows: list[Row], details: dict) -> None:
    """The figures as JSON: run metadata, every row (with its ratio) and the raw details."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "rows": [row_dict(r) for r in rows], "details": details}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
