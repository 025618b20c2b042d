"""Storage faults: a full disk, a database deleted or replaced while running, a second process.

A full disk is a real one: a small tmpfs mounted for the test (root only; outside CI the tests
skip without it). Money must stay safe, a refusal must be clean and come before anything is
sent, and a paid result must survive in memory until it can be stored.
"""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.core.ledger import Usage
from gateway.http.keys import METRICS
from tests.client import post, usage
from tests.conftest import Gateway, Upstream, books_balance
from tests.fakes import gate
from tests.process import GatewayProcess, to_toml

DISK_BYTES = 3 * 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs: a disk that can really fill up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        message = f"cannot mount a tmpfs (needs root): {done.stderr.decode().strip()}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Write a file until the disk has no room left; delete it to free the disk."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (65536, 4096, 512, 1):  # down to the last crumbs
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


async def eventually(check: Any, seconds: float = 10) -> None:
    """Wait for ``check()`` to hold (a condition, not a guessed duration)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not check():
        assert loop.time() < deadline, "condition never held"
        await asyncio.sleep(0.01)


async def readyz(gateway: Gateway) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.url + "/readyz") as resp:
            return resp.status, await resp.json()


@pytest.mark.sqlite_only
async def test_a_full_disk_refuses_cleanly_before_anything_is_sent(
    start_gateway, upstream: Upstream, small_disk: Path
) -> None:
    gateway = await start_gateway(storage={"database": str(small_disk / "gateway.db")})
    assert (await post(gateway))[0] == 200
    await gateway.settled()
    filler = fill(small_disk)
    status, body, headers = await post(gateway, n=2)
    assert (status, body["error"]["code"]) == (503, "storage_unavailable")
    assert headers["x-should-retry"] == "false"  # the SDK must not retry at once
    assert "disk" in body["error"]["message"] and str(small_disk) not in body["error"]["message"]
    assert (await readyz(gateway))[0] == 503
    assert len(upstream.sim.generation_requests()) == 1  # nothing more was sent
    filler.unlink()
    assert (await readyz(gateway))[0] == 200
    assert (await post(gateway))[0] == 200
    await gateway.settled()
    assert await usage(gateway) == Usage(spent=4000)
    await books_balance(gateway, upstream)


@pytest.mark.sqlite_only
async def test_a_paid_result_survives_a_full_disk_until_it_can_be_stored(
    start_gateway, upstream: Upstream, small_disk: Path
) -> None:
    gateway = await start_gateway(storage={"database": str(small_disk / "gateway.db")})
    release, arrived = asyncio.Event(), asyncio.Event()
    upstream.faults.add(gate(release, arrived))
    key = {"Idempotency-Key": "disk-full-1"}
    first = asyncio.create_task(post(gateway, headers=key, quality="high"))
    await arrived.wait()  # the hold is on disk; the generation is running upstream
    filler = fill(small_disk)
    release.set()
    status, paid, _ = await first
    assert status == 200 and paid["data"]  # the client has its images, disk or no disk
    registry = gateway.app[METRICS].registry
    # the settlement waits (and the Idempotency-Key outcome too, if it was tried meanwhile)
    await eventually(lambda: registry.get_sample_value("gateway_unsettled_results") >= 1)
    status, replay, headers = await post(gateway, headers=key, quality="high")
    assert (status, replay, headers["Idempotent-Replayed"]) == (200, paid, "true")
    status, retry, headers = await post(
        gateway, headers={"x-stainless-retry-count": "1"}, quality="high"
    )
    assert (status, retry) == (200, paid) and "X-Gateway-Deduplicated" in headers
    assert len(upstream.sim.generation_requests()) == 1  # never bought twice
    filler.unlink()  # the disk frees up: the settlement lands by itself
    await gateway.settled()
    assert registry.get_sample_value("gateway_ledger_write_retries_total") >= 1
    assert registry.get_sample_value("gateway_unsettled_results") == 0
    assert await usage(gateway) == Usage(spent=4000)
    status, replay, headers = await post(gateway, headers=key, quality="high")
    assert (status, replay) == (200, paid)
    await books_balance(gateway, upstream)


@pytest.mark.sqlite_only
async def test_a_database_deleted_while_running_is_noticed(
    gateway: Gateway, tmp_path: Path
) -> None:
    assert (await readyz(gateway))[0] == 200
    (tmp_path / "gateway.db").unlink()
    status, body = await readyz(gateway)
    assert (status, body["checks"]["database"]) == (503, "error: StorageUnavailable")


@pytest.mark.sqlite_only
async def test_a_removed_write_ahead_log_is_noticed(gateway: Gateway, tmp_path: Path) -> None:
    assert (await post(gateway))[0] == 200
    assert (await readyz(gateway))[0] == 200
    (tmp_path / "gateway.db-wal").unlink()
    assert (await readyz(gateway))[0] == 503


@pytest.mark.process
async def test_a_second_process_on_the_same_database_is_refused_in_one_line(
    tmp_path: Path, upstream: Upstream
) -> None:
    from tests.conftest import base_config

    (tmp_path / "gateway.toml").write_text(to_toml(base_config(tmp_path, upstream.url)))
    first = GatewayProcess(tmp_path / "gateway.toml")
    try:
        await first.start()
        second = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--config", str(tmp_path / "gateway.toml"),
            env={**os.environ, "TEST_UPSTREAM_KEY": "sk_test_central_0123456789abcdef"},
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, stderr = await asyncio.wait_for(second.communicate(), 30)
        assert second.returncode == 1
        lines = [line for line in stderr.decode().splitlines() if "INFO" not in line]
        assert lines == [
            f"image-gateway: cannot start: {tmp_path / 'gateway.db'} is in use by another "
            "gateway process; run one process per SQLite database (several instances need "
            "the postgres backend)"
        ]
        async with aiohttp.ClientSession() as http:  # the first one is untouched
            async with http.get(first.url + "/readyz") as resp:
                assert resp.status == 200
    finally:
        await first.close()


@pytest.mark.process
async def test_a_new_ledger_is_announced_and_check_config_says_whether_it_exists(
    tmp_path: Path, upstream: Upstream
) -> None:
    from tests.conftest import base_config

    config = tmp_path / "gateway.toml"
    config.write_text(to_toml(base_config(tmp_path, upstream.url)))
    env = {**os.environ, "TEST_UPSTREAM_KEY": "sk_test_central_0123456789abcdef"}
    code, out = await check_config(config, env)
    assert code == 0 and "does not exist yet" in out
    process = GatewayProcess(config)
    try:
        await process.start()
        _, stderr = await process.stop()
    finally:
        await process.close()
    assert "NEW LEDGER: no database existed at" in stderr
    code, out = await check_config(config, env)
    assert code == 0 and f"database {tmp_path / 'gateway.db'}: exists" in out


async def check_config(config: Path, env: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "check-config", str(config),
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()
