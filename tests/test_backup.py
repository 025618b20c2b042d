"""Backup and restore (issue 21), as the README's runbook does it, with real processes: a
SQLite backup taken under traffic; a restore after more spend refused at start, naming the gap;
``--accept-restored-ledger`` starting on it and recording that; a deleted ledger refused too."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.core.restore import when
from tests.conftest import TEAM_KEYS, UPSTREAM_KEY, Upstream, base_config, merge
from tests.fakes import gate
from tests.process import GatewayProcess, to_toml

pytestmark = pytest.mark.process


async def post(url: str, **body: Any) -> int:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            url + "/v1/images/generations",
            headers={"Authorization": f"Bearer {TEAM_KEYS['design']}"},
            json={"prompt": "a beacon", "quality": "low", **body},
        ) as resp:
            await resp.read()
            return resp.status


async def cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args,
        env={**os.environ, "TEST_UPSTREAM_KEY": UPSTREAM_KEY},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def refused_start(config: Path) -> str:
    """``serve --config``, which must exit 1 at once: its stderr."""
    code, _, err = await cli("serve", "--config", str(config))
    assert code == 1, err
    return err


def position(database: Path) -> tuple[int, float, float]:
    """(holds, newest hold's time, spent over every period) of a stopped gateway's SQLite file."""
    with sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True) as conn:
        holds, last = conn.execute("SELECT COUNT(*), MAX(created_at) FROM holds").fetchone()
        (spent,) = conn.execute("SELECT COALESCE(SUM(spent), 0) FROM usage").fetchone()
    conn.close()
    return holds, last, spent / 10_000


def restore(backup: Path, database: Path) -> None:
    """The runbook's restore: the database and its -wal/-shm moved away, the backup copied in."""
    for suffix in ("", "-wal", "-shm"):
        live = Path(f"{database}{suffix}")
        if live.exists():
            live.rename(Path(f"{database}{suffix}.broken"))
    shutil.copyfile(backup, database)


async def test_a_restored_older_ledger_is_refused_until_accepted(
    tmp_path: Path, upstream: Upstream
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(to_toml(merge(base_config(tmp_path, upstream.url), {})))
    database, backup = tmp_path / "gateway.db", tmp_path / "backup.db"
    process = GatewayProcess(config)
    try:
        await process.start()
        assert [await post(process.url) for _ in range(4)] == [200] * 4
        # Under traffic: one request held at the upstream (its hold reserved) and a stream of
        # others while the backup is taken.
        release, arrived = asyncio.Event(), asyncio.Event()
        upstream.faults.add(gate(release, arrived))
        held = asyncio.create_task(post(process.url))
        await arrived.wait()
        stream = asyncio.gather(*(post(process.url) for _ in range(6)))
        code, out, err = await cli("db", "backup", "--config", str(config), "--to", str(backup))
        assert code == 0, err
        assert out.startswith(f"backed up {database} to {backup}: ")
        assert out.splitlines()[-1].startswith("consistent (")
        release.set()
        assert await held == 200
        assert await stream == [200] * 6
        assert [await post(process.url, quality="high") for _ in range(6)] == [200] * 6
        code, stderr = await process.stop()
        assert code == 0, stderr
    finally:
        await process.close()
    before = position(database)
    backed_up = position(backup)
    assert 5 <= backed_up[0] < before[0] == 17

    restore(backup, database)
    code, out, _ = await cli("ledger", "verify", "--config", str(config))
    assert (code, out) == (0, f"consistent ({backed_up[0]} entries)\n")

    err = await refused_start(config)
    (line,) = [line for line in err.splitlines() if "missing" in line]
    assert line == (
        f"image-gateway: cannot start: the ledger at {database} is older than what this gateway "
        f"had committed: spend from {when(backed_up[1])} to {when(before[1])} is missing "
        f"({before[0] - backed_up[0]} request(s), {before[2] - backed_up[2]:.4f} CNY spent), "
        "and budgets would grant it again; restore a newer backup, or accept the loss by "
        "starting once with `serve --accept-restored-ledger`"
    )
    assert [line for line in err.splitlines() if " INFO " not in line] == [line], err

    accepted = GatewayProcess(config, args=("--accept-restored-ledger",))
    try:
        await accepted.start()
        assert await post(accepted.url) == 200
        code, stderr = await accepted.stop()
        assert code == 0
    finally:
        await accepted.close()
    assert "restored ledger accepted (recorded in the ledger)" in stderr
    with sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT value FROM meta WHERE key LIKE 'restore_accepted:%'").fetchall()
    conn.close()
    (record,) = [json.loads(value) for (value,) in rows]
    assert record["missing_requests"] == before[0] - backed_up[0]
    assert record["ledger"]["holds"] == backed_up[0]

    again = GatewayProcess(config)  # once accepted, later starts need no flag
    try:
        await again.start()
        code, _ = await again.stop()
        assert code == 0
    finally:
        await again.close()
    code, out, _ = await cli("ledger", "verify", "--config", str(config))
    assert (code, out) == (0, f"consistent ({backed_up[0] + 1} entries)\n")


async def test_a_deleted_ledger_is_refused_while_its_watermark_remains(
    tmp_path: Path, upstream: Upstream
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(to_toml(merge(base_config(tmp_path, upstream.url), {})))
    process = GatewayProcess(config)
    try:
        await process.start()
        assert await post(process.url) == 200
        code, _ = await process.stop()
        assert code == 0
    finally:
        await process.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{tmp_path / 'gateway.db'}{suffix}").unlink(missing_ok=True)
    err = await refused_start(config)
    assert "(none existed: a new, empty one was made) is older than" in err
    assert "spend from its beginning to " in err and "(1 request(s), 0.1000 CNY spent)" in err
    err = await refused_start(config)  # the empty file it left changes nothing
    assert "spend from its beginning to " in err


async def run_with_path(path: str, *args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args,
        env={**os.environ, **env, "PATH": path},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_a_postgres_backup_wraps_pg_dump_or_prints_its_line(
    tmp_path: Path, upstream: Upstream, postgres_dsn: str
) -> None:
    from tests.conftest import PG_URL_ENV
    from tests.postgres import PgserverMissing, pg_bin_dir

    config = merge(base_config(tmp_path, upstream.url), {})
    config["storage"] = {"backend": "postgres", "dsn_env": PG_URL_ENV}
    path = tmp_path / "gateway.toml"
    path.write_text(to_toml(config))
    process = GatewayProcess(path, env={PG_URL_ENV: postgres_dsn})
    try:
        await process.start()
        assert await post(process.url) == 200
        dump = tmp_path / "ledger.dump"
        env = {PG_URL_ENV: postgres_dsn}
        # Without pg_dump: exit 1, saying so, and the line to run elsewhere (no password).
        code, out, err = await run_with_path("/nonexistent", "db", "backup", "--config",
                                             str(path), "--to", str(dump), env=env)  # fmt: skip
        assert code == 1 and out == ""
        first, line = err.splitlines()
        assert first.startswith("image-gateway: pg_dump is not installed; back up with")
        assert line.strip().startswith("pg_dump --format=custom --no-owner --file=")
        assert not dump.exists()
        # With a pg_dump as new as the server (the one beside the test server's binaries).
        try:
            tools = str(pg_bin_dir())
        except PgserverMissing:  # an external test server: its pg_dump is not known here
            return
        code, out, err = await run_with_path(tools, "db", "backup", "--config", str(path),
                                             "--to", str(dump), env=env)  # fmt: skip
        assert code == 0, err
        assert out == f"backed up PostgreSQL to {dump} (pg_dump custom format; see README)\n"
        listed = await asyncio.create_subprocess_exec(
            f"{tools}/pg_restore", "--list", str(dump),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        contents, _ = await asyncio.wait_for(listed.communicate(), 60)
        assert b"TABLE DATA public holds" in contents
        code, _ = await process.stop()
        assert code == 0
    finally:
        await process.close()
