"""``image-gateway usage``: each team's budget, spend and images for a period."""

from __future__ import annotations

import argparse
import json

from gateway.cli.commands import CommandError
from gateway.cli.support import offline
from gateway.core.config import Settings
from gateway.core.periods import utc_now
from gateway.services.usage import check_report_args, format_report, usage_report
from gateway.store.factory import open_store


@offline
async def usage(args: argparse.Namespace, settings: Settings) -> int:
    if args.team is not None and args.team not in settings.teams:
        raise CommandError(f"unknown team {args.team!r}")
    try:
        check_report_args(args.period, args.by, settings)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    db = await open_store(settings, "reader")
    try:
        result = await usage_report(
            db, settings, utc_now(), only=args.team, period=args.period, by=args.by
        )
    finally:
        await db.close()
    print(
        json.dumps(result, indent=2) if args.json else format_report(result),
        end="\n" if args.json else "",
    )
    return 0
