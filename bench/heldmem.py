"""Memory per held request, by where it was allocated (issue 26).

``.venv/bin/python -m bench.heldmem [--held 2000] [--top 25]``

Runs the gateway in this process (its real ``serve``, every feature on, the bench config) under
``tracemalloc``, in front of the fast fake upstream, and holds ``--held`` sync requests (sent by
``bench.loadgen``'s raw client from its own process) for as long as it takes to look: once the
upstream holds them all, it compares a snapshot with one taken before, after a warm-up. Prints
the bytes per held request by package (aiohttp's server and client, asyncio, the gateway, the
rest) and by allocation site, the gc-tracked objects per held request by type, and the RSS
increase per held request. tracemalloc counts what Python asked for; RSS adds the allocator's
overhead and fragmentation, so the RSS figure is the larger one.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import os
import shutil
import signal
import sys
import tempfile
import tracemalloc
from pathlib import Path

import aiohttp

from bench import procs
from bench.load import LoadRunner
from bench.memory import rss_kib
from bench.procs import PYTHON
from bench.scenarios import GENERATION_PATH, generation_body
from bench.serving import raise_fd_limit
from bench.stack import KEY_ENV, TEAM_KEY, UPSTREAM_KEY, StackOptions, gateway_config
from gateway.core.config import load_settings
from gateway.http.server import serve

HOLD_S = 60.0


def package(filename: str) -> str:
    for name in ("aiohttp", "asyncio", "gateway", "multidict", "yarl", "sqlite3", "json"):
        if f"/{name}/" in filename:
            return name
    return "other"


def objects_by_type() -> collections.Counter[str]:
    return collections.Counter(type(o).__qualname__ for o in gc.get_objects())


async def run(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="igw-heldmem-", dir="/var/tmp"))
    os.environ[KEY_ENV] = UPSTREAM_KEY
    upstream = await procs.start(
        "upstream", [PYTHON, "-m", "bench.fake_upstream", "--delay-s", "0"], work,
        procs.child_env(**{KEY_ENV: UPSTREAM_KEY}),
    )  # fmt: skip
    try:
        config = work / "gateway.toml"
        config.write_text(gateway_config(StackOptions(db_dir=work), upstream.url, work))
        ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        server = asyncio.create_task(serve(load_settings(config), on_ready=ready.set_result))
        url = await ready
        headers = {"Authorization": f"Bearer {TEAM_KEY}", "Content-Type": "application/json"}
        async with aiohttp.ClientSession() as http:
            for _ in range(50):  # warm-up: caches, pools, lazily built objects
                async with http.post(url + GENERATION_PATH, data=generation_body(),
                                     headers=headers) as resp:  # fmt: skip
                    await resp.read()
            gc.collect()
            before_types, before = objects_by_type(), tracemalloc.take_snapshot()
            rss_before = rss_kib(os.getpid())
            load = LoadRunner(work, "python")
            body = generation_body(f"held [sleep={HOLD_S}]")
            held = asyncio.create_task(
                load.count(
                    url + GENERATION_PATH,
                    headers,
                    body=body,
                    count=args.held,
                    ramp_s=2.0,
                    timeout_s=HOLD_S + 60,
                    raw=True,
                )
            )
            while True:
                async with http.get(upstream.url + "/_bench/stats") as resp:
                    if (await resp.json())["held_now"] >= args.held:
                        break
                await asyncio.sleep(0.2)
            gc.collect()
            after, after_types = tracemalloc.take_snapshot(), objects_by_type()
            rss_after = rss_kib(os.getpid())
            report(
                args, before=before, after=after, before_types=before_types,
                after_types=after_types, rss_kib_increase=rss_after - rss_before,
            )  # fmt: skip
            os.kill(os.getpid(), signal.SIGTERM)  # the gateway drains: the held requests end
            await server
            result = await held
            print(f"held requests answered: {result['ok']} of {args.held}", file=sys.stderr)
    finally:
        await upstream.stop()
        shutil.rmtree(work, ignore_errors=True)


def report(
    args: argparse.Namespace,
    *,
    before: tracemalloc.Snapshot,
    after: tracemalloc.Snapshot,
    before_types: collections.Counter[str],
    after_types: collections.Counter[str],
    rss_kib_increase: int,
) -> None:
    n = args.held
    diff = after.compare_to(before, "lineno")
    by_package: collections.Counter[str] = collections.Counter()
    for stat in diff:
        by_package[package(stat.traceback[0].filename)] += stat.size_diff
    total = sum(by_package.values())
    print(f"held {n}: tracemalloc {total / n / 1024:.1f} KiB per held request, "
          f"RSS {rss_kib_increase / n:.1f} KiB per held request")  # fmt: skip
    for name, size in by_package.most_common():
        print(f"  {name:10} {size / n:8.0f} B")
    print("by allocation site (bytes per held request):")
    sites = [
        s for s in diff if not args.package or package(s.traceback[0].filename) == args.package
    ]
    for stat in sites[: args.top]:
        frame = stat.traceback[0]
        where = "/".join(Path(frame.filename).parts[-2:])
        print(
            f"  {stat.size_diff / n:8.0f} B {stat.count_diff / n:6.2f} blocks"
            f"  {where}:{frame.lineno}"
        )
    print("gc-tracked objects per held request, by type:")
    grown = after_types - before_types
    print(f"  total {sum(grown.values()) / n:.1f}")
    for name, count in grown.most_common(args.top):
        print(f"  {count / n:6.2f} {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--held", type=int, default=2000)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--package", default=None, help="allocation sites of this package only")
    args = parser.parse_args()
    if raise_fd_limit() < 2 * args.held + 200:
        parser.error("RLIMIT_NOFILE is too low for --held")
    tracemalloc.start(1)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
