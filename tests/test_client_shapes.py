"""Replay the requests real clients send (``tests/fixtures/clients``) against the gateway.

Each ``.http`` fixture holds the raw bytes one client sent: recorded from the real library, or
reconstructed from an application's source with the HTTP library it uses (the ``.json`` beside it
says which, with versions and sources; ``tests/record_client_shapes.py`` made them all). The
bytes go to the gateway over a plain TCP connection with only ``${API_KEY}`` and ``${HOST}``
substituted in the head: chunked bodies stay chunked, Content-Length bodies keep their length.
Then both sides are checked: what the client reads (``data[].url``, or ``data[].b64_json``
decoding to exactly the PNG the upstream serves for that result, or both: an SDK asking for a
GPT-image model under the default ``auto`` format) and exactly the JSON body that reached the
simulated upstream.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from tests.conftest import TEAM_KEYS, UPSTREAM_KEY, Upstream

pytestmark = pytest.mark.engines("memory")  # services above the store; engines: test_store.py

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "clients"
NAMES = sorted(path.stem for path in FIXTURES.glob("*.http"))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RESULT_PATH = re.compile(r"/v1/images/files/gpt-image-2/\d{8}/[0-9a-f-]+-(\d+)\.png")
EXCHANGE_TIMEOUT_S = 10


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: CIMultiDict[str]
    body: bytes


def load(name: str) -> tuple[bytes, dict[str, Any]]:
    raw = (FIXTURES / f"{name}.http").read_bytes()
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    return raw, meta


def split_head(raw: bytes) -> tuple[str, CIMultiDict[str], bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, "no end of headers"
    start, *lines = head.decode("latin-1").split("\r\n")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        name, colon, value = line.partition(":")
        assert colon, f"malformed header line {line!r}"
        headers.add(name.strip(), value.strip())
    return start, headers, body


def dechunk(body: bytes) -> tuple[bytes, bytes]:
    """The payload of a chunked body, and whatever follows its final CRLF."""
    payload = b""
    while True:
        size_line, sep, rest = body.partition(b"\r\n")
        assert sep, "truncated chunk size line"
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            assert rest.startswith(b"\r\n"), "trailers are not expected"
            return payload, rest[2:]
        assert rest[size : size + 2] == b"\r\n", "chunk not followed by CRLF"
        payload += rest[:size]
        body = rest[size + 2 :]


def substitute(raw: bytes, host: str, api_key: str) -> bytes:
    """The fixture with its placeholders filled in; only the head changes."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    head = head.replace(b"${API_KEY}", api_key.encode()).replace(b"${HOST}", host.encode())
    return head + sep + body


async def exchange(host: str, request: bytes) -> RawResponse:
    """Send ``request`` on a fresh connection and read one HTTP/1.1 response."""
    address, port = host.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(address, int(port))
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(EXCHANGE_TIMEOUT_S):
            head = await reader.readuntil(b"\r\n\r\n")
            start, headers, _ = split_head(head)
            status = int(start.split(" ", 2)[1])
            if "chunked" in headers.get("Transfer-Encoding", "").lower():
                body = await _read_chunked(reader)
            elif "Content-Length" in headers:
                body = await reader.readexactly(int(headers["Content-Length"]))
            else:
                body = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    encoding = headers.get("Content-Encoding", "identity").lower()
    if encoding in ("gzip", "deflate"):
        body = zlib.decompress(body, 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    return RawResponse(status, headers, body)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    payload = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass
            return payload
        payload += (await reader.readexactly(size + 2))[:-2]


def png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(PNG_SIGNATURE), data[:16]
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


async def fetch(url: str) -> bytes:
    """GET ``url`` the way a client would (following the simulator's 302 to the object)."""
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200, (url, resp.status)
        assert resp.content_type == "image/png"
        return await resp.read()


def downloaded_results(upstream: Upstream) -> list[str]:
    """Result-file paths the gateway fetched from the upstream, in result order."""
    paths = [r.path for r in upstream.sim.received if r.method == "GET" and "/files/" in r.path]
    for path in paths:
        assert RESULT_PATH.fullmatch(path), path
    return sorted(paths, key=lambda path: int(RESULT_PATH.fullmatch(path)[1]))  # type: ignore[index]


def gets_both(meta: dict[str, Any], headers: CIMultiDict[str]) -> bool:
    """The pinned ``auto`` rule, stated independently of the gateway: with no response_format
    and no team default, an SDK (``x-stainless-lang``, or ``ai-sdk/`` in its User-Agent) asking
    for a GPT-image model by name gets ``url`` and ``b64_json`` in each item."""
    sent = meta["sent"]
    fields = sent if isinstance(sent, dict) else {f["name"]: f.get("value") for f in sent}
    team = meta["gateway_config"].get("teams", {}).get("design", {})
    return (
        "response_format" not in fields
        and "default_response_format" not in team
        and str(fields.get("model", "")).startswith(("gpt-image-", "chatgpt-image-"))
        and ("x-stainless-lang" in headers or "ai-sdk/" in headers.get("User-Agent", ""))
    )


# -- the fixtures themselves ------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_fixture_is_well_formed(name: str) -> None:
    """Framing intact, placeholders only in the head, expectations built from the sent bytes."""
    raw, meta = load(name)
    start, headers, body = split_head(raw)
    assert start == f"POST {meta['endpoint']} HTTP/1.1"
    assert headers.getall("Authorization") == ["Bearer ${API_KEY}"]
    assert headers.getall("Host") == ["${HOST}"]
    assert b"${" not in body
    if meta["framing"] == "chunked":
        assert "Content-Length" not in headers
        assert headers["Transfer-Encoding"].lower() == "chunked"
        payload, rest = dechunk(body)
        assert rest == b""
    else:
        assert meta["framing"] == "content-length"
        assert "Transfer-Encoding" not in headers
        assert int(headers["Content-Length"]) == len(body)
        payload = body
    assert headers["Content-Type"].split(";")[0] == meta["request_content_type"]
    expected = meta["expected_upstream"]["body"]
    assert expected["model"] == "gpt-image-2"
    for ref in expected.get("image_urls", []):
        assert base64.b64decode(ref.split(",", 1)[1]) in payload  # the very bytes uploaded
    if meta["request_content_type"] == "application/json":
        assert json.loads(payload) == meta["sent"]


def test_every_client_in_the_issue_has_fixtures() -> None:
    prefixes = (
        "openai_python3_",
        "openai_python2_",
        "openai_node6_",
        "openai_node4_",
        "langchain_",
        "openwebui_",
        "librechat_",
    )
    for prefix in prefixes:
        assert any(name.startswith(prefix) for name in NAMES), prefix
    shapes = {name: load(name)[1] for name in NAMES}
    assert any(m["framing"] == "chunked" for m in shapes.values())
    assert any(m["reads"] == "b64_json" for m in shapes.values())
    both = [name for name in NAMES if gets_both(load(name)[1], split_head(load(name)[0])[1])]
    assert any(n.startswith("openai_python") for n in both), both  # the auto rule is exercised
    assert any(n.startswith("openai_node") for n in both), both


# -- replay -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
async def test_client_shape(name: str, start_gateway: Any, upstream: Upstream) -> None:
    raw, meta = load(name)
    gateway = await start_gateway(**meta["gateway_config"])
    host = gateway.url.removeprefix("http://")

    response = await exchange(host, substitute(raw, host, TEAM_KEYS["design"]))

    assert response.status == 200, response.body[:1000]
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers.get("X-Gateway-Ignored-Params") == meta["expected_ignored_params"]
    assert "X-Gateway-Warning" not in response.headers
    payload = json.loads(response.body)
    assert isinstance(payload["created"], int)
    data = payload["data"]
    assert len(data) == meta["n"]

    # Exactly what reached the upstream: one normalized JSON request, nothing else.
    posts = upstream.sim.generation_requests()
    assert len(posts) == 1, posts
    post = posts[0]
    assert post.path == meta["expected_upstream"]["path"]
    assert post.query == {}
    assert post.content_type == "application/json"
    assert post.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert post.body == meta["expected_upstream"]["body"]
    for param in meta["must_not_reach_upstream"]:
        assert param not in post.body

    # What the client reads.
    results = downloaded_results(upstream)
    both = gets_both(meta, split_head(raw)[1])
    if meta["reads"] == "b64_json" or both:
        assert len(results) == len(data)
        for item, path in zip(data, results, strict=True):
            if both:  # the SDK reads whichever it was written for
                assert item["url"] == upstream.url + path
            else:
                assert "url" not in item
            image = base64.b64decode(item["b64_json"], validate=True)
            assert image == await fetch(upstream.url + path)
            png_size(image)
    else:
        assert meta["reads"] == "url"
        assert results == []  # the gateway passed the URLs through without downloading
        for item in data:
            assert "b64_json" not in item
            url = item["url"]
            assert RESULT_PATH.fullmatch(url.removeprefix(upstream.url)), url
            png_size(await fetch(url))
