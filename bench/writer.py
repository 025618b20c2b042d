"""The SQLite writer alone: what one request's reservation and settlement cost (issue 26).

``.venv/bin/python -m bench.writer [--concurrency 32] [--seconds 5] [--gap-ms 0] [--dir /var/tmp]``

Opens a fresh SQLite store on real disk (``synchronous=FULL``, as the gateway) and runs
``--concurrency`` loops, each as a sync request does: reserve a hold, wait for it, then
settle it without waiting (the answer leaves before its settlement commits) and, after
``--gap-ms`` (the client's round trip before its next request; about 1 ms at concurrency 1),
go on to the next reservation. Prints pairs per second, the mean reservation time, this
process's CPU per pair (user + system) and the writer thread's share of it, the commits
(batches) per pair, and from ``/proc/self/io`` the write syscalls and bytes written per pair:
the figures the group commit is judged by. No HTTP, no upstream: only the store, so two
revisions can be compared in seconds: run it from outside both trees (``-m`` puts the current
directory first on the path) with ``PYTHONPATH`` set to each tree, alternately; the first
figure printed is the tree it ran.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.cpu import TICKS
from gateway.core.ledger import Capture, Hold
from gateway.store import sqlite_writer
from gateway.store.manager import Store
from gateway.store.sqlite import SQLiteEngine

RESULT = (
    '{"created": 1765000000, "data": [{"url": "http://127.0.0.1:8000/v1/images/files/'
    'gpt-image-2/2026-12-07/0123456789abcdef0123456789abcdef-1.png"}], "id": "0123456789abcdef"}'
)


def io_counters() -> dict[str, int]:
    with open("/proc/self/io", encoding="ascii") as fh:
        return {k: int(v) for k, v in (line.split(": ") for line in fh)}


def thread_cpu_s(name: str) -> float:
    for thread in threading.enumerate():
        if thread.name == name and thread.native_id is not None:
            path = f"/proc/self/task/{thread.native_id}/stat"
            with open(path, encoding="ascii") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / TICKS
    return 0.0


def new_hold() -> Hold:
    """A hold as the gateway makes one (a random request id, as ``new_request_id``)."""
    return Hold(
        request_id=f"req_{os.urandom(12).hex()}", team="bench", period="total",
        created_at=time.time(), endpoint="generations", mode="sync", quality="medium", n=1,
        unit_price=100, budget=10**15, fingerprint=os.urandom(16).hex(), key_id="k1",
        key_fp="fp01", key_budget=None,
    )  # fmt: skip


def count_commits(counts: dict[str, float]) -> None:
    """Count the writer's batches (a bench may wrap a private function; both revisions have it)."""
    commit = sqlite_writer._commit_batch

    def counted(connection: Any, operations: Any) -> Any:
        counts["commits"] += 1
        return commit(connection, operations)

    sqlite_writer._commit_batch = counted


async def run(directory: Path, concurrency: int, seconds: float, gap_s: float) -> dict[str, float]:
    store = Store(await SQLiteEngine.open(directory / "writer.db"))
    counts = {"pairs": 0, "reserve_s": 0.0, "commits": 0}
    count_commits(counts)
    settling: set[asyncio.Task[bool]] = set()
    stop = asyncio.Event()

    async def loop() -> None:
        while not stop.is_set():
            hold = new_hold()
            started = time.perf_counter()
            await store.reserve(hold)
            counts["reserve_s"] += time.perf_counter() - started
            settlement = Capture(1, hold.amount, 0, "up_1", None, RESULT, "main", 100)
            task = asyncio.create_task(store.settle(hold.request_id, settlement, time.time()))
            settling.add(task)
            task.add_done_callback(settling.discard)
            counts["pairs"] += 1
            if gap_s:
                await asyncio.sleep(gap_s)

    async def phase(length: float) -> None:
        stop.clear()
        loops = [asyncio.create_task(loop()) for _ in range(concurrency)]
        await asyncio.sleep(length)
        stop.set()
        await asyncio.gather(*loops)
        await asyncio.gather(*settling)

    await phase(1.0)  # warm-up
    counts.update(pairs=0, reserve_s=0.0, commits=0)
    io, cpu = io_counters(), os.times()
    writer_cpu, started = thread_cpu_s("sqlite-writer"), time.monotonic()
    await phase(seconds)
    wall = time.monotonic() - started
    after, cpu_after = io_counters(), os.times()
    writer = thread_cpu_s("sqlite-writer") - writer_cpu
    await store.close()
    pairs = counts["pairs"]
    used = (cpu_after.user - cpu.user) + (cpu_after.system - cpu.system)
    return {
        "pairs_per_s": pairs / wall,
        "reserve_ms": 1000 * counts["reserve_s"] / pairs,
        "cpu_ms_per_pair": 1000 * used / pairs,
        "writer_ms_per_pair": 1000 * writer / pairs,
        "commits_per_pair": counts["commits"] / pairs,
        "write_calls_per_pair": (after["syscw"] - io["syscw"]) / pairs,
        "kib_written_per_pair": (after["wchar"] - io["wchar"]) / 1024 / pairs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--gap-ms", type=float, default=0.0)
    parser.add_argument("--dir", default="/var/tmp")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="igw-writer-", dir=args.dir))
    try:
        figures = asyncio.run(run(directory, args.concurrency, args.seconds, args.gap_ms / 1000))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    load1, _, _ = os.getloadavg()
    tree = Path(sqlite_writer.__file__).parents[2]
    print(
        f"tree={tree} "
        + " ".join(f"{k}={v:.3f}" for k, v in figures.items())
        + f" load={load1:.1f}"
    )


if __name__ == "__main__":
    main()
