"""Scenario 6, budget contention: 500 concurrent requests for one team whose budget covers
exactly K images. Exactly K may be answered 200 and generated upstream, the rest refused 402,
and the ledger must show spent == K x price with nothing left reserved or uncertain.

Reservation cost per request comes from the gateway's ``gateway_reserve_seconds`` histogram,
against uncontended reservations measured first in the same run.
"""

from __future__ import annotations

from bench.report import Row
from bench.scenarios import (
    GENERATION_PATH,
    Context,
    Outcome,
    generation_body,
    mean_ms,
    reserve_totals,
)
from bench.stack import TIGHT_KEY, running_stack

REQUESTS = 500
PRICE_CNY = 0.20  # medium quality at the default prices
IMAGES_ALLOWED = 100
UPSTREAM_DELAY_S = 0.05  # every hold is still reserved while the others arrive


async def run(ctx: Context) -> Outcome:
    name = ctx.label(f"6 budget x{REQUESTS}")
    budget = round(IMAGES_ALLOWED * PRICE_CNY, 4)
    options = ctx.options("6-budget", tight_budget_cny=budget)
    body = generation_body(f"contended [sleep={UPSTREAM_DELAY_S}]")
    async with running_stack(ctx.workdir("6-budget"), options) as stack:
        url = stack.gateway.url + GENERATION_PATH
        await ctx.load.count(
            url, stack.team_headers(), body=generation_body(), count=50, concurrency=1
        )
        start = reserve_totals(await stack.metrics())
        before = await stack.upstream_stats()
        storm = await ctx.load.count(url, stack.team_headers(TIGHT_KEY), body=body, count=REQUESTS)
        end = reserve_totals(await stack.metrics())
        after = await stack.upstream_stats()
        usage = await stack.usage("tight")
    calm_ms = mean_ms((0.0, 0.0), start)
    storm_ms = mean_ms(start, end)
    generated = after.get("generations", 0) - before.get("generations", 0)
    ok, refused = storm["statuses"].get("200", 0), storm["statuses"].get("402", 0)
    exact = (
        usage["spent_cny"] == budget
        and usage["reserved_cny"] == 0
        and usage["uncertain_cny"] == 0
        and generated == IMAGES_ALLOWED
    )
    rows = [
        Row(
            name,
            "answered 200",
            ok,
            "",
            "images the budget covers",
            IMAGES_ALLOWED,
            target="exactly K",
            met=ok == IMAGES_ALLOWED,
            note=f"statuses {storm['statuses']} errors {storm['errors']}",
        ),
        Row(
            name,
            "refused 402",
            refused,
            "",
            "requests over budget",
            REQUESTS - IMAGES_ALLOWED,
            target="all the rest",
            met=refused == REQUESTS - IMAGES_ALLOWED,
        ),
        Row(
            name,
            "spent (admin/usage)",
            usage["spent_cny"],
            "CNY",
            "budget",
            budget,
            target="no overspend",
            met=exact,
            note=f"reserved {usage['reserved_cny']} uncertain {usage['uncertain_cny']} CNY; "
            f"upstream generated {generated}",
        ),
        Row(
            name,
            "mean reservation time, contended",
            storm_ms,
            "ms",
            "uncontended",
            calm_ms,
            note="includes the wait for the single SQLite writer (lock queue); the burst took "
            f"{storm['elapsed_s']:.2f} s",
        ),
    ]
    details = {
        "storm": storm,
        "usage": usage,
        "upstream_generated": generated,
        "reserve_ms": {"uncontended": calm_ms, "contended": storm_ms},
    }
    return Outcome(rows, details, stack.problems)
