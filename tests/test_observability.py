"""The access log (the dashboard's contract), redaction, metrics, Server-Timing and health."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import __version__
from gateway.core.auth import key_digest
from gateway.http.keys import INSTANCE
from gateway.ops.accesslog import FIELDS
from tests.conftest import ADMIN_KEY, PNG, TEAM_KEYS, UPSTREAM_KEY, Gateway, Upstream
from tests.fakes import hang, json_error

pytestmark = pytest.mark.engines("memory")  # services above the store; engines: test_store.py

RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")
NUMBER = (int, float)
TYPES: dict[str, tuple[type, ...]] = {
    "ts": (str,),
    "request_id": (str,),
    "team": (str, type(None)),
    "method": (str,),
    "path": (str,),
    "endpoint": (str,),
    "mode": (str, type(None)),
    "model": (str, type(None)),
    "n": (int, type(None)),
    "size": (str, type(None)),
    "resolution": (str, type(None)),
    "quality": (str, type(None)),
    "refs": (int, type(None)),
    "status": (int,),
    "error_type": (str, type(None)),
    "upstream_status": (int, type(None)),
    "upstream_ms": (*NUMBER, type(None)),
    "latency_ms": NUMBER,
    "cost_cny": NUMBER,
    "reserved_cny": NUMBER,
    "budget_remaining_cny": (*NUMBER, type(None)),
    "task_id": (str, type(None)),
    "upstream_id": (str, type(None)),
    "ignored_params": (list, type(None)),
    "client": (str, type(None)),
    "retry_count": (int, type(None)),
    "client_ip": (str,),
    "instance": (str,),
    "actor": (str, type(None)),
}
ENDPOINTS = {"generations", "edits", "tasks", "models", "admin", "health", "metrics"}


async def traffic(gateway: Gateway, upstream: Upstream) -> list[tuple[int, str, dict[str, str]]]:
    """One of each kind of request the dashboard must see; returns (status, body, headers)."""
    data_url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    seen = []
    async with aiohttp.ClientSession() as http:

        async def call(method: str, path: str, **kwargs: Any) -> str:
            async with http.request(method, gateway.url + path, **kwargs) as resp:
                body = await resp.text()
                seen.append((resp.status, body, dict(resp.headers)))
            await gateway.settled()  # its line is written: the next one comes after it
            return body

        ok = {
            "headers": gateway.headers(),
            "json": {"prompt": "secret prompt", "image_urls": [data_url], "style": "v"},
        }
        await call("POST", "/v1/images/edits", **ok)
        await call(
            "POST",
            "/v1/images/generations",
            headers=gateway.headers(),
            json={"prompt": "x", "n": 0},
        )
        await call("POST", "/v1/images/generations", json={"prompt": "x"})
        upstream.faults.add(json_error(500, "server_error", "failed"))
        await call(
            "POST", "/v1/images/generations", headers=gateway.headers(), json={"prompt": "x"}
        )
        upstream.faults.add(hang())
        await call(
            "POST", "/v1/images/generations", headers=gateway.headers(), json={"prompt": "x"}
        )
        task = await call(
            "POST",
            "/v1/images/generations?async=1",
            headers=gateway.headers(),
            json={"prompt": "y"},
        )
        task_id = task.split('"task_id": "')[1].split('"')[0]
        upstream.sim.finish_task(task_id)
        await call("GET", f"/v1/images/tasks/{task_id}", headers=gateway.headers())
        await call("GET", "/v1/models", headers=gateway.headers())
        await call("GET", "/admin/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        await call("GET", "/healthz")
        await call("GET", "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    return seen


async def test_every_request_is_one_complete_typed_line(start_gateway, upstream: Upstream) -> None:
    gateway = await start_gateway(upstream={"timeout_s": 0.5})
    seen = await traffic(gateway, upstream)
    lines = await gateway.log_lines()
    assert len(lines) == len(seen)
    for line in lines:
        assert list(line)[: len(FIELDS)] == list(FIELDS)
        for field, types in TYPES.items():
            assert isinstance(line[field], types), (field, line[field])
        assert RFC3339.fullmatch(line["ts"])
        assert line["endpoint"] in ENDPOINTS
        assert line["mode"] in (None, "sync", "async", "poll")
    by_status = [(line["endpoint"], line["mode"], line["status"]) for line in lines]
    assert by_status == [
        ("edits", "sync", 200),
        ("generations", "sync", 400),
        ("generations", "sync", 401),
        ("generations", "sync", 500),
        ("generations", "sync", 504),
        ("generations", "async", 202),
        ("tasks", "poll", 200),
        ("models", None, 200),
        ("admin", None, 200),
        ("health", None, 200),
        ("metrics", None, 200),
    ]
    assert {line["client_ip"] for line in lines} == {"127.0.0.1"}  # the socket peer
    assert {line["instance"] for line in lines} == {gateway.app[INSTANCE]}
    assert {headers["X-Gateway-Instance"] for _, _, headers in seen} == {gateway.app[INSTANCE]}
    admin_key = f"sha256:{key_digest(ADMIN_KEY)[:8]}"  # unnamed: known by its hash prefix
    assert [line["actor"] for line in lines if line["actor"]] == [admin_key, admin_key]
    assert [line["endpoint"] for line in lines if line["actor"]] == ["admin", "metrics"]
    success, invalid, unauthorized, failed, timed_out, submitted, polled = lines[:7]
    assert (success["size"], success["quality"], success["refs"], success["n"]) == (
        "1:1",
        "medium",
        1,
        1,
    )
    assert success["cost_cny"] == success["reserved_cny"] == 0.2
    assert success["budget_remaining_cny"] == pytest.approx(99.8)
    assert success["ignored_params"] == ["style"]
    assert success["upstream_status"] == 200 and success["upstream_ms"] > 0
    assert success["upstream_id"] and success["client"].startswith("Python")
    assert invalid["error_type"] == "invalid_request_error" and invalid["cost_cny"] == 0
    assert unauthorized["team"] is None and unauthorized["error_type"] == "authentication_error"
    assert (
        failed["upstream_status"] == 500
        and failed["cost_cny"] == 0
        and failed["reserved_cny"] == 0.2
    )
    assert timed_out["error_type"] == "upstream_error" and timed_out["cost_cny"] == 0
    assert submitted["task_id"] and submitted["reserved_cny"] == 0.2 and submitted["cost_cny"] == 0
    assert polled["task_id"] == submitted["task_id"] and polled["result_ids"]


async def test_no_secret_base64_prompt_or_result_url_is_logged(
    start_gateway, upstream: Upstream
) -> None:
    gateway = await start_gateway(upstream={"timeout_s": 0.5})
    seen = await traffic(gateway, upstream)
    text = gateway.access_log.read_text()
    urls = re.findall(r'"(?:url|result_url)": "([^"]+)"', " ".join(body for _, body, _ in seen))
    assert urls
    forbidden = [UPSTREAM_KEY, *TEAM_KEYS.values(), ADMIN_KEY, "base64,", "secret prompt", *urls]
    for needle in forbidden:
        assert needle not in text, needle
    for _, body, headers in seen:
        for secret in (UPSTREAM_KEY, *TEAM_KEYS.values(), ADMIN_KEY):
            assert secret not in body and secret not in str(headers)


async def test_prompts_are_logged_only_when_asked(start_gateway) -> None:
    gateway = await start_gateway(log={"prompts": True})
    await gateway.async_openai().images.generate(prompt="a logged prompt")
    assert (await gateway.log_lines())[-1]["prompt"] == "a logged prompt"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def scrape(gateway: Gateway, headers: dict[str, str] | None = None) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http:
        async with http.get(
            gateway.url + "/metrics",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"} if headers is None else headers,
        ) as resp:
            return resp.status, await resp.text()


DESIGN_KEY = f"design/sha256:{key_digest(TEAM_KEYS['design'])[:8]}"


async def test_metrics_move_with_traffic(gateway: Gateway) -> None:
    _, before = await scrape(gateway)
    assert (
        "gateway_requests_total",
        (("endpoint", "generations"), ("key", DESIGN_KEY), ("status", "200"), ("team", "design")),
    ) not in samples(before)
    client = gateway.async_openai()
    await client.images.generate(prompt="x", n=2, quality="high")
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway.url + "/v1/images/generations?async=1",
            headers=gateway.headers(),
            json={"prompt": "y"},
        ) as resp:
            assert resp.status == 202
    status, after = await scrape(gateway)
    assert status == 200
    values = samples(after)
    assert (
        values[
            (
                "gateway_requests_total",
                (
                    ("endpoint", "generations"),
                    ("key", DESIGN_KEY),
                    ("status", "200"),
                    ("team", "design"),
                ),
            )
        ]
        == 1
    )
    assert values[("gateway_images_total", (("quality", "high"), ("team", "design")))] == 2
    assert values[
        ("gateway_spent_cny_total", (("key", DESIGN_KEY), ("team", "design")))
    ] == pytest.approx(0.8)
    assert values[("gateway_budget_remaining_cny", (("team", "design"),))] == pytest.approx(99.0)
    assert (
        values[("gateway_upstream_seconds_count", (("endpoint", "generations"), ("mode", "sync")))]
        == 1
    )
    assert values[("gateway_reserve_seconds_count", ())] == 2
    assert values[("gateway_pending_tasks", ())] == 1
    assert ("gateway_requests_in_flight", ()) in values


async def test_metrics_can_be_disabled_or_require_the_admin_key(start_gateway) -> None:
    disabled = await start_gateway(metrics={"enabled": False})
    assert (await scrape(disabled))[0] == 404
    guarded = await start_gateway()  # admin keys configured: required by default
    assert (await scrape(guarded, {}))[0] == 401
    assert (await scrape(guarded, {"Authorization": f"Bearer {TEAM_KEYS['design']}"}))[0] == 401
    assert (await scrape(guarded, {"Authorization": f"Bearer {ADMIN_KEY}"}))[0] == 200
    opened = await start_gateway(metrics={"require_admin": False})  # an explicit choice
    assert (await scrape(opened, {}))[0] == 200
    no_admins = await start_gateway(admin={"keys_sha256": []})
    assert (await scrape(no_admins, {}))[0] == 200


async def test_server_timing_on_every_response(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as http:
        for method, path in (
            ("GET", "/healthz"),
            ("GET", "/nope"),
            ("POST", "/v1/images/generations"),
        ):
            async with http.request(
                method, gateway.url + path, headers=gateway.headers(), json={"prompt": "x"}
            ) as resp:
                timing = resp.headers["Server-Timing"]
                assert re.fullmatch(r"gateway;dur=\d+\.\d\d, upstream;dur=\d+\.\d\d", timing)
                if path.startswith("/v1"):
                    assert float(timing.split("upstream;dur=")[1]) > 0


async def test_readyz(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.url + "/readyz") as resp:
            assert resp.status == 200
            body = await resp.json()
    assert body == {
        "status": "ready",
        "version": __version__,
        "checks": {"config": "ok", "database": "ok", "central_key": "ok"},
    }
    await gateway.db.close()
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.url + "/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["checks"]["database"].startswith("error")


def test_the_readme_documents_every_access_log_field() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    table = readme.split("### The access log", 1)[1].split("\n\n| field | meaning |\n", 1)[1]
    rows = table.split("\n\n", 1)[0].splitlines()[1:]  # below the header's rule
    documented = {name for row in rows for name in re.findall(r"`(\w+)`", row)}
    assert set(FIELDS) <= documented, set(FIELDS) - documented
