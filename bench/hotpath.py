"""CPU per request of the gateway, A/B against another revision, side by side (issue 26).

``.venv/bin/python -m bench.hotpath [--base REV] [--rounds 3] [--seconds 5]``

Starts on 127.0.0.1 a zero-delay fake upstream, nginx as a reverse proxy (when installed), the
bare aiohttp passthrough, LiteLLM's proxy without a database when ``--litellm PATH`` names its
CLI (``python3 -m venv /tmp/litellm && /tmp/litellm/bin/pip install 'litellm[proxy]'``), the
gateway of ``--base`` (default ``HEAD``, exported with ``git
archive`` to a temp dir) and the gateway of the work tree, every feature on, each with its own
SQLite file on real disk and access log. Then, in ``--rounds`` interleaved rounds (the order
rotated each round), wrk at concurrency 32 for ``--seconds`` against each target, reading each
target's process CPU time (user + system, from /proc) before and after; then the same at
concurrency 1 for latency. CPU per request is that process's CPU seconds / requests served: it
does not depend on how much of the machine the others left to it, where requests/s does (these
2 cores are shared with other work; the load average and the machine's busy share outside the
measured processes are printed with the figures). Medians over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import shutil
import socket
import statistics
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import procs, profile
from bench.cpu import machine_busy_seconds, process_seconds, tree_seconds
from bench.load import LoadRunner
from bench.procs import PYTHON, REPO, Proc
from bench.scenarios import GENERATION_PATH, generation_body
from bench.stack import KEY_ENV, TEAM_KEY, UPSTREAM_KEY, StackOptions, gateway_config

CONCURRENCY = 32
LITELLM_KEY = "sk-bench-litellm-master-key-0123456789abcdef"


@dataclass
class Target:
    name: str
    url: str
    headers: dict[str, str]
    pids: list[int] = field(default_factory=list)
    tree: int | None = None  # nginx: the master and its workers
    c32: list[dict[str, Any]] = field(default_factory=list)
    c1: list[dict[str, Any]] = field(default_factory=list)

    def cpu_s(self) -> float:
        if self.tree is not None:
            return tree_seconds(self.tree)
        return sum(process_seconds(pid) for pid in self.pids)


def export(rev: str, into: Path) -> Path:
    """The tree of ``rev`` (git archive), for the A side."""
    data = subprocess.run(
        ["git", "archive", "--format=tar", rev], cwd=REPO, capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into


def nginx_conf(work: Path, port: int, upstream_port: int) -> Path:
    conf = work / "nginx.conf"
    conf.write_text(
        f"""
worker_processes 1;
error_log {work}/nginx-error.log;
pid {work}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    upstream fake {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://fake;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {UPSTREAM_KEY}";
        }}
    }}
}}
"""
    )
    return conf


async def start_nginx(work: Path, upstream_port: int) -> tuple[asyncio.subprocess.Process, int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    conf = nginx_conf(work, port, upstream_port)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = await asyncio.create_subprocess_exec(
        nginx, "-p", str(work), "-c", str(conf), "-g", "daemon off;"
    )
    for _ in range(100):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return proc, port
        except OSError:
            await asyncio.sleep(0.05)
    proc.terminate()
    await proc.wait()
    raise RuntimeError("nginx did not start")


def litellm_config(work: Path, upstream_url: str) -> Path:
    """LiteLLM's proxy config: the fake upstream as an OpenAI-compatible images API, no
    database, a master key (checked on every request, as the gateway checks a team key),
    nothing fetched at start."""
    conf = work / "litellm.yaml"
    conf.write_text(
        f"""
model_list:
  - model_name: gpt-image-2
    litellm_params:
      model: openai/gpt-image-2
      api_base: {upstream_url}/v1
      api_key: {UPSTREAM_KEY}
general_settings:
  master_key: {LITELLM_KEY}
litellm_settings:
  telemetry: false
"""
    )
    return conf


async def start_litellm(
    work: Path, litellm: str, upstream_url: str
) -> tuple[asyncio.subprocess.Process, int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
    log = (work / "litellm.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        litellm, "--config", str(litellm_config(work, upstream_url)), "--host", "127.0.0.1",
        "--port", str(port), "--num_workers", "1", stdout=log, stderr=log, env=env,
    )  # fmt: skip
    for _ in range(1200):  # it imports for a while
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return proc, port
        except OSError:
            await asyncio.sleep(0.1)
    if proc.returncode is None:
        proc.terminate()
        await proc.wait()
    raise RuntimeError(f"LiteLLM did not start; see {work / 'litellm.log'}")


async def measure(
    load: LoadRunner, targets: list[Target], rounds: int, seconds: float
) -> dict[str, Any]:
    body = generation_body()
    machine = {"busy_s": 0.0, "measured_s": 0.0, "wall_s": 0.0}
    for number in range(rounds):
        order = targets[number % len(targets) :] + targets[: number % len(targets)]
        for target in order:
            await load.rate(target.url, target.headers, body, concurrency=CONCURRENCY,
                            duration_s=1.0, warmup_s=0)  # fmt: skip
            cpu, busy, wall = target.cpu_s(), machine_busy_seconds(), time.monotonic()
            run = await load.rate(
                target.url, target.headers, body, concurrency=CONCURRENCY,
                duration_s=seconds, warmup_s=0,
            )  # fmt: skip
            run["cpu_s"] = target.cpu_s() - cpu
            run["cpu_ms_per_request"] = 1000 * run["cpu_s"] / max(1, run["requests"])
            machine["busy_s"] += machine_busy_seconds() - busy
            machine["measured_s"] += run["cpu_s"]
            machine["wall_s"] += time.monotonic() - wall
            target.c32.append(run)
        for target in order:
            target.c1.append(
                await load.rate(
                    target.url,
                    target.headers,
                    body,
                    concurrency=1,
                    duration_s=seconds / 2,
                    warmup_s=0.5,
                )
            )
    return machine


async def profile_now(load: LoadRunner, target: Target, seconds: float, work: Path) -> str:
    """py-spy on the work tree's gateway during one more c=32 run of ``seconds``."""
    body = generation_body()
    sampling = asyncio.create_task(profile.record(target.pids[0], seconds, work, rate=250))
    run = await load.rate(target.url, target.headers, body, concurrency=CONCURRENCY,
                          duration_s=seconds, warmup_s=0)  # fmt: skip
    raw = await sampling
    summary = profile.summarize(raw, slots=round(seconds) * 250, top=30)
    return f"raw stacks: {raw}\n" + profile.format_summary(summary, run["rps"])


def fsync_ms(directory: Path, count: int = 50) -> float:
    """Median time of one fdatasync of a 4 KiB append on ``directory``'s disk (where the
    gateways' databases are): the c=1 target allows one of these over the passthrough."""
    times = []
    fd = os.open(directory / "fsync-probe", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for _ in range(count):
            os.write(fd, b"x" * 4096)
            started = time.perf_counter()
            os.fdatasync(fd)
            times.append((time.perf_counter() - started) * 1000)
    finally:
        os.close(fd)
    return statistics.median(times)


def med(runs: list[dict[str, Any]], *keys: str) -> float:
    values = []
    for run in runs:
        value: Any = run
        for key in keys:
            value = value[key]
        values.append(float(value))
    return statistics.median(values) if values else float("nan")


def report(targets: list[Target], machine: dict[str, Any], fsync: float) -> str:
    by = {t.name: t for t in targets}
    passthrough = med(by["passthrough"].c32, "rps") if "passthrough" in by else float("nan")
    direct_p50 = med(by["direct"].c1, "latency_ms", "p50")
    lines = [
        f"{'target':14} {'c=32 req/s':>10} {'x passthr':>9} {'CPU ms/req':>10} "
        f"{'c=1 p50 ms':>10} {'added p50':>9} {'errors':>6}"
    ]
    for t in targets:
        rps = med(t.c32, "rps")
        errors = sum(r["requests"] - r["ok"] for r in t.c32 + t.c1)
        cpu = med(t.c32, "cpu_ms_per_request") if t.pids or t.tree else float("nan")
        p50 = med(t.c1, "latency_ms", "p50")
        lines.append(
            f"{t.name:14} {rps:10,.0f} {rps / passthrough:9.2f} {cpu:10.3f} "
            f"{p50:10.2f} {p50 - direct_p50:9.2f} {errors:6d}"
        )
    if "passthrough" in by:
        allowed = med(by["passthrough"].c1, "latency_ms", "p50") - direct_p50 + fsync + 0.3
        lines.append(
            f"c=1: one fdatasync here {fsync:.2f} ms (median); target for the gateway's added "
            f"p50: passthrough's + fsync + 0.3 ms = {allowed:.2f} ms"
        )
    a, b = (t for t in targets if t.name.startswith("gateway"))
    pairs = [
        rb["cpu_ms_per_request"] / ra["cpu_ms_per_request"]
        for ra, rb in zip(a.c32, b.c32, strict=True)
    ]
    lines.append(
        f"CPU per request, {b.name} / {a.name}, per round (run back to back): "
        + ", ".join(f"{p:.2f}" for p in pairs)
        + f"; median {statistics.median(pairs):.2f}"
    )
    wall = max(1e-9, machine["wall_s"] * (os.cpu_count() or 1))
    other = 100 * max(0.0, machine["busy_s"] - machine["measured_s"]) / wall
    load1, load5, _ = os.getloadavg()
    lines.append(
        f"machine during the c=32 runs: busy {100 * machine['busy_s'] / wall:.0f}% of "
        f"{os.cpu_count()} CPUs, of which {other:.0f}% outside the measured server (the load "
        f"generator, the fake upstream, other work); load average now {load1:.1f} / {load5:.1f}"
    )
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="igw-hotpath-", dir="/var/tmp"))
    started: list[Proc] = []
    nginx: asyncio.subprocess.Process | None = None
    litellm: asyncio.subprocess.Process | None = None
    try:
        env = procs.child_env(**{KEY_ENV: UPSTREAM_KEY})
        upstream = await procs.start(
            "upstream", [PYTHON, "-m", "bench.fake_upstream", "--delay-s", "0"], work, env
        )
        started.append(upstream)
        team = {"Authorization": f"Bearer {TEAM_KEY}", "Content-Type": "application/json"}
        targets = [
            Target("direct", upstream.url + GENERATION_PATH,
                   {"Authorization": f"Bearer {UPSTREAM_KEY}", "Content-Type": "application/json"},
                   [upstream.pid]),
        ]  # fmt: skip
        if args.side_by_side and shutil.which("nginx", path=os.defpath + ":/usr/sbin"):
            port = int(upstream.url.rsplit(":", 1)[1])
            nginx, nginx_port = await start_nginx(work, port)
            targets.append(
                Target("nginx", f"http://127.0.0.1:{nginx_port}{GENERATION_PATH}", team,
                       tree=nginx.pid)
            )  # fmt: skip
        if args.side_by_side:
            passthrough = await procs.start(
                "passthrough", [PYTHON, "-m", "bench.passthrough", "--upstream", upstream.url],
                work, env,
            )  # fmt: skip
            started.append(passthrough)
            targets.append(Target("passthrough", passthrough.url + GENERATION_PATH, team,
                                  [passthrough.pid]))  # fmt: skip
        if args.side_by_side and args.litellm:
            litellm, litellm_port = await start_litellm(work, args.litellm, upstream.url)
            targets.append(
                Target("litellm", f"http://127.0.0.1:{litellm_port}{GENERATION_PATH}",
                       {**team, "Authorization": f"Bearer {LITELLM_KEY}"}, tree=litellm.pid)
            )  # fmt: skip
        sides = {f"gateway {args.base}": export(args.base, work / "base"), "gateway now": REPO}
        for index, (name, tree) in enumerate(sides.items()):
            gw_dir = work / f"gw{index}"
            gw_dir.mkdir()
            config = gw_dir / "gateway.toml"
            config.write_text(
                gateway_config(StackOptions(db_dir=gw_dir), upstream.url, gw_dir, None)
            )
            gw_env = {**env, "PYTHONPATH": str(tree)}
            gateway = await procs.start(
                f"gw{index}", [PYTHON, "-m", "gateway", "serve", "--config", str(config)],
                gw_dir, gw_env, cwd=tree,
            )  # fmt: skip
            started.append(gateway)
            targets.append(Target(name, gateway.url + GENERATION_PATH, team, [gateway.pid]))
        load = LoadRunner(work, "wrk")
        machine = await measure(load, targets, args.rounds, args.seconds)
        print(report(targets, machine, fsync_ms(work)))
        if args.profile:
            print(await profile_now(load, targets[-1], args.profile, work))
    finally:
        for proc in reversed(started):
            await proc.stop()
        for child in (nginx, litellm):
            if child is not None:
                child.terminate()
                await child.wait()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", default="HEAD", help="git revision of the A side")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument(
        "--litellm", default=None, help="LiteLLM's CLI (a venv of its own) to run side by side"
    )
    parser.add_argument(
        "--gateways-only", dest="side_by_side", action="store_false",
        help="only direct and the two gateways (more rounds in the same time)",
    )  # fmt: skip
    parser.add_argument(
        "--profile", type=float, default=0.0, metavar="SECONDS",
        help="then py-spy the work tree's gateway for one more c=32 run of SECONDS",
    )  # fmt: skip
    parser.add_argument("--keep", action="store_true")
    asyncio.run(main(parser.parse_args()))
