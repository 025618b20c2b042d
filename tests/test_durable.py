"""Background writes at shutdown: one last try, then named; none started after close."""

from __future__ import annotations

import asyncio

import pytest

from gateway.core.errors import StorageUnavailable
from gateway.ops.metrics import Metrics
from gateway.services.durable import Durable


def unsettled(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("gateway_unsettled_results")


async def test_close_gives_each_waiting_write_one_last_try() -> None:
    """The worker may be in a 30 s backoff at shutdown: a release that can land now must not
    be left to start-up recovery, which would call it uncertain (charged)."""
    metrics, never = Metrics(), asyncio.Event()

    async def in_backoff(_: float) -> None:
        await never.wait()

    durable = Durable(metrics, sleep=in_backoff)
    landed: list[str] = []

    async def release() -> None:
        landed.append("release")

    durable.later("release of r1", release)
    assert unsettled(metrics) == 1
    await durable.close()
    assert landed == ["release"] and unsettled(metrics) == 0


async def test_a_write_that_still_fails_at_close_is_named(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    durable = Durable(metrics, sleep=lambda _: asyncio.Event().wait())

    async def unavailable() -> None:
        raise StorageUnavailable("the disk is full")

    durable.later("release of r2", unavailable)
    await durable.close()
    assert "shutting down with 1 write(s) not stored: release of r2" in caplog.text
    durable.later("release of r3", unavailable)  # after close: no worker nobody awaits
    assert durable._worker is not None and durable._worker.done()
    assert "the release of r3 could not be stored before shutdown" in caplog.text
