"""Scenario fairness (issue 16): small generate requests while two clients post big edits.

Two clients post a 100 MB edits body in a loop (six 12 MiB PNG-looking images, once as JSON data
URLs and once as multipart files) while the bench's own client sends small generate requests at
concurrency 4; the same small load runs alone first. The fake upstream answers at once and never
parses (or holds) a big body, so whatever the small requests wait for is the gateway.

Figures: p50/p99/max of the small requests alone and under each load (target: p99 <= 50 ms
under load), the big uploads' own MB/s, and the gateway's peak RSS increase over the image bytes
in flight (two requests' images; target <= 2.5x). From the access log, the small requests' own
``latency_ms`` and ``queued_ms`` p99: how much of the wait the log admits.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from bench import payloads, profile
from bench.loadgen import percentile
from bench.memory import watch_peak
from bench.payloads import MIB, Upload
from bench.report import Row
from bench.scenarios import EDITS_PATH, GENERATION_PATH, Context, Outcome, generation_body
from bench.stack import TEAM_KEY, Stack, running_stack

IMAGES, IMAGE_MIB = 6, 12
BIG_CLIENTS = 2
SMALL_CONCURRENCY = 4
LEAD_S = 1.5  # the big uploads start first; the small requests are measured once they flow
TARGET_P99_MS = 50.0
TARGET_RSS_X = 2.5


async def run(ctx: Context) -> Outcome:
    name = ctx.label("fairness")
    duration = 4.0 if ctx.quick else 8.0
    workdir = ctx.workdir("fairness")
    workdir.mkdir(parents=True, exist_ok=True)
    pictures = payloads.images(IMAGES, IMAGE_MIB * MIB)
    bodies = {
        "data URLs": payloads.data_urls(workdir, pictures, "restyle these"),
        "multipart": payloads.multipart(workdir, pictures, "restyle these"),
    }
    del pictures
    measured: dict[str, dict[str, Any]] = {}
    logged: dict[str, dict[str, float | None]] = {}
    problems: dict[str, list[str]] = {}
    for kind, upload in bodies.items():  # a fresh gateway each: peak RSS starts from the same
        stack_dir = workdir / kind.replace(" ", "-")
        async with running_stack(stack_dir, ctx.options(f"fairness-{stack_dir.name}")) as stack:
            small = _small_load(ctx, stack, duration)
            await ctx.load.count(
                stack.gateway.url + GENERATION_PATH,
                stack.team_headers(),
                body=generation_body(),
                count=50,
                concurrency=SMALL_CONCURRENCY,
            )
            if not measured:
                measured["alone"] = {"small": await small("alone")}
            measured[kind] = await _under_load(ctx, stack, upload, small, duration)
            logged |= _logged(stack.workdir / "access.log")
        problems |= {f"{kind}: {proc}": lines for proc, lines in stack.problems.items()}
    rows = _rows(name, measured, bodies, logged)
    reports = {k: m.pop("profile") for k, m in measured.items() if m.get("profile")}
    for upload in bodies.values():
        upload.path.unlink(missing_ok=True)
    details = {
        "bodies": {k: vars(v) | {"path": str(v.path)} for k, v in bodies.items()},
        "measured": measured,
        "access_log": logged,
    }
    if reports:
        ctx.results_dir.mkdir(parents=True, exist_ok=True)
        report = ctx.results_dir / "profile-fairness.txt"
        report.write_text("".join(f"== {kind}\n{text}\n" for kind, text in reports.items()))
        details["profile"] = {"report": str(report)}
    return Outcome(rows, details, problems)


def _small_load(ctx: Context, stack: Stack, duration: float) -> Any:
    async def small(phase: str) -> dict[str, Any]:
        headers = {**stack.team_headers(), "User-Agent": f"bench-fairness-{phase}"}
        return await ctx.load.small(
            stack.gateway.url + GENERATION_PATH,
            headers,
            generation_body(),
            concurrency=SMALL_CONCURRENCY,
            duration_s=duration,
            warmup_s=LEAD_S,
        )

    return small


async def _under_load(
    ctx: Context, stack: Stack, upload: Upload, small: Any, duration: float
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {TEAM_KEY}", "Content-Type": upload.content_type}
    async with watch_peak(stack.gateway.pid, 0.01) as peak:
        big = asyncio.create_task(
            ctx.load.repeat_file(
                stack.gateway.url + EDITS_PATH,
                headers,
                upload.path,
                concurrency=BIG_CLIENTS,
                duration_s=duration + LEAD_S + 0.5,
            )
        )
        sampled = None
        if ctx.profile:
            sampled = asyncio.create_task(
                profile.record(stack.gateway.pid, duration, stack.workdir, rate=250)
            )
        small_result = await small("during " + upload.path.stem)
        big_result = await big
        raw = await sampled if sampled is not None else None
    in_flight = BIG_CLIENTS * upload.image_bytes
    return {
        "small": small_result,
        "big": big_result,
        "big_mb_s": big_result["ok"] * upload.body_bytes / big_result["elapsed_s"] / 1e6,
        "peak_increase_kib": peak.increase_kib,
        "rss_x": peak.increase_kib * 1024 / in_flight,
        "profile": profile.format_summary(
            profile.summarize(raw, slots=round(duration) * 250), small_result["rps"]
        )
        if raw is not None
        else None,
    }


def _logged(path: Path) -> dict[str, dict[str, float | None]]:
    """p99 of the gateway's own latency_ms and queued_ms per phase (by User-Agent)."""
    values: dict[str, dict[str, list[float]]] = {}
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            record = json.loads(line)
            client = record.get("client") or ""
            if not client.startswith("bench-fairness-") or record.get("endpoint") != "generations":
                continue
            phase = values.setdefault(client.removeprefix("bench-fairness-"), {})
            for key in ("latency_ms", "queued_ms"):
                if isinstance(record.get(key), int | float):
                    phase.setdefault(key, []).append(float(record[key]))
    return {
        phase: {
            key: percentile(sorted(found.get(key, [])), 99) if found.get(key) else None
            for key in ("latency_ms", "queued_ms")
        }
        for phase, found in values.items()
    }


def _rows(
    name: str,
    measured: dict[str, dict[str, Any]],
    bodies: dict[str, Upload],
    logged: dict[str, dict[str, float | None]],
) -> list[Row]:
    alone = measured["alone"]["small"]["latency_ms"]
    rows = [
        Row(
            name,
            "small requests alone: p99",
            alone["p99"],
            "ms",
            note=f"p50 {alone['p50']:.1f} ms, max {alone['max']:.1f} ms, "
            f"{measured['alone']['small']['rps']:.0f} req/s at c={SMALL_CONCURRENCY}",
        )
    ]
    for kind, upload in bodies.items():
        found = measured[kind]
        lat = found["small"]["latency_ms"]
        log = logged.get("during " + upload.path.stem, {})
        log_note = ", ".join(
            f"{key} p99 {value:.1f} ms" if value is not None else f"{key} -"
            for key, value in log.items()
        )
        big = found["big"]
        rows += [
            Row(
                name,
                f"small p99 during {BIG_CLIENTS} big {kind}",
                lat["p99"],
                "ms",
                "alone",
                alone["p99"],
                target=f"<= {TARGET_P99_MS:.0f} ms",
                met=lat["p99"] <= TARGET_P99_MS
                and found["small"]["ok"] == found["small"]["requests"],
                note=f"p50 {lat['p50']:.1f} ms, max {lat['max']:.1f} ms, "
                f"{found['small']['rps']:.0f} req/s, statuses {found['small']['statuses']}; "
                f"access log: {log_note or 'no lines'}",
            ),
            Row(
                name,
                f"big {kind}: upload throughput",
                found["big_mb_s"],
                "MB/s",
                note=f"{big['ok']} of {big['requests']} answered 2xx, statuses {big['statuses']}, "
                f"errors {big['errors']}; body {upload.body_bytes / 1e6:.1f} MB",
            ),
            Row(
                name,
                f"big {kind}: peak RSS / image bytes in flight",
                found["rss_x"],
                "x",
                target=f"<= {TARGET_RSS_X}x",
                met=found["rss_x"] <= TARGET_RSS_X,
                note=f"peak increase {found['peak_increase_kib'] / 1024:.0f} MiB over "
                f"{BIG_CLIENTS} x {upload.image_bytes / MIB:.0f} MiB of images",
            ),
        ]
    return rows
