"""The PostgreSQL backend's own promises: /readyz and a clear 503 while the database cannot be
reached (nothing sent), check-config naming a missing or unusable DSN."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import asyncpg

from gateway.http.app import create_app
from tests.conftest import (
    PG_URL_ENV,
    TEAM_KEYS,
    UPSTREAM_KEY,
    Upstream,
    base_config,
    build_settings,
)
from tests.process import to_toml


async def test_an_unreachable_database_is_503_before_anything_is_sent(
    aiohttp_server, upstream: Upstream, tmp_path: Path, postgres_server, postgres_dsn: str
) -> None:
    settings = build_settings(
        tmp_path, upstream.url, {PG_URL_ENV: postgres_dsn},
        storage={"backend": "postgres", "dsn_env": PG_URL_ENV},
    )  # fmt: skip
    server = await aiohttp_server(create_app(settings))
    url = str(server.make_url("")).rstrip("/")
    name = urlsplit(postgres_dsn).path.lstrip("/")
    admin = await asyncpg.connect(postgres_server.dsn)

    async def call(method: str, path: str) -> tuple[int, dict]:
        async with aiohttp.ClientSession() as http:
            async with http.request(
                method, url + path, headers={"Authorization": f"Bearer {TEAM_KEYS['design']}"},
                json={"prompt": "x"},
            ) as resp:  # fmt: skip
                return resp.status, await resp.json()

    try:
        assert (await call("GET", "/readyz"))[0] == 200
        await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity WHERE datname = $1", name
        )
        status, body = await call("GET", "/readyz")
        assert (status, body["checks"]["database"]) == (503, "error: StorageUnavailable")
        status, body = await call("POST", "/v1/images/generations")
        assert (status, body["error"]["code"]) == (503, "storage_unavailable")
        assert upstream.sim.generation_requests() == []
        await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
        assert (await call("GET", "/readyz"))[0] == 200
        assert (await call("POST", "/v1/images/generations"))[0] == 200
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
        await admin.close()
        await server.close()


async def test_connections_the_server_killed_are_unavailable_then_replaced(
    postgres_server, postgres_dsn: str
) -> None:
    """Sessions terminated under a busy pool: each statement that hits one is
    StorageUnavailable (never asyncpg's own InterfaceError or InternalClientError), and the
    pool never hands a dead connection out again. (``pg_terminate_backend(pid, timeout)``
    waits for the backend to exit: without it a backend may still answer once.)"""
    from gateway.core.errors import StorageUnavailable
    from gateway.store.manager import Store
    from gateway.store.postgres import PostgresEngine

    store = Store(await PostgresEngine.open(postgres_dsn, register=False))
    admin = await asyncpg.connect(postgres_server.dsn)
    name = urlsplit(postgres_dsn).path.lstrip("/")
    try:
        for _ in range(5):
            await asyncio.gather(*(store.check_ready() for _ in range(8)))  # 8 pooled sessions
            await admin.execute(
                "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity WHERE datname = $1",
                name,
            )
            outcomes = await asyncio.gather(
                *(store.check_ready() for _ in range(8)), return_exceptions=True
            )
            assert {type(o) for o in outcomes} <= {type(None), StorageUnavailable}, outcomes
            await asyncio.gather(*(store.check_ready() for _ in range(8)))  # all replaced
    finally:
        await admin.close()
        await store.close()


async def check_config(path: Path, env: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "check-config", str(path),
        env={**os.environ, "TEST_UPSTREAM_KEY": UPSTREAM_KEY, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, (out + err).decode()


async def test_check_config_names_a_missing_or_unusable_dsn(
    tmp_path: Path, upstream: Upstream, postgres_dsn: str
) -> None:
    config = base_config(tmp_path, upstream.url)
    config["storage"] = {"backend": "postgres", "dsn_env": PG_URL_ENV}
    path = tmp_path / "pg.toml"
    path.write_text(to_toml(config))
    code, out = await check_config(path, {})
    assert code == 1 and f"environment variable {PG_URL_ENV}): the PostgreSQL URL is missing" in out
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    code, out = await check_config(path, {PG_URL_ENV: f"postgresql://u:secret@127.0.0.1:{port}/x"})
    assert code == 1 and "cannot connect to PostgreSQL" in out and "secret" not in out
    assert len(out.strip().splitlines()) == 1
    code, out = await check_config(path, {PG_URL_ENV: "mysql://x"})
    assert code == 1 and "must start with postgresql://" in out
    code, out = await check_config(path, {PG_URL_ENV: postgres_dsn})
    assert code == 0 and "PostgreSQL: reachable" in out
    config["storage"]["database"] = "gateway.db"
    path.write_text(to_toml(config))
    code, out = await check_config(path, {PG_URL_ENV: postgres_dsn})
    assert code == 1 and "storage.database is the SQLite file" in out
