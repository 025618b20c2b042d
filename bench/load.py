"""Driving load from a separate process: wrk when installed, else ``bench.loadgen``.

Rate measurements (latency at concurrency 1, throughput at 32) use wrk if it is on ``PATH``
(``apt-get install wrk``), because a C load generator leaves more of the 2-core machine to the
servers; otherwise they fall back to the bounded aiohttp generator. Scenarios that must account
for every single request (held connections, uploads, polling storm, budget contention) always
use ``bench.loadgen``, which can fire exactly N requests at once; wrk cannot.

Both return the same summary: ``requests``, ``ok``, ``rps``, ``statuses``, ``errors`` and
``latency_ms`` {p50, p90, p99, mean, max}.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
from pathlib import Path
from typing import Any

from bench.procs import PYTHON, REPO, child_env

WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50":%.1f,"p90":%.1f,"p99":%.1f,"mean":%.1f,"max":%.1f}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
"""


class LoadError(RuntimeError):
    """The load generator failed or produced no figures."""


class LoadRunner:
    """Runs load generators in child processes; ``tool`` names what measured the rates."""

    def __init__(self, workdir: Path, prefer: str = "auto") -> None:
        self.workdir = workdir
        self.wrk = shutil.which("wrk") if prefer in ("auto", "wrk") else None
        if prefer == "wrk" and self.wrk is None:
            raise LoadError("--loadgen wrk was asked for but wrk is not installed")
        self.tool = "wrk" if self.wrk else "python-aiohttp (bench.loadgen)"
        self._ids = itertools.count()

    async def rate(
        self,
        url: str,
        headers: dict[str, str],
        body: str | None,
        *,
        concurrency: int,
        duration_s: float,
        warmup_s: float = 1.0,
    ) -> dict[str, Any]:
        """Closed-loop load for ``duration_s`` after a warm-up; returns the summary."""
        if self.wrk:
            if warmup_s > 0:
                await self._wrk(url, headers, body, concurrency, warmup_s)
            return await self._wrk(url, headers, body, concurrency, duration_s)
        spec = {
            "url": url,
            "headers": headers,
            "body": body,
            "mode": "duration",
            "concurrency": concurrency,
            "duration_s": duration_s,
            "warmup_s": warmup_s,
        }
        return await self._loadgen(spec, timeout_s=duration_s + warmup_s + 120)

    async def repeat_file(
        self,
        url: str,
        headers: dict[str, str],
        body_file: Path,
        *,
        concurrency: int,
        duration_s: float,
        timeout_s: float = 120.0,
    ) -> dict[str, Any]:
        """Closed-loop load of a large body read from a file (always ``bench.loadgen``)."""
        spec = {
            "url": url,
            "headers": headers,
            "body_file": str(body_file),
            "mode": "duration",
            "concurrency": concurrency,
            "duration_s": duration_s,
            "timeout_s": timeout_s,
        }
        return await self._loadgen(spec, timeout_s=duration_s + timeout_s + 60)

    async def small(
        self,
        url: str,
        headers: dict[str, str],
        body: str,
        *,
        concurrency: int,
        duration_s: float,
        warmup_s: float,
    ) -> dict[str, Any]:
        """Closed-loop load of a small body from ``bench.loadgen`` even when wrk is installed,
        so latency figures measured by this client compare across machines and runs."""
        spec = {
            "url": url,
            "headers": headers,
            "body": body,
            "mode": "duration",
            "concurrency": concurrency,
            "duration_s": duration_s,
            "warmup_s": warmup_s,
        }
        return await self._loadgen(spec, timeout_s=duration_s + warmup_s + 120)

    async def count(
        self,
        url: str,
        headers: dict[str, str],
        *,
        method: str = "POST",
        body: str | None = None,
        body_file: Path | None = None,
        count: int,
        concurrency: int | None = None,
        ramp_s: float = 0.0,
        waves: int = 1,
        wave_gap_s: float = 0.0,
        timeout_s: float = 120.0,
        raw: bool = False,
    ) -> dict[str, Any]:
        """Exactly ``count`` requests (per wave), at most ``concurrency`` at once (``raw``: one
        connection each, without aiohttp's client; see bench/loadgen.py)."""
        spec = {
            "url": url,
            "method": method,
            "headers": headers,
            "body": body,
            "body_file": str(body_file) if body_file else None,
            "mode": "count",
            "count": count,
            "concurrency": concurrency or count,
            "ramp_s": ramp_s,
            "waves": waves,
            "wave_gap_s": wave_gap_s,
            "timeout_s": timeout_s,
            "raw": raw,
        }
        return await self._loadgen(spec, timeout_s=timeout_s + waves * wave_gap_s + 60)

    async def _loadgen(self, spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        path = self.workdir / f"load-{next(self._ids)}.json"
        path.write_text(json.dumps(spec))
        out = await _run([PYTHON, "-m", "bench.loadgen", str(path)], timeout_s)
        return json.loads(out.strip().splitlines()[-1])

    async def _wrk(
        self, url: str, headers: dict[str, str], body: str | None, concurrency: int, seconds: float
    ) -> dict[str, Any]:
        script = self.workdir / f"wrk-{next(self._ids)}.lua"
        script.write_text(_wrk_script(headers, body))
        threads = max(1, min(2, concurrency))
        argv = [
            str(self.wrk), f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(seconds))}s",
            "--timeout", "30s", "-s", str(script), url,
        ]  # fmt: skip
        out = await _run(argv, seconds + 60)
        lines = [line for line in out.splitlines() if line.startswith("BENCH_JSON ")]
        if not lines:
            raise LoadError(f"wrk printed no figures:\n{out}")
        raw = json.loads(lines[-1].removeprefix("BENCH_JSON "))
        errors = {k: raw[k] for k in ("connect", "read", "write", "timeout") if raw[k]}
        elapsed = raw["duration_us"] / 1e6
        ok = raw["requests"] - raw["status"]
        return {
            "requests": raw["requests"],
            "ok": ok,
            "elapsed_s": elapsed,
            "rps": ok / elapsed if elapsed else 0.0,
            "statuses": {"non-2xx": raw["status"]} if raw["status"] else {},
            "errors": errors,
            "latency_ms": {k: raw[k] / 1000 for k in ("p50", "p90", "p99", "mean", "max")},
        }


def _wrk_script(headers: dict[str, str], body: str | None) -> str:
    lines = [f'wrk.method = "{"POST" if body is not None else "GET"}"']
    if body is not None:
        lines.append(f"wrk.body = [==[{body}]==]")
    lines += [f'wrk.headers["{name}"] = "{value}"' for name, value in headers.items()]
    return "\n".join(lines) + "\n" + WRK_DONE


async def _run(argv: list[str], timeout_s: float) -> str:
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
        env=child_env(),
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout_s)
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise
    if process.returncode != 0:
        raise LoadError(f"{argv[0]} exited {process.returncode}: {err.decode()[-2000:]}")
    return out.decode()
