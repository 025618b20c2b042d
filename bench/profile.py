"""Sampling the gateway with py-spy (attached by pid, nothing changed in the gateway) and
summarizing the samples: how busy each thread was, and the top frames by own and total time.

py-spy is optional: ``pip install py-spy`` into the venv. Only non-idle samples are recorded,
so a thread's sample count over (seconds x rate) is roughly how busy it was; the frame shares
are of all recorded samples. The gateway has three threads: the event loop, and aiosqlite's
writer and reader connection threads (SQLite runs there, outside the GIL).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

THREAD = re.compile(r"thread \(\d+\): (.*)")
# Frames on every stack of a thread (interpreter start, the loop's own chain): left out of totals.
ROOT = re.compile(
    r"^(_run_module_as_main|_run_code|<module>|main|_serve|run|Runner\.run|"
    r"BaseEventLoop\.(run_until_complete|run_forever|_run_once)|Handle\._run|"
    r"Thread\.(_bootstrap|_bootstrap_inner|run)) \("
)
WAITING = "EpollSelector.select (selectors.py)"  # the loop waiting for events, not working


class ProfileError(RuntimeError):
    """py-spy is missing or failed."""


def py_spy() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


async def record(pid: int, seconds: float, workdir: Path, rate: int = 250) -> Path:
    """Sample ``pid`` for ``seconds`` into a collapsed-stacks file and return its path."""
    exe = py_spy()
    if exe is None:
        raise ProfileError("py-spy is not installed (pip install py-spy)")
    out = workdir / "py-spy.raw"
    argv = [
        exe, "record", "-p", str(pid), "-d", str(max(1, round(seconds))), "-r", str(rate),
        "--threads", "--nonblocking", "--nolineno", "-f", "raw", "-o", str(out),
    ]  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    text, _ = await asyncio.wait_for(process.communicate(), seconds + 60)
    if process.returncode != 0 or not out.exists():
        raise ProfileError(f"py-spy failed ({process.returncode}): {text.decode()[-1000:]}")
    return out


def summarize(raw: Path, slots: int, top: int = 10) -> dict[str, Any]:
    """Thread busyness (samples / ``slots`` = seconds x rate), and the top frames by own time
    (leaf of the sample), by total time (anywhere on the stack, the root chain left out) and
    own time per source file, as shares of all samples."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    files: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        match = THREAD.fullmatch(frames[0])
        thread = _thread_kind(match[1]) if match else "?"
        frames = frames[1:] if match else frames
        if not frames:
            continue
        samples += count
        threads[thread if frames[-1] != WAITING else "loop waiting in epoll"] += count
        own[f"{frames[-1]} [{thread}]"] += count
        files[_file_of(frames[-1])] += count
        for frame in set(frames):
            if not ROOT.match(frame):
                total[f"{frame} [{thread}]"] += count

    def share(counter: Counter[str], of: int) -> list[tuple[str, float]]:
        return [(frame, 100 * n / max(1, of)) for frame, n in counter.most_common(top)]

    return {
        "samples": samples,
        "slots": slots,
        "thread_busy": share(threads, slots),
        "own": share(own, samples),
        "total": share(total, samples),
        "own_by_file": share(files, samples),
    }


def _thread_kind(name: str) -> str:
    if name == "MainThread":
        return "loop"
    return "sqlite" if "_connection_worker_thread" in name else name


def _file_of(frame: str) -> str:
    start = frame.rfind("(")
    return frame[start + 1 : -1] if start >= 0 and frame.endswith(")") else frame


def format_summary(summary: dict[str, Any], rps: float) -> str:
    """The summary as text for the results directory and the terminal."""
    lines = [
        f"py-spy: {summary['samples']} busy samples of {summary['slots']} slots per thread; "
        f"gateway at {rps:,.0f} req/s while sampled"
    ]
    for key, title in (
        ("thread_busy", "thread busy (share of wall time)"),
        ("own", "top frames by own time (share of samples)"),
        ("total", "top frames by total time, loop's root chain left out (share of samples)"),
        ("own_by_file", "own time by source file (share of samples)"),
    ):
        lines += ["", f"{title}:"]
        lines += [f"  {pct:5.1f}%  {frame}" for frame, pct in summary[key]]
    return "\n".join(lines) + "\n"
