"""Versions and upgrades (issue 21): one version number, expand/contract migrations that keep
the previous release working, and an instance older than the database's oldest served release
going unready instead of running unchecked."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import sqlite3
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from gateway import __version__ as VERSION
from gateway.store import migrations
from gateway.store.migrations import Migration, SchemaState, SchemaTooNew, SchemaTooOld
from tests.conftest import ADMIN_KEY, PG_URL_ENV, Gateway, books_balance
from tests.process import GatewayProcess

# Each gateway here migrates its own ledger from nothing, as an upgraded or first start does.
pytestmark = pytest.mark.new_ledger

ROOT = Path(__file__).resolve().parent.parent
PREVIOUS_RELEASE = ("0.1.0", "ac151ab")  # its version and commit


# -- one version number ------------------------------------------------------------------------


def test_the_version_is_one_number_everywhere() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert VERSION == pyproject == importlib.metadata.version("image-gateway")
    assert f"## [{pyproject}]" in (ROOT / "CHANGELOG.md").read_text()
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "--version"], capture_output=True, text=True, check=True
    )
    assert done.stdout == f"image-gateway {pyproject}\n"


async def test_readyz_reports_the_version(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as http, http.get(gateway.url + "/readyz") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["version"] == VERSION


# -- expand now, contract a release later --------------------------------------------------


def steps(*contracts: str | None) -> tuple[Migration, ...]:
    """Steps 1..4 (the baseline) and then one step per argument (a contract's release, or None
    for an expand-only step)."""
    base = tuple(Migration(n, f"s{n}", "") for n in range(1, 5))
    more = tuple(Migration(5 + i, f"s{5 + i}", "", c) for i, c in enumerate(contracts))
    return base + more


EMPTY = SchemaState(0, 0)


def walk(code: tuple[Migration, ...], state: SchemaState = EMPTY) -> SchemaState:
    """The state after migrating with ``code`` from ``state``."""
    for step in migrations.pending(state, code, where="db"):
        state = migrations.state_of(migrations.records_after(step, code, state))
    return state


def test_expand_only_steps_keep_the_level_the_previous_release_reads() -> None:
    state = walk(steps(None, None, None, None))
    assert state == SchemaState(step=8, level=4, min_release="0.1.0")
    # 0.1.0 knows steps 1..4 and requires exactly level 4: it goes on working.
    previous = steps()
    assert migrations.pending(state, previous, where="db") == []
    migrations.require_current(state, previous, where="db")


def test_a_contracting_step_raises_the_level_and_the_oldest_release_served() -> None:
    state = walk(steps(None, "0.3.0", None))
    assert state == SchemaState(step=7, level=6, min_release="0.3.0")
    with pytest.raises(SchemaTooNew, match=r"0\.3\.0"):
        migrations.pending(state, steps(None), where="db")  # a release that knows step 5 only
    assert migrations.too_old("0.2.0", state) and not migrations.too_old("0.3.0", state)
    # The floor never goes down, whatever a later step declares.
    assert walk(steps(None, "0.3.0", None, "0.2.0"), state).min_release == "0.3.0"


def test_tools_refuse_a_database_the_gateway_has_not_migrated_yet() -> None:
    with pytest.raises(SchemaTooOld, match=r"step 4"):
        migrations.require_current(walk(steps()), steps(None), where="db")


def test_0_1_0_databases_read_as_step_and_level_4() -> None:
    assert migrations.state_of({"schema_version": "4"}) == SchemaState(4, 4, "0.1.0")


def test_the_shipped_migrations_are_numbered_alike_and_contract_alike() -> None:
    sqlite, postgres = migrations.load("sqlite"), migrations.load("postgres")
    assert [(m.version, m.contracts_below) for m in sqlite] == [
        (m.version, m.contracts_below) for m in postgres
    ]


# -- the previous release on a database this release migrated ------------------------------


def previous_release(tmp_path: Path) -> Path:
    """The previous release's package, extracted from git history (``git archive``)."""
    version, commit = PREVIOUS_RELEASE
    folder = tmp_path / f"image-gateway-{version}"
    folder.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", commit, "gateway"],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        message = f"git history with {commit} ({version}) is not available here"
        if os.environ.get("CI"):
            pytest.fail(message + "; under CI it must be")
        pytest.skip(message)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


async def run_previous(folder: Path, env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args,
        env={**env, "PYTHONPATH": str(folder)}, cwd=folder,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_the_previous_release_reads_a_database_this_release_migrated(
    start_gateway, upstream, tmp_path: Path
) -> None:
    folder = previous_release(tmp_path)
    gateway = await start_gateway()
    client = gateway.async_openai()
    await client.images.generate(prompt="a lighthouse", quality="high")
    await client.images.generate(prompt="a harbour", quality="low")
    await gateway.settled()
    config = gateway.config_file(tmp_path / "gateway.toml")
    env = gateway.cli_env()
    code, out, err = await run_previous(folder, env, "--version")
    assert (code, out.strip()) == (0, f"image-gateway {PREVIOUS_RELEASE[0]}"), err
    for args, expect in (
        (("usage", "--config", str(config), "--period", "total"), "design"),
        (("ledger", "list", "--config", str(config), "--period", "total"), "captured"),
        (("ledger", "export", "--config", str(config), "--period", "total"), "request_id"),
        (("ledger", "verify", "--config", str(config)), "consistent (2 entries)"),
        (("keys", "--config", str(config)), "design"),
    ):
        code, out, err = await run_previous(folder, env, *args)
        assert code == 0, (args, err)
        assert expect in out, (args, out)
    listed = json.loads(
        (
            await run_previous(
                folder,
                env,
                "ledger",
                "list",
                "--config",
                str(config),
                "--json",
                "--period",
                "total",
            )
        )[1]
    )
    assert len(listed["entries"]) == 2
    await books_balance(gateway, upstream)


# -- an instance older than the database serves --------------------------------------------


async def set_meta(gateway: Gateway, key: str, value: str) -> None:
    """Write a ``meta`` row as a newer release's migration would, beside the running gateway."""
    if PG_URL_ENV in gateway.env:
        conn = await asyncpg.connect(gateway.env[PG_URL_ENV])
        try:
            await conn.execute(
                "INSERT INTO meta (key, value) VALUES ($1, $2)"
                " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                key,
                value,
            )
        finally:
            await conn.close()
        return
    with sqlite3.connect(gateway.settings.database, timeout=10) as conn:
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))
    conn.close()


async def get(gateway: Gateway, path: str, **headers: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(gateway.url + path, headers=headers) as r:
        return r.status, await (r.json() if path != "/metrics" else r.text())


async def test_an_instance_older_than_the_database_serves_goes_unready(
    start_gateway, upstream, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = await start_gateway()
    await gateway.async_openai().images.generate(prompt="before")
    await set_meta(gateway, "min_release", "99.0.0")  # a newer release contracted the schema
    for _ in range(3):
        status, body = await get(gateway, "/readyz")
        assert status == 503
        assert body["status"] == "upgrade_required"
        assert body["checks"]["release"].startswith("upgrade_required")
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway.url + "/v1/images/generations", headers=gateway.headers(), json={"prompt": "x"}
        ) as resp:
            assert resp.status == 503
            error = (await resp.json())["error"]
    assert error["code"] == "upgrade_required"
    assert "nothing was sent or charged" in error["message"]
    status, text = await get(gateway, "/metrics", Authorization=f"Bearer {ADMIN_KEY}")
    assert status == 200 and "gateway_storage_up 1.0" in text
    lines = [r.getMessage() for r in caplog.records if "upgrade required" in r.getMessage()]
    assert len(lines) == 1, lines

    await set_meta(gateway, "min_release", "0.1.0")  # e.g. that release's backup restored
    status, body = await get(gateway, "/readyz")
    assert (status, body["status"]) == (200, "ready")
    await gateway.async_openai().images.generate(prompt="after")
    assert len(upstream.sim.served) == 2  # the refused request never went upstream
    await books_balance(gateway, upstream)


@pytest.mark.sqlite_only
async def test_a_start_on_a_database_that_serves_only_newer_releases_is_refused(
    start_gateway, tmp_path: Path
) -> None:
    gateway = await start_gateway()
    await set_meta(gateway, "min_release", "99.0.0")
    config = gateway.config_file(tmp_path / "gateway.toml")
    await gateway.server.close()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--config", str(config),
        env=gateway.cli_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    assert err.decode().splitlines()[-1] == (
        "image-gateway: cannot start: upgrade required: the database serves image-gateway "
        f"99.0.0 and newer; this is {VERSION}"
    )


async def test_the_previous_release_serves_beside_this_one_during_a_rolling_upgrade(
    start_gateway, upstream, tmp_path: Path, backend: str
) -> None:
    """A fleet half upgraded: 0.1.0 keeps taking paid requests on the migrated database (on
    SQLite, where one process holds the file, once this release's gateway has stopped)."""
    folder = previous_release(tmp_path)
    gateway = await start_gateway()
    await gateway.async_openai().images.generate(prompt="on the new release", quality="high")
    await gateway.settled()
    config = gateway.config_file(tmp_path / "gateway.toml")
    if backend == "sqlite":
        await gateway.server.close()
    old = GatewayProcess(config, cwd=folder, env={**gateway.env, "PYTHONPATH": str(folder)})
    try:
        await old.start()
        async with aiohttp.ClientSession() as http:
            async with http.post(
                old.url + "/v1/images/generations",
                headers=gateway.headers(),
                json={"prompt": "on the old release", "quality": "low"},
            ) as resp:
                assert resp.status == 200, await resp.text()
        code, _ = await old.stop()
        assert code == 0
    finally:
        await old.close()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "ledger", "verify", "--config", str(config),
        env=gateway.cli_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert (proc.returncode, out.decode()) == (0, "consistent (2 entries)\n"), err
    assert len(upstream.sim.served) == 2
