"""One scenario's processes: the fake upstream, the gateway with every feature on, and
(optionally) the bare passthrough, all on 127.0.0.1 and all stopped when the block ends.

The gateway runs from its real entry point (``python -m gateway serve --config``) with auth,
budget reservation (SQLite, ``synchronous=FULL``), an access log written to a file, and the
``/metrics`` endpoint. A fresh stack per scenario keeps peak-RSS figures from leaking between
scenarios.
"""

from __future__ import annotations

import contextlib
import json
import statistics
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench import procs
from bench.procs import PYTHON, Proc
from gateway.core.auth import key_digest

UPSTREAM_KEY = "sk_bench_central_key_0123456789abcdef"
TEAM_KEY = "igw_bench_team_key_0000000000000000000000"
TIGHT_KEY = "igw_bench_tight_key_111111111111111111111"
ADMIN_KEY = "igw_bench_admin_key_222222222222222222222"
KEY_ENV = "BENCH_UPSTREAM_KEY"
BIG_BUDGET_CNY = 1_000_000


@dataclass
class StackOptions:
    db_dir: Path
    upstream_delay_s: float = 0.0
    task_delay_s: float = 60.0
    passthrough: bool = False
    tight_budget_cny: float = 20.0
    poll_cache_ttl_s: float = 2.0
    # More gateways beside the main one, by name: the [storage] table of each (a PostgreSQL
    # one, say), and environment variables they need (its DSN).
    extra_gateways: dict[str, str] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)


@dataclass
class Stack:
    workdir: Path
    http: aiohttp.ClientSession
    upstream: Proc
    gateway: Proc
    passthrough: Proc | None = None
    extra: dict[str, Proc] = field(default_factory=dict)
    problems: dict[str, list[str]] = field(default_factory=dict)

    def three_ways(self, path: str) -> dict[str, tuple[str, dict[str, str]]]:
        """``path`` straight to the upstream, through the passthrough, through the gateway."""
        assert self.passthrough is not None
        return {
            "direct": (self.upstream.url + path, self.upstream_headers),
            "passthrough": (self.passthrough.url + path, self.team_headers()),
            "gateway": (self.gateway.url + path, self.team_headers()),
        }

    def team_headers(self, key: str = TEAM_KEY) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    @property
    def upstream_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {UPSTREAM_KEY}", "Content-Type": "application/json"}

    async def upstream_stats(self) -> dict[str, int]:
        async with self.http.get(self.upstream.url + "/_bench/stats") as resp:
            return await resp.json()

    async def metrics(self, gateway: Proc | None = None) -> str:
        """``/metrics`` of the gateway (or of ``gateway``), with the admin key: the config
        lists one, so ``require_admin`` is on by default."""
        url = (gateway or self.gateway).url + "/metrics"
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with self.http.get(url, headers=headers) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise RuntimeError(f"GET /metrics answered {resp.status}: {text[:200]}")
            return text

    async def usage(self, team: str) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        url = f"{self.gateway.url}/admin/usage?team={team}"
        async with self.http.get(url, headers=headers) as resp:
            return (await resp.json())["teams"][team]

    def access_log_lines(self) -> int:
        path = self.workdir / "access.log"
        return sum(1 for _ in path.open("rb")) if path.exists() else 0

    def access_log_medians(self, endpoint: str = "generations") -> dict[str, float]:
        """Medians of the gateway's own timings (``latency_ms``, ``gateway_ms``,
        ``upstream_ms``) over the access log's successful ``endpoint`` requests."""
        path = self.workdir / "access.log"
        values: dict[str, list[float]] = {"latency_ms": [], "gateway_ms": [], "upstream_ms": []}
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                record = json.loads(line)
                if record.get("endpoint") == endpoint and record.get("status") == 200:
                    for key, found in values.items():
                        if isinstance(record.get(key), int | float):
                            found.append(float(record[key]))
        return {key: statistics.median(found) for key, found in values.items() if found}


def sqlite_storage(options: StackOptions) -> str:
    """The [storage] table of the main gateway: its SQLite file."""
    return f"database = {json.dumps(str(options.db_dir / 'gateway.db'))}"


def postgres_storage(dsn_env: str) -> str:
    """A [storage] table naming a PostgreSQL database by the environment variable holding its
    DSN (``instance_lease_s`` left at its default)."""
    return f'backend = "postgres"\ndsn_env = {json.dumps(dsn_env)}'


def gateway_config(
    options: StackOptions,
    upstream_url: str,
    workdir: Path,
    storage: str | None = None,
    access_log: str = "access.log",
) -> str:
    """The TOML config of the benchmarked gateway: every feature on."""
    q = json.dumps
    storage = sqlite_storage(options) if storage is None else storage
    return f"""
[server]
host = "127.0.0.1"
port = 0
drain_s = 10

[upstream]
base_url = {q(upstream_url)}
api_key_env = {q(KEY_ENV)}
timeout_s = 120

[storage]
{storage}

[log]
access = {q(str(workdir / access_log))}

[tasks]
poll_cache_ttl_s = {options.poll_cache_ttl_s}

[metrics]
enabled = true

[admin]
keys_sha256 = [{q(key_digest(ADMIN_KEY))}]

[teams.bench]
keys_sha256 = [{q(key_digest(TEAM_KEY))}]
budget_cny = {BIG_BUDGET_CNY}

[teams.tight]
keys_sha256 = [{q(key_digest(TIGHT_KEY))}]
budget_cny = {options.tight_budget_cny}
"""


def _make_dirs(*paths: Path) -> None:
    for path in paths:
        path.mkdir(parents=True, exist_ok=True)


@contextlib.asynccontextmanager
async def running_stack(workdir: Path, options: StackOptions) -> AsyncIterator[Stack]:
    """Start upstream, gateway (and passthrough); stop them all, in reverse order, on exit."""
    _make_dirs(workdir, options.db_dir)
    env = procs.child_env(**{KEY_ENV: UPSTREAM_KEY}, **options.extra_env)
    started: list[Proc] = []
    stack: Stack | None = None
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        try:
            upstream = await procs.start(
                "upstream",
                [
                    PYTHON, "-m", "bench.fake_upstream",
                    "--delay-s", str(options.upstream_delay_s),
                    "--task-delay-s", str(options.task_delay_s),
                ],
                workdir,
                env,
            )  # fmt: skip
            started.append(upstream)
            config = workdir / "gateway.toml"
            config.write_text(gateway_config(options, upstream.url, workdir))
            gateway = await procs.start(
                "gateway", [PYTHON, "-m", "gateway", "serve", "--config", str(config)], workdir, env
            )
            started.append(gateway)
            extra = {}
            for name, storage in options.extra_gateways.items():
                path = workdir / f"{name}.toml"
                text = gateway_config(options, upstream.url, workdir, storage, f"{name}-access.log")
                path.write_text(text)
                argv = [PYTHON, "-m", "gateway", "serve", "--config", str(path)]
                extra[name] = await procs.start(name, argv, workdir, env)
                started.append(extra[name])
            passthrough = None
            if options.passthrough:
                passthrough = await procs.start(
                    "passthrough",
                    [PYTHON, "-m", "bench.passthrough", "--upstream", upstream.url],
                    workdir,
                    env,
                )
                started.append(passthrough)
            stack = Stack(workdir, http, upstream, gateway, passthrough, extra)
            yield stack
        finally:
            codes = {proc.name: await proc.stop() for proc in reversed(started)}
            if stack is not None:
                for proc in started:
                    found = proc.problems()
                    if codes[proc.name] != 0:
                        found.append(f"exit status {codes[proc.name]} after SIGTERM")
                    if found:
                        stack.problems[proc.name] = found
