"""The six scenarios of issue 8, each a coroutine ``run(ctx) -> Outcome``, plus what they share."""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.load import LoadRunner
from bench.report import Row
from bench.stack import StackOptions

GENERATION_PATH = "/v1/images/generations"
EDITS_PATH = "/v1/images/edits"


def generation_body(prompt: str = "a lighthouse at dusk, watercolour") -> str:
    """A small, valid generation request (medium quality: 0.20 CNY at the default prices)."""
    fields = {"model": "gpt-image-2", "prompt": prompt, "n": 1, "size": "1:1", "quality": "medium"}
    return json.dumps(fields)


@dataclass
class Context:
    """What every scenario needs: where to work, how to load, how long to run."""

    root: Path
    db_root: Path
    db_kind: str
    load: LoadRunner
    quick: bool
    profile: bool = False
    results_dir: Path = Path("bench/results")

    @property
    def rounds(self) -> int:
        return 1 if self.quick else 3

    @property
    def duration_s(self) -> float:
        return 2.0 if self.quick else 3.0

    def label(self, scenario: str) -> str:
        return scenario if self.db_kind == "disk" else f"{scenario} [tmpfs db]"

    def workdir(self, name: str) -> Path:
        return self.root / f"{name}-{self.db_kind}"

    def options(self, name: str, **kwargs: Any) -> StackOptions:
        return StackOptions(db_dir=self.db_root / f"{name}-{self.db_kind}", **kwargs)


@dataclass
class Outcome:
    rows: list[Row]
    details: dict[str, Any] = field(default_factory=dict)
    problems: dict[str, list[str]] = field(default_factory=dict)


Scenario = Callable[[Context], Awaitable[Outcome]]


def median_of(runs: list[dict[str, Any]], *keys: str) -> float:
    """The median over rounds of one figure, e.g. ``median_of(runs, "latency_ms", "p50")``."""
    values = []
    for run in runs:
        value: Any = run
        for key in keys:
            value = value[key]
        values.append(float(value))
    return statistics.median(values)


def metric_value(text: str, name: str, labels: str = "") -> float:
    """One sample of a Prometheus text exposition (0.0 when absent)."""
    pattern = re.compile(rf"^{re.escape(name)}{re.escape(labels)}\s+(\S+)$", re.M)
    match = pattern.search(text)
    return float(match[1]) if match else 0.0


def reserve_totals(metrics_text: str) -> tuple[float, float]:
    """(sum of seconds, count) of ``gateway_reserve_seconds``."""
    return (
        metric_value(metrics_text, "gateway_reserve_seconds_sum"),
        metric_value(metrics_text, "gateway_reserve_seconds_count"),
    )


def mean_ms(before: tuple[float, float], after: tuple[float, float]) -> float | None:
    count = after[1] - before[1]
    return (after[0] - before[0]) / count * 1000 if count else None


async def measure_targets(
    ctx: Context, targets: dict[str, tuple[str, dict[str, str]]], concurrency: int
) -> dict[str, list[dict[str, Any]]]:
    """Closed-loop load on each target in turn, ``ctx.rounds`` times interleaved (A B C A B C),
    so a slow moment of the machine hits every target alike rather than one of them."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
    body = generation_body()
    for _ in range(ctx.rounds):
        for name, (url, headers) in targets.items():
            runs[name].append(
                await ctx.load.rate(
                    url, headers, body, concurrency=concurrency, duration_s=ctx.duration_s
                )
            )
    return runs


def failures(runs: dict[str, list[dict[str, Any]]]) -> str:
    """A note naming any target that had non-2xx answers or errors, else ''."""
    bad = []
    for name, rounds in runs.items():
        failed = sum(r["requests"] - r["ok"] for r in rounds)
        errors = sum(sum(r["errors"].values()) for r in rounds)
        if failed or errors:
            bad.append(f"{name}: {failed} non-2xx, {errors} socket errors")
    return "; ".join(bad)
