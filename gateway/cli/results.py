"""``image-gateway results purge --config PATH [--team T] [--before DATE]``: delete stored result
images now (a privacy request, a team leaving), beside a running gateway or without one.

The images' index rows are marked deleted (their gateway URLs answer 410 ``result_expired``) and
the files no live image names are removed. The ledger is not touched.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from datetime import date, datetime

from gateway.cli.commands import CommandError
from gateway.cli.support import offline
from gateway.core.config import Settings
from gateway.services.results import delete_images, open_blobs
from gateway.store.factory import open_store
from gateway.store.results import Deletion

DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


@offline
async def purge(args: argparse.Namespace, settings: Settings) -> int:
    which = Deletion(team=args.team, before=_before(args.before, settings))
    if args.team is not None and args.team not in settings.teams:
        print(f"note: {args.team} is not a team of this config; purging its images anyway")
    db = await open_store(settings, "writer")
    try:
        deleted = await delete_images(
            db.results, open_blobs(settings.results.directory), which, time.time()
        )
    finally:
        await db.close()
    requests = len({row.request_id for row in deleted})
    freed = sum(row.bytes or 0 for row in deleted)
    if args.json:
        print(json.dumps({"images": len(deleted), "requests": requests, "bytes": freed}))
    else:
        print(f"deleted {len(deleted)} image(s) of {requests} request(s), {freed} bytes")
    return 0


def _before(value: str | None, settings: Settings) -> float | None:
    if value is None:
        return None
    try:
        if DAY.fullmatch(value):
            day = date.fromisoformat(value)
            return datetime(day.year, day.month, day.day, tzinfo=settings.server.tz).timestamp()
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise CommandError(f"--before {value!r}: not a date (YYYY-MM-DD) or time") from None
    if moment.tzinfo is None:
        raise CommandError(f"--before {value!r}: give the time's offset (such as +08:00 or Z)")
    return moment.timestamp()
