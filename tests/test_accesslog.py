"""The access-log writer: one JSON line per record, reopened on SIGHUP or when rotated away."""

from __future__ import annotations

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
