"""Scenario 3, held connections: 2,000 concurrent sync requests held open by a ~20 s upstream
delay, through the gateway and (at the same time, separately measured) through the passthrough.

Figures: how many completed, peak RSS, and RSS per held request = (peak during the hold - RSS
before) / 2,000, against the passthrough's own figure. Target: at most 20 KiB per held request.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from bench.memory import Peak, rss_kib, watch_peak
from bench.netstat import listen_drops
from bench.report import Row
from bench.scenarios import GENERATION_PATH, Context, Outcome, generation_body, metric_value
from bench.stack import Stack, running_stack

HELD = 2000
TARGET_KIB = 20.0
RAMP_S = 2.0


async def run(ctx: Context) -> Outcome:
    name = ctx.label(f"3 held x{HELD}")
    hold_s = 8.0 if ctx.quick else 20.0
    async with running_stack(
        ctx.workdir("3-held"), ctx.options("3-held", passthrough=True)
    ) as stack:
        assert stack.passthrough is not None
        proxies = {"gateway": stack.gateway, "passthrough": stack.passthrough}
        for proxy in proxies.values():  # warm up: imports, pools, first allocations
            await ctx.load.count(
                proxy.url + GENERATION_PATH,
                stack.team_headers(),
                body=generation_body(),
                count=50,
                concurrency=8,
            )
        held_body = generation_body(f"held [sleep={hold_s}]")
        async with contextlib.AsyncExitStack() as watching:
            peaks = {
                key: await watching.enter_async_context(watch_peak(proxy.pid, 0.05))
                for key, proxy in proxies.items()
            }
            loads = {
                key: asyncio.create_task(
                    ctx.load.count(
                        proxy.url + GENERATION_PATH,
                        stack.team_headers(),
                        body=held_body,
                        count=HELD,
                        ramp_s=RAMP_S,
                        timeout_s=hold_s + 120,
                    )
                )
                for key, proxy in proxies.items()
            }
            drops = listen_drops()
            await asyncio.sleep(RAMP_S + hold_s / 2)
            probe = await _probe(stack)
            results = {key: await task for key, task in loads.items()}
            probe["listen_drops"] = listen_drops() - drops
        after = {key: rss_kib(proxy.pid) for key, proxy in proxies.items()}
    rows = _rows(name, results, peaks, probe)
    details = {
        "hold_s": hold_s,
        "results": results,
        "peaks_kib": {k: vars(p) for k, p in peaks.items()},
        "rss_after_kib": after,
        "mid_hold_probe": probe,
    }
    return Outcome(rows, details, stack.problems)


async def _probe(stack: Stack) -> dict[str, Any]:
    """Mid-hold: how many requests the gateway and the upstream hold right now."""
    in_flight = metric_value(await stack.metrics(), "gateway_requests_in_flight") - 1
    return {
        "gateway_in_flight": in_flight,
        "upstream_held": (await stack.upstream_stats())["held_now"],
    }


def _rows(
    name: str, results: dict[str, dict[str, Any]], peaks: dict[str, Peak], probe: dict[str, Any]
) -> list[Row]:
    per_held = {key: peak.increase_kib / HELD for key, peak in peaks.items()}
    gateway, passthrough = results["gateway"], results["passthrough"]
    return [
        Row(
            name,
            "completed (2xx) via gateway",
            gateway["ok"],
            "",
            "sent",
            HELD,
            target="all complete",
            met=gateway["ok"] == HELD,
            note=f"statuses {gateway['statuses']} errors {gateway['errors']}; mid-hold: "
            f"gateway in flight {probe['gateway_in_flight']:.0f}, upstream holding "
            f"{probe['upstream_held']} (gateway + passthrough); listen-queue drops "
            f"{probe['listen_drops']}",
        ),
        Row(name, "completed (2xx) via passthrough", passthrough["ok"], "", "sent", HELD),
        Row(
            name,
            "RSS per held request, gateway",
            per_held["gateway"],
            "KiB",
            "passthrough",
            per_held["passthrough"],
            target=f"<= {TARGET_KIB:.0f} KiB",
            met=per_held["gateway"] <= TARGET_KIB,
        ),
        Row(
            name,
            "peak RSS, gateway",
            peaks["gateway"].peak_kib / 1024,
            "MiB",
            "before hold",
            peaks["gateway"].before_kib / 1024,
        ),
        Row(
            name,
            "time to answer all, gateway",
            gateway["elapsed_s"],
            "s",
            "passthrough",
            passthrough["elapsed_s"],
        ),
    ]
