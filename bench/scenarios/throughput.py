"""Scenario 2, throughput: requests/s at concurrency 32 through the gateway (every feature on)
against the bare passthrough; target at least half of the passthrough's rate.

With ``--profile`` an extra, uncounted gateway run is sampled by py-spy for the hot spots.
"""

from __future__ import annotations

import asyncio
import sys

from bench import profile
from bench.report import Row
from bench.scenarios import (
    GENERATION_PATH,
    Context,
    Outcome,
    failures,
    generation_body,
    mean_ms,
    measure_targets,
    median_of,
    reserve_totals,
)
from bench.stack import running_stack

CONCURRENCY = 32
TARGET_RATIO = 0.5


async def run(ctx: Context) -> Outcome:
    name = ctx.label(f"2 throughput c={CONCURRENCY}")
    async with running_stack(
        ctx.workdir("2-throughput"), ctx.options("2-throughput", passthrough=True)
    ) as stack:
        targets = stack.three_ways(GENERATION_PATH)
        runs = await measure_targets(ctx, targets, concurrency=CONCURRENCY)
        reserve_ms = mean_ms((0.0, 0.0), reserve_totals(await stack.metrics()))
        details: dict = {"runs": runs, "reserve_mean_ms": reserve_ms}
        if ctx.profile:
            try:
                details["profile"] = await _profile(ctx, stack.gateway.pid, *targets["gateway"])
            except profile.ProfileError as exc:  # the figures stand without the profile
                details["profile_error"] = str(exc)
                print(f"profile skipped: {exc}", file=sys.stderr)
    rps = {t: median_of(r, "rps") for t, r in runs.items()}
    p50 = {t: median_of(r, "latency_ms", "p50") for t, r in runs.items()}
    p99 = {t: median_of(r, "latency_ms", "p99") for t, r in runs.items()}
    ratio = rps["gateway"] / rps["passthrough"] if rps["passthrough"] else 0.0
    rows = [
        Row(
            name,
            "requests/s via gateway",
            rps["gateway"],
            "req/s",
            "passthrough",
            rps["passthrough"],
            target=f">= {TARGET_RATIO:.2f}x passthrough",
            met=ratio >= TARGET_RATIO,
            note=failures(runs),
        ),
        Row(name, "requests/s via gateway", rps["gateway"], "req/s", "direct", rps["direct"]),
        Row(
            name, "p99 latency via gateway", p99["gateway"], "ms", "passthrough", p99["passthrough"]
        ),
        Row(
            name,
            "mean reservation (lock wait + write)",
            reserve_ms,
            "ms",
            "gateway p50",
            p50["gateway"],
            note="gateway_reserve_seconds sum/count: one SQLite writer, one fsync per commit",
        ),
    ]
    return Outcome(rows, details, stack.problems)


async def _profile(ctx: Context, pid: int, url: str, headers: dict[str, str]) -> dict:
    """Sample the gateway with py-spy during one more (uncounted) run at the same load."""
    seconds = max(ctx.duration_s, 5.0)
    out = ctx.results_dir / f"profile-gateway-{ctx.db_kind}.txt"
    rate = 250
    workdir = ctx.workdir("2-throughput")
    sampler = asyncio.create_task(profile.record(pid, seconds, workdir, rate))
    await asyncio.sleep(0.3)  # py-spy attaches before the load starts
    load = await ctx.load.rate(
        url, headers, generation_body(), concurrency=CONCURRENCY, duration_s=seconds, warmup_s=0
    )
    raw = await sampler
    summary = profile.summarize(raw, slots=round(seconds) * rate)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(profile.format_summary(summary, load["rps"]))
    return {"rps_while_profiled": load["rps"], "report": str(out), **summary}
