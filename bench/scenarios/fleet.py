"""Scenario fleet (issue 14): one gateway on SQLite, one on PostgreSQL, two on one PostgreSQL
database, side by side in one run, at concurrency 32 against the same fast fake upstream.

Every gateway runs from the real entry point with every feature on, all requests for one team
(one hot ``usage`` row). PostgreSQL is ``tests/postgres.py``'s local server with its data on
real disk and its durable defaults (as production runs it); a second server with the test
suite's fast settings (fsync, synchronous_commit, full_page_writes off) gives the same figures
for context. Two instances share the load: two load generators at once, 16 connections each.

Targets (issue 14): two instances on PostgreSQL >= 1.6x one SQLite instance's requests/s; one
instance on PostgreSQL no figure worse than 0.8x SQLite's (requests/s >= 0.8x, latency <= 1.25x).
Also: the mean reservation time (``gateway_reserve_seconds`` from /metrics), the CPU split of
the two cores between gateways, PostgreSQL, load generator and fake upstream, and the
reservation statement measured directly (asyncpg, 1 and 32 connections, one hot row).
With ``--profile``: py-spy on the gateways and what PostgreSQL's backends waited on, during one
more, uncounted run of each PostgreSQL configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from bench import pg, profile
from bench.cpu import CpuWatch, format_shares
from bench.procs import Proc
from bench.report import Row
from bench.scenarios import (
    GENERATION_PATH,
    Context,
    Outcome,
    failures,
    generation_body,
    reserve_totals,
)
from bench.stack import Stack, postgres_storage, running_stack
from tests.postgres import create_database

CONCURRENCY = 32
TARGET_FLEET = 1.6  # two instances on PostgreSQL, x one SQLite instance's requests/s
TARGET_ONE = 0.8  # one instance on PostgreSQL: no figure worse than 0.8x SQLite's
DIRECT_S = 2.0
# name -> (server, database, instances); server "durable" or "fast"
CONFIGS: dict[str, tuple[str, str, int]] = {
    "pg x1": ("durable", "fleet1", 1),
    "pg x2": ("durable", "fleet2", 2),
    "pg x1 fast": ("fast", "fleet1", 1),
    "pg x2 fast": ("fast", "fleet2", 2),
}
SQLITE = "sqlite x1"
PG_PARENT = Path("/var/tmp" if os.path.isdir("/var/tmp") else "/tmp")  # real disk, not tmpfs
# The direct measurement: (server, statements, connections).
DIRECT = [
    *(("durable", what, n) for what in ("reserve", "reserve+settle") for n in (1, 4, 32)),
    *(("durable", "reserve+async settle", n) for n in (1, 32)),
    *(("fast", what, n) for what in ("reserve", "reserve+settle") for n in (1, 32)),
]


def _gateway_names(config: str) -> list[str]:
    count = CONFIGS[config][2]
    return [f"{config.replace(' ', '-')}-{i}" for i in range(count)]


async def run(ctx: Context) -> Outcome:
    name = ctx.label(f"fleet c={CONCURRENCY}")
    parent = PG_PARENT
    with contextlib.ExitStack() as servers:
        pids: dict[str, int] = {}
        dsns: dict[str, str] = {}
        for kind, settings in (("durable", pg.DURABLE), ("fast", pg.FAST)):
            server, pids[kind] = servers.enter_context(pg.local_server(settings, parent))
            dsns[kind] = server.dsn
        env, extra = {}, {}
        for config, (kind, database, _) in CONFIGS.items():
            dsn = await create_database(dsns[kind], database)
            variable = f"BENCH_PG_DSN_{kind.upper()}_{database.upper()}"
            env[variable] = dsn
            extra |= {gw: postgres_storage(variable) for gw in _gateway_names(config)}
        options = ctx.options("fleet", extra_gateways=extra, extra_env=env)
        async with running_stack(ctx.workdir("fleet"), options) as stack:
            gateways = {SQLITE: [stack.gateway]} | {
                config: [stack.extra[gw] for gw in _gateway_names(config)] for config in CONFIGS
            }
            trees = {SQLITE: {}} | {c: {"postgres": pids[CONFIGS[c][0]]} for c in CONFIGS}
            runs: dict[str, list[dict[str, Any]]] = {config: [] for config in gateways}
            for _ in range(ctx.rounds):
                for config, procs in gateways.items():
                    runs[config].append(await _measure(ctx, stack, procs, trees[config]))
            reserve = {c: await _reserve_mean(stack, procs) for c, procs in gateways.items()}
            profiles: list[dict[str, Any]] = []
            if ctx.profile:
                for config in (SQLITE, "pg x1", "pg x2"):
                    profiles.append(
                        await _profile(ctx, stack, config, gateways[config], dsns["durable"])
                    )
        direct = {}
        for kind, what, conns in DIRECT:
            dsn = await pg.migrated_database(dsns[kind], f"direct_{len(direct)}")
            key = f"{what} x{conns} [{kind}]"
            direct[key] = await pg.hot_row(
                dsn,
                conns,
                DIRECT_S,
                settle=what != "reserve",
                async_settle=what == "reserve+async settle",
            )
    rows = _rows(name, runs, reserve, direct)
    details = {
        "runs": runs,
        "reserve_mean_ms": reserve,
        "direct": direct,
        "postgres": {"durable": pg.describe(pg.DURABLE), "fast": pg.describe(pg.FAST)},
        "profiles": profiles,
    }
    return Outcome(rows, details, stack.problems)


async def _measure(
    ctx: Context,
    stack: Stack,
    procs: list[Proc],
    trees: dict[str, int],
    duration_s: float | None = None,
) -> dict[str, Any]:
    """One closed-loop run of CONCURRENCY connections spread evenly over ``procs`` (one load
    generator per instance, all at once) after a warm-up, with the CPU split of the machine
    during the measured part and each part's CPU time per request."""
    share = CONCURRENCY // len(procs)
    body = generation_body()

    async def load(seconds: float) -> list[dict[str, Any]]:
        return list(
            await asyncio.gather(
                *(
                    ctx.load.rate(
                        p.url + GENERATION_PATH,
                        stack.team_headers(),
                        body,
                        concurrency=share,
                        duration_s=seconds,
                        warmup_s=0,
                    )
                    for p in procs
                )
            )
        )

    await load(1.0)  # warm-up, outside the CPU figures
    watch = CpuWatch(
        pids={"gateways": [p.pid for p in procs], "fake upstream": [stack.upstream.pid]},
        trees=trees,
    )
    with watch:
        results = await load(duration_s or ctx.duration_s)
    requests = sum(r["requests"] for r in results)
    return {
        "rps": sum(r["rps"] for r in results),
        "requests": requests,
        "ok": sum(r["ok"] for r in results),
        "errors": dict(sum((Counter(r["errors"]) for r in results), Counter())),
        # Percentiles of two generators cannot be merged from their summaries: the worse one.
        "p50": max(r["latency_ms"]["p50"] for r in results),
        "p99": max(r["latency_ms"]["p99"] for r in results),
        "per_instance": results,
        "cpu": watch.shares(),
        "cpu_other_top": watch.top_other(),
        "cpu_ms_per_request": watch.ms_per(requests),
    }


async def _reserve_mean(stack: Stack, procs: list[Proc]) -> float | None:
    total, count = 0.0, 0.0
    for proc in procs:
        s, n = reserve_totals(await stack.metrics(proc))
        total, count = total + s, count + n
    return total / count * 1000 if count else None


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(float(r[key]) for r in runs)


def _failures(config: str, runs: dict[str, list[dict[str, Any]]]) -> str:
    found = failures({config: runs[config]})
    return f"; {found}" if found else ""


def _cpu(runs: list[dict[str, Any]], key: str = "cpu") -> dict[str, float]:
    """The median over rounds of each part's share (or CPU ms per request)."""
    return {k: statistics.median(r[key][k] for r in runs) for k in runs[0][key]}


def _cpu_note(runs: list[dict[str, Any]]) -> str:
    """Shares of the two cores, and CPU per request with the rate they would allow on this
    machine's cores if nothing else ran (cores / the sum of the parts' CPU per request)."""
    per = {k: v for k, v in _cpu(runs, "cpu_ms_per_request").items() if k not in ("other",)}
    bound = (os.cpu_count() or 1) * 1000 / max(1e-9, sum(per.values()))
    busiest = max(runs, key=lambda r: r["cpu"]["other"])
    others = ", ".join(f"{name} {pct:.0f}%" for name, pct in busiest["cpu_other_top"])
    return (
        f"CPU {format_shares(_cpu(runs))} (other, worst round: {others or 'no process'}); "
        "CPU ms per request "
        + ", ".join(f"{k} {v:.2f}" for k, v in per.items())
        + f" (at most {bound:,.0f} req/s on {os.cpu_count()} cores)"
    )


def _rows(
    name: str,
    runs: dict[str, list[dict[str, Any]]],
    reserve: dict[str, float | None],
    direct: dict[str, dict[str, Any]],
) -> list[Row]:
    rps = {c: _median(r, "rps") for c, r in runs.items()}
    p50 = {c: _median(r, "p50") for c, r in runs.items()}
    p99 = {c: _median(r, "p99") for c, r in runs.items()}
    base = rps[SQLITE]
    rows = [
        Row(
            name,
            f"requests/s {SQLITE}",
            base,
            "req/s",
            note=f"p50 {p50[SQLITE]:.1f} ms, p99 {p99[SQLITE]:.1f} ms; "
            + _cpu_note(runs[SQLITE])
            + _failures(SQLITE, runs),
        )
    ]
    for config in CONFIGS:
        fast = "fast" in config
        ratio = rps[config] / base if base else 0.0
        target = TARGET_FLEET if config == "pg x2" else TARGET_ONE if config == "pg x1" else None
        rows.append(
            Row(
                name,
                f"requests/s {config}",
                rps[config],
                "req/s",
                SQLITE,
                base,
                target=f">= {target:.1f}x" if target else "",
                met=ratio >= target if target else None,
                note=("postgres fast settings (context); " if fast else "")
                + _cpu_note(runs[config])
                + _failures(config, runs),
            )
        )
    for label, figures in (("p50", p50), ("p99", p99)):
        for config in CONFIGS:
            limit = 1 / TARGET_ONE if config == "pg x1" else None
            ratio = figures[config] / figures[SQLITE] if figures[SQLITE] else 0.0
            rows.append(
                Row(
                    name,
                    f"{label} latency {config}",
                    figures[config],
                    "ms",
                    SQLITE,
                    figures[SQLITE],
                    target=f"<= {limit:.2f}x" if limit else "",
                    met=ratio <= limit if limit else None,
                    note="two load generators: the worse one's" if "x2" in config else "",
                )
            )
    for config, value in reserve.items():
        rows.append(
            Row(
                name,
                f"mean reservation {config}",
                value,
                "ms",
                SQLITE if config != SQLITE else "",
                reserve[SQLITE] if config != SQLITE else None,
                note="gateway_reserve_seconds sum/count from /metrics (admin key), warm-ups "
                "included; one hot team row"
                if config == SQLITE
                else "",
            )
        )
    for key, found in direct.items():
        rows.append(
            Row(
                name.replace("fleet", "fleet direct"),
                f"reserve_hold() {key}",
                found["per_s"],
                "/s",
                note=f"mean reserve_hold() latency {found['reserve_mean_ms']:.2f} ms, p50 "
                f"{found['reserve_p50_ms']:.2f} ms"
                + (
                    "; asyncpg on the migrated schema, one hot row, each statement its own "
                    "committed transaction; reserve+settle: each reservation followed by its "
                    "capture, pairs per second; async settle (not what the gateway does): the "
                    "capture committed with synchronous_commit=off"
                    if key == "reserve x1 [durable]"
                    else ""
                ),
            )
        )
    return rows


async def _profile(
    ctx: Context, stack: Stack, config: str, procs: list[Proc], maintenance_dsn: str
) -> dict[str, Any]:
    """py-spy on each gateway of ``config`` and the PostgreSQL view during one more run."""
    seconds = max(ctx.duration_s, 5.0)
    rate = 200
    view = pg.ServerView(maintenance_dsn, CONFIGS[config][1]) if config in CONFIGS else None
    for p in procs:
        (stack.workdir / p.name).mkdir(exist_ok=True)
    samplers = [
        asyncio.create_task(profile.record(p.pid, seconds, stack.workdir / p.name, rate))
        for p in procs
    ]
    await asyncio.sleep(0.3)  # py-spy attaches before the load starts
    try:
        async with view.watching() if view else contextlib.nullcontext():
            result = await _measure(ctx, stack, procs, {}, seconds - 1.5)
        raws = await asyncio.gather(*samplers)
    except profile.ProfileError as exc:
        print(f"profile skipped: {exc}", file=sys.stderr)
        return {"config": config, "error": str(exc)}
    out = ctx.results_dir / f"profile-fleet-{config.replace(' ', '-')}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    texts = []
    summaries = []
    for proc, raw in zip(procs, raws, strict=True):
        summary = profile.summarize(raw, slots=round(seconds) * rate)
        summaries.append(summary)
        texts.append(f"== {proc.name}\n" + profile.format_summary(summary, result["rps"]))
    server = view.summary(result["requests"]) if view else None
    if server:
        texts.append("== postgres during the same run")
        texts += [f"  {k}: {v}" for k, v in server.items()]
    texts.append(f"== CPU split\n{format_shares(result['cpu'])}")
    out.write_text("\n".join(texts))
    return {"config": config, "rps_while_profiled": result["rps"], "report": str(out),
            "postgres": server, "cpu": result["cpu"]}  # fmt: skip
