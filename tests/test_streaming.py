"""JSON bodies are checked while they stream in: every refusal still comes before anything is
sent upstream, and too many references are refused before the body has even arrived."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.conftest import PNG, Gateway, Upstream

pytestmark = pytest.mark.engines("memory")  # services above the store; engines: test_store.py

IMAGE = base64.b64encode(PNG + bytes(3000)).decode()  # past the prefix: streamed, not decoded


async def post_stream(gateway: Gateway, chunks: AsyncIterator[bytes]) -> tuple[int, dict]:
    headers = {**gateway.headers(), "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway.url + "/v1/images/edits", headers=headers, data=chunks
        ) as resp:
            return resp.status, await resp.json()


async def pieces(*parts: str, size: int = 1000) -> AsyncIterator[bytes]:
    raw = "".join(parts).encode()
    for start in range(0, len(raw), size):
        yield raw[start : start + size]


async def test_body_over_the_limit_is_413_while_streaming(
    start_gateway, upstream: Upstream
) -> None:
    gateway = await start_gateway(server={"max_body_mb": 0.02, "max_image_mb": 1})
    body = pieces('{"prompt": "x", "image_urls": ["data:image/png;base64,', IMAGE * 8, '"]}')
    status, answer = await post_stream(gateway, body)
    assert status == 413 and answer["error"]["code"] == "payload_too_large"
    assert upstream.sim.generation_requests() == []


async def test_bad_base64_is_400_naming_the_entry(gateway: Gateway, upstream: Upstream) -> None:
    good = f'"data:image/png;base64,{IMAGE}"'
    for bad, param in (
        (f'"data:image/png;base64,{IMAGE[:1500]}!{IMAGE[1500:]}"', "image_urls[1]"),
        (f'"data:image/gif;base64,{IMAGE}A"', "image_urls[1]"),  # one character too many
        (f'"data:image\\/png;base64,{IMAGE[:-4]}=AAA"', "image_urls[1]"),  # data after padding
    ):
        status, answer = await post_stream(
            gateway, pieces(f'{{"prompt": "x", "image_urls": [{good}, {bad}]}}', size=700)
        )
        assert status == 400, answer
        assert answer["error"]["param"] == param
        assert "not valid base64" in answer["error"]["message"]
    assert upstream.sim.generation_requests() == []


async def test_oversized_image_is_refused_while_streaming(
    start_gateway, upstream: Upstream
) -> None:
    gateway = await start_gateway(server={"max_image_mb": 0.002})
    status, answer = await post_stream(
        gateway,
        pieces(
            '{"images": [{"image_url": "data:image/png;base64,', IMAGE * 2, '"}], "prompt": "x"}'
        ),
    )
    assert status == 413 and answer["error"]["param"] == "images[0]"
    assert answer["error"]["code"] == "payload_too_large"
    assert "larger than" in answer["error"]["message"]
    assert upstream.sim.generation_requests() == []


async def test_streamed_references_reach_the_upstream_unchanged(
    gateway: Gateway, upstream: Upstream
) -> None:
    url = f"data:image/png;base64,{IMAGE}"
    escaped = url.replace("/", "\\/")  # as PHP's json_encode writes it
    body = f'{{"prompt": "x", "image_urls": ["{url}", "https://a.example/b.png", "{escaped}"]}}'
    status, _ = await post_stream(gateway, pieces(body, size=333))
    assert status == 200
    (sent,) = upstream.sim.generation_requests()
    assert sent.body["image_urls"] == [url, "https://a.example/b.png", url]


async def test_too_many_references_are_refused_before_the_body_ends(
    start_gateway, upstream: Upstream
) -> None:
    """Issue 12, item 12: count before decoding, refuse as early as the stream allows.

    The client streams tiny references until it has an answer (or 4 MB, the body limit); each
    one is invalid, so checking any would name it instead of the count.
    """
    gateway = await start_gateway(server={"max_body_mb": 4})
    answered = asyncio.Event()
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"prompt": "x", "image_urls": ['
        batch = b'"data:image/png;base64,!!!!",' * 1000
        while not answered.is_set() and sent < 5 * 1024 * 1024:
            sent += len(batch)
            yield batch
            await asyncio.sleep(0)  # let the answer in
        yield b'"x"]}'

    headers = {**gateway.headers(), "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway.url + "/v1/images/edits", headers=headers, data=endless()
        ) as resp:
            answered.set()
            status, answer = resp.status, await resp.json()
    assert status == 400, answer
    assert answer["error"]["param"] == "image_urls"
    assert "At most 16" in answer["error"]["message"]
    assert sent < 4 * 1024 * 1024  # refused long before the body (or its limit) ended
    assert upstream.sim.generation_requests() == []
