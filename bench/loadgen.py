"""A bounded aiohttp load generator, run as its own process so it never shares a core's event
loop with the server it measures.

Two modes, both bounded in count and time:

- ``duration``: ``concurrency`` closed-loop workers repeat one request for ``duration_s`` after
  ``warmup_s`` (the fallback when wrk is not installed);
- ``count``: exactly ``count`` requests, at most ``concurrency`` at once, their starts spread over
  ``ramp_s``, repeated in ``waves`` started ``wave_gap_s`` apart (held connections, uploads,
  polling storm, budget contention: scenarios where every single answer matters).

``raw`` (count mode only): each request on a connection of its own, written as bytes with
asyncio streams and read to the close, without aiohttp's client. For thousands of requests at
once (capacity) the client must write each request as soon as it has connected: aiohttp's
client needs several loop turns per request, which a loaded machine stretches past the
gateway's ``header_timeout_s`` (10 s), and the gateway then rightly closes the silent
connections (issue 26: 9,116 of 9,392 in one run).

Usage: ``python -m bench.loadgen SPEC.json``; prints one JSON object with the figures.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from bench.serving import raise_fd_limit

MAX_SAMPLES = 2_000_000


@dataclass
class Spec:
    url: str
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    body: str | None = None
    body_file: str | None = None
    mode: str = "duration"
    concurrency: int = 1
    duration_s: float = 5.0
    warmup_s: float = 0.0
    count: int = 1
    ramp_s: float = 0.0
    waves: int = 1
    wave_gap_s: float = 0.0
    timeout_s: float = 60.0
    raw: bool = False


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    bodies: list[str] = field(default_factory=list)
    first: float = 0.0
    last: float = 0.0

    def note(self, started: float, status: str, keep_body: str | None = None) -> None:
        now = time.perf_counter()
        if len(self.latencies) < MAX_SAMPLES:
            self.latencies.append(now - started)
        self.statuses[status] += 1
        self.last = max(self.last, now)
        if keep_body is not None and len(self.bodies) < 3:
            self.bodies.append(keep_body[:300])


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, math.ceil(pct / 100 * len(sorted_values)) - 1))
    return sorted_values[rank]


async def _one(session: aiohttp.ClientSession, spec: Spec, body: bytes | None, t: Tally) -> None:
    started = time.perf_counter()
    try:
        async with session.request(spec.method, spec.url, data=body, headers=spec.headers) as r:
            text = await r.read()
            keep = text.decode("utf-8", "replace") if r.status >= 400 else None
            t.note(started, str(r.status), keep)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        t.errors[_error_name(exc)] += 1
        t.note(started, "error")


def _error_name(exc: BaseException) -> str:
    """The error's type, with the errno where there is one (104 = reset, 111 = refused)."""
    code = getattr(exc, "errno", None)
    return f"{type(exc).__name__} {code}" if code else type(exc).__name__


async def _closed_loop(spec: Spec, body: bytes | None) -> Tally:
    connector = aiohttp.TCPConnector(limit=spec.concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=spec.timeout_s)
    tally = Tally()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker(until: float, into: Tally) -> None:
            while time.perf_counter() < until:
                await _one(session, spec, body, into)

        if spec.warmup_s > 0:
            until = time.perf_counter() + spec.warmup_s
            await asyncio.gather(*(worker(until, Tally()) for _ in range(spec.concurrency)))
        tally.first = time.perf_counter()
        until = tally.first + spec.duration_s
        await asyncio.gather(*(worker(until, tally) for _ in range(spec.concurrency)))
    return tally


async def _counted(spec: Spec, body: bytes | None) -> Tally:
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=spec.timeout_s)
    tally = Tally()
    gate = asyncio.Semaphore(spec.concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def request(delay: float) -> None:
            if delay:
                await asyncio.sleep(delay)
            async with gate:
                await _one(session, spec, body, tally)

        tally.first = time.perf_counter()
        jobs = []
        for wave in range(spec.waves):
            for index in range(spec.count):
                delay = wave * spec.wave_gap_s + spec.ramp_s * index / max(1, spec.count)
                jobs.append(asyncio.ensure_future(request(delay)))
        await asyncio.gather(*jobs)
    return tally


def raw_request(spec: Spec, body: bytes | None) -> tuple[str, int, bytes]:
    """Host, port and the bytes of ``spec``'s request, with ``Connection: close``."""
    url = urlsplit(spec.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    target = url.path + (f"?{url.query}" if url.query else "")
    lines = [f"{spec.method} {target} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in spec.headers.items()]
    lines.append(f"Content-Length: {len(body or b'')}")
    return host, port, ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


async def _raw_one(host: str, port: int, request: bytes, timeout_s: float, t: Tally) -> None:
    started = time.perf_counter()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            answer = await reader.read()
    except (TimeoutError, OSError) as exc:
        t.errors[_error_name(exc)] += 1
        t.note(started, "error")
        return
    finally:
        if writer is not None:
            writer.close()
    head = answer.split(b"\r\n", 1)[0].split()
    if len(head) < 2 or not head[0].startswith(b"HTTP/1."):
        t.errors["no answer" if not answer else "not HTTP"] += 1
        t.note(started, "error")
        return
    status = head[1].decode("ascii", "replace")
    keep = answer.decode("utf-8", "replace") if not status.startswith("2") else None
    t.note(started, status, keep)


async def _raw_counted(spec: Spec, body: bytes | None) -> Tally:
    host, port, request = raw_request(spec, body)
    tally = Tally()
    gate = asyncio.Semaphore(spec.concurrency)

    async def one(delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        async with gate:
            await _raw_one(host, port, request, spec.timeout_s, tally)

    tally.first = time.perf_counter()
    jobs = [
        asyncio.ensure_future(one(wave * spec.wave_gap_s + spec.ramp_s * i / max(1, spec.count)))
        for wave in range(spec.waves)
        for i in range(spec.count)
    ]
    await asyncio.gather(*jobs)
    return tally


def summarize(tally: Tally) -> dict[str, Any]:
    """The JSON figures of a run: counts, rate and latency percentiles in milliseconds."""
    values = sorted(tally.latencies)
    elapsed = max(1e-9, tally.last - tally.first)
    ok = sum(n for status, n in tally.statuses.items() if status.startswith("2"))
    return {
        "requests": sum(tally.statuses.values()),
        "ok": ok,
        "elapsed_s": elapsed,
        "rps": ok / elapsed,
        "statuses": dict(tally.statuses),
        "errors": dict(tally.errors),
        "error_bodies": tally.bodies,
        "latency_ms": {
            "p50": percentile(values, 50) * 1000,
            "p90": percentile(values, 90) * 1000,
            "p99": percentile(values, 99) * 1000,
            "mean": (sum(values) / len(values) * 1000) if values else float("nan"),
            "max": (values[-1] * 1000) if values else float("nan"),
        },
    }


def load_body(spec: Spec) -> bytes | None:
    if spec.body_file:
        return Path(spec.body_file).read_bytes()
    return None if spec.body is None else spec.body.encode()


async def run(spec: Spec, body: bytes | None) -> dict[str, Any]:
    """Run one load described by ``spec`` and return its summary."""
    if spec.mode == "duration":
        tally = await _closed_loop(spec, body)
    else:
        tally = await (_raw_counted(spec, body) if spec.raw else _counted(spec, body))
    return summarize(tally)


def main() -> None:
    raise_fd_limit()
    spec = Spec(**json.loads(Path(sys.argv[1]).read_text()))
    print(json.dumps(asyncio.run(run(spec, load_body(spec)))))


if __name__ == "__main__":
    main()
