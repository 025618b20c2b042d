"""The command line against broken and hostile inputs found while trying issue 19: each test
failed before (the docstring says how), and now ends in one line, or quietly, at once."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import shutil
import sqlite3
import sys
from pathlib import Path

import pytest

from gateway.core.config import ConfigError, parse_settings
from gateway.core.ledger import LedgerEntry
from gateway.services.reconcile import export_csv, export_row
from gateway.store import migrations
from tests.conftest import PG_URL_ENV, UPSTREAM_KEY, base_config
from tests.process import to_toml

CLI_BOUND_S = 30  # a command that has not exited by then hangs
FIXTURE_01 = Path(__file__).parent / "fixtures" / "ledger" / "gateway-0.1.0.db"


async def run(
    *args: str, env: dict[str, str] | None = None, stdout: int | None = None
) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args,
        env={**os.environ, "TEST_UPSTREAM_KEY": UPSTREAM_KEY, **(env or {})},
        stdout=asyncio.subprocess.PIPE if stdout is None else stdout,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CLI_BOUND_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"`image-gateway {' '.join(args)}` hung") from None
    return proc.returncode or 0, (out or b"").decode(), err.decode()


def sqlite_config(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(to_toml(base_config(tmp_path, "http://127.0.0.1:9")))
    return path


READERS = [
    ("usage",),
    ("ledger", "list"),
    ("ledger", "export", "--period", "total"),
    ("ledger", "verify"),
    ("keys",),
]


@pytest.mark.parametrize("command", READERS, ids=[" ".join(c) for c in READERS])
@pytest.mark.parametrize("database", ["another schema", "not a database"])
async def test_a_read_only_tool_on_a_database_it_cannot_use_exits_at_once(
    tmp_path: Path, command: tuple[str, ...], database: str
) -> None:
    """The read-only connection was left open when the version check raised: the one line was
    printed, then the process never exited (aiosqlite's thread kept it alive)."""
    config = sqlite_config(tmp_path)
    if database == "another schema":
        shutil.copy(FIXTURE_01, tmp_path / "gateway.db")  # a 0.1 ledger: schema 1
    else:
        (tmp_path / "gateway.db").write_bytes(b"not a database, " * 256)
    code, out, err = await run(*command, "--config", str(config))
    assert code == 1, (out, err)
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert str(tmp_path / "gateway.db") in err


MALFORMED = {
    "a port that is not a number": "postgresql://gw:hunter2-secret@127.0.0.1:abc/db",
    "a port out of range": "postgresql://gw:hunter2-secret@127.0.0.1:99999/db",
    "an unclosed IPv6 address": "postgresql://gw:hunter2-secret@[::1/db",
}
PG_COMMANDS = [
    ("serve", "--config"),
    ("check-config",),
    ("ledger", "list", "--config"),
    ("db", "copy", "--from", "x.db", "--config"),
]


@pytest.mark.parametrize("command", PG_COMMANDS, ids=[" ".join(c[:2]) for c in PG_COMMANDS])
@pytest.mark.parametrize("dsn", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_postgresql_url_is_one_line_naming_the_key(
    tmp_path: Path, command: tuple[str, ...], dsn: str
) -> None:
    """asyncpg's ValueError / OverflowError escaped every handler: a 54-87 line traceback."""
    config = base_config(tmp_path, "http://127.0.0.1:9")
    config["storage"] = {"backend": "postgres", "dsn_env": PG_URL_ENV}
    config["server"]["port"] = 0
    path = tmp_path / "pg.toml"
    path.write_text(to_toml(config))
    code, out, err = await run(*command, str(path), env={PG_URL_ENV: dsn})
    assert code == 1
    assert len(err.strip().splitlines()) == 1, err
    assert "storage.dsn_env" in err and "malformed" in err
    assert "hunter2" not in out + err


def test_a_well_formed_url_with_several_hosts_or_a_socket_is_accepted() -> None:
    for dsn in (
        "postgresql://gw:p%40ss@db1:5432,db2:5433/gateway",
        "postgresql://gw@[::1]:5432/gateway?sslmode=disable",
        "postgresql:///gateway?host=/run/postgresql&port=5432",
    ):
        data = base_config(Path("/tmp"), "http://127.0.0.1:9")
        data["storage"] = {"backend": "postgres", "dsn_env": "DB"}
        env = {"DB": dsn, "TEST_UPSTREAM_KEY": UPSTREAM_KEY}
        settings = parse_settings(data, base_dir=Path("/tmp"), env=env)
        assert settings.storage.dsn is not None and settings.storage.dsn.reveal() == dsn


def test_an_expiry_in_quotes_names_its_type() -> None:
    """The message lacked its f prefix: it said `got {type(value).__name__}` literally."""
    data = base_config(Path("/tmp"), "http://127.0.0.1:9")
    data["teams"]["design"]["keys"] = [
        {"name": "web", "sha256": "ab" * 32, "expires": "2027-01-31"}
    ]
    with pytest.raises(ConfigError) as refused:
        parse_settings(data, base_dir=Path("/tmp"), env={"TEST_UPSTREAM_KEY": UPSTREAM_KEY})
    (problem,) = [p for p in refused.value.problems if "expires" in p]
    assert problem.endswith("got str") and "{" not in problem


HOSTILE = ["=1+2", "+1", "-2+3", "@SUM(A1)", "\t=1", "\r=1", '=HYPERLINK("http://x","y")']


@pytest.mark.parametrize("text", HOSTILE)
def test_export_neutralises_spreadsheet_formulas_in_csv_only(text: str) -> None:
    """Upstream text (an error kept as the reason, an upstream id) went into CSV cells as is:
    a spreadsheet opening the export ran it as a formula (OWASP's CSV injection)."""
    entry = LedgerEntry(
        request_id="req_1", team="design", period="monthly:2026-11", created_at=0.0,
        mode="sync", quality="medium", n=1, unit_price=2000, held=2000, settled_state="released",
        settled_amount=0, images=0, overrun=0, upstream_id=text, task_id=None, reason=text,
        settled_at=1.0, resolution=None,
    )  # fmt: skip
    (row,) = csv.DictReader(io.StringIO(export_csv([entry]), newline=""))
    assert row["reason"] == "'" + text and row["upstream_id"] == "'" + text
    assert row["request_id"] == "req_1" and row["amount_cny"] == "0.0"
    assert export_row(entry)["reason"] == text  # JSON keeps the text as it is


async def test_db_copy_migrates_a_copy_of_a_0_1_database(tmp_path: Path, postgres_dsn: str) -> None:
    """A 0.1 SQLite file was refused ("start the gateway once"): exactly the file an admin
    moving from 0.1 to PostgreSQL has. Now a temporary copy is migrated and copied; the file
    is left as it was."""
    source = tmp_path / "gateway-0.1.db"
    shutil.copy(FIXTURE_01, source)
    before = source.read_bytes()
    config = base_config(tmp_path, "http://127.0.0.1:9")
    config["storage"] = {"backend": "postgres", "dsn_env": PG_URL_ENV}
    path = tmp_path / "pg.toml"
    path.write_text(to_toml(config))
    env = {PG_URL_ENV: postgres_dsn}
    code, out, err = await run("db", "copy", "--from", str(source), "--config", str(path), env=env)
    assert code == 0, err
    assert "schema step 1" in out and "the file itself is unchanged" in out
    assert out.splitlines()[-1] == "consistent (11 entries)"
    assert source.read_bytes() == before
    with sqlite3.connect(source) as conn:
        assert conn.execute("SELECT value FROM meta").fetchall() == [("1",)]
    code, out, err = await run("ledger", "verify", "--config", str(path), env=env)
    assert (code, out.strip()) == (0, "consistent (11 entries)")
    latest = migrations.load("postgres")[-1].version
    assert latest >= 6


COMMANDS = [
    ("--version",),
    ("--help",),
    ("new-key",),
    ("hash-key", "igw_a_plausible_key_for_the_pipe_test_000"),
    ("check-config", "{config}"),
    ("usage", "--config", "{config}"),
    ("keys", "--config", "{config}"),
    ("ledger", "list", "--config", "{config}", "--period", "total"),
    ("ledger", "export", "--config", "{config}", "--period", "total"),
    ("ledger", "verify", "--config", "{config}"),
]


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c[:2]) for c in COMMANDS])
async def test_output_into_a_closed_pipe_exits_quietly(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    """`image-gateway ... | head` ended in a BrokenPipeError traceback once head had gone."""
    config = sqlite_config(tmp_path)
    await _a_ledger(tmp_path)
    reader, writer = os.pipe()
    os.close(reader)  # the reader has gone before the first write: deterministic
    try:
        args = [a.format(config=config) for a in command]
        code, _, err = await run(*args, stdout=writer)
    finally:
        os.close(writer)
    # 141 as for a command SIGPIPE ended; argparse's own --help/--version swallow the error, 0
    assert err == "" and code == (0 if command[0].startswith("--") else 141), err


async def _a_ledger(tmp_path: Path) -> None:
    """A current, non-empty ledger at tmp_path/gateway.db."""
    from gateway.core.ledger import Capture, Hold
    from gateway.store.manager import Store
    from gateway.store.sqlite import SQLiteEngine

    store = Store(await SQLiteEngine.open(tmp_path / "gateway.db"))
    try:
        hold = Hold("req_1", "design", "total", 1.0, "generations", "sync", "medium", 1, 2000,
                    10**6, "fp")  # fmt: skip
        await store.reserve(hold)
        await store.settle("req_1", Capture(images=1, amount=2000), 2.0)
    finally:
        await store.close()
