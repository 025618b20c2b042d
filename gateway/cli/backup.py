"""``image-gateway db backup``: a consistent copy of the ledger, taken while the gateway serves
(README, "Backup and restore")."""

from __future__ import annotations

import argparse
import asyncio

from gateway.cli.commands import fail
from gateway.cli.support import offline
from gateway.core.config import Settings
from gateway.core.restore import Position, when
from gateway.services.reconcile import mismatch_line
from gateway.store.backup import BackupFailed, backup_postgres, backup_sqlite, pg_dump_line
from gateway.store.manager import Store
from gateway.store.sqlite import SQLiteEngine


@offline
async def backup(args: argparse.Namespace, settings: Settings) -> int:
    if settings.storage.backend == "postgres":
        assert settings.storage.dsn is not None, "validated by the config"
        dsn = settings.storage.dsn.reveal()
        try:
            await asyncio.to_thread(backup_postgres, dsn, args.target)
        except BackupFailed as exc:
            return fail(
                f"{exc}; back up with (the password from PGPASSWORD or ~/.pgpass):\n  "
                + pg_dump_line(dsn, args.target)
            )
        print(f"backed up PostgreSQL to {args.target} (pg_dump custom format; see README)")
        return 0
    try:
        await asyncio.to_thread(backup_sqlite, settings.database, args.target)
    except BackupFailed as exc:
        return fail(str(exc))
    copy = Store(await SQLiteEngine.open_read_only(args.target))
    try:
        checked = await copy.verify()
        position = await copy.position()
    finally:
        await copy.close()
    if checked.mismatches:
        print(f"INCONSISTENT: {len(checked.mismatches)} counter(s) differ from their entries:")
        for mismatch in checked.mismatches:
            print(f"  {mismatch_line(mismatch)}")
        return 1
    print(f"backed up {settings.database} to {args.target}: {_summary(position)}")
    print(f"consistent ({checked.entries} entries)")
    return 0


def _summary(position: Position) -> str:
    newest = when(position.last_at) if position.last_at else "none"
    return f"{position.holds} requests, newest {newest}"
