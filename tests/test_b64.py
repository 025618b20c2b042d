"""``b64_json`` for clients written for gpt-image-1: downloads only from the upstream's own hosts."""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.http.keys import RESULTS
from gateway.upstream.pngs import solid_png
from tests.conftest import Gateway, Upstream
from tests.fakes import respond

pytestmark = pytest.mark.engines("memory")  # services above the store; engines: test_store.py


async def evil_server(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> tuple[TestServer, list[str]]:
    """A server the gateway must never fetch from; it records every hit."""
    hits: list[str] = []

    async def anything(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(body=solid_png(2, 2, (255, 0, 0)), content_type="image/png")

    app = web.Application()
    app.router.add_get("/{tail:.*}", anything)
    return await aiohttp_server(app), hits


async def fetch(url: str) -> bytes:
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as resp:
            return await resp.read()


async def test_b64_json_decodes_to_the_served_png(gateway: Gateway, upstream: Upstream) -> None:
    result = await gateway.async_openai().images.generate(
        prompt="x", n=2, response_format="b64_json"
    )
    assert len(result.data) == 2
    await gateway.settled()
    stored = await gateway.stored_results()
    urls = [item["url"] for item in json.loads(stored[0])["data"]]
    for item, url in zip(result.data, urls, strict=True):
        assert item.url is None
        assert base64.b64decode(item.b64_json) == await fetch(url)
    assert "response_format" not in upstream.sim.generation_requests()[0].body


async def test_team_default_response_format(start_gateway, upstream: Upstream) -> None:
    gateway = await start_gateway(teams={"design": {"default_response_format": "b64_json"}})
    client = gateway.async_openai()
    implicit = await client.images.generate(prompt="x", model="gpt-image-1")
    assert implicit.data[0].b64_json and implicit.data[0].url is None
    explicit = await client.images.generate(prompt="x", response_format="url")
    assert explicit.data[0].url and explicit.data[0].b64_json is None


async def test_hostile_result_url_is_never_fetched(
    gateway: Gateway, upstream: Upstream, aiohttp_server
) -> None:
    server, hits = await evil_server(aiohttp_server)
    evil = f"http://localhost:{server.port}/steal.png"  # another host name, not the upstream's
    upstream.faults.add(respond({"created": 1, "id": "u1", "data": [{"url": evil}]}))
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway.url + "/v1/images/generations",
            headers=gateway.headers(),
            json={"prompt": "x", "response_format": "b64_json"},
        ) as resp:
            assert resp.status == 200
            body = await resp.json()
            assert "not an upstream host" in resp.headers["X-Gateway-Warning"]
    assert body["data"] == [{"url": evil}]  # paid for: the client still gets it
    assert hits == []


async def test_redirect_to_a_foreign_host_is_not_followed(
    gateway: Gateway, upstream: Upstream, aiohttp_server
) -> None:
    server, hits = await evil_server(aiohttp_server)

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://localhost:{server.port}/x.png")

    redirector = web.Application()
    redirector.router.add_get("/{tail:.*}", redirect)
    bouncer = await aiohttp_server(redirector)
    url = f"http://127.0.0.1:{bouncer.port}/v1/images/files/gpt-image-2/20260101/a-1.png"
    upstream.faults.add(respond({"created": 1, "id": "u1", "data": [{"url": url}]}))
    result = await gateway.async_openai().images.generate(prompt="x", response_format="b64_json")
    assert result.data[0].url == url and result.data[0].b64_json is None
    assert hits == []


async def test_download_size_cap(start_gateway, upstream: Upstream) -> None:
    gateway = await start_gateway(upstream={"download_max_mb": 0.00001})
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway.url + "/v1/images/generations",
            headers=gateway.headers(),
            json={"prompt": "x", "response_format": "b64_json"},
        ) as resp:
            assert resp.status == 200
            assert "larger than" in resp.headers["X-Gateway-Warning"]
            assert (await resp.json())["data"][0]["url"]


async def test_proxy_results_serves_images_through_the_gateway(
    start_gateway, upstream: Upstream
) -> None:
    gateway = await start_gateway(upstream={"proxy_results": True})
    client = gateway.async_openai()
    result = await client.images.generate(prompt="x", n=2)
    await gateway.settled()
    stored = json.loads((await gateway.stored_results())[0])
    for item, original in zip(result.data, stored["data"], strict=True):
        assert item.url.startswith(gateway.url + "/v1/images/files/gpt-image-2/")
        assert item.url.removeprefix(gateway.url) == original["url"].removeprefix(upstream.url)
        async with aiohttp.ClientSession() as http:  # no key: the URL is the credential
            async with http.get(item.url) as resp:
                assert resp.status == 200 and resp.content_type == "image/png"
                assert await resp.read() == await fetch(original["url"])
    log = gateway.access_log.read_text()
    assert original["url"].removeprefix(upstream.url) not in log
    files = [line for line in (await gateway.log_lines()) if line["endpoint"] == "files"]
    assert len(files) == 2 and files[0]["path"] == "/v1/images/files/…" and files[0]["result_ids"]


async def test_proxy_results_rewrites_task_answers(start_gateway, upstream: Upstream) -> None:
    gateway = await start_gateway(upstream={"proxy_results": True})
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway.url + "/v1/images/generations?async=1",
            headers=gateway.headers(),
            json={"prompt": "x"},
        ) as resp:
            task_id = (await resp.json())["task_id"]
        upstream.sim.finish_task(task_id)
        async with http.get(
            gateway.url + f"/v1/images/tasks/{task_id}", headers=gateway.headers()
        ) as resp:
            answer = await resp.json()
        assert answer["result_url"].startswith(gateway.url + "/v1/images/files/")
        assert answer["data"] == [{"url": answer["result_url"]}]
        async with http.get(answer["result_url"]) as resp:
            assert (await resp.read()).startswith(b"\x89PNG")


async def test_result_files_route_is_off_by_default(gateway: Gateway, upstream: Upstream) -> None:
    result = await gateway.async_openai().images.generate(prompt="x")
    assert result.data[0].url.startswith(upstream.url)
    await gateway.app[RESULTS].idle()  # the store has kept the image (one GET of its own)
    before = len(upstream.sim.received)
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.url + "/v1/images/files/gpt-image-2/20260101/x-1.png") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "not_found"
    assert len(upstream.sim.received) == before  # nothing was fetched upstream
