"""The web console's page time with a large ledger (issue 24's target: under 100 ms p99 with
10,000 entries). A figure, not a test.

    .venv/bin/python bench/console.py [--entries N] [--requests N] [--backend sqlite|postgres|both]

For each backend: writes ``--entries`` ledger entries for one team (period ``total``, so every
entry is in the period its page sums; spread over the last 30 days for the charts; with
results, key names, end users, 50 uncertain entries and 20 pending tasks) plus two small teams,
starts the gateway from its entry point (``python -m gateway serve --config``) on 127.0.0.1,
signs in through the console's form as the big team and as an admin, and times sequential GETs
of each page (after a warm-up): p50, p90, p99 and max as the client saw them, and the
gateway's own time from ``Server-Timing`` and its CPU time per request (the database's own
CPU aside: PostgreSQL's is another process). The figures move with the machine's load (printed
too). Everything it starts is stopped before it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.core.auth import key_digest
from gateway.core.ledger import Hold, Uncertain
from gateway.core.periods import period_at
from gateway.core.settlement import capture_reply
from gateway.store.manager import Store
from gateway.store.postgres import PostgresEngine
from gateway.store.sqlite import SQLiteEngine
from tests.process import to_toml

TEAM, TEAM_KEY = "bench", "igw_bench_team_key_000000000000000000"
ADMIN_KEY = "igw_bench_admin_key_00000000000000000"
NAMED = {f"app-{n}": f"igw_bench_named_key_{n}_0000000000000000" for n in range(3)}
PRICES = {"low": 1000, "medium": 2000, "high": 4000}
PAGES = ("/console/team", "/console/team.json", "/console/admin", "/console/admin.json")
WARMUP = 20
DAY_S = 86400


def config(database: dict[str, Any], port: int) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": port},
        "upstream": {"base_url": "http://127.0.0.1:9", "api_key_env": "BENCH_UPSTREAM_KEY"},
        "storage": database,
        "log": {"access": "access.log"},
        "metrics": {"require_admin": False},
        "teams": {
            TEAM: {
                "budget_cny": "1000000.00",
                "period": "total",
                "keys_sha256": [key_digest(TEAM_KEY)],
                "keys": [{"name": name, "sha256": key_digest(k)} for name, k in NAMED.items()],
            },
            "small": {
                "budget_cny": "100.00",
                "keys_sha256": [key_digest("igw_bench_small_0000000000000000")],
            },
            "other": {
                "budget_cny": "50.00",
                "period": "daily",
                "keys_sha256": [key_digest("igw_bench_other_0000000000000000")],
            },
        },
        "admin": {"keys_sha256": [key_digest(ADMIN_KEY)]},
    }


async def fill(db: Store, entries: int) -> None:
    """``entries`` requests of the big team over the last 30 days, settled as they would be."""
    rng = random.Random(24)
    now = time.time()
    keys = [(f"{TEAM}/{name}", key_digest(k)[:16]) for name, k in NAMED.items()]
    period = period_at("total", datetime.now(UTC), UTC).key
    sem = asyncio.Semaphore(16)

    async def one(i: int) -> None:
        quality = rng.choice(("low", "medium", "medium", "high"))
        n = rng.choice((1, 1, 1, 2, 4))
        key_id, key_fp = rng.choice(keys)
        hold = Hold(
            request_id=f"req_bench_{i:06d}", team=TEAM, period=period,
            created_at=now - DAY_S * 30 * (entries - i) / entries, endpoint="generations",
            mode="async" if i >= entries - 20 else "sync", quality=quality, n=n,
            unit_price=PRICES[quality], budget=10**12, fingerprint=f"fp{i}", key_id=key_id,
            key_fp=key_fp, end_user=f"user-{i % 40}",
        )  # fmt: skip
        async with sem:
            await db.reserve(hold)
            if hold.mode == "async":  # pending tasks, their money held
                await db.record_task(f"task-bench-{i:06d}", TEAM, hold.request_id, now, now + 60)
            elif i % 200 == 7:
                await db.settle(hold.request_id, Uncertain(hold.amount, "upstream_timeout"), now)
            else:
                urls = [f"https://files.example/v1/images/files/x/{i}-{k}.png" for k in range(n)]
                result = json.dumps({"id": f"gen-{i}", "data": [{"url": u} for u in urls]})
                await db.settle(hold.request_id, capture_reply(hold, n, f"gen-{i}", result), now)

    await asyncio.gather(*(one(i) for i in range(entries)))


@contextlib.asynccontextmanager
async def gateway(
    work: Path, database: dict[str, Any], env: dict[str, str]
) -> AsyncIterator[tuple[str, int]]:
    port = _free_port()
    path = work / "gateway.toml"
    path.write_text(to_toml(config(database, port)))
    with (work / "stderr.log").open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--config", str(path),
            env={**os.environ, **env, "BENCH_UPSTREAM_KEY": "sk_bench_0000"},
            stdout=asyncio.subprocess.DEVNULL, stderr=stderr, cwd=work,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        async with aiohttp.ClientSession() as http:
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(url + "/healthz") as resp:
                        if resp.status == 200:
                            break
                if time.monotonic() > deadline or proc.returncode is not None:
                    raise RuntimeError((work / "stderr.log").read_text()[-2000:])
                await asyncio.sleep(0.1)
        yield url, proc.pid
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)


async def signed_in(url: str, key: str) -> aiohttp.ClientSession:
    http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    async with http.get(url + "/console/") as resp:
        token = re.search(r'name="csrf" value="([^"]+)"', await resp.text())
    assert token
    async with http.post(
        url + "/console/signin", data={"key": key, "csrf": token[1]}, allow_redirects=False
    ) as resp:
        assert resp.status == 303, resp.status
    return http


def cpu_s(pid: int) -> float:
    """User and system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def time_page(
    http: aiohttp.ClientSession, url: str, requests: int, pid: int
) -> dict[str, float]:
    client, server, size = [], [], 0
    cpu = 0.0
    for i in range(WARMUP + requests):
        if i == WARMUP:
            cpu = cpu_s(pid)
        start = time.perf_counter()
        async with http.get(url) as resp:
            body = await resp.read()
            assert resp.status == 200, (url, resp.status)
        elapsed = (time.perf_counter() - start) * 1000
        if i >= WARMUP:
            client.append(elapsed)
            timing = re.search(r"gateway;dur=([0-9.]+)", resp.headers.get("Server-Timing", ""))
            server.append(float(timing[1]) if timing else float("nan"))
            size = len(body)
    return {
        "p50": _pct(client, 50), "p90": _pct(client, 90), "p99": _pct(client, 99),
        "max": max(client), "server_p99": _pct(server, 99), "kb": size / 1024,
        "cpu": (cpu_s(pid) - cpu) * 1000 / requests,
    }  # fmt: skip


def _pct(values: list[float], pct: int) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[pct - 1]
        if pct < 100
        else max(values)
    )


def _load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run(backend: str, entries: int, requests: int) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix="bench-console-", dir="/var/tmp") as tmp:
        os.chmod(tmp, 0o755)  # as root, PostgreSQL runs as nobody and must reach its folder
        work = Path(tmp)
        async with _database(backend, work) as (database, env, db):
            started = time.perf_counter()
            await fill(db, entries)
            await db.close()
            if "BENCH_DATABASE_URL" in env:  # as autovacuum would have by now, in production
                conn = await asyncpg.connect(env["BENCH_DATABASE_URL"])
                await conn.execute("ANALYZE")
                await conn.close()
            took = time.perf_counter() - started
            print(f"  {backend}: {entries} entries written in {took:.0f} s", file=sys.stderr)
            async with gateway(work, database, env) as (url, pid):
                team = await signed_in(url, NAMED["app-0"])
                admin = await signed_in(url, ADMIN_KEY)
                try:
                    figures = {}
                    for page in PAGES:
                        user = admin if "admin" in page else team
                        figures[page] = await time_page(user, url + page, requests, pid)
                    return figures
                finally:
                    await team.close()
                    await admin.close()


@contextlib.asynccontextmanager
async def _database(
    backend: str, work: Path
) -> AsyncIterator[tuple[dict[str, Any], dict[str, str], Store]]:
    if backend == "sqlite":
        db = Store(await SQLiteEngine.open(work / "gateway.db"))
        yield {"database": str(work / "gateway.db")}, {}, db
        return
    from bench.pg import DURABLE, local_server, migrated_database

    with local_server(DURABLE, work) as (server, _):
        dsn = await migrated_database(server.dsn, "console")
        db = Store(await PostgresEngine.open(dsn, register=False))
        yield (
            {"backend": "postgres", "dsn_env": "BENCH_DATABASE_URL"},
            {"BENCH_DATABASE_URL": dsn},
            db,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    args = parser.parse_args()
    backends = ("sqlite", "postgres") if args.backend == "both" else (args.backend,)
    print(
        f"console pages, {args.entries} ledger entries, {args.requests} sequential GETs each "
        f"(after {WARMUP} warm-up), milliseconds; load average before: {_load()}"
    )
    columns = ("p50", "p90", "p99", "max", "gw p99", "cpu/req", "KiB")
    print(f"{'backend':9} {'page':20}" + "".join(f"{c:>8}" for c in columns))
    missed = False
    for backend in backends:
        for page, f in asyncio.run(run(backend, args.entries, args.requests)).items():
            missed |= f["p99"] >= 100
            values = (f["p50"], f["p90"], f["p99"], f["max"], f["server_p99"], f["cpu"], f["kb"])
            print(f"{backend:9} {page:20}" + "".join(f"{v:8.1f}" for v in values))
    print(f"load average after: {_load()}")
    print("target: p99 < 100 ms:", "missed" if missed else "met")
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
