"""Never pay twice: SDK retries attach to their first attempt; Idempotency-Key replays outcomes."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import openai
import pytest

from gateway.core.config import Secret, UpstreamConfig
from gateway.core.normalize import Rules, normalize
from gateway.core.wire import upstream_body
from gateway.http.keys import CONFIG, GENERATIONS, METRICS
from gateway.upstream.client import HttpUpstream
from tests.client import PROMPT, post
from tests.conftest import Gateway, Upstream, build_settings
from tests.fakes import gate, json_error

pytestmark = pytest.mark.engines("memory")  # services above the store; engines: test_store.py


def spy_on_attach(gateway: Gateway) -> asyncio.Event:
    """An event set when a request attaches to an earlier attempt (the seam tests wait on)."""
    generations = gateway.app[GENERATIONS]
    attached = asyncio.Event()
    original = generations.attach

    async def attach(*args: Any, **kwargs: Any) -> Any:
        attached.set()
        return await original(*args, **kwargs)

    generations.attach = attach  # type: ignore[method-assign]
    return attached


# -- SDK retries ------------------------------------------------------------------------------


async def test_sdk_timeout_with_default_retries_buys_one_image(
    gateway: Gateway, upstream: Upstream
) -> None:
    release = asyncio.Event()
    upstream.faults.add(gate(release))
    attached = spy_on_attach(gateway)

    async def release_once_the_retry_attached() -> None:
        await attached.wait()
        release.set()

    helper = asyncio.create_task(release_once_the_retry_attached())
    client = gateway.async_openai(max_retries=2, timeout=1.0)
    result = await client.images.generate(prompt=PROMPT)
    await helper
    assert len(upstream.sim.generation_requests()) == 1
    assert upstream.faults.seen == 1
    lines = await gateway.log_lines()
    retry = [line for line in lines if line["retry_count"] and line["status"] == 200]
    assert retry and retry[-1]["dedupe_of"] is not None
    assert retry[-1]["cost_cny"] == 0.0
    entries = await gateway.ledger()
    assert [(e.state, e.settled_amount) for e in entries] == [("captured", 2000)]
    stored = json.loads((await gateway.stored_results())[0])
    assert result.data[0].url == stored["data"][0]["url"]


async def test_caller_gets_the_result_after_the_sdk_gave_up(
    gateway: Gateway, upstream: Upstream
) -> None:
    release = asyncio.Event()
    upstream.faults.add(gate(release))
    client = gateway.async_openai(max_retries=0, timeout=0.3)
    with pytest.raises(openai.APITimeoutError):
        await client.images.generate(prompt=PROMPT)
    (running,) = gateway.app[GENERATIONS]._by_request.values()
    release.set()
    first = await running.ready
    status, body, headers = await post(gateway, headers={"x-stainless-retry-count": "1"})
    assert (status, body) == (200, first.payload)
    assert headers["X-Gateway-Deduplicated"] == first.request_id
    assert len(upstream.sim.generation_requests()) == 1
    registry = gateway.app[METRICS].registry
    assert registry.get_sample_value("gateway_deduplicated_requests_total", {"team": "design"}) == 1


async def test_a_fresh_identical_request_is_a_new_image(
    gateway: Gateway, upstream: Upstream
) -> None:
    await post(gateway)
    status, _, headers = await post(gateway, headers={"x-stainless-retry-count": "0"})
    assert status == 200 and "X-Gateway-Deduplicated" not in headers
    assert len(upstream.sim.generation_requests()) == 2


async def test_dedupe_needs_the_same_request_team_and_window(
    gateway: Gateway, upstream: Upstream
) -> None:
    retry = {"x-stainless-retry-count": "2"}
    await post(gateway)
    assert "X-Gateway-Deduplicated" in (await post(gateway, headers=retry))[2]
    assert "X-Gateway-Deduplicated" not in (await post(gateway, headers=retry, prompt="other"))[2]
    assert "X-Gateway-Deduplicated" not in (await post(gateway, team="ops", headers=retry))[2]
    gateway.clock.advance(minutes=11)
    assert "X-Gateway-Deduplicated" not in (await post(gateway, headers=retry))[2]
    assert len(upstream.sim.generation_requests()) == 4


async def test_a_retry_after_a_failure_generates_again(
    gateway: Gateway, upstream: Upstream
) -> None:
    upstream.faults.add(json_error(500, "server_error", "generation failed"))
    assert (await post(gateway))[0] == 500
    status, _, headers = await post(gateway, headers={"x-stainless-retry-count": "1"})
    assert status == 200 and "X-Gateway-Deduplicated" not in headers
    await gateway.settled()
    assert sorted(e.state for e in await gateway.ledger()) == ["captured", "released"]


# -- Idempotency-Key --------------------------------------------------------------------------


async def test_idempotency_key_replays_the_first_outcome(
    gateway: Gateway, upstream: Upstream
) -> None:
    key = {"Idempotency-Key": "order-42"}
    first = await post(gateway, headers=key)
    await gateway.settled()
    second = await post(gateway, headers=key)
    assert first[0] == second[0] == 200
    assert first[1] == second[1]
    assert second[2]["Idempotent-Replayed"] == "true"
    assert len(upstream.sim.generation_requests()) == 1
    assert [line["idempotency"] for line in (await gateway.log_lines())] == ["new", "replayed"]


async def test_idempotency_key_with_the_sdk(gateway: Gateway, upstream: Upstream) -> None:
    client = gateway.async_openai()
    headers = {"Idempotency-Key": "sdk-key-1"}
    one = await client.images.generate(prompt="x", extra_headers=headers)
    two = await client.images.generate(prompt="x", extra_headers=headers)
    assert one.data[0].url == two.data[0].url
    assert len(upstream.sim.generation_requests()) == 1


async def test_same_key_in_flight_is_409(gateway: Gateway, upstream: Upstream) -> None:
    release, arrived = asyncio.Event(), asyncio.Event()
    upstream.faults.add(gate(release, arrived))
    key = {"Idempotency-Key": "k1"}
    first = asyncio.create_task(post(gateway, headers=key))
    await arrived.wait()
    status, body, headers = await post(gateway, headers=key)
    assert status == 409 and body["error"]["code"] == "idempotency_key_in_use"
    assert headers["Retry-After"]
    release.set()
    assert (await first)[0] == 200
    assert len(upstream.sim.generation_requests()) == 1


async def test_same_key_different_payload_is_422(gateway: Gateway, upstream: Upstream) -> None:
    key = {"Idempotency-Key": "k2"}
    assert (await post(gateway, headers=key))[0] == 200
    status, body, headers = await post(gateway, headers=key, prompt="something else")
    assert status == 422 and body["error"]["param"] == "Idempotency-Key"
    assert headers["x-should-retry"] == "false"
    assert len(upstream.sim.generation_requests()) == 1


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there", "ключ"])
async def test_malformed_keys_are_400(gateway: Gateway, upstream: Upstream, key: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway.url + "/v1/images/generations",
            headers={**gateway.headers(), "Idempotency-Key": key.encode().decode("latin-1")},
            json={"prompt": "x"},
        ) as resp:
            assert resp.status == 400
    assert upstream.sim.generation_requests() == []


async def test_keys_are_scoped_per_team(gateway: Gateway, upstream: Upstream) -> None:
    key = {"Idempotency-Key": "shared"}
    await post(gateway, headers=key)
    status, _, headers = await post(gateway, team="ops", headers=key)
    assert status == 200 and "Idempotent-Replayed" not in headers
    assert len(upstream.sim.generation_requests()) == 2


async def test_validation_failure_and_budget_refusal_store_nothing(
    gateway: Gateway, upstream: Upstream, tmp_path
) -> None:
    key = {"Idempotency-Key": "k3"}
    assert (await post(gateway, headers=key, n=99))[0] == 400
    broke = build_settings(tmp_path, upstream.url, teams={"design": {"budget_cny": 0.0}})
    gateway.app[CONFIG].reload(broke)
    assert (await post(gateway, headers=key))[0] == 402
    gateway.app[CONFIG].reload(gateway.settings)
    assert (await post(gateway, headers=key))[0] == 200
    assert (await post(gateway, headers=key))[2]["Idempotent-Replayed"] == "true"


async def test_upstream_refusal_is_stored_and_replayed(
    gateway: Gateway, upstream: Upstream
) -> None:
    key = {"Idempotency-Key": "k4"}
    upstream.faults.add(json_error(400, "invalid_request_error", "Rejected by the safety system."))
    first = await post(gateway, headers=key)
    second = await post(gateway, headers=key)
    assert first[0] == second[0] == 400
    assert first[1] == second[1]
    assert second[2]["x-should-retry"] == "false"
    assert upstream.faults.seen == 1


async def test_replays_survive_restart_and_expire(start_gateway, upstream: Upstream) -> None:
    key = {"Idempotency-Key": "k5"}
    first_gateway = await start_gateway()
    first = await post(first_gateway, headers=key)
    await first_gateway.server.close()
    second_gateway = await start_gateway()
    replay = await post(second_gateway, headers=key)
    assert replay[1] == first[1] and replay[2]["Idempotent-Replayed"] == "true"
    second_gateway.clock.advance(hours=25)
    fresh = await post(second_gateway, headers=key)
    assert "Idempotent-Replayed" not in fresh[2]
    assert len(upstream.sim.generation_requests()) == 2


# -- the retry rule at the socket level -------------------------------------------------------


class _Refused:
    async def __aenter__(self) -> None:
        raise aiohttp.ClientConnectionResetError("reset before anything was written")

    async def __aexit__(self, *exc: object) -> None:
        return None


class _Answer:
    status = 200
    headers: dict[str, str] = {}

    async def __aenter__(self) -> _Answer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    class content:
        @staticmethod
        async def iter_any() -> Any:
            yield b'{"created": 1, "data": [{"url": "https://x.test/1.png"}]}'


class _Session:
    """Answers ``post`` with a reset the first time (no header was sent), then a success."""

    def __init__(self) -> None:
        self.calls = 0

    def post(self, url: str, **kwargs: Any) -> Any:
        self.calls += 1
        return _Refused() if self.calls == 1 else _Answer()


async def test_reset_before_any_byte_was_sent_is_retried() -> None:
    session = _Session()
    sleeps: list[float] = []

    async def no_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    client = HttpUpstream(
        UpstreamConfig(base_url="https://u.test", api_key=Secret("sk_x")),
        session,  # type: ignore[arg-type]
        sleep=no_sleep,
    )
    request = normalize({"prompt": "x"}, [], endpoint="generations", rules=Rules(1024, {}))
    reply = await client.submit("/v1/images/generations", upstream_body(request), {})
    assert (session.calls, reply.attempts, len(sleeps)) == (2, 2, 1)
