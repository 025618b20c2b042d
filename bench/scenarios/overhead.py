"""Scenario 1, overhead: p50/p99 latency at concurrency 1 through the gateway, against the same
request sent straight to the fake upstream and through the bare passthrough (the Python floor).

The target is on the *added* p50 (gateway minus direct) of at most 0.5 ms.
"""

from __future__ import annotations

from bench.report import Row
from bench.scenarios import (
    GENERATION_PATH,
    Context,
    Outcome,
    failures,
    mean_ms,
    measure_targets,
    median_of,
    reserve_totals,
)
from bench.stack import running_stack

TARGET_ADDED_MS = 0.5


async def run(ctx: Context) -> Outcome:
    name = ctx.label("1 overhead c=1")
    async with running_stack(
        ctx.workdir("1-overhead"), ctx.options("1-overhead", passthrough=True)
    ) as stack:
        targets = stack.three_ways(GENERATION_PATH)
        runs = await measure_targets(ctx, targets, concurrency=1)
        reserve_ms = mean_ms((0.0, 0.0), reserve_totals(await stack.metrics()))
        log_lines = stack.access_log_lines()
        own = stack.access_log_medians()
    p50 = {t: median_of(r, "latency_ms", "p50") for t, r in runs.items()}
    p99 = {t: median_of(r, "latency_ms", "p99") for t, r in runs.items()}
    added = p50["gateway"] - p50["direct"]
    floor_added = p50["passthrough"] - p50["direct"]
    rows = [
        Row(
            name,
            "added p50 latency (gateway - direct)",
            added,
            "ms",
            "passthrough adds",
            floor_added,
            target=f"<= {TARGET_ADDED_MS} ms",
            met=added <= TARGET_ADDED_MS,
            note=failures(runs),
        ),
        Row(name, "p50 latency via gateway", p50["gateway"], "ms", "direct", p50["direct"]),
        Row(name, "p99 latency via gateway", p99["gateway"], "ms", "direct", p99["direct"]),
        Row(
            name, "p50 latency via gateway", p50["gateway"], "ms", "passthrough", p50["passthrough"]
        ),
        Row(
            name, "p99 latency via gateway", p99["gateway"], "ms", "passthrough", p99["passthrough"]
        ),
        Row(
            name,
            "mean reservation (SQLite write+fsync)",
            reserve_ms,
            "ms",
            "gateway p50",
            p50["gateway"],
            note=f"db on {ctx.db_kind}; gateway_reserve_seconds sum/count",
        ),
        Row(
            name,
            "gateway's own time p50 (access log)",
            own.get("gateway_ms"),
            "ms",
            "added p50",
            added,
            note="access-log gateway_ms: handler time minus upstream_ms, before the response "
            f"is written; access-log upstream_ms p50 {own.get('upstream_ms', 0):.3f} ms",
        ),
    ]
    details = {
        "runs": runs,
        "reserve_mean_ms": reserve_ms,
        "access_log_lines": log_lines,
        "access_log_medians_ms": own,
    }
    return Outcome(rows, details, stack.problems)
