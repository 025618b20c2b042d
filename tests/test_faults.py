"""The fault matrix: what the upstream and the network can do, and what it costs (nothing, or an
uncertain hold; never a silent refund, never a blind second purchase).

Each case checks the upstream call count, the status and ``x-should-retry``, and the ledger.
"""

from __future__ import annotations

import asyncio
import base64
import socket
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.core.periods import period_at
from gateway.http.keys import GENERATIONS
from tests.client import post
from tests.conftest import UPSTREAM_KEY, Gateway, Upstream
from tests.fakes import (
    IdleTimeoutFront,
    gate,
    hang,
    html_error,
    json_error,
    malformed_json,
    reset_after_read,
    reset_mid_body,
    truncated_body,
)

pytestmark = pytest.mark.engines("memory")  # services above the store; engines: test_store.py

MODES = ["sync", "async"]


ASYNC = {"sync": "", "async": "?async=1"}


async def ledger(gateway: Gateway) -> list[tuple[str, int]]:
    return [(e.state, e.settled_amount) for e in await gateway.ledger()]


async def committed(gateway: Gateway) -> tuple[int, int, int]:
    period = period_at("monthly", gateway.clock(), gateway.settings.server.tz)
    usage = await gateway.db.usage("design", period.key)
    return usage.spent, usage.reserved, usage.uncertain


async def last_log(gateway: Gateway) -> dict[str, Any]:
    return (await gateway.log_lines())[-1]


@pytest.fixture
def closed_port() -> int:
    """A loopback port with nothing listening (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("mode", MODES)
async def test_upstream_down_is_retried_then_costs_nothing(
    start_gateway, closed_port: int, mode: str
) -> None:
    gateway = await start_gateway(upstream={"base_url": f"http://127.0.0.1:{closed_port}"})
    status, body, headers = await post(gateway, suffix=ASYNC[mode])
    assert status == 502
    assert body["error"]["code"] == "upstream_unreachable"
    assert "x-should-retry" not in headers  # nothing was sent: a client retry is safe
    assert (await last_log(gateway))["attempts"] == 2
    assert await ledger(gateway) == [("released", 0)]
    assert await committed(gateway) == (0, 0, 0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        (reset_after_read, 502, "upstream_connection_lost"),
        (truncated_body, 502, "upstream_connection_lost"),
        (malformed_json, 502, "upstream_bad_response"),
        (lambda: html_error(502), 502, "upstream_bad_gateway"),
        (lambda: html_error(504), 504, "upstream_bad_gateway"),
        (lambda: html_error(500), 502, "upstream_bad_gateway"),
        (hang, 504, "upstream_timeout"),
    ],
)
async def test_unknown_outcome_is_never_retried_and_stays_uncertain(
    start_gateway, upstream: Upstream, mode: str, fault: Any, status: int, code: str
) -> None:
    gateway = await start_gateway(upstream={"timeout_s": 0.5})
    upstream.faults.add(fault())
    got, body, headers = await post(gateway, suffix=ASYNC[mode], quality="high")
    assert (got, body["error"]["code"]) == (status, code)
    assert headers["x-should-retry"] == "false"
    ledger_id = (await last_log(gateway))["ledger_id"]
    assert f"ledger id {ledger_id}" in body["error"]["message"]  # what the admin resolves
    assert upstream.faults.seen == 1  # never sent twice
    assert await ledger(gateway) == [("uncertain", 4000)]
    assert await committed(gateway) == (0, 0, 4000)


BIG_REFERENCE = (
    "data:image/png;base64,"
    + base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(12 * 1024 * 1024)).decode()
)  # more than loopback's socket buffers hold: the upload blocks until it is read


async def test_a_reset_before_the_body_was_all_written_never_started_and_is_retried(
    gateway: Gateway, upstream: Upstream
) -> None:
    upstream.faults.add(reset_mid_body())
    status, body, _ = await post(gateway, image_urls=[BIG_REFERENCE])
    assert status == 200, body
    assert upstream.faults.seen == 2  # the first never arrived whole; the second did
    assert len(upstream.sim.generation_requests()) == 1
    assert (await last_log(gateway))["attempts"] == 2
    assert await ledger(gateway) == [("captured", 2000)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "refusal",
    [
        lambda: json_error(429, "rate_limit_error", "slow down", retry_after="0"),
        lambda: json_error(503, "server_error", "busy", retry_after="0"),
        lambda: html_error(503, retry_after="0"),
    ],
)
async def test_refusal_to_start_with_retry_after_is_retried(
    gateway: Gateway, upstream: Upstream, mode: str, refusal: Any
) -> None:
    upstream.faults.add(refusal())
    status, _, _ = await post(gateway, suffix=ASYNC[mode])
    assert status == (202 if mode == "async" else 200)
    assert upstream.faults.seen == 2
    assert len(upstream.sim.generation_requests()) == 1
    assert (await last_log(gateway))["attempts"] == 2
    assert await ledger(gateway) == [("captured", 2000) if mode == "sync" else ("held", 0)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("refusal", "status"),
    [
        (lambda: json_error(429, "rate_limit_error", "slow down"), 429),
        (lambda: json_error(429, "rate_limit_error", "slow down", retry_after="3600"), 429),
        (lambda: json_error(503, "server_error", "busy"), 503),
        (lambda: json_error(500, "server_error", "generation failed"), 500),
        (lambda: json_error(400, "invalid_request_error", "content policy"), 400),
    ],
)
async def test_refusals_without_a_usable_retry_after_are_passed_on_and_released(
    gateway: Gateway, upstream: Upstream, mode: str, refusal: Any, status: int
) -> None:
    upstream.faults.add(refusal())
    got, body, headers = await post(gateway, suffix=ASYNC[mode])
    assert got == status
    assert body["error"]["message"] in ("slow down", "busy", "generation failed", "content policy")
    assert upstream.faults.seen == 1
    assert await ledger(gateway) == [("released", 0)]
    if status == 400:
        assert headers["x-should-retry"] == "false"


async def test_twice_refused_gives_up_after_max_attempts(
    gateway: Gateway, upstream: Upstream
) -> None:
    for _ in range(2):
        upstream.faults.add(json_error(503, "server_error", "busy", retry_after="0"))
    status, _, _ = await post(gateway)
    assert status == 503
    assert upstream.faults.seen == 2
    assert await ledger(gateway) == [("released", 0)]


async def test_upstream_rejecting_the_central_key_is_not_a_team_auth_error(
    gateway: Gateway, upstream: Upstream
) -> None:
    upstream.faults.add(json_error(401, "authentication_error", "Invalid API key."))
    status, body, _ = await post(gateway)
    assert status == 502
    assert body["error"]["code"] == "upstream_auth_failed"
    assert await ledger(gateway) == [("released", 0)]


async def test_slow_upload_reserves_nothing_until_the_body_is_complete(
    gateway: Gateway, upstream: Upstream
) -> None:
    more = asyncio.Event()
    first_chunk_sent = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b'{"prompt": "a slow'
        first_chunk_sent.set()
        await more.wait()
        yield b' upload"}'

    async with aiohttp.ClientSession() as http:
        request = asyncio.create_task(
            http.post(
                gateway.url + "/v1/images/generations",
                headers={**gateway.headers(), "Content-Type": "application/json"},
                data=body(),
            )
        )
        await first_chunk_sent.wait()
        assert await ledger(gateway) == []
        assert upstream.sim.received == []
        more.set()
        async with await request as resp:
            assert resp.status == 200
    assert await ledger(gateway) == [("captured", 2000)]


@pytest.mark.parametrize("mode", MODES)
async def test_client_disconnect_does_not_stop_the_generation(
    gateway: Gateway, upstream: Upstream, mode: str
) -> None:
    release, arrived = asyncio.Event(), asyncio.Event()
    upstream.faults.add(gate(release, arrived))
    request = asyncio.create_task(post(gateway, suffix=ASYNC[mode]))
    await arrived.wait()
    request.cancel()  # the client goes away mid-request
    with pytest.raises(asyncio.CancelledError):
        await request
    running = list(gateway.app[GENERATIONS]._by_request.values())
    assert len(running) == 1
    release.set()
    outcome = await running[0].ready
    assert outcome.status == (202 if mode == "async" else 200)
    if mode == "sync":
        assert await ledger(gateway) == [("captured", 2000)]
        status, body, headers = await post(gateway, headers={"x-stainless-retry-count": "1"})
        assert status == 200 and headers["X-Gateway-Deduplicated"] == outcome.request_id
        assert body == outcome.payload
        assert len(upstream.sim.generation_requests()) == 1
    else:
        assert (await gateway.db.task(outcome.task_id)).status == "pending"
        assert await ledger(gateway) == [("held", 0)]  # reserved until the task ends


async def test_an_upstream_message_never_carries_the_central_key_to_a_team(
    gateway: Gateway, upstream: Upstream
) -> None:
    upstream.faults.add(
        json_error(400, "invalid_request_error", f"bad request for key {UPSTREAM_KEY}")
    )
    status, body, _ = await post(gateway)
    assert status == 400
    assert body["error"]["message"] == "bad request for key sk_…"


IDLE_S = 1.0  # the upstream side's idle timeout; the gateway's pool keeps connections for 15 s


@pytest.mark.parametrize(
    ("closer", "gaps"),
    [
        # Deterministic: every pooled connection is dead when the next wave reuses it.
        ("balancer drops idle flows", (1.02, 1.04, 1.06, 1.08)),
        # nginx-like: the upstream closes (FIN) exactly at 1 s; spacing around it hunts the race.
        ("upstream keepalive_timeout", (0.98, 1.0, 1.01, 1.03)),
    ],
)
async def test_a_short_upstream_idle_timeout_never_makes_an_unsent_request_uncertain(
    start_gateway,
    upstream: Upstream,
    aiohttp_server: Any,
    closer: str,
    gaps: tuple[float, ...],
) -> None:
    """40 generations in waves spaced at the upstream's idle timeout, none on a stale connection.

    A POST sent on a pooled connection that the far side has just closed breaks after its bytes
    left, so it would be held as uncertain although the upstream never received it.
    """
    front: IdleTimeoutFront | None = None
    if closer == "balancer drops idle flows":
        front = IdleTimeoutFront(urlsplit(upstream.url).port or 0, idle_s=IDLE_S)
        base_url = f"http://127.0.0.1:{await front.start()}"
    else:
        app = upstream.sim.app(middlewares=[upstream.faults.middleware])
        server: TestServer = await aiohttp_server(app, keepalive_timeout=IDLE_S)
        base_url = str(server.make_url("")).rstrip("/")
    try:
        gateway = await start_gateway(upstream={"base_url": base_url})
        outcomes: list[tuple[str, int, str | None]] = []

        async def generate(prompt: str, mode: str) -> None:
            status, body, _ = await post(gateway, suffix=ASYNC[mode], prompt=prompt)
            outcomes.append((prompt, status, body.get("error", {}).get("code")))

        for wave in range(len(gaps) + 1):
            await asyncio.gather(*(generate(f"wave {wave} #{i}", MODES[i % 2]) for i in range(8)))
            if wave < len(gaps):
                await asyncio.sleep(gaps[wave])  # idle, as between real generations
    finally:
        if front is not None:
            await front.close()

    received = {r.body["prompt"] for r in upstream.sim.generation_requests() if r.body}
    never_received = [(p, code) for p, status, code in outcomes if code and p not in received]
    assert never_received == [], f"{len(never_received)} of {len(outcomes)} failed unsent"
    assert sorted(status for _, status, _ in outcomes) == [200] * 20 + [202] * 20
    assert len(upstream.sim.generation_requests()) == 40
    assert [state for state, _ in await ledger(gateway)].count("uncertain") == 0
