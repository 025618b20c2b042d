"""Scenario 4, uploads: an edits request with 16 images of 4 MiB, as multipart and as JSON data
URLs, sent one at a time through the gateway and through the passthrough.

Figures: the peak RSS increase of the proxy process during the request, relative to the image
payload (64 MiB), and the time per request. Target: gateway peak <= 2.5x the payload (issue 16).
"""

from __future__ import annotations

import statistics
from typing import Any

from bench import payloads
from bench.memory import watch_peak
from bench.payloads import MIB, Upload
from bench.procs import Proc
from bench.report import Row
from bench.scenarios import EDITS_PATH, Context, Outcome, generation_body
from bench.stack import TEAM_KEY, running_stack

TARGET_X = 2.5


async def run(ctx: Context) -> Outcome:
    name = ctx.label("4 uploads 16x4MiB")
    repeats = 1 if ctx.quick else 2
    workdir = ctx.workdir("4-uploads")
    async with running_stack(workdir, ctx.options("4-uploads", passthrough=True)) as stack:
        assert stack.passthrough is not None
        pictures = payloads.images()
        bodies = {
            "multipart": payloads.multipart(workdir, pictures, "restyle these"),
            "data URLs": payloads.data_urls(workdir, pictures, "restyle these"),
        }
        del pictures
        proxies = {"gateway": stack.gateway, "passthrough": stack.passthrough}
        for proxy in proxies.values():
            await ctx.load.count(
                proxy.url + "/v1/images/generations",
                stack.team_headers(),
                body=generation_body(),
                count=5,
            )
        measured: dict[str, dict[str, Any]] = {}
        for kind, upload in bodies.items():
            for key, proxy in proxies.items():
                measured[f"{kind}/{key}"] = await _measure(ctx, proxy, upload, repeats)
        stats = await stack.upstream_stats()
    rows: list[Row] = []
    for kind, upload in bodies.items():
        gateway, passthrough = measured[f"{kind}/gateway"], measured[f"{kind}/passthrough"]
        ratio = gateway["peak_increase_kib"] * 1024 / upload.image_bytes
        floor = passthrough["peak_increase_kib"] * 1024 / upload.image_bytes
        rows += [
            Row(
                name,
                f"{kind}: gateway peak RSS / payload",
                ratio,
                "x",
                "passthrough",
                floor,
                target=f"<= {TARGET_X}x payload",
                met=ratio <= TARGET_X and gateway["all_ok"],
                note=f"payload {upload.image_bytes / MIB:.0f} MiB of images, body "
                f"{upload.body_bytes / MIB:.1f} MiB; statuses {gateway['statuses']}",
            ),
            Row(
                name,
                f"{kind}: time per request",
                gateway["time_s"],
                "s",
                "passthrough",
                passthrough["time_s"],
            ),
        ]
    rows[0].note += f"; upstream saw at most {stats.get('max_refs', 0)} images per request"
    details = {
        "bodies": {k: vars(v) | {"path": str(v.path)} for k, v in bodies.items()},
        "measured": measured,
        "upstream": stats,
    }
    for upload in bodies.values():
        upload.path.unlink(missing_ok=True)
    return Outcome(rows, details, stack.problems)


async def _measure(ctx: Context, proxy: Proc, upload: Upload, repeats: int) -> dict[str, Any]:
    """Send ``upload`` ``repeats`` times, one at a time, watching the proxy's peak RSS."""
    headers = {"Authorization": f"Bearer {TEAM_KEY}", "Content-Type": upload.content_type}
    times, increases, statuses = [], [], []
    for _ in range(repeats):
        async with watch_peak(proxy.pid, 0.01) as peak:
            result = await ctx.load.count(
                proxy.url + EDITS_PATH, headers, body_file=upload.path, count=1, timeout_s=120
            )
        times.append(result["latency_ms"]["max"] / 1000)
        increases.append(peak.increase_kib)
        statuses.append(result["statuses"])
    return {
        "time_s": statistics.median(times),
        "times_s": times,
        "peak_increase_kib": max(increases),
        "increases_kib": increases,
        "statuses": statuses,
        "all_ok": all(s == {"200": 1} for s in statuses),
    }
