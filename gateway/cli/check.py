"""``image-gateway check-config``: a config's problems, and whether its database is there."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from gateway.cli.commands import CommandError
from gateway.cli.support import load_config, refuse_fleet_rehearsal
from gateway.core.config import Settings
from gateway.store.errors import PostgresOpenError
from gateway.store.factory import open_store
from gateway.store.migrations import SchemaTooNew, SchemaTooOld


def check_config(args: argparse.Namespace) -> int:
    if (args.path is None) == (args.config is None):
        raise CommandError("check-config: give the config file once, as PATH or --config PATH")
    path: Path = args.path or args.config
    settings = load_config(path, require_central_key=not args.simulate_upstream)
    if args.simulate_upstream:
        refuse_fleet_rehearsal(settings)
    if settings.storage.backend == "postgres":
        try:
            state = asyncio.run(_probe_postgres(settings))
        except (PostgresOpenError, SchemaTooNew) as exc:
            raise CommandError(f"{path}: {settings.storage.dsn_source}: {exc}") from None
        print(f"{path}: OK ({len(settings.teams)} teams, PostgreSQL: {state})")
        return 0
    database = settings.database
    state = "exists" if database.exists() else "does not exist yet: the gateway will create it"
    print(f"{path}: OK ({len(settings.teams)} teams, database {database}: {state})")
    return 0


async def _probe_postgres(settings: Settings) -> str:
    """Whether the configured PostgreSQL answers, and at which schema (nothing is changed)."""
    try:
        db = await open_store(settings, "reader")
    except SchemaTooOld as exc:
        return f"reachable; {str(exc).split(';')[0]} (the gateway migrates it at start)"
    await db.close()
    return "reachable, schema current"
