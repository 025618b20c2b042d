"""``image-gateway db copy``: move a SQLite history into an empty PostgreSQL database."""

from __future__ import annotations

import argparse

from gateway.cli.commands import fail
from gateway.cli.support import offline
from gateway.core.config import Settings
from gateway.store.dbcopy import CopyRefused, copy_sqlite_to_postgres
from gateway.store.factory import open_store


@offline
async def copy_database(args: argparse.Namespace, settings: Settings) -> int:
    if settings.storage.backend != "postgres" or settings.storage.dsn is None:
        return fail(f'{args.config} must set [storage] backend = "postgres"')
    target = await open_store(settings)  # migrates the target to this code's schema
    await target.close()
    try:
        copied = await copy_sqlite_to_postgres(args.source, settings.storage.dsn.reveal())
    except CopyRefused as exc:
        return fail(str(exc))
    rows = ", ".join(f"{count} {name}" for name, count in copied.rows.items())
    if copied.migrated_from is not None:
        print(
            f"{args.source} is at schema step {copied.migrated_from}: copied from a "
            "temporary copy migrated to this release's schema (the file itself is unchanged)"
        )
    print(f"copied {rows}")
    print(f"consistent ({copied.entries} entries)")
    return 0
