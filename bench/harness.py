"""The harness: parse options, run the chosen scenarios on fresh process stacks, print the
table, write the JSON. Everything listens on 127.0.0.1 and is stopped before it returns.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench.load import LoadRunner
from bench.procs import REPO
from bench.report import Row, format_table, write_json
from bench.scenarios import (
    Context,
    Scenario,
    budget,
    capacity,
    fairness,
    fleet,
    held,
    overhead,
    polling,
    throughput,
    uploads,
)
from bench.serving import raise_fd_limit

SCENARIOS: dict[str, Scenario] = {
    "1": overhead.run,
    "2": throughput.run,
    "3": held.run,
    "4": uploads.run,
    "5": polling.run,
    "6": budget.run,
    "fairness": fairness.run,
    "capacity": capacity.run,
    "fleet": fleet.run,
}
DEFAULT_SCENARIOS = ("1", "2", "3", "4", "5", "6", "fairness", "capacity")  # not fleet: opt in
DB_BOUND = ("1", "2", "6")  # scenarios whose cost is mostly the durable SQLite writes
SCENARIO_TIMEOUT_S = 240.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter runs, one round each")
    parser.add_argument(
        "--scenarios",
        default=",".join(DEFAULT_SCENARIOS),
        help="comma-separated scenario numbers or names (" + ", ".join(SCENARIOS) + ")",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/latest.json")
    parser.add_argument(
        "--db",
        choices=("disk", "tmpfs", "both"),
        default="disk",
        help="where the gateway's SQLite file lives; 'both' reruns scenarios 1, 2, 6 on tmpfs",
    )
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the gateway during scenario 2"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directories")
    args = parser.parse_args(argv)
    args.scenario_ids = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(args.scenario_ids) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {sorted(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit()
    return asyncio.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    started = time.monotonic()
    disk_root = Path(tempfile.mkdtemp(prefix="igw-bench-", dir=_disk_tmp()))
    tmpfs_root = Path(tempfile.mkdtemp(prefix="igw-bench-", dir="/dev/shm"))
    load = LoadRunner(disk_root, "auto" if args.loadgen == "auto" else args.loadgen)
    print(f"load generator: {load.tool}; work dir {disk_root}", file=sys.stderr)
    rows: list[Row] = []
    details: dict[str, Any] = {}
    problems: dict[str, Any] = {}
    kinds = {"disk": ("disk",), "tmpfs": ("tmpfs",), "both": ("disk", "tmpfs")}[args.db]
    try:
        for kind in kinds:
            ctx = Context(
                root=disk_root,
                db_root=disk_root if kind == "disk" else tmpfs_root,
                db_kind=kind,
                load=load,
                quick=args.quick,
                profile=args.profile,
                results_dir=args.out.parent,
            )
            for number in args.scenario_ids:
                if kind == "tmpfs" and args.db == "both" and number not in DB_BOUND:
                    continue
                key = f"{number}-{kind}"
                print(f"[{time.monotonic() - started:6.1f}s] scenario {key} ...", file=sys.stderr)
                try:
                    outcome = await asyncio.wait_for(SCENARIOS[number](ctx), SCENARIO_TIMEOUT_S)
                except Exception as exc:
                    failure = "".join(traceback.format_exception(exc))
                    print(failure, file=sys.stderr)
                    rows.append(Row(ctx.label(str(number)), "FAILED", None, "", note=repr(exc)))
                    details[key] = {"error": failure}
                    continue
                rows += outcome.rows
                details[key] = outcome.details
                if outcome.problems:
                    problems[key] = outcome.problems
    finally:
        if not args.keep:
            shutil.rmtree(disk_root, ignore_errors=True)
            shutil.rmtree(tmpfs_root, ignore_errors=True)
    elapsed = time.monotonic() - started
    meta = _meta(args, load, elapsed, disk_root)
    print()
    print(format_table(rows))
    _print_problems(problems)
    _print_profiles(details)
    write_json(args.out, meta, rows, details | {"problems": problems})
    print(f"\n{len(rows)} figures in {elapsed:.0f} s; JSON written to {args.out}")
    return 0 if all(row.met is not False for row in rows) else 1


def _disk_tmp() -> str:
    """A temp dir on real disk (``/var/tmp`` survives reboots, so it is not tmpfs)."""
    for candidate in ("/var/tmp", tempfile.gettempdir()):
        if os.path.isdir(candidate) and os.access(candidate, os.W_OK):
            return candidate
    return tempfile.gettempdir()


def _print_profiles(details: dict[str, Any]) -> None:
    profiles = []
    for key, found in details.items():
        if isinstance(found, dict):
            profiles += [(key, p) for p in [found.get("profile"), *found.get("profiles", [])] if p]
    for key, found in profiles:
        if "report" in found:
            print(f"\nprofile of the gateway under scenario {key}: {found['report']}")
            print(Path(found["report"]).read_text())


def _print_problems(problems: dict[str, Any]) -> None:
    if not problems:
        return
    print("\nproblems logged by the processes:")
    for scenario, by_proc in problems.items():
        for proc, lines in by_proc.items():
            print(f"  [{scenario}] {proc}:")
            print("\n".join(f"    {line}" for line in lines))


def _meta(args: argparse.Namespace, load: LoadRunner, elapsed: float, root: Path) -> dict:
    return {
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 1),
        "quick": args.quick,
        "scenarios": args.scenario_ids,
        "db": args.db,
        "work_dir": str(root),
        "load_generator": load.tool,
        "wrk": _wrk_version(load.wrk),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "aiohttp": version("aiohttp"),
        "platform": platform.platform(),
        "git_commit": _git_commit(),
    }


def _wrk_version(wrk: str | None) -> str | None:
    if wrk is None:
        return None
    result = subprocess.run([wrk, "--version"], capture_output=True, text=True, check=False)
    lines = (result.stdout or result.stderr).splitlines()
    return lines[0] if lines else None


def _git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
        return result.stdout.strip() or None
    return None
