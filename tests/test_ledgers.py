"""The ledgers tests start on (tests/ledgers.py): a copy of the one migrated once per session is
the ledger a first start makes, and a test marked ``new_ledger`` still gets a first start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.http.keys import DB
from gateway.store import migrations
from gateway.store.postgres import PostgresEngine
from gateway.store.sqlite import SQLiteEngine
from tests.client import post
from tests.conftest import Gateway, Upstream, books_balance, gateway_log_text
from tests.ledgers import migrated_sqlite

MIGRATED = "database migrated to schema step"


async def schema_step(gateway: Gateway) -> int:
    rows = await gateway.app[DB].engine._rows("SELECT value FROM meta WHERE key = 'schema_step'")
    return int(rows[0][0])


def migration_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Every migration logged so far, by the test's own gateways or a template made for it."""
    records = [*caplog.get_records("setup"), *caplog.get_records("call")]
    return [r.getMessage() for r in records if r.getMessage().startswith(MIGRATED)]


async def test_a_gateway_starts_on_a_copy_already_migrated(
    start_gateway: Any, upstream: Upstream, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = await start_gateway()
    assert not gateway.app[DB].created
    assert "NEW LEDGER" not in gateway_log_text(caplog)
    assert migration_lines(caplog) == []
    assert await schema_step(gateway) == migrations.load(backend)[-1].version  # type: ignore[arg-type]
    assert (await post(gateway))[0] == 200  # a working ledger: it takes money
    await books_balance(gateway, upstream)


@pytest.mark.new_ledger
async def test_a_new_ledger_test_starts_with_none_and_the_gateway_migrates_it(
    start_gateway: Any,
    upstream: Upstream,
    backend: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gateway = await start_gateway()
    assert gateway.app[DB].created
    assert "NEW LEDGER: no database existed at" in gateway_log_text(caplog)
    steps = migrations.load(backend)  # type: ignore[arg-type]
    assert migration_lines(caplog) == [f"{MIGRATED} {s.version} ({s.name})" for s in steps]
    assert (await post(gateway))[0] == 200
    await books_balance(gateway, upstream)


SQLITE_SCHEMA = "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"
POSTGRES_SCHEMA = """
SELECT 'column', table_name || '.' || column_name || ' ' || data_type || ' '
       || coalesce(column_default, '') || ' ' || is_nullable
  FROM information_schema.columns WHERE table_schema = 'public'
UNION ALL SELECT 'index', indexdef FROM pg_indexes WHERE schemaname = 'public'
UNION ALL SELECT 'constraint', conrelid::regclass || ' ' || pg_get_constraintdef(oid)
  FROM pg_constraint WHERE connamespace = 'public'::regnamespace
UNION ALL SELECT 'trigger', pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal
UNION ALL SELECT 'function', p.proname || ' ' || md5(p.prosrc)
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'public'
UNION ALL SELECT 'meta', key || '=' || value FROM meta
ORDER BY 1, 2
"""


async def test_the_sqlite_copy_is_what_a_first_start_makes(
    sqlite_template: Path, tmp_path: Path
) -> None:
    copy = await SQLiteEngine.open(migrated_sqlite(sqlite_template, tmp_path / "copy.db"))
    made = await SQLiteEngine.open(tmp_path / "made.db")
    try:
        assert not copy.created and made.created
        copied, fresh = await copy._rows(SQLITE_SCHEMA), await made._rows(SQLITE_SCHEMA)
        assert copied == fresh and len(fresh) > 20
        meta = "SELECT key, value FROM meta ORDER BY key"
        assert await copy._rows(meta) == await made._rows(meta)
    finally:
        await copy.close()
        await made.close()


async def test_the_postgres_copy_is_what_a_first_start_makes(
    migrated_postgres_dsn: str, postgres_dsn: str
) -> None:
    copy = await PostgresEngine.open(migrated_postgres_dsn, register=False)
    made = await PostgresEngine.open(postgres_dsn, register=False)
    try:
        assert not copy.created and made.created
        copied, fresh = await copy._rows(POSTGRES_SCHEMA), await made._rows(POSTGRES_SCHEMA)
        assert copied == fresh and len(fresh) > 50
    finally:
        await copy.close()
        await made.close()


async def test_the_postgres_template_takes_no_connection(
    postgres_server: Any, postgres_template: str
) -> None:
    """No test can change the copies of the tests after it through the template itself."""
    with pytest.raises(asyncpg.PostgresError, match="not currently accepting connections"):
        await asyncpg.connect(postgres_server.dsn_for(postgres_template))
