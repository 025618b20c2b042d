"""A 2 MB result image served from the gateway's result store, side by side with a bare aiohttp
static file handler serving the same file (issue 25's target: at least 0.5x its bytes/s). A
figure, not a test.

    .venv/bin/python bench/results_store.py [--seconds 5] [--rounds 3] [--connections 4]

Stores one 2 MB PNG-typed image the way the gateway does (an index row in a fresh SQLite ledger,
the file content-addressed in its results directory), starts the gateway from its entry point
(``python -m gateway serve --config``, ``proxy_results`` on, its upstream a closed port: nothing
can come from there) and the bare handler (``web.FileResponse`` in an aiohttp app of its own,
no middleware), each its own process on 127.0.0.1, then runs wrk against each in turn, rounds
interleaved, and prints the bytes/s of each round, the medians and their ratio. Both servers
send the file with sendfile; the gateway also authenticates nothing (the path is the
credential), looks the URL up in the index, checks the file (its digest once, then its inode,
size and mtime) and writes an access-log line. Everything it starts is stopped before it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.core.auth import key_digest
from gateway.core.results import url_key
from gateway.store.blobs import Blobs
from gateway.store.manager import Store
from gateway.store.results import ResultImage
from gateway.store.sqlite import SQLiteEngine
from tests.process import to_toml

ROOT = Path(__file__).resolve().parent.parent
SIZE = 2 * 1024 * 1024
PATH = "/v1/images/files/gpt-image-2/20260101/bench-1.png"
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens


def image() -> bytes:
    """2 MB typed as PNG by its magic bytes, incompressible like a real photo's data."""
    return b"\x89PNG\r\n\x1a\n" + os.urandom(SIZE - 8)


async def store(work: Path, data: bytes) -> None:
    db = Store(await SQLiteEngine.open(work / "gateway.db"))
    try:
        url = UNREACHABLE + PATH
        row = ResultImage(
            "req_bench", 0, "bench", "default", url, url_key(url), None, 1, time.time()
        )
        await db.results.add([row])
        blob = Blobs(work / "results").put(data)
        assert await db.results.stored("req_bench", 0, blob, time.time())
    finally:
        await db.close()


def config(port: int) -> dict[str, object]:
    return {
        "server": {"host": "127.0.0.1", "port": port},
        "upstream": {
            "base_url": UNREACHABLE,
            "api_key_env": "BENCH_UPSTREAM_KEY",
            "proxy_results": True,
        },
        "storage": {"database": "gateway.db"},
        "log": {"access": "access.log"},
        "teams": {"bench": {"budget_cny": "1.00", "keys_sha256": [key_digest("igw_bench_0")]}},
    }


@contextlib.asynccontextmanager
async def process(args: list[str], url: str, work: Path, name: str) -> AsyncIterator[str]:
    with (work / f"{name}.stderr").open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *args, cwd=work, stdout=asyncio.subprocess.DEVNULL, stderr=stderr,
            env={**os.environ, "BENCH_UPSTREAM_KEY": "sk_bench_0000"},
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        async with aiohttp.ClientSession() as http:
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(url) as resp:
                        if resp.status == 200:
                            break
                if time.monotonic() > deadline or proc.returncode is not None:
                    text = (work / f"{name}.stderr").read_text()[-2000:]
                    raise SystemExit(f"{name} did not answer {url}:\n{text}")
                await asyncio.sleep(0.1)
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def wrk(url: str, seconds: float, connections: int) -> float:
    """Bytes per second as wrk counted them."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{round(seconds)}s", url],
        capture_output=True, text=True, check=True, timeout=seconds + 60,
    ).stdout  # fmt: skip
    match = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out)
    assert match is not None, out
    unit = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}[match.group(2)]
    return float(match.group(1)) * unit


async def run(seconds: float, rounds: int, connections: int) -> None:
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-results-") as tmp:
        work = Path(tmp)
        data = image()
        await store(work, data)
        (work / "static.png").write_bytes(data)
        gw_port, static_port = _free_port(), _free_port()
        (work / "gateway.toml").write_text(to_toml(config(gw_port)))
        gateway_args = ["-m", "gateway", "serve", "--config", str(work / "gateway.toml")]
        static_args = [__file__, "--static", str(work / "static.png"), "--port", str(static_port)]
        os.environ["PYTHONPATH"] = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
        gateway_url = f"http://127.0.0.1:{gw_port}{PATH}"
        static_url = f"http://127.0.0.1:{static_port}/static.png"
        async with (
            process(gateway_args, gateway_url, work, "gateway"),
            process(static_args, static_url, work, "static"),
            aiohttp.ClientSession() as http,
        ):
            for url in (gateway_url, static_url):  # the same bytes from both
                async with http.get(url) as resp:
                    body = await resp.read()
                    assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest(), url
            figures: dict[str, list[float]] = {"gateway store": [], "aiohttp static": []}
            for _ in range(rounds):
                figures["gateway store"].append(wrk(gateway_url, seconds, connections))
                figures["aiohttp static"].append(wrk(static_url, seconds, connections))
    print(f"2 MB image, wrk -t1 -c{connections} -d{seconds}s, {rounds} interleaved rounds; "
          f"load average before: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")  # fmt: skip
    for name, values in figures.items():
        rounds_text = ", ".join(f"{v / 1024**2:.0f}" for v in values)
        median = statistics.median(values)
        print(f"  {name:15s} median {median / 1024**2:7.0f} MiB/s  (rounds: {rounds_text})")
    ratio = statistics.median(figures["gateway store"]) / statistics.median(
        figures["aiohttp static"]
    )
    print(f"  ratio gateway/static: {ratio:.2f} (target >= 0.5)")


def serve_static(path: Path, port: int) -> None:
    """The bare handler: one route, the file, nothing else."""

    async def handler(request: web.Request) -> web.FileResponse:
        return web.FileResponse(path, headers={"Content-Type": "image/png"})

    app = web.Application()
    app.router.add_get("/static.png", handler)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--static", type=Path, help=argparse.SUPPRESS)  # the bare server's mode
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.static is not None:
        serve_static(args.static, args.port)
        return
    asyncio.run(run(args.seconds, args.rounds, args.connections))


if __name__ == "__main__":
    main()
