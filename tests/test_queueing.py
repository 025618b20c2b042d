"""queued_ms: how long a request waited, already received, for a held event loop."""

from __future__ import annotations

import asyncio
import http.client
import struct
import threading
import time
from urllib.parse import urlsplit

import pytest

from gateway.http.queueing import LAST_DATA_RECV_OFFSET, last_data_recv_ms
from tests.conftest import Gateway

pytestmark = pytest.mark.engines("memory")  # services above the store; engines: test_store.py

HELD_S = 0.3


def test_reads_tcpi_last_data_recv() -> None:
    info = bytearray(104)
    struct.pack_into("=I", info, LAST_DATA_RECV_OFFSET, 1234)
    assert last_data_recv_ms(bytes(info)) == 1234
    assert last_data_recv_ms(b"\x00" * 20) is None


async def test_counts_the_time_a_request_waited_for_a_held_loop(gateway: Gateway) -> None:
    parts = urlsplit(gateway.url)
    sent = threading.Event()

    def client() -> None:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        connection.request("GET", "/healthz", headers={"User-Agent": "queued-probe"})
        sent.set()  # the request is in the gateway's kernel buffer now
        connection.getresponse().read()
        connection.close()

    thread = threading.Thread(target=client)
    thread.start()
    assert sent.wait(10)
    time.sleep(HELD_S)  # noqa: ASYNC251 - holding the loop is the point (not a synchronization)
    await asyncio.to_thread(thread.join)
    (line,) = [line for line in await gateway.log_lines() if line["client"] == "queued-probe"]
    assert line["queued_ms"] >= HELD_S * 1000 - 10  # the kernel clock ticks every 1-4 ms


async def test_is_small_for_a_request_served_at_once(gateway: Gateway) -> None:
    async with gateway.async_openai() as client:
        await client.images.generate(prompt="x")
    line = next(line for line in await gateway.log_lines() if line["endpoint"] == "generations")
    assert isinstance(line["queued_ms"], int) and line["queued_ms"] >= 0
