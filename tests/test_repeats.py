"""Repeated identical log lines are logged once, then as a count every window (issue 21)."""

from __future__ import annotations

import logging

import pytest

from gateway.ops.repeats import RepeatFilter


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def logged() -> tuple[logging.Logger, list[str], Clock]:
    clock = Clock()
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(f"{record.levelname} {record.getMessage()}")

    handler = Keep()
    handler.addFilter(RepeatFilter(window_s=10, clock=clock))
    logger = logging.getLogger("test.repeats")
    logger.propagate = False
    logger.handlers = [handler]
    logger.setLevel(logging.INFO)
    return logger, lines, clock


def test_an_outage_logs_each_error_once_per_window_with_a_count(logged) -> None:
    logger, lines, clock = logged
    for second in range(25):  # 10 refused requests a second for 25 s
        clock.now = float(second)
        for _ in range(10):
            logger.error("PostgreSQL cannot be used: %s", "Connection refused")
    assert lines == [
        "ERROR PostgreSQL cannot be used: Connection refused",
        "ERROR PostgreSQL cannot be used: Connection refused (and 99 more like it in the last 10 s)",
        "ERROR PostgreSQL cannot be used: Connection refused (and 99 more like it in the last 10 s)",
    ]


def test_different_messages_and_info_lines_are_not_held_back(logged) -> None:
    logger, lines, clock = logged
    logger.error("disk full")
    logger.error("connection refused")
    logger.warning("disk full")  # another level: another line
    logger.info("listening")
    logger.info("listening")
    logger.error("disk full")
    clock.now = 10.0
    logger.error("disk full")
    assert lines == [
        "ERROR disk full",
        "ERROR connection refused",
        "WARNING disk full",
        "INFO listening",
        "INFO listening",
        "ERROR disk full (and 1 more like it in the last 10 s)",
    ]
