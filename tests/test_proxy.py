"""End to end: real OpenAI SDK and curl-shaped requests -> gateway -> simulated upstream."""

from __future__ import annotations

import asyncio
import base64
import io

import aiohttp
import pytest

from tests.conftest import GIF, JPEG, PNG, TEAM_KEYS, UPSTREAM_KEY, WEBP, Gateway, Upstream


def only_request(upstream: Upstream) -> dict:
    posts = upstream.sim.generation_requests()
    assert len(posts) == 1, posts
    assert posts[0].headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert posts[0].content_type == "application/json"
    return posts[0].body


@pytest.mark.parametrize("v1", [True, False])
async def test_sdk_generate_with_pixel_size(gateway: Gateway, upstream: Upstream, v1: bool) -> None:
    client = gateway.openai(v1=v1)
    result = await asyncio.to_thread(
        client.images.generate, model="gpt-image-2", prompt="a red fox", size="1536x1024"
    )
    assert result.data[0].url.startswith(upstream.url + "/v1/images/files/gpt-image-2/")
    assert only_request(upstream) == {
        "model": "gpt-image-2",
        "prompt": "a red fox",
        "n": 1,
        "size": "3:2",
        "resolution": "1k",
        "quality": "medium",
    }
    assert (
        upstream.sim.generation_requests()[0].path == ("/v1" if v1 else "") + "/images/generations"
    )


async def test_async_sdk_generate_2k(gateway: Gateway, upstream: Upstream) -> None:
    client = gateway.async_openai()
    result = await client.images.generate(prompt="a city", size="2048x2048", n=2, quality="hd")
    assert len(result.data) == 2
    assert only_request(upstream) == {
        "model": "gpt-image-2",
        "prompt": "a city",
        "n": 2,
        "size": "1:1",
        "resolution": "2k",
        "quality": "high",
    }


@pytest.mark.parametrize("v1", [True, False])
async def test_sdk_edit_with_one_file(gateway: Gateway, upstream: Upstream, v1: bool) -> None:
    client = gateway.openai(v1=v1)
    image = io.BytesIO(PNG)
    image.name = "photo.png"
    result = await asyncio.to_thread(
        client.images.edit, image=image, prompt="older", size="1024x1536"
    )
    assert result.data[0].url
    body = only_request(upstream)
    assert body["image_urls"] == ["data:image/png;base64," + base64.b64encode(PNG).decode()]
    assert body["size"] == "2:3"
    assert upstream.sim.generation_requests()[0].path == ("/v1" if v1 else "") + "/images/edits"


async def test_sdk_edit_with_a_list_of_files_and_bytes(
    gateway: Gateway, upstream: Upstream
) -> None:
    client = gateway.async_openai()
    named = io.BytesIO(WEBP)
    named.name = "claims-to-be.png"
    await client.images.edit(
        image=[JPEG, named, ("x.bin", GIF, "application/octet-stream")], prompt="merge"
    )
    body = only_request(upstream)
    assert [url.split(";")[0] for url in body["image_urls"]] == [
        "data:image/jpeg",
        "data:image/webp",
        "data:image/gif",
    ]
    assert base64.b64decode(body["image_urls"][0].split(",", 1)[1]) == JPEG


async def test_curl_minimal_json(gateway: Gateway, upstream: Upstream) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway.url + "/v1/images/generations",
            headers=gateway.headers(),
            json={"model": "gpt-image-2", "prompt": "an orange cat"},
        ) as resp:
            assert resp.status == 200
            assert resp.content_type == "application/json"
            body = await resp.json()
    assert set(body) == {"created", "data", "id"}
    assert isinstance(body["id"], str)
    assert only_request(upstream)["size"] == "1:1"


async def test_curl_ratio_2k_and_mixed_references(gateway: Gateway, upstream: Upstream) -> None:
    data_url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway.url + "/v1/images/edits",
            headers=gateway.headers(),
            json={
                "model": "gpt-image-2",
                "prompt": "merge these",
                "size": "4:3",
                "resolution": "2k",
                "image_urls": ["https://example.com/a.jpg"],
                "image_input": [data_url],
            },
        ) as resp:
            assert resp.status == 200
    body = only_request(upstream)
    assert body["image_urls"] == ["https://example.com/a.jpg", data_url]
    assert (body["size"], body["resolution"]) == ("4:3", "2k")
    assert "image_input" not in body


async def test_curl_multipart_upload(gateway: Gateway, upstream: Upstream) -> None:
    form = aiohttp.FormData()
    form.add_field("model", "gpt-image-2")
    form.add_field("prompt", "make this person 70 years old")
    form.add_field("size", "1536x1024")
    form.add_field("image[]", PNG, filename="photo.png", content_type="image/png")
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway.url + "/v1/images/edits", headers=gateway.headers(), data=form
        ) as resp:
            assert resp.status == 200, await resp.text()
    body = only_request(upstream)
    assert body["size"] == "3:2"
    assert body["image_urls"] == ["data:image/png;base64," + base64.b64encode(PNG).decode()]


async def test_request_id_echo_and_server_timing(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway.url + "/v1/images/generations",
            headers=gateway.headers(**{"X-Request-ID": "trace-abc.123"}),
            json={"prompt": "x"},
        ) as resp:
            assert resp.headers["X-Request-ID"] == "trace-abc.123"
            assert "gateway;dur=" in resp.headers["Server-Timing"]
            assert "upstream;dur=" in resp.headers["Server-Timing"]
        async with http.get(gateway.url + "/healthz") as resp:
            assert resp.headers["X-Request-ID"].startswith("req_")
    entry = next(line for line in await gateway.log_lines() if line["endpoint"] == "generations")
    assert entry["request_id"] == "trace-abc.123"
    assert entry["ledger_id"].startswith("req_")


async def test_reused_client_request_id_never_collides(
    gateway: Gateway, upstream: Upstream
) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(2):
            async with http.post(
                gateway.url + "/v1/images/generations",
                headers=gateway.headers(**{"X-Request-ID": "same-id"}),
                json={"prompt": "x"},
            ) as resp:
                assert resp.status == 200
    assert len(upstream.sim.generation_requests()) == 2


async def test_models_lists_gpt_image_2(gateway: Gateway) -> None:
    models = await gateway.async_openai().models.list()
    assert "gpt-image-2" in [m.id for m in models.data]


async def test_ignored_params_are_named_and_not_forwarded(
    gateway: Gateway, upstream: Upstream
) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway.url + "/v1/images/generations",
            headers=gateway.headers(),
            json={"prompt": "x", "style": "vivid", "user": "u1", "background": "transparent"},
        ) as resp:
            assert resp.status == 200
            assert resp.headers["X-Gateway-Ignored-Params"] == "background, style, user"
    assert set(only_request(upstream)) == {"model", "prompt", "n", "size", "resolution", "quality"}


async def test_team_key_never_reaches_upstream(gateway: Gateway, upstream: Upstream) -> None:
    await gateway.async_openai().images.generate(prompt="x")
    for received in upstream.sim.received:
        assert TEAM_KEYS["design"] not in str(received.headers)
