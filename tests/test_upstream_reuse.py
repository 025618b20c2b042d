"""POSTs on pooled upstream connections (issue 26): reused only while recently used, so an
upstream that closes idle connections never turns a generation uncertain or buys it twice.

Each case runs generations from several clients at once with idle gaps spread across the
upstream's idle timeout, then checks that some POSTs did ride pooled connections (fewer
connections than requests), that no hold is uncertain, that every prompt was generated exactly
once, and that the books balance.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from gateway.core.config import Secret, UpstreamConfig
from gateway.upstream.client import HttpUpstream
from gateway.upstream.connector import UpstreamConnector
from tests.conftest import Gateway, Upstream, books_balance
from tests.fakes import IdleTimeoutFront

CLIENTS = 6
PER_CLIENT = 8


async def load(gateway: Gateway, idle_s: float, seed: int) -> list[tuple[str, int, Any]]:
    """CLIENTS clients, each sending PER_CLIENT generations, every other one after a gap close
    to ``idle_s`` (where a reused connection races the upstream's close), the others soon."""
    rng = random.Random(seed)
    outcomes: list[tuple[str, int, Any]] = []

    async def client(number: int, gaps: list[float]) -> None:
        async with aiohttp.ClientSession() as http:
            for i, gap in enumerate(gaps):
                prompt = f"client {number} #{i}"
                async with http.post(
                    gateway.url + "/v1/images/generations",
                    headers=gateway.headers(),
                    json={"prompt": prompt},
                ) as resp:
                    outcomes.append((prompt, resp.status, (await resp.json()).get("error")))
                await asyncio.sleep(gap)  # idle between generations, as real clients are

    plans = [
        [rng.uniform(0.9, 1.1) * idle_s if i % 2 else rng.uniform(0, 0.2) * idle_s
         for i in range(PER_CLIENT)]
        for _ in range(CLIENTS)
    ]  # fmt: skip
    await asyncio.gather(*(client(n, plan) for n, plan in enumerate(plans)))
    return outcomes


async def assert_each_generated_once(
    gateway: Gateway, upstream: Upstream, outcomes: list[tuple[str, int, Any]]
) -> None:
    assert [o for o in outcomes if o[1] != 200] == []
    prompts = [r.body["prompt"] for r in upstream.sim.generation_requests() if r.body]
    assert sorted(prompts) == sorted(p for p, _, _ in outcomes)  # each exactly once
    states = [e.state for e in await gateway.ledger()]
    assert [s for s in states if s != "captured"] == []  # nothing uncertain, nothing held
    await books_balance(gateway, upstream)


def counting_connections(seen: set[object], keep_alive: str | None) -> Any:
    """Middleware: keeps each connection (its transport) a request arrived on, so no two are
    confused by a reused id; announces ``keep_alive``."""

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        seen.add(request.transport)
        response = await handler(request)
        if keep_alive is not None:
            response.headers["Keep-Alive"] = keep_alive
        return response

    return middleware


@pytest.mark.parametrize(
    ("idle_s", "announced", "reuse_idle_s", "reused"),
    [
        (1.0, None, None, True),  # says nothing: the suite's window (0.5 s) is under its timeout
        (1.0, "timeout=1", 2.0, True),  # the production default, narrowed by what it announces
        (0.1, "timeout=0.1", 2.0, False),  # under 1 s: no reuse at all
    ],
)
async def test_an_upstream_closing_idle_connections_never_makes_a_post_uncertain(
    start_gateway: Any,
    upstream: Upstream,
    aiohttp_server: Any,
    idle_s: float,
    announced: str | None,
    reuse_idle_s: float | None,
    reused: bool,
) -> None:
    """An upstream that closes (FIN) connections idle for ``idle_s``, as nginx does."""
    connections: set[object] = set()
    app = upstream.sim.app(
        middlewares=[counting_connections(connections, announced), upstream.faults.middleware]
    )
    server: TestServer = await aiohttp_server(app, keepalive_timeout=idle_s)
    extra = {} if reuse_idle_s is None else {"reuse_idle_s": reuse_idle_s}
    gateway = await start_gateway(
        upstream={"base_url": str(server.make_url("")).rstrip("/"), **extra}
    )
    outcomes = await load(gateway, idle_s, seed=26)
    await assert_each_generated_once(gateway, upstream, outcomes)
    assert (len(connections) < len(outcomes)) is reused  # POSTs rode pooled connections, or not


# 0.4, not less: the window is half the timeout, and a margin of 50 ms (at 0.1) was lost
# whenever the test process was descheduled that long (four workers on two cores).
@pytest.mark.parametrize("idle_s", [1.0, 0.4])
async def test_a_balancer_dropping_idle_flows_never_makes_a_post_uncertain(
    start_gateway: Any, upstream: Upstream, idle_s: float
) -> None:
    """A balancer that silently drops flows idle for ``idle_s`` (no FIN, a reset on the next
    request): only a window under its timeout keeps POSTs off dead connections."""
    front = IdleTimeoutFront(urlsplit(upstream.url).port or 0, idle_s=idle_s)
    port = await front.start()
    try:
        gateway = await start_gateway(
            upstream={"base_url": f"http://127.0.0.1:{port}", "reuse_idle_s": idle_s / 2}
        )
        outcomes = await load(gateway, idle_s, seed=14)
    finally:
        await front.close()
    await assert_each_generated_once(gateway, upstream, outcomes)
    assert front.refused == 0
    assert front.connections < len(outcomes)


async def test_reuse_off_opens_a_connection_per_post(upstream: Upstream) -> None:
    """``reuse_idle_s = 0``: every POST on a new connection, as before the window existed."""
    config = UpstreamConfig(base_url=upstream.url, api_key=Secret("k"), reuse_idle_s=0)
    session = HttpUpstream.new_session()
    try:
        HttpUpstream(config, session)  # names its origin's window: 0
        connector = session.connector
        assert isinstance(connector, UpstreamConnector)
        for _ in range(3):
            async with session.post(upstream.url + "/v1/images/generations", json={}) as resp:
                await resp.read()
        assert (connector.reused, connector.fresh) == (0, 3)
    finally:
        await session.close()


async def test_the_window_narrows_to_half_the_announced_timeout() -> None:
    connector = UpstreamConnector()
    origin, other = URL("https://upstream.example"), URL("https://other.example:8443")
    connector.reuse(str(origin), 2.0)
    connector.reuse(str(other), 2.0)
    for header, window in [
        ({}, 2.0),
        ({"Keep-Alive": "max=100"}, 2.0),
        ({"Keep-Alive": "timeout=5, max=1000"}, 2.0),
        ({"Keep-Alive": "timeout=3"}, 1.5),
        ({"Keep-Alive": "timeout=x"}, 1.5),
        ({"Keep-Alive": "max=9, timeout=1"}, 0.5),
        ({"Keep-Alive": "timeout=60"}, 0.5),  # the smaller wins, for good
        ({"Keep-Alive": "timeout=0.9"}, 0.0),  # under a second: no reuse
    ]:
        connector.learn(origin.with_path("/v1/images/generations"), header)
        assert connector.window_s(origin) == window, header
    assert connector.window_s(other) == 2.0  # each upstream origin learns on its own
    assert connector.window_s(URL("https://never-named.example")) == 0.0  # a new connection
    await connector.close()
