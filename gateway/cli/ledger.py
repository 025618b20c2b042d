"""``image-gateway ledger list | export | verify``: reading the money, for reconciliation.

The commands read the database directly, so they work whether or not a gateway is running.
"""

from __future__ import annotations

import argparse
import json

from gateway.cli.commands import CommandError, fail
from gateway.cli.support import offline
from gateway.core.config import Settings
from gateway.core.ledger import LedgerEntry
from gateway.core.periods import utc_now
from gateway.services.reconcile import (
    entry_json,
    export_csv,
    export_row,
    mismatch_line,
    queries,
    table,
)
from gateway.store.factory import open_store
from gateway.store.manager import Store


@offline
async def list_entries(args: argparse.Namespace, settings: Settings) -> int:
    if args.team is not None and args.team not in settings.teams:
        return fail(f"unknown team {args.team!r}")
    db = await open_store(settings, "reader")
    try:
        if args.entry_id is not None:
            found = await db.find_entry(args.entry_id)
            entries = [found] if found is not None else []
        else:
            entries = await _entries(db, settings, args.team, args.state, args.period)
    finally:
        await db.close()
    if args.json:
        print(json.dumps({"entries": [entry_json(e) for e in entries]}, indent=2))
    else:
        print(table(entries), end="")
    return 0


@offline
async def export_entries(args: argparse.Namespace, settings: Settings) -> int:
    db = await open_store(settings, "reader")
    try:
        entries = await _entries(db, settings, None, None, args.period)
    finally:
        await db.close()
    entries.reverse()  # oldest first, as the provider's Usage Details list them
    if args.format == "json":
        print(json.dumps({"rows": [export_row(e) for e in entries]}, indent=2))
    else:
        print(export_csv(entries), end="")
    return 0


@offline
async def verify_ledger(args: argparse.Namespace, settings: Settings) -> int:
    db = await open_store(settings, "reader")
    try:
        result = await db.verify()
    finally:
        await db.close()
    if not result.mismatches:
        print(f"consistent ({result.entries} entries)")
        return 0
    print(f"INCONSISTENT: {len(result.mismatches)} counter(s) differ from their entries:")
    for mismatch in result.mismatches:
        print(f"  {mismatch_line(mismatch)}")
    return 1


async def _entries(
    db: Store, settings: Settings, team: str | None, state: str | None, period: str | None
) -> list[LedgerEntry]:
    try:
        found = queries(
            settings.teams, team=team, state=state, period=period, now=utc_now(),
            tz=settings.server.tz,
        )  # fmt: skip
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    entries: list[LedgerEntry] = []
    for query in found:
        entries.extend(await db.entries(query))
    entries.sort(key=lambda e: (e.created_at, e.request_id), reverse=True)
    return entries
