"""Resident memory of a child process, read from /proc, for peak-RSS figures.

Linux keeps a per-process high-water mark (VmHWM) that can be reset by writing ``5`` to
``/proc/PID/clear_refs``; where that is refused we fall back to sampling VmRSS, which can miss a
short peak, so the sampler runs alongside every measured request as well.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

KIB = 1024


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(f"{field} not in /proc/{pid}/status")


def rss_kib(pid: int) -> int:
    """Current resident set size in KiB."""
    return _status_kib(pid, "VmRSS")


def hwm_kib(pid: int) -> int:
    """Peak resident set size in KiB since start or since the last ``reset_hwm``."""
    return _status_kib(pid, "VmHWM")


def reset_hwm(pid: int) -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS; False if the kernel refused."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


@dataclass
class Peak:
    """What a ``watch_peak`` block saw: RSS before, the highest RSS, and the samples taken."""

    before_kib: int
    peak_kib: int = 0
    samples: int = 0
    hwm_reset: bool = False

    @property
    def increase_kib(self) -> int:
        return max(0, self.peak_kib - self.before_kib)


@contextlib.asynccontextmanager
async def watch_peak(pid: int, interval_s: float = 0.02) -> AsyncIterator[Peak]:
    """Track the peak RSS of ``pid`` while the block runs (kernel mark and sampling combined)."""
    peak = Peak(before_kib=rss_kib(pid))
    peak.hwm_reset = reset_hwm(pid)
    peak.peak_kib = peak.before_kib

    async def sample() -> None:
        while True:
            with contextlib.suppress(OSError, LookupError):
                peak.peak_kib = max(peak.peak_kib, rss_kib(pid))
                peak.samples += 1
            await asyncio.sleep(interval_s)

    sampler = asyncio.create_task(sample())
    try:
        yield peak
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        with contextlib.suppress(OSError, LookupError):
            peak.peak_kib = max(peak.peak_kib, rss_kib(pid))
            if peak.hwm_reset:
                peak.peak_kib = max(peak.peak_kib, hwm_kib(pid))
