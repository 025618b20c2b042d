"""``image-gateway ledger list | resolve | expire | export | verify``: reconciling and closing
money.

The commands read the database directly, so they work whether or not a gateway is running; a
resolution or expiry written here is seen by a running gateway's next budget check (the counters
live in the database), and a gateway writes its access-log line on its next pass. Each records
who made it: ``--actor``, by default the OS user.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
from pathlib import Path

from gateway.cli.backup import add_backup_command
from gateway.cli.support import CONFIG_HELP, CommandError, examples, fail, offline
from gateway.core.config import Settings
from gateway.core.ledger import LedgerEntry, actor_problem
from gateway.core.periods import utc_now
from gateway.core.settlement import ExpiryRefused, ResolutionRefused
from gateway.services.reconcile import (
    entry_json,
    expired_line,
    export_csv,
    export_row,
    mismatch_line,
    queries,
    resolved_line,
    table,
)
from gateway.services.resolutions import expire, resolve
from gateway.store.base import UnknownEntry
from gateway.store.dbcopy import CopyRefused, copy_sqlite_to_postgres
from gateway.store.factory import open_store
from gateway.store.manager import Store


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``ledger`` and its subcommands on the main parser."""
    ledger = commands.add_parser("ledger", help="list, resolve, export and verify ledger entries")
    sub = ledger.add_subparsers(required=True, metavar="ACTION")

    show = sub.add_parser(
        "list",
        help="ledger entries, newest first",
        **examples(
            "image-gateway ledger list --config gateway.toml --state uncertain",
            "image-gateway ledger list --config gateway.toml --id <ledger, upstream or task id>",
        ),
    )
    show.add_argument("--config", type=Path, required=True, help=CONFIG_HELP)
    show.add_argument(
        "--state",
        choices=("held", "captured", "released", "uncertain"),
        help="only entries in this state",
    )
    show.add_argument("--team", help="only this team's entries")
    show.add_argument("--period", help="YYYY-MM, YYYY-MM-DD or total (default: the current one)")
    show.add_argument("--id", dest="entry_id", help="one entry, by ledger, upstream or task id")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(run=offline(_list))

    fix = sub.add_parser(
        "resolve",
        help="close an uncertain entry",
        **examples(
            "image-gateway ledger resolve <ledger id> --config gateway.toml --captured "
            '--reason "alice: provider usage shows it"',
            "image-gateway ledger resolve <ledger id> --config gateway.toml --released "
            '--reason "alice: not in the provider\'s records"',
        ),
    )
    fix.add_argument("request_id", help="the entry's ledger id (as `ledger list` shows it)")
    fix.add_argument("--config", type=Path, required=True, help=CONFIG_HELP)
    outcome = fix.add_mutually_exclusive_group(required=True)
    outcome.add_argument("--captured", action="store_true", help="it was generated: charge it")
    outcome.add_argument("--released", action="store_true", help="it was not: free the money")
    fix.add_argument("--images", type=int, help="with --captured: images served (default all)")
    fix.add_argument("--reason", required=True, help="who resolved it and why")
    fix.add_argument("--actor", help="who resolves it (default: the OS user)")
    fix.set_defaults(run=offline(_resolve))

    stuck = sub.add_parser(
        "expire",
        help="turn a held entry stuck past [tasks] max_pending_age_s uncertain",
        **examples(
            "image-gateway ledger expire <ledger id> --config gateway.toml "
            '--reason "its task can never be polled"',
        ),
    )
    stuck.add_argument("request_id", help="the entry's ledger id (as `ledger list` shows it)")
    stuck.add_argument("--config", type=Path, required=True, help=CONFIG_HELP)
    stuck.add_argument("--reason", required=True, help="why it is given up on")
    stuck.add_argument("--actor", help="who expires it (default: the OS user)")
    stuck.set_defaults(run=offline(_expire))

    export = sub.add_parser(
        "export",
        help="one row per request of a period, for reconciliation",
        **examples("image-gateway ledger export --config gateway.toml --period 2026-05 > may.csv"),
    )
    export.add_argument("--config", type=Path, required=True, help=CONFIG_HELP)
    export.add_argument("--period", required=True, help="YYYY-MM, YYYY-MM-DD or total")
    export.add_argument(
        "--format", choices=("csv", "json"), default="csv", help="output format (default csv)"
    )
    export.set_defaults(run=offline(_export))

    check = sub.add_parser(
        "verify",
        help="recompute every counter from the ledger's entries",
        **examples("image-gateway ledger verify --config gateway.toml"),
    )
    check.add_argument("--config", type=Path, required=True, help=CONFIG_HELP)
    check.set_defaults(run=offline(_verify))


async def _list(args: argparse.Namespace, settings: Settings) -> int:
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


def os_user() -> str:
    """Who runs the command: under sudo the user who ran sudo, else the login name."""
    try:
        return os.environ.get("SUDO_USER") or getpass.getuser()
    except OSError:  # no name for this uid (a bare container)
        return f"uid-{os.getuid()}"


async def _resolve(args: argparse.Namespace, settings: Settings) -> int:
    if args.images is not None and not args.captured:
        return fail("--images goes with --captured")
    actor = args.actor if args.actor is not None else os_user()
    problem = actor_problem(actor)
    if problem:
        return fail(f"--actor: {problem}")
    db = await open_store(settings, "writer")
    try:
        entry = await resolve(
            db,
            args.request_id,
            state="captured" if args.captured else "released",
            images=args.images,
            reason=args.reason,
            actor=actor,
            now=utc_now().timestamp(),
            books=None,
        )
    except UnknownEntry:
        return fail(f"no ledger entry has the id {args.request_id!r}")
    except ResolutionRefused as exc:
        return fail(f"cannot resolve {args.request_id}: {exc}")
    finally:
        await db.close()
    print(resolved_line(entry))
    return 0


async def _expire(args: argparse.Namespace, settings: Settings) -> int:
    actor = args.actor if args.actor is not None else os_user()
    problem = actor_problem(actor)
    if problem:
        return fail(f"--actor: {problem}")
    db = await open_store(settings, "writer")
    try:
        entry = await expire(
            db,
            args.request_id,
            reason=args.reason,
            actor=actor,
            now=utc_now().timestamp(),
            max_pending_age_s=settings.tasks.max_pending_age_s,
        )
    except UnknownEntry:
        return fail(f"no ledger entry has the id {args.request_id!r}")
    except ExpiryRefused as exc:
        return fail(f"cannot expire {args.request_id}: {exc}")
    finally:
        await db.close()
    print(expired_line(entry))
    return 0


async def _export(args: argparse.Namespace, settings: Settings) -> int:
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


async def _verify(args: argparse.Namespace, settings: Settings) -> int:
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


def add_db_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``db copy``: move a SQLite history into PostgreSQL; ``db backup``: copy the ledger."""
    db = commands.add_parser("db", help="back up a ledger, or move it between backends")
    sub = db.add_subparsers(required=True, metavar="ACTION")
    copy = sub.add_parser(
        "copy",
        help="copy a SQLite history into an empty PostgreSQL database",
        **examples(
            "image-gateway db copy --from /var/lib/image-gateway/gateway.db --config pg.toml"
        ),
    )
    copy.add_argument("--from", dest="source", type=Path, required=True, help="the SQLite file")
    copy.add_argument("--config", type=Path, required=True, help="the PostgreSQL config")
    copy.set_defaults(run=offline(_copy))
    add_backup_command(sub)


async def _copy(args: argparse.Namespace, settings: Settings) -> int:
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
