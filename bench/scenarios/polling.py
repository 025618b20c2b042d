"""Scenario 5, polling storm: 1,000 concurrent polls of one pending async task, in waves
spanning more than one cache TTL, and how many task polls reached the upstream.

A passthrough would forward every poll; the gateway should ask the upstream at most once per
``poll_cache_ttl_s`` however many clients ask (target: <= 1 upstream poll per TTL window). The
same storm sent straight to the fake upstream is the reference for the poll latency.
"""

from __future__ import annotations

import math
from typing import Any

from bench.netstat import listen_drops
from bench.report import Row
from bench.scenarios import GENERATION_PATH, Context, Outcome, generation_body
from bench.stack import Stack, running_stack

POLLERS = 1000
TTL_S = 2.0


async def run(ctx: Context) -> Outcome:
    name = ctx.label(f"5 polling x{POLLERS}")
    waves, gap_s = (2, 1.5) if ctx.quick else (4, 1.5)
    options = ctx.options("5-polling", task_delay_s=600.0, poll_cache_ttl_s=TTL_S)
    async with running_stack(ctx.workdir("5-polling"), options) as stack:
        task_id = await _submit(stack)
        before = await stack.upstream_stats()
        drops = listen_drops()
        storm = await _storm(
            ctx, stack.gateway.url, stack.team_headers(), task_id, waves=waves, gap_s=gap_s
        )
        drops = listen_drops() - drops
        after = await stack.upstream_stats()
        direct = await _storm(
            ctx, stack.upstream.url, stack.upstream_headers, task_id, waves=1, gap_s=0
        )
    upstream_polls = after.get("task_polls", 0) - before.get("task_polls", 0)
    windows = max(1, math.ceil(storm["elapsed_s"] / TTL_S))
    per_ttl = upstream_polls / windows
    client_polls = POLLERS * waves
    rows = [
        Row(
            name,
            "upstream task polls caused",
            upstream_polls,
            "",
            "client polls",
            client_polls,
            note=f"{waves} waves of {POLLERS} concurrent polls, {gap_s} s apart, over "
            f"{storm['elapsed_s']:.2f} s = {windows} TTL windows of {TTL_S} s; "
            f"statuses {storm['statuses']} errors {storm['errors']}",
        ),
        Row(
            name,
            "upstream polls per TTL window",
            per_ttl,
            "",
            target="<= 1 per TTL",
            met=per_ttl <= 1 and storm["ok"] == client_polls,
        ),
        Row(
            name,
            "poll latency p50 via gateway",
            storm["latency_ms"]["p50"],
            "ms",
            "direct",
            direct["latency_ms"]["p50"],
        ),
        Row(
            name,
            "poll latency p99 via gateway",
            storm["latency_ms"]["p99"],
            "ms",
            "direct",
            direct["latency_ms"]["p99"],
            note=f"connections dropped at a full listen queue during the gateway storm: {drops} "
            "(each costs a 1 s SYN retransmit)",
        ),
    ]
    details = {
        "task_id": task_id,
        "storm": storm,
        "direct_storm": direct,
        "listen_drops": drops,
        "upstream_before": before,
        "upstream_after": after,
    }
    return Outcome(rows, details, stack.problems)


async def _submit(stack: Stack) -> str:
    url = stack.gateway.url + GENERATION_PATH + "?async=1"
    async with stack.http.post(url, data=generation_body(), headers=stack.team_headers()) as r:
        submitted = await r.json()
        if r.status != 202:
            raise RuntimeError(f"async submit answered {r.status}: {submitted}")
    return str(submitted["task_id"])


async def _storm(
    ctx: Context, base: str, headers: dict[str, str], task_id: str, *, waves: int, gap_s: float
) -> dict[str, Any]:
    return await ctx.load.count(
        f"{base}/v1/images/tasks/{task_id}",
        {"Authorization": headers["Authorization"]},
        method="GET",
        count=POLLERS,
        waves=waves,
        wave_gap_s=gap_s,
    )
