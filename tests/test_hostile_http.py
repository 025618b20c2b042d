"""Hostile HTTP (issue 12): bytes that are not UTF-8, malformed request heads, slow and vanishing
clients, digits that are not ASCII.

Most defects live below the app (aiohttp's parser and connection handling, stderr), so most
tests start a real gateway process and talk to it over raw sockets: a client library would
refuse to send these requests. Both of aiohttp's parsers are exercised where they differ: the C
one (llhttp, the default) and the pure-Python one (``AIOHTTP_NO_EXTENSIONS=1``). Sections carry
the numbers of the issue's items; those fixed in the app come first, those below it last.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import resource
import sys
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.http_exceptions import BadHttpMessage, InvalidHeader, InvalidURLError, LineTooLong

from gateway.core.config import parse_settings
from gateway.http.protocol import AIOHTTP_LOGGERS, describe, install_log_filter, max_connections
from gateway.http.server import METRICS_CONNECTIONS
from gateway.ops.safe_log import clean
from tests.conftest import (
    ADMIN_KEY,
    SECRETS,
    TEAM_KEYS,
    UPSTREAM_KEY,
    Gateway,
    Upstream,
    base_config,
    merge,
)
from tests.fakes import gate
from tests.process import GatewayProcess, to_toml

pytestmark = pytest.mark.engines("memory")  # services above the store; engines: test_store.py

ROOT = Path(__file__).resolve().parent.parent
KEY = TEAM_KEYS["design"]
RESULT_PATH = "/v1/images/files/SECRETRESULTPATH0123456789/a.png"
PARSERS = {"c-parser": {}, "python-parser": {"AIOHTTP_NO_EXTENSIONS": "1"}}
IO_TIMEOUT_S = 30  # a bound for every read and request, never a measurement

Start = Callable[..., Awaitable[GatewayProcess]]


# --- raw HTTP ----------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers.get("content-type", "").startswith("application/json"), self
        return json.loads(self.body)


def request(
    method: str,
    target: str | bytes,
    headers: list[tuple[str, str | bytes]] | None = None,
    body: bytes = b"",
    *,
    close: bool = True,
) -> bytes:
    """A request head exactly as given: str values are sent as UTF-8, bytes as they are."""
    raw_target = target if isinstance(target, bytes) else target.encode()
    headers = headers or []
    lines = [method.encode() + b" " + raw_target + b" HTTP/1.1"]
    if not any(name.lower() == "host" for name, _ in headers):
        lines.append(b"Host: gateway.test")
    for name, value in headers:
        lines.append(
            name.encode() + b": " + (value if isinstance(value, bytes) else value.encode())
        )
    if body:
        lines.append(b"Content-Length: %d" % len(body))
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def generation(*headers: tuple[str, str | bytes], key: str | bytes = KEY) -> bytes:
    auth = b"Bearer " + (key if isinstance(key, bytes) else key.encode())
    return request(
        "POST",
        "/v1/images/generations",
        [("Authorization", auth), ("Content-Type", "application/json"), *headers],
        json.dumps({"prompt": "a kite"}).encode(),
    )


def parse(raw: bytes) -> Answer:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(status_line.split()[1]), headers, body)


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def exchange(url: str, data: bytes) -> Answer:
    """Send ``data`` on a new connection; the answer, read until the gateway closes."""
    reader, writer = await asyncio.open_connection(*address(url))
    try:
        writer.write(data)
        return parse(await asyncio.wait_for(reader.read(), IO_TIMEOUT_S))
    finally:
        writer.close()


async def closed_by_gateway(reader: asyncio.StreamReader) -> bytes:
    """Everything the gateway sends until it closes the connection (bounded)."""
    return await asyncio.wait_for(reader.read(), IO_TIMEOUT_S)


# --- processes ---------------------------------------------------------------------------------


@pytest.fixture
async def start_process(tmp_path: Path, upstream: Upstream) -> AsyncIterator[Start]:
    started: list[GatewayProcess] = []

    async def start(
        *,
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
        **overrides: Any,
    ) -> GatewayProcess:
        config = merge(base_config(tmp_path, upstream.url), overrides)
        (tmp_path / "gateway.toml").write_text(to_toml(config))
        process = GatewayProcess(tmp_path / "gateway.toml", env=env, preexec_fn=preexec_fn)
        started.append(process)
        await process.start()
        return process

    yield start
    for process in started:
        await process.close()


def access_lines(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "access.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def stopped(process: GatewayProcess) -> str:
    """Stop the gateway (SIGTERM drains what is in flight); its whole stderr."""
    code, stderr = await process.stop()
    assert code == 0, stderr
    return stderr


def assert_nothing_secret(text: str) -> None:
    for needle in (*SECRETS, "SECRETRESULTPATH"):
        assert needle not in text, f"{needle[:10]}... leaked: {text[-2000:]}"


# --- 5. retry counts: ASCII digits only --------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "count"), [("²", 0), ("①", 0), ("٣", 0), ("\U0001d7e0", 0), ("2", 2), ("99999999", 0)]
)
async def test_retry_count_takes_ascii_digits_only(
    start_gateway: Callable[..., Awaitable[Gateway]], value: str, count: int
) -> None:
    gateway = await start_gateway()
    answer = await exchange(gateway.url, generation(("x-stainless-retry-count", value)))
    assert answer.status == 200, answer
    assert (await gateway.log_lines())[-1]["retry_count"] == count


# --- 4. a client that leaves mid-body ----------------------------------------------------------


async def requests_by_status(url: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as http:
        async with http.get(
            url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        ) as response:
            text = await response.text()
    counts: dict[str, float] = {}
    for status, value in re.findall(
        r'^gateway_requests_total\{endpoint="generations",[^}]*status="(\d+)"[^}]*\} (\S+)$',
        text,
        re.M,
    ):
        counts[status] = counts.get(status, 0.0) + float(value)
    return counts


@pytest.mark.process
async def test_a_client_that_leaves_mid_body_is_logged_as_499_without_a_traceback(
    start_process: Start, tmp_path: Path
) -> None:
    process = await start_process()
    auth = ("Authorization", f"Bearer {KEY}")
    bodies = [
        ("application/json", b'{"prompt": "a ki'),
        ("multipart/form-data; boundary=bb", b'--bb\r\nContent-Disposition: form-data; name="p'),
    ]
    for (ctype, part), hard in zip(bodies, (True, False), strict=True):
        head = request("POST", "/v1/images/generations", [auth, ("Content-Type", ctype),
                       ("Content-Length", "100000")], close=False)  # fmt: skip
        reader, writer = await asyncio.open_connection(*address(process.url))
        writer.write(head + part)
        await writer.drain()
        if hard:
            writer.transport.abort()  # RST
        else:
            writer.write_eof()  # FIN
            assert await closed_by_gateway(reader) == b""
            writer.close()

    async def both_logged() -> dict[str, float]:
        while (counts := await requests_by_status(process.url)).get("499", 0) < 2:
            pass  # each poll is a request to the gateway: this waits on it, not on a clock
        return counts

    counts = await asyncio.wait_for(both_logged(), IO_TIMEOUT_S)
    assert counts == {"499": 2.0}
    stderr = await stopped(process)
    assert "Traceback" not in stderr and "unhandled error" not in stderr, stderr
    lines = access_lines(tmp_path)
    assert [
        (line["status"], line["error_code"]) for line in lines if line["endpoint"] == "generations"
    ] == [(499, "client_closed_request")] * 2


# --- 1a. the access log: its failures never cost an answer ------------------------------------


@pytest.mark.process
async def test_an_access_log_that_cannot_be_written_never_costs_the_answer(
    start_process: Start,
) -> None:
    process = await start_process(log={"access": "/dev/full"})  # every write: ENOSPC
    for _ in range(3):
        answer = await exchange(process.url, generation())
        assert answer.status == 200 and answer.json()["data"]
    stderr = await stopped(process)
    assert stderr.count("access log write failed") == 1, stderr  # reported once, not per line
    assert "No space left on device" in stderr and "Traceback" not in stderr


def test_clean_replaces_escaped_bytes_and_keeps_text() -> None:
    assert clean("plain") == "plain"
    assert clean("häkchen ✓") == "häkchen ✓"
    assert clean(b"a\xffb\xc3".decode("utf-8", "surrogateescape")) == "a\ufffdb\ufffd"
    assert clean("lone \ud800 high") == "lone \ufffd high"


# --- 2a. result paths: a credential, so never in a log or an error message -------------------


@pytest.mark.parametrize("method", ["POST", "OPTIONS", "PUT", "DELETE"])
async def test_a_result_path_with_the_wrong_method_is_not_repeated(
    start_gateway: Callable[..., Awaitable[Gateway]],
    caplog: pytest.LogCaptureFixture,
    method: str,
) -> None:
    gateway = await start_gateway(upstream={"proxy_results": True})
    answer = await exchange(gateway.url, request(method, RESULT_PATH, body=b"{}"))
    assert answer.status == 405  # only GET (and HEAD) are routed to the result file handler
    assert answer.json()["error"]["message"] == f"{method} is not allowed on /v1/images/files/…"
    assert [line["path"] for line in await gateway.log_lines()] == ["/v1/images/files/…"]
    diagnostics = "".join(  # the test server's aiohttp access log is off (and filtered) in serve
        f"{r.getMessage()}\n{r.exc_text or ''}"
        for r in caplog.records
        if r.name != "aiohttp.access"
    )
    assert_nothing_secret(answer.body.decode() + gateway.access_log.read_text() + diagnostics)


# --- 1. bytes that are not UTF-8, below the app -----------------------------------------------


@pytest.mark.process
@pytest.mark.parametrize("parser", PARSERS)
async def test_header_bytes_that_are_not_utf8_never_cost_the_answer(
    start_process: Start, tmp_path: Path, parser: str
) -> None:
    process = await start_process(env=PARSERS[parser], upstream={"proxy_results": True})
    paid = await exchange(process.url, generation(("User-Agent", b"curl/8.5 \xff\xfe\xc3")))
    assert paid.status == 200 and paid.json()["data"][0]["url"]
    refused = [
        (generation(key=b"igw_\xff\xfe"), 401),  # a key that is not UTF-8 is just a wrong key
        (generation(("Idempotency-Key", b"k\xff")), 400),
        (generation(("X-Request-ID", b"id-\xff")), 200),  # not usable: the gateway's own is used
        (generation(("Host", b"h\xffst")), 200),  # in result URLs (proxy_results)
        (request("POST", "/v1/images/edits", [("Authorization", f"Bearer {KEY}"),
                 ("Content-Type", b"image/\xff")], b"x"), 415),
    ]  # fmt: skip
    if parser == "python-parser":  # llhttp itself refuses a request target that is not ASCII
        refused.append((request("GET", b"/v1/images/tasks/t\xff"), 401))
        refused.append((request("GET", b"/nowhere/\xff?x=\xfe"), 404))
    for data, status in refused:
        answer = await exchange(process.url, data)
        assert answer.status == status, (data, answer)
        assert answer.json()
    stderr = await stopped(process)
    assert "Traceback" not in stderr and "UnicodeEncodeError" not in stderr, stderr
    lines = access_lines(tmp_path)
    assert len(lines) == 1 + len(refused)  # every request has its line
    (paid_line,) = [line for line in lines if (line["client"] or "").startswith("curl/8.5")]
    assert paid_line["status"] == 200 and paid_line["client"] == "curl/8.5 \ufffd\ufffd\ufffd"
    assert paid_line["cost_cny"] == 0.2


# --- 2. malformed request heads: no key or result path in any log -----------------------------

AUTH = f"Authorization: Bearer {KEY}".encode()
MALFORMED = {
    "trailing CR (a CRLF key file)": AUTH + b"\r",
    "control character": AUTH + b"\x01",
    "NUL": AUTH + b"\x00",
    "space before the colon": AUTH.replace(b":", b" :", 1),
    "overlong value": AUTH + b"x" * 9000,
    "folded line": b"Authorization: Bearer\r\n " + KEY.encode(),
    "no colon": b"Bearer " + KEY.encode(),
}


def malformed(header_line: bytes, target: bytes = b"/v1/models") -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n" + header_line + b"\r\nX-A: b\r\n\r\n"


@pytest.mark.process
@pytest.mark.parametrize("parser", PARSERS)
async def test_malformed_heads_are_answered_and_logged_without_their_content(
    start_process: Start, tmp_path: Path, parser: str
) -> None:
    process = await start_process(env=PARSERS[parser], upstream={"proxy_results": True})
    sent = [malformed(line) for line in MALFORMED.values()]
    sent += [
        malformed(b"X-Junk: \x01", RESULT_PATH.encode()),  # a bad header after a result path
        b"GET " + RESULT_PATH.encode() + b"\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET " + RESULT_PATH.encode() + b"\x7f HTTP/1.1\r\nHost: x\r\n\r\n",
    ]
    for data in sent:
        answer = await exchange(process.url, data)
        assert_nothing_secret(answer.body.decode("latin-1"))
        assert answer.status == 400, (data, answer)
        error = answer.json()["error"]  # the gateway's error shape, never aiohttp's text
        assert error["code"] == "bad_request" and error["type"] == "invalid_request_error"
        assert error["message"].startswith("Malformed HTTP request: ")
    stderr = await stopped(process)
    assert_nothing_secret(stderr)
    assert "Traceback" not in stderr, stderr
    diagnostics = re.findall(r"malformed request from 127\.0\.0\.1: (.*)", stderr)
    # One line per distinct problem: identical ones within 10 s are counted, not repeated
    # (gateway.ops.repeats), so a flood of junk cannot flood the journal.
    assert len(set(diagnostics)) == len(diagnostics) >= 3, stderr
    assert any("authorization header" in line for line in diagnostics), diagnostics
    assert access_lines(tmp_path) == []  # none of them reached the app


def test_describe_keeps_the_parsers_words_and_drops_the_bytes() -> None:
    line = AUTH + b"\x01"
    llhttp = BadHttpMessage(f"Invalid header value char:\n\n  {line!r}\n      ^")
    assert describe(llhttp) == "Invalid header value char (in the authorization header)"
    assert describe(InvalidHeader(AUTH + b"\r")) == (
        "Invalid HTTP header (in the authorization header)"
    )
    assert describe(InvalidHeader(b"Bearer " + KEY.encode())) == "Invalid HTTP header"
    assert describe(LineTooLong(AUTH[:100] + b"...", 8190)).startswith("Got more than 8190 bytes")
    unquoted = InvalidURLError(RESULT_PATH + "\x01")  # the pure-Python parser does not quote it
    assert describe(unquoted) == "Invalid request target"
    assert describe(BadHttpMessage(f"Bad thing {KEY} here")) == "Malformed request"
    assert describe(BadHttpMessage("Duplicate 'Content-Length' header found.")) == (
        "Duplicate (in the content-length header)"
    )


def test_aiohttp_loggers_keep_their_words_but_not_the_exception_text() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in AIOHTTP_LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)
    install_log_filter()
    try:
        try:
            raise InvalidHeader(AUTH + b"\r")
        except InvalidHeader:
            logging.getLogger("aiohttp.server").exception("Error handling request from %s", "1.2")
        logging.getLogger("aiohttp.access").info('1.2 "GET %s HTTP/1.1" 405', RESULT_PATH)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
            logger.filters.clear()
    text = stream.getvalue()
    assert text.startswith("aiohttp.server: Error handling request from 1.2\nTraceback")
    assert "InvalidHeader" in text and "aiohttp.access" not in text
    assert_nothing_secret(text)


# --- 3. slow clients: header and keep-alive timeouts, the connection cap -----------------------

PARTIAL_HEAD = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"  # the blank line never comes


@pytest.mark.process
async def test_a_first_request_head_must_arrive_within_header_timeout(
    start_process: Start, upstream: Upstream
) -> None:
    process = await start_process(server={"header_timeout_s": 0.5, "keepalive_timeout_s": 600})
    release, arrived = asyncio.Event(), asyncio.Event()
    upstream.faults.add(gate(release, arrived))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=IO_TIMEOUT_S)) as http:
        held = asyncio.create_task(
            http.post(
                process.url + "/v1/images/generations",
                headers={"Authorization": f"Bearer {KEY}"},
                json={"prompt": "slow"},
            )
        )
        await arrived.wait()  # the held request's head arrived; its generation is running
        silent = await asyncio.open_connection(*address(process.url))
        slow = await asyncio.open_connection(*address(process.url))
        slow[1].write(PARTIAL_HEAD)
        assert await closed_by_gateway(slow[0]) == b""  # closed without an answer
        assert await closed_by_gateway(silent[0]) == b""
        for _, writer in (silent, slow):
            writer.close()
        release.set()  # more than header_timeout_s has passed: the held request lives on
        response = await held
        assert response.status == 200 and (await response.json())["data"]
        response.release()
    await stopped(process)


@pytest.mark.process
async def test_an_idle_keepalive_connection_is_closed_after_keepalive_timeout(
    start_process: Start,
) -> None:
    process = await start_process(server={"header_timeout_s": 600, "keepalive_timeout_s": 0.5})
    reader, writer = await asyncio.open_connection(*address(process.url))
    writer.write(request("GET", "/healthz", close=False))
    answer = parse(await asyncio.wait_for(reader.readuntil(b'{"status": "ok"}'), IO_TIMEOUT_S))
    assert answer.status == 200 and answer.headers.get("connection") != "close"
    writer.write(PARTIAL_HEAD)  # the next head trickles: the keep-alive deadline still holds
    assert await closed_by_gateway(reader) == b""
    writer.close()
    await stopped(process)


OPEN_FILES = 512  # the gateway's RLIMIT_NOFILE in the attack test
ATTACKERS = 600  # slow connections kept open at once, above OPEN_FILES
CLIENT = """
import socket, sys
data = sys.stdin.buffer.read()
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30) as conn:
    conn.sendall(data)  # at once, like a real client: the head is there when it is accepted
    while chunk := conn.recv(65536):
        sys.stdout.buffer.write(chunk)
"""


async def exchange_from_another_process(url: str, data: bytes) -> Answer:
    """``exchange``, from a client process of its own: no waiting on this busy event loop."""
    host, port = address(url)
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT, host, str(port),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(client.communicate(data), IO_TIMEOUT_S)
    finally:
        if client.returncode is None:
            client.kill()
            await client.wait()
    assert client.returncode == 0 and out, "the gateway closed or reset a normal request"
    return parse(out)


@dataclass
class Attack:
    """Slowloris: connections that send a partial head, reopened whenever the gateway closes one."""

    url: str
    opened: int = 0
    closed_by_gateway: int = 0
    enough: asyncio.Event = field(default_factory=asyncio.Event)
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    stop: bool = False

    async def one(self) -> None:
        while not self.stop:  # a flag too: 3.11's wait_for can swallow a cancellation
            async with asyncio.timeout(IO_TIMEOUT_S):
                reader, writer = await asyncio.open_connection(*address(self.url))
            self.writers.add(writer)
            self.opened += 1
            if self.opened >= ATTACKERS:
                self.enough.set()
            try:
                writer.write(PARTIAL_HEAD)
                await reader.read()  # until the gateway closes it
                self.closed_by_gateway += 1
            except ConnectionError:
                self.closed_by_gateway += 1
            finally:
                self.writers.discard(writer)
                writer.close()


@pytest.mark.process
async def test_slow_connections_past_the_open_file_limit_do_not_stop_paying_requests(
    start_process: Start,
) -> None:
    def low_open_file_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, OPEN_FILES))

    process = await start_process(preexec_fn=low_open_file_limit, server={"backlog": 16})
    attack = Attack(process.url)
    attackers = [asyncio.create_task(attack.one()) for _ in range(ATTACKERS)]
    try:
        await asyncio.wait_for(attack.enough.wait(), IO_TIMEOUT_S)
        for _ in range(3):  # each a new connection, made while the attack goes on
            answer = await exchange_from_another_process(process.url, generation())
            assert answer.status == 200 and answer.json()["data"]
        assert attack.opened > OPEN_FILES and attack.closed_by_gateway > 0
    finally:
        attack.stop = True
        for task in attackers:
            task.cancel()
        await asyncio.gather(*attackers, return_exceptions=True)
        for writer in attack.writers:
            writer.close()
    stderr = await stopped(process)
    assert "Too many open files" not in stderr, stderr
    assert f"open-file limit {OPEN_FILES}: up to " in stderr
    assert "connection limit (" in stderr


def test_the_connection_cap_leaves_room_for_upstream_descriptors() -> None:
    assert max_connections(65536, 1024) >= 30_000
    assert max_connections(OPEN_FILES, 16) * 2 + 16 + 64 <= OPEN_FILES
    assert max_connections(1024, 1024) * 2 + 1024 // 4 + 64 <= 1024
    assert max_connections(10, 1024) == 8  # never none at all


def test_systemd_unit_has_room_for_ten_thousand_held_requests() -> None:
    unit = (ROOT / "systemd" / "image-gateway.service").read_text()
    limits = re.findall(r"^LimitNOFILE=(\d+)$", unit, re.M)
    assert limits, "the unit must raise the open-file limit (the default soft limit is 1024)"
    assert max_connections(int(limits[-1]), 1024) >= 10_000  # client + upstream fd each


def test_new_server_keys_are_documented_and_parsed() -> None:
    example = ROOT / "config" / "gateway.example.toml"
    text = example.read_text()
    for key in ("header_timeout_s", "keepalive_timeout_s"):
        assert f"\n{key} = " in text, key
    server = tomllib.loads(text)["server"]
    assert (server["header_timeout_s"], server["keepalive_timeout_s"]) == (10, 75)
    settings = parse_settings(
        merge(base_config(ROOT, "http://127.0.0.1:1"), {"server": {"header_timeout_s": 2.5}}),
        base_dir=ROOT,
        env={"TEST_UPSTREAM_KEY": UPSTREAM_KEY},
    )
    assert (settings.server.header_timeout_s, settings.server.keepalive_timeout_s) == (2.5, 75.0)


@pytest.mark.process
async def test_a_connection_past_the_cap_is_answered_503_not_reset(
    start_process: Start, upstream: Upstream
) -> None:
    """Every connection busy with a held request: a newcomer gets a JSON 503 and a clean close."""
    open_files = 140
    cap = max_connections(open_files - METRICS_CONNECTIONS, 16)

    def low_open_file_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

    release, all_arrived = asyncio.Event(), asyncio.Event()
    arrived = 0

    async def hold(request: Any, handler: Any) -> Any:
        nonlocal arrived
        arrived += 1
        if arrived == cap:
            all_arrived.set()
        await release.wait()
        return await handler(request)

    for _ in range(cap + 1):  # one more: the refused request must not take it
        upstream.faults.add(hold)
    process = await start_process(preexec_fn=low_open_file_limit, server={"backlog": 16})
    held = [await asyncio.open_connection(*address(process.url)) for _ in range(cap)]
    for _, writer in held:
        writer.write(generation())
    await asyncio.wait_for(all_arrived.wait(), IO_TIMEOUT_S)
    refused = await exchange_from_another_process(process.url, generation())
    assert refused.status == 503 and refused.headers["connection"] == "close"
    assert refused.json()["error"]["code"] == "too_many_connections"
    assert refused.headers["x-should-retry"] == "true"
    release.set()
    for reader, writer in held:
        assert parse(await closed_by_gateway(reader)).status == 200
        writer.close()
    assert arrived == cap  # the refused request never reached the upstream
    stderr = await stopped(process)
    assert f"connection limit ({cap}) reached" in stderr
    assert "refused (503 or closed) while every connection was busy: 1;" in stderr
