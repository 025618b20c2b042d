"""The access-log writer: one JSON line per record, reopened on SIGHUP or when rotated away."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from gateway.ops.accesslog import FIELDS, AccessLog, new_record, result_id, timestamp


class Ticks:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_rotated_file_is_noticed_without_a_signal(tmp_path: Path) -> None:
    path, ticks = tmp_path / "access.log", Ticks()
    log = AccessLog(str(path), monotonic=ticks)
    log.write({"n": 1})
    path.rename(tmp_path / "access.log.1")  # logrotate, without the reload
    log.write({"n": 2})  # checked at most once a second: still the old file
    ticks.now += 1.5
    log.write({"n": 3})
    log.close()
    assert lines(tmp_path / "access.log.1") == [{"n": 1}, {"n": 2}]
    assert lines(path) == [{"n": 3}]


def test_reopen_follows_a_moved_file(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    log.write({"n": 1})
    path.rename(tmp_path / "old.log")
    log.reopen()  # what SIGHUP does
    log.write({"n": 2})
    log.close()
    assert (lines(tmp_path / "old.log"), lines(path)) == ([{"n": 1}], [{"n": 2}])


def test_stdout_target(capsys: pytest.CaptureFixture[str]) -> None:
    log = AccessLog("-")
    log.write(new_record("GET", "/healthz", "req_1", None))
    log.reopen()
    record = json.loads(capsys.readouterr().out)
    assert list(record) == list(FIELDS)
    assert (record["request_id"], record["cost_cny"], record["client"]) == ("req_1", 0.0, None)


def test_helpers() -> None:
    assert timestamp(1795655106.4519) == "2026-11-26T01:05:06.451Z"
    assert len(result_id("https://api.icodeeasy.cc/v1/images/files/x.png")) == 16
    assert new_record("GET", "/", "r", "x" * 500)["client"] == "x" * 200


class CountingStream:
    """A text stream that counts its writes and flushes."""

    def __init__(self, path: Path) -> None:
        self.inner = path.open("a", encoding="utf-8")
        self.writes = self.flushes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return self.inner.write(text)

    def flush(self) -> None:
        self.flushes += 1
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()


async def test_in_a_loop_the_lines_of_one_iteration_are_written_together(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    log._stream.close()
    stream = log._stream = CountingStream(path)  # type: ignore[assignment]
    for n in range(3):
        log.write({"n": n})
    assert path.read_text() == ""  # not yet: at the start of the next iteration
    await asyncio.sleep(0)
    assert lines(path) == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert (stream.writes, stream.flushes) == (1, 1)
    log.write({"n": 3})
    log.write({"n": 4})
    log.close()  # shutdown writes what is pending, once
    await asyncio.sleep(0)
    assert [line["n"] for line in lines(path)] == [0, 1, 2, 3, 4]
    assert (stream.writes, stream.flushes) == (2, 2)


async def test_lines_pending_at_a_reopen_go_to_the_file_they_were_due_in(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    log.write({"n": 1})
    path.rename(tmp_path / "old.log")
    log.reopen()
    log.write({"n": 2})
    await asyncio.sleep(0)
    log.close()
    assert (lines(tmp_path / "old.log"), lines(path)) == ([{"n": 1}], [{"n": 2}])
