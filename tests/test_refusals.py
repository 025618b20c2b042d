"""Every invalid request is refused with an OpenAI-shaped 4xx before anything reaches the upstream."""

from __future__ import annotations

import asyncio
import base64
import io

import aiohttp
import openai
import pytest

from tests.client import assert_openai_error, post
from tests.conftest import PNG, Gateway, Upstream

pytestmark = pytest.mark.engines("memory")  # services above the store; engines: test_store.py

GOOD = {"model": "gpt-image-2", "prompt": "a cat"}
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"model": "dall-e-9"}, "model"),
        ({"model": 3}, "model"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"prompt": ["a"]}, "prompt"),
        ({"n": 0}, "n"),
        ({"n": 11}, "n"),
        ({"n": "2"}, "n"),
        ({"n": True}, "n"),
        ({"n": 1.5}, "n"),
        ({"size": "999:1"}, "size"),
        ({"size": "0x100"}, "size"),
        ({"size": "big"}, "size"),
        ({"resolution": "4k"}, "resolution"),
        ({"quality": "ultra"}, "quality"),
        ({"quality": "xhigh"}, "quality"),
        ({"response_format": "png"}, "response_format"),
        ({"stream": True}, "stream"),
        ({"mask": "x"}, "mask"),
        ({"image_urls": "https://example.com/a.png"}, "image_urls"),
        ({"image_urls": ["http://example.com/a.png"]}, "image_urls[0]"),
        ({"image_urls": ["https://"]}, "image_urls[0]"),
        ({"image_urls": [DATA_URL, "ftp://x/y.png"]}, "image_urls[1]"),
        ({"image_input": ["data:image/png;base64,!!!notbase64"]}, "image_input[0]"),
        ({"image_input": ["data:image/tiff;base64,AAAA"]}, "image_input[0]"),
        ({"image_input": ["data:image/png;base64,"]}, "image_input[0]"),
        ({"image_urls": [42]}, "image_urls[0]"),
        ({"image_urls": [DATA_URL] * 10, "image_input": [DATA_URL] * 7}, "image_urls"),
        ({"images": [{"file_id": "file-123"}]}, "images[0]"),
    ],
)
async def test_invalid_json_fields(
    gateway: Gateway, upstream: Upstream, change: dict, param: str
) -> None:
    payload = {**GOOD, **change}
    if change.get("prompt", "") is None:
        del payload["prompt"]
    status, body, headers = await post(gateway, payload=payload)
    assert status == 400
    assert_openai_error(body, param=param)
    assert headers["x-should-retry"] == "false"
    assert upstream.sim.generation_requests() == []


async def test_unknown_size_lists_supported_values(gateway: Gateway) -> None:
    _, body, _ = await post(gateway, payload={**GOOD, "size": "7:3"})
    assert "16:9" in body["error"]["message"] and "auto" in body["error"]["message"]


@pytest.mark.parametrize(
    ("raw", "ctype", "status"),
    [
        (b"", "application/json", 400),
        (b"{", "application/json", 400),
        (b"[1, 2]", "application/json", 400),
        (b"\xff\xfe{}", "application/json", 400),
        (b"[" * 100_000, "application/json", 400),
        (b'{"prompt": "x", "n": 1' + b"0" * 5000 + b"}", "application/json", 400),
        (b"prompt=x", "text/plain", 415),
        (b"prompt=x", "", 415),
    ],
)
async def test_malformed_bodies(
    gateway: Gateway, upstream: Upstream, raw: bytes, ctype: str, status: int
) -> None:
    headers = {**gateway.headers(), "Content-Type": ctype} if ctype else gateway.headers()
    async with aiohttp.ClientSession(skip_auto_headers=["Content-Type"]) as http:
        async with http.post(
            gateway.url + "/v1/images/generations", data=raw, headers=headers
        ) as resp:
            assert resp.status == status
            assert_openai_error(await resp.json())
    assert upstream.sim.generation_requests() == []


async def test_multipart_mask_and_non_image_upload(gateway: Gateway, upstream: Upstream) -> None:
    client = gateway.openai()
    image = io.BytesIO(PNG)
    image.name = "a.png"
    with pytest.raises(openai.BadRequestError) as excinfo:
        await asyncio.to_thread(client.images.edit, image=image, mask=PNG, prompt="x")
    assert excinfo.value.body["param"] == "mask"
    assert "mask" in excinfo.value.body["message"]
    with pytest.raises(openai.BadRequestError) as excinfo:
        await asyncio.to_thread(
            client.images.edit, image=[PNG, b"%PDF-1.4 not an image"], prompt="x"
        )
    assert excinfo.value.body["param"] == "image[1]"
    assert upstream.sim.generation_requests() == []


async def test_seventeen_uploads(gateway: Gateway, upstream: Upstream) -> None:
    form = aiohttp.FormData()
    form.add_field("prompt", "x")
    for index in range(17):
        form.add_field("image[]", PNG, filename=f"{index}.png", content_type="image/png")
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway.url + "/v1/images/edits", headers=gateway.headers(), data=form
        ) as resp:
            assert resp.status == 400
            assert_openai_error(await resp.json())
    assert upstream.sim.generation_requests() == []


@pytest.mark.parametrize(
    "authorization", [None, "Bearer ", "Bearer igw_wrong", "Basic abc", "igw_x"]
)
async def test_auth_failures(
    gateway: Gateway, upstream: Upstream, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway.url + "/v1/images/generations", headers=headers, data=b"not even json"
        ) as resp:
            assert resp.status == 401
            assert assert_openai_error(await resp.json())["type"] == "authentication_error"
    assert upstream.sim.received == []


async def test_sdk_sees_authentication_error(gateway: Gateway) -> None:
    client = gateway.async_openai()
    client.api_key = "igw_not_a_real_key"
    with pytest.raises(openai.AuthenticationError):
        await client.images.generate(prompt="x")


async def test_body_over_limit_is_413(start_gateway, upstream: Upstream) -> None:
    gateway = await start_gateway(server={"max_body_mb": 0.01, "max_image_mb": 0.005})
    status, body, _ = await post(gateway, payload={**GOOD, "prompt": "x" * 20_000})
    assert status == 413
    assert_openai_error(body)
    form = aiohttp.FormData()
    form.add_field("prompt", "x")
    form.add_field("image", PNG + b"\x00" * 8000, filename="big.png", content_type="image/png")
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway.url + "/v1/images/edits", headers=gateway.headers(), data=form
        ) as resp:
            assert resp.status == 413
            assert "image" in (await resp.json())["error"]["message"]
    assert upstream.sim.generation_requests() == []


async def test_chunked_body_over_limit_is_413(start_gateway, upstream: Upstream) -> None:
    gateway = await start_gateway(server={"max_body_mb": 0.01})

    async def chunks():
        for _ in range(100):
            yield b"x" * 1024

    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway.url + "/v1/images/generations",
            headers={**gateway.headers(), "Content-Type": "application/json"},
            data=chunks(),
        ) as resp:
            assert resp.status == 413
    assert upstream.sim.generation_requests() == []


async def test_unknown_route_and_method(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(
            gateway.url + "/v1/chat/completions", headers=gateway.headers()
        ) as resp:
            assert resp.status == 404
            assert_openai_error(await resp.json())
        async with http.get(
            gateway.url + "/v1/images/generations", headers=gateway.headers()
        ) as resp:
            assert resp.status == 405
            assert_openai_error(await resp.json())
