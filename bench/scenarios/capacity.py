"""Scenario capacity: 10,000 concurrent sync requests held ~30 s by the upstream, all of which
must be answered 200, while /healthz is probed every 20 ms.

Figures: completed (2xx) and errors, RSS per held request = (peak RSS during the hold - RSS
before) / held (target <= 30 KiB), and /healthz p50/p99/max during the hold (target p99 <=
50 ms). Each held request is two sockets in the gateway (client and upstream): the harness lifts
RLIMIT_NOFILE (the hard limit too, where the kernel allows it) before starting the processes,
and the gateway lifts its soft limit to the hard one itself. Where the hard limit stays below
what 10,000 need (a sandbox without CAP_SYS_RESOURCE: 20,000), the scenario holds as many as fit
and says so. Bounded: one wave of at most 10,000 requests, ramped over 8 s, all on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from typing import Any

from bench.loadgen import percentile
from bench.memory import rss_kib, watch_peak
from bench.netstat import listen_drops
from bench.report import Row
from bench.scenarios import GENERATION_PATH, Context, Outcome, generation_body, metric_value
from bench.stack import Stack, running_stack

HELD = 10_000
TARGET_KIB = 30.0
TARGET_HEALTHZ_P99_MS = 50.0
RAMP_S = 8.0
PROBE_EVERY_S = 0.02
PHASES = {
    "ramp": "while the requests arrive",
    "hold": "while all are held",
    "answers": "while the answers leave",
}
SPARE_FDS = 200  # database, listener, log, keep-alive connections of the warm-up and probes


async def run(ctx: Context) -> Outcome:
    hold_s = 30.0
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    held = min(HELD, (limit - SPARE_FDS) // 2)
    name = ctx.label(f"capacity x{held}")
    async with running_stack(ctx.workdir("capacity"), ctx.options("capacity")) as stack:
        gateway = stack.gateway
        await ctx.load.count(
            gateway.url + GENERATION_PATH,
            stack.team_headers(),
            body=generation_body(),
            count=200,
            concurrency=16,
        )
        before = rss_kib(gateway.pid)
        drops = listen_drops()
        async with watch_peak(gateway.pid, 0.1) as peak:
            load = asyncio.create_task(
                ctx.load.count(
                    gateway.url + GENERATION_PATH,
                    stack.team_headers(),
                    body=generation_body(f"held [sleep={hold_s}]"),
                    count=held,
                    ramp_s=RAMP_S,
                    timeout_s=hold_s + RAMP_S + 120,
                )
            )
            healthz = {
                "ramp": await _probe_healthz(stack, RAMP_S + 1),
                "hold": await _probe_healthz(stack, hold_s - RAMP_S - 2),
            }
            mid = {
                "in_flight": metric_value(await stack.metrics(), "gateway_requests_in_flight") - 1,
                "upstream_held": (await stack.upstream_stats())["held_now"],
            }
            healthz["answers"] = await _probe_healthz(stack, RAMP_S + 2)
            result = await load
        mid["listen_drops"] = listen_drops() - drops
    mid["held"], mid["limit"] = held, limit
    return Outcome(_rows(name, result, peak.peak_kib - before, healthz, mid), {
        "hold_s": hold_s,
        "result": result,
        "rss_before_kib": before,
        "peak": vars(peak),
        "healthz_ms": healthz,
        "probe_at_end_of_hold": mid,
        "rlimit_nofile": limit,
    }, stack.problems)  # fmt: skip


async def _probe_healthz(stack: Stack, seconds: float) -> dict[str, Any]:
    """GET /healthz every 20 ms for ``seconds``: latency percentiles and failures."""
    latencies: list[float] = []
    failed = 0
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        started = time.perf_counter()
        with contextlib.suppress(Exception):
            async with stack.http.get(stack.gateway.url + "/healthz") as resp:
                await resp.read()
                if resp.status == 200:
                    latencies.append((time.perf_counter() - started) * 1000)
                    await asyncio.sleep(PROBE_EVERY_S)
                    continue
        failed += 1
        await asyncio.sleep(PROBE_EVERY_S)
    values = sorted(latencies)
    return {
        "probes": len(values) + failed,
        "failed": failed,
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": values[-1] if values else float("nan"),
    }


def _rows(
    name: str,
    result: dict[str, Any],
    increase_kib: int,
    healthz: dict[str, dict[str, Any]],
    mid: dict[str, Any],
) -> list[Row]:
    held = mid["held"]
    per_held = increase_kib / held
    limited = (
        f"; {held} held, not {HELD}: RLIMIT_NOFILE is {mid['limit']} and each needs 2 sockets"
        if held < HELD
        else ""
    )
    return [
        Row(
            name,
            "completed (2xx)",
            result["ok"],
            "",
            "sent",
            held,
            target="all 200",
            met=result["ok"] == held,
            note=f"statuses {result['statuses']} errors {result['errors']}; at the end of the "
            f"hold: gateway in flight {mid['in_flight']:.0f}, upstream holding "
            f"{mid['upstream_held']}; listen-queue drops {mid['listen_drops']}; "
            f"all answered in {result['elapsed_s']:.1f} s{limited}",
        ),
        Row(
            name,
            "RSS per held request",
            per_held,
            "KiB",
            target=f"<= {TARGET_KIB:.0f} KiB",
            met=per_held <= TARGET_KIB,
            note=f"peak increase {increase_kib / 1024:.0f} MiB",
        ),
        *(
            Row(
                name,
                f"/healthz p99 {PHASES[phase]}",
                probe["p99"],
                "ms",
                target=f"<= {TARGET_HEALTHZ_P99_MS:.0f} ms" if phase == "hold" else "",
                met=probe["p99"] <= TARGET_HEALTHZ_P99_MS and not probe["failed"]
                if phase == "hold"
                else None,
                note=f"p50 {probe['p50']:.1f} ms, max {probe['max']:.1f} ms, "
                f"{probe['probes']} probes, {probe['failed']} failed",
            )
            for phase, probe in healthz.items()
        ),
    ]
