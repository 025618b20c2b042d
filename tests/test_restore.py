"""The watermark and the restored-ledger check (issue 21), without a gateway: the pure rules, the
file, and the check against a real SQLite ledger, including a fleet's accepted restore."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gateway.core.config_digest import config_sha256
from gateway.core.restore import Position, Watermark, further, gap
from gateway.ops import watermark as watermark_file
from gateway.services.restores import RestoredLedger, check_restored
from gateway.store.manager import Store
from gateway.store.sqlite import SQLiteEngine
from tests.conftest import build_settings

AHEAD = Watermark(Position(10, 9, 1, 2000.0, 40_000), written_at=3000.0)


def test_a_ledger_behind_on_any_count_has_a_gap() -> None:
    assert gap(Position(10, 9, 1, 2000.0, 40_000), AHEAD) is None
    assert gap(Position(12, 12, 1, 2500.0, 50_000), AHEAD) is None
    assert gap(Position(9, 9, 1), None) is None  # a fresh install
    missing = gap(Position(7, 7, 1, 1000.0, 30_000), AHEAD)
    assert missing is not None and (missing.requests, missing.cny) == (3, 10_000)
    assert missing.describe("at x.db") == (
        "the ledger at x.db is older than what this gateway had committed: spend from "
        "1970-01-01 00:16:40 UTC to 1970-01-01 00:33:20 UTC is missing (3 request(s), "
        "1.0000 CNY spent), and budgets would grant it again; restore a newer backup, or "
        "accept the loss by starting once with `serve --accept-restored-ledger`"
    )
    # A settlement or a resolution lost is spend lost too, even with every hold there.
    assert gap(Position(10, 8, 1, 2000.0, 40_000), AHEAD) is not None
    assert gap(Position(10, 9, 0, 2000.0, 40_000), AHEAD) is not None


def test_racing_writers_keep_the_further_watermark() -> None:
    behind = Watermark(Position(5, 5, 0), written_at=4000.0)
    assert further(AHEAD, behind) is AHEAD
    assert further(behind, AHEAD) is AHEAD
    assert further(None, behind) is behind


def test_the_file_is_replaced_whole_and_a_broken_one_is_named(tmp_path: Path) -> None:
    path = tmp_path / "state" / "ledger.watermark"
    assert watermark_file.read(path) is None
    watermark_file.write(path, AHEAD)
    assert watermark_file.read(path) == AHEAD
    watermark_file.write(path, Watermark(Position(1, 1, 0), 5000.0))  # merged: kept
    assert watermark_file.read(path) == AHEAD
    watermark_file.write(path, Watermark(Position(1, 1, 0), 5000.0), merge=False)
    assert watermark_file.read(path) == Watermark(Position(1, 1, 0), 5000.0)
    assert os.listdir(path.parent) == ["ledger.watermark"]  # no temporary file left
    path.write_text("{half")
    with pytest.raises(watermark_file.WatermarkUnreadable, match=str(path)):
        watermark_file.read(path)


async def test_a_fleet_instance_follows_a_restore_accepted_elsewhere(tmp_path: Path) -> None:
    store = Store(await SQLiteEngine.open(tmp_path / "gateway.db"))
    mine, theirs = tmp_path / "a.watermark", tmp_path / "b.watermark"
    try:
        for path in (mine, theirs):  # both saw a ledger further than the (restored) one
            watermark_file.write(path, AHEAD)
        with pytest.raises(RestoredLedger, match=r"spend from its beginning to .* \(10 request"):
            await check_restored(store, mine, accept=False, where="at gateway.db")
        await check_restored(store, mine, accept=True, where="at gateway.db")
        (record,) = await store.restores_since(0)
        assert json.loads(record)["missing_requests"] == 10
        assert watermark_file.read(mine).position == Position()  # type: ignore[union-attr]
        # The other instance's watermark predates the acceptance: it starts without the flag.
        await check_restored(store, theirs, accept=False, where="at gateway.db")
        assert watermark_file.read(theirs).position == Position()  # type: ignore[union-attr]
    finally:
        await store.close()


def test_the_config_hash_leaves_out_secrets_and_per_instance_places(tmp_path: Path) -> None:
    one = build_settings(tmp_path, "http://127.0.0.1:1")
    other = build_settings(
        tmp_path,
        "http://127.0.0.1:1",
        {"TEST_UPSTREAM_KEY": "sk_another_central_key_0123456789"},  # a rotated key is not drift
        server={"port": 8081},
        log={"access": "b.log"},
        storage={"watermark": "b.watermark"},
    )
    assert config_sha256(one) == config_sha256(other)
    assert len(config_sha256(one)) == 12
    richer = build_settings(tmp_path, "http://127.0.0.1:1", teams={"design": {"budget_cny": 7}})
    assert config_sha256(richer) != config_sha256(one)
