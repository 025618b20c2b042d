"""Where the machine's CPU went during a load: per process group, from /proc.

``CpuWatch`` reads user+system time at the start and end of a block for: named processes (the
gateways, the fake upstream), a PostgreSQL server's postmaster with its direct children (the
backends, the WAL writer, the checkpointer: each in a session of its own), and this harness's
finished children (``RUSAGE_CHILDREN``: the load generators, which are waited for within the block).
Shares are of the wall time of the block times the number of CPUs, so they add up to at most
100 % of the machine; ``other`` is what the machine spent besides (the harness, other work).
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field

TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # fields from the 3rd (state) on


def process_seconds(pid: int) -> float:
    """User + system CPU seconds of one live process (0 when gone)."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / TICKS if fields else 0.0


def tree_seconds(root: int) -> float:
    """User + system CPU seconds of live process ``root`` and its live direct children."""
    total = 0.0
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat_fields(int(name))
            if fields and (int(name) == root or int(fields[1]) == root):
                total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


def all_processes() -> dict[int, tuple[str, int, float]]:
    """Every live process: pid -> (command name, parent pid, user + system CPU seconds)."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="ascii", errors="replace") as fh:
                text = fh.read()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        comm = text[text.index("(") + 1 : text.rindex(")")]
        out[int(name)] = (comm, int(fields[1]), (int(fields[11]) + int(fields[12])) / TICKS)
    return out


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine was busy (all CPUs, everything but idle and iowait)."""
    with open("/proc/stat", encoding="ascii") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / TICKS


def children_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class CpuWatch:
    """``with CpuWatch(pids={...}, trees={...}) as watch:`` ... ``watch.shares()``."""

    pids: dict[str, list[int]] = field(default_factory=dict)
    trees: dict[str, int] = field(default_factory=dict)
    children_name: str = "load generator"
    _start: dict[str, float] = field(default_factory=dict)
    _end: dict[str, float] = field(default_factory=dict)
    _wall: float = 0.0
    _procs_start: dict[int, tuple[str, int, float]] = field(default_factory=dict)
    _procs_end: dict[int, tuple[str, int, float]] = field(default_factory=dict)

    def _read(self) -> dict[str, float]:
        out = {name: sum(process_seconds(p) for p in pids) for name, pids in self.pids.items()}
        out |= {name: tree_seconds(root) for name, root in self.trees.items()}
        out[self.children_name] = children_seconds()
        out["machine"] = machine_busy_seconds()
        return out

    def __enter__(self) -> CpuWatch:
        self._procs_start = all_processes()
        self._start = self._read()
        self._wall = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self._end = self._read()
        self._wall = time.monotonic() - self._wall
        self._procs_end = all_processes()

    def top_other(self, n: int = 3) -> list[tuple[str, float]]:
        """The busiest processes that are none of the named ones (nor the harness), as
        (command name, percent of the machine): what ``other`` was, where it was a process
        that lived through the block (kernel threads included)."""
        named = {pid for pids in self.pids.values() for pid in pids} | {os.getpid()}
        roots = set(self.trees.values())
        capacity = max(1e-9, self._wall * (os.cpu_count() or 1))
        found = []
        for pid, (comm, ppid, seconds) in self._procs_end.items():
            if pid in named or pid in roots or ppid in roots or pid not in self._procs_start:
                continue
            used = seconds - self._procs_start[pid][2]
            if used > 0:
                found.append((f"{comm}[{pid}]", 100 * used / capacity))
        return sorted(found, key=lambda item: -item[1])[:n]

    def ms_per(self, count: int) -> dict[str, float]:
        """CPU milliseconds per unit of work (a request) of each name and of ``other``."""
        used = {name: self._end[name] - self._start[name] for name in self._start}
        machine = used.pop("machine")
        used["other"] = max(0.0, machine - sum(used.values()))
        return {name: 1000 * seconds / max(1, count) for name, seconds in used.items()}

    def shares(self) -> dict[str, float]:
        """Percent of the machine (wall time x CPUs) per name, plus ``other``."""
        capacity = max(1e-9, self._wall * (os.cpu_count() or 1))
        used = {name: self._end[name] - self._start[name] for name in self._start}
        machine = used.pop("machine")
        out = {name: 100 * seconds / capacity for name, seconds in used.items()}
        out["other"] = max(0.0, 100 * (machine - sum(used.values())) / capacity)
        out["idle"] = max(0.0, 100 - 100 * machine / capacity)
        return out


def format_shares(shares: dict[str, float]) -> str:
    return ", ".join(f"{name} {pct:.0f}%" for name, pct in shares.items())
