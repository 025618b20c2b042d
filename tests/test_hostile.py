"""Hostile input: generated JSON and multipart bodies never get a 5xx and never reach the upstream
unless they were valid; the gateway keeps serving.

Hypothesis runs in a worker thread with a plain ``http.client`` connection, while the gateway
serves from the test's event loop.
"""

from __future__ import annotations

import asyncio
import http.client
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import GIF, JPEG, PNG, TEAM_KEYS, Gateway, Upstream

pytestmark = pytest.mark.engines("memory")  # services above the store; engines: test_store.py

FIELDS = [
    "model", "prompt", "n", "size", "resolution", "quality", "image_urls", "image_input", "images",
    "response_format", "stream", "mask", "user", "style", "background",
]  # fmt: skip
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(
        ["gpt-image-2", "dall-e-3", "1536x1024", "16:9", "auto", "2k", "hd", "b64_json", ""]
    ),
    st.sampled_from(
        ["https://example.com/a.png", "http://x/y.png", "data:image/png;base64,iVBORw0K", "data:,"]
    ),
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)
json_bodies = st.dictionaries(
    st.sampled_from(FIELDS) | st.text(max_size=10), json_values, max_size=8
)


class Client:
    """A blocking HTTP client for the hypothesis thread."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80

    def send(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            connection.request(
                "POST",
                path,
                body=body,
                headers={"Authorization": f"Bearer {TEAM_KEYS['design']}", **headers},
            )
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()


def check(status: int, raw: bytes, reached_upstream: bool) -> None:
    assert status < 500, (status, raw[:300])
    if reached_upstream:
        assert status in (200, 202), (status, raw[:300])  # only valid requests may be forwarded
        return
    assert 400 <= status < 500, (status, raw[:300])
    error = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


async def run_in_thread(
    gateway: Gateway, upstream: Upstream, test: Callable[[Client, Callable[[], int]], None]
) -> None:
    def forwarded() -> int:
        return len(upstream.sim.generation_requests())

    await asyncio.to_thread(test, Client(gateway.url), forwarded)
    async with gateway.async_openai() as client:  # still serving
        assert (await client.images.generate(prompt="still alive")).data


async def test_generated_json_bodies(start_gateway, upstream: Upstream) -> None:
    gateway = await start_gateway(teams={"design": {"budget_cny": 100000.0}})

    def test(client: Client, forwarded: Callable[[], int]) -> None:
        @SETTINGS
        @given(body=json_bodies, path=st.sampled_from(["/v1/images/generations", "/images/edits"]))
        @example(body={"\x1f": None, "prompt": "0"}, path="/v1/images/generations")  # found by it
        def one(body: dict[str, Any], path: str) -> None:
            before = forwarded()
            status, raw = client.send(
                path, json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            check(status, raw, forwarded() > before)

        one()

    await run_in_thread(gateway, upstream, test)


raw_bodies = st.one_of(
    st.binary(max_size=200),
    st.just(b""),
    st.just(b"[" * 50_000 + b"]" * 50_000),
    st.just(b'{"a":' * 20_000 + b"1" + b"}" * 20_000),
    st.just(b'{"prompt": "x", "n": 1' + b"0" * 10_000 + b"}"),
    st.just(b'{"prompt": "x", "n": 1e999}'),
    st.just(b'{"prompt": "\xff\xfe"}'),
    st.just(b'{"prompt": "\\ud800"}'),
    st.text(max_size=100).map(str.encode),
)


async def test_generated_raw_bodies_and_content_types(start_gateway, upstream: Upstream) -> None:
    gateway = await start_gateway()

    def test(client: Client, forwarded: Callable[[], int]) -> None:
        @SETTINGS
        @given(
            body=raw_bodies,
            ctype=st.sampled_from(
                ["application/json", "text/plain", "application/x-www-form-urlencoded", "image/png",
                 "multipart/form-data", "multipart/form-data; boundary=", "application/json; charset=latin-1", ""]
            ),
        )  # fmt: skip
        def one(body: bytes, ctype: str) -> None:
            before = forwarded()
            status, raw = client.send(
                "/v1/images/generations", body, {"Content-Type": ctype} if ctype else {}
            )
            check(status, raw, forwarded() > before)

        one()

    await run_in_thread(gateway, upstream, test)


part_contents = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([PNG, JPEG, GIF, b"%PDF-1.4", b"", b"\x89PNG"]),
    st.binary(max_size=64).map(lambda tail: PNG + tail),
)
parts = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "image",
                "image[]",
                "mask",
                "prompt",
                "n",
                "size",
                "model",
                "file",
                "image_urls[]",
                "",
                'x"y',
            ]
        ),
        st.one_of(
            st.none(),
            st.sampled_from(["a.png", "upload", "unknown_file", "../../etc/passwd", "ü.png", ""]),
        ),
        st.sampled_from(["image/png", "application/octet-stream", "text/plain", None]),
        part_contents,
    ),
    max_size=20,
)


def multipart(
    items: list[tuple[str, str | None, str | None, bytes]], boundary: str, *, close: bool
) -> bytes:
    out = b""
    for name, filename, ctype, content in items:
        disposition = f'form-data; name="{name}"' + (
            f'; filename="{filename}"' if filename is not None else ""
        )
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if ctype:
            out += f"Content-Type: {ctype}\r\n".encode()
        out += b"\r\n" + content + b"\r\n"
    return out + (f"--{boundary}--\r\n".encode() if close else b"")


@pytest.mark.filterwarnings("ignore::aiohttp.multipart.BadContentDispositionHeader")
async def test_generated_multipart_bodies(start_gateway, upstream: Upstream) -> None:
    gateway = await start_gateway(server={"max_image_mb": 0.001, "max_body_mb": 0.05})

    def test(client: Client, forwarded: Callable[[], int]) -> None:
        @SETTINGS
        @given(
            items=parts,
            boundary=st.sampled_from(["b0undary", "x" * 70, "a b", ""]),
            declared=st.sampled_from(["same", "other", "missing"]),
            close=st.booleans(),
            garble=st.sampled_from([None, b"\r\n--", b"--", b"\x00" * 3]),
        )
        def one(
            items: list, boundary: str, declared: str, close: bool, garble: bytes | None
        ) -> None:
            body = multipart(items, boundary, close=close)
            if garble is not None:
                body = body[: len(body) // 2] + garble + body[len(body) // 2 :]
            header = {"same": f"multipart/form-data; boundary={boundary}", "other": "multipart/form-data; boundary=zzz",
                      "missing": "multipart/form-data"}[declared]  # fmt: skip
            before = forwarded()
            status, raw = client.send("/v1/images/edits", body, {"Content-Type": header})
            check(status, raw, forwarded() > before)

        one()

    await run_in_thread(gateway, upstream, test)


async def test_oversized_and_too_many_parts(start_gateway, upstream: Upstream) -> None:
    gateway = await start_gateway(server={"max_image_mb": 0.01, "max_body_mb": 0.5})

    def test(client: Client, forwarded: Callable[[], int]) -> None:
        many = multipart(
            [("prompt", None, None, b"x")] + [("image[]", "a.png", "image/png", PNG)] * 17,
            "bb",
            close=True,
        )
        big = multipart(
            [("prompt", None, None, b"x"), ("image", "a.png", "image/png", PNG + b"\x00" * 20_000)],
            "bb",
            close=True,
        )
        huge = multipart(
            [("prompt", None, None, b"x")]
            + [("image[]", "a.png", "image/png", PNG + b"\x00" * 9_000)] * 60,
            "bb",
            close=True,
        )
        header = {"Content-Type": "multipart/form-data; boundary=bb"}
        for body, expected in ((many, 400), (big, 413), (huge, 413)):
            status, raw = client.send("/v1/images/edits", body, header)
            assert status == expected, (status, raw[:200])
        assert forwarded() == 0

    await run_in_thread(gateway, upstream, test)
