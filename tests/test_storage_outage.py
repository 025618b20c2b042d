"""Monitoring that stays up when the database does not (issue 21): a real PostgreSQL stopped
under traffic, two gateway processes on it, and a real Prometheus with the shipped rules.

``/metrics`` must answer 200 on every instance with ``gateway_storage_up 0`` and the money
gauges at their last values; Prometheus fires ``GatewayStorageDown`` (its ``for`` shortened to
2 s here: the expression is what is tested) and never ``GatewayDown``; each instance's error log
stays under 50 lines for 10 s of refused traffic.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import ADMIN_KEY, PG_URL_ENV, TEAM_KEYS, Upstream, base_config, merge
from tests.postgres import (
    LocalPostgres,
    PgserverMissing,
    PostgresServer,
    create_database,
    pg_bin_dir,
)
from tests.process import GatewayProcess, to_toml
from tests.test_monitoring import ALERTS, Prometheus, binary

pytestmark = pytest.mark.process

TRAFFIC_S = 10.0
MAX_REQUESTS = 3000  # the traffic's bound, whatever the speed
DEADLINE_S = 30.0


@pytest.fixture
def own_postgres() -> AsyncIterator[tuple[LocalPostgres, PostgresServer]]:
    """A PostgreSQL of this test's own, to stop (the session's server is shared)."""
    try:
        pg_bin_dir()
    except PgserverMissing as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))
    server = LocalPostgres()
    with server as info:
        yield server, info


def shortened_rules(path: Path) -> Path:
    """The shipped rules, GatewayStorageDown waiting 2 s instead of a minute."""
    groups = yaml.safe_load(ALERTS.read_text())
    for group in groups["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == "GatewayStorageDown":
                rule["for"] = "2s"
    path.write_text(yaml.safe_dump(groups))
    return path


async def scrape(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.get(url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as r:
        return r.status, await r.text()


def sample(text: str, name: str) -> float | None:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return None if match is None else float(match[1])


async def until(what: str, check: Any) -> Any:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        result = await check()
        if result:
            return result
        await asyncio.sleep(0.2)
    pytest.fail(f"{what}: not within {DEADLINE_S} s")


async def refused_traffic(http: aiohttp.ClientSession, urls: list[str]) -> list[int]:
    """Requests to every instance in turn for TRAFFIC_S (at most MAX_REQUESTS): their statuses."""
    statuses: list[int] = []
    stop = time.monotonic() + TRAFFIC_S
    while time.monotonic() < stop and len(statuses) < MAX_REQUESTS:
        url = urls[len(statuses) % len(urls)]
        async with http.post(
            url + "/v1/images/generations",
            headers={"Authorization": f"Bearer {TEAM_KEYS['design']}"},
            json={"prompt": "a beacon", "quality": "low"},
        ) as resp:
            await resp.read()
            statuses.append(resp.status)
    return statuses


async def test_a_database_outage_is_a_storage_alert_not_a_dead_gateway(
    own_postgres, tmp_path: Path, upstream: Upstream
) -> None:
    binary("prometheus")
    postgres, server = own_postgres
    dsn = await create_database(server.dsn, "gateway")
    config = merge(base_config(tmp_path, upstream.url), {"metrics": {"require_admin": True}})
    config["storage"] = {"backend": "postgres", "dsn_env": PG_URL_ENV}
    path = tmp_path / "fleet.toml"
    path.write_text(to_toml(config))
    fleet = [GatewayProcess(path, env={PG_URL_ENV: dsn}) for _ in range(2)]
    token = tmp_path / "token"
    token.write_text(ADMIN_KEY + "\n")
    prometheus: Prometheus | None = None
    try:
        urls = [await process.start() for process in fleet]
        prometheus = Prometheus(
            tmp_path,
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(shortened_rules(tmp_path / "alerts.yml"))],
                "scrape_configs": [
                    {
                        "job_name": "image-gateway",
                        "scrape_timeout": "1s",
                        "authorization": {"type": "Bearer", "credentials_file": str(token)},
                        "static_configs": [
                            {"targets": [url.removeprefix("http://") for url in urls]}
                        ],
                    }
                ],
            },
        )
        async with aiohttp.ClientSession() as http:
            await prometheus.start(http)
            async with http.post(
                urls[0] + "/v1/images/generations",
                headers={"Authorization": f"Bearer {TEAM_KEYS['design']}"},
                json={"prompt": "before", "quality": "high"},
            ) as resp:
                assert resp.status == 200

            async def both_up() -> bool:
                data = await prometheus.api(http, "query", query="gateway_storage_up == 1")
                return len(data["result"]) == 2

            await prometheus.until("both instances scraped with the database up", both_up)

            async def no_gateway_down() -> bool:  # absent(up) is pending before the first scrape
                alerts = (await prometheus.api(http, "alerts"))["alerts"]
                return not [a for a in alerts if a["labels"]["alertname"] == "GatewayDown"]

            await prometheus.until("the rules evaluated on both targets", no_gateway_down)

            await asyncio.to_thread(postgres._signal_and_wait)  # a fast shutdown: it is gone
            traffic = asyncio.create_task(refused_traffic(http, urls))

            async def all_down() -> list[str] | None:
                pages = [await scrape(http, url) for url in urls]
                assert [status for status, _ in pages] == [200, 200]
                if all(sample(text, "gateway_storage_up") == 0 for _, text in pages):
                    return [text for _, text in pages]
                return None

            pages = await until("gateway_storage_up 0 on every instance", all_down)
            for text in pages:  # the money gauges at their last known values
                assert sample(text, 'gateway_budget_remaining_cny{team="design"}') == 99.6
                assert (sample(text, "gateway_storage_last_ok_timestamp_seconds") or 0) > 0

            async def storage_down_firing() -> list[dict[str, Any]]:
                alerts = (await prometheus.api(http, "alerts"))["alerts"]
                assert [a for a in alerts if a["labels"]["alertname"] == "GatewayDown"] == []
                return [
                    a for a in alerts
                    if a["labels"]["alertname"] == "GatewayStorageDown" and a["state"] == "firing"
                ]  # fmt: skip

            (alert,) = await prometheus.until("GatewayStorageDown firing", storage_down_firing)
            assert alert["value"] in ("2e+00", "2")
            targets = (await prometheus.api(http, "targets"))["activeTargets"]
            assert [t["health"] for t in targets] == ["up", "up"]

            statuses = await traffic
            assert statuses and set(statuses) == {503}
            alerts = (await prometheus.api(http, "alerts"))["alerts"]
            assert [a for a in alerts if a["labels"]["alertname"] == "GatewayDown"] == []
        for process in fleet:
            _, stderr = await process.stop()
            noisy = [line for line in stderr.splitlines() if " INFO " not in line]
            assert len(noisy) < 50, "\n".join(noisy)
            assert "Traceback" not in stderr, stderr  # an outage is reported, not dumped
            assert any("PostgreSQL cannot be used" in line for line in noisy), stderr
    finally:
        if prometheus is not None:
            await prometheus.stop()
        for process in fleet:
            await process.close()
