"""``image-gateway ledger resolve | expire``: closing money an admin has looked into.

A resolution or expiry written here is seen by a running gateway's next budget check (the
counters live in the database), and a gateway writes its access-log line on its next pass. Each
records who made it: ``--actor``, by default the OS user.
"""

from __future__ import annotations

import argparse
import getpass
import os

from gateway.cli.commands import CommandError, fail
from gateway.cli.support import offline
from gateway.core.config import Settings
from gateway.core.ledger import actor_problem
from gateway.core.periods import utc_now
from gateway.core.settlement import ExpiryRefused, ResolutionRefused
from gateway.services.reconcile import expired_line, resolved_line
from gateway.services.resolutions import expire, resolve
from gateway.store.base import UnknownEntry
from gateway.store.factory import open_store


def os_user() -> str:
    """Who runs the command: under sudo the user who ran sudo, else the login name."""
    try:
        return os.environ.get("SUDO_USER") or getpass.getuser()
    except OSError:  # no name for this uid (a bare container)
        return f"uid-{os.getuid()}"


def _actor(args: argparse.Namespace) -> str:
    """``--actor``, or the OS user; refused when it could not be recorded as given."""
    actor: str = args.actor if args.actor is not None else os_user()
    problem = actor_problem(actor)
    if problem:
        raise CommandError(f"--actor: {problem}")
    return actor


@offline
async def resolve_entry(args: argparse.Namespace, settings: Settings) -> int:
    if args.images is not None and not args.captured:
        return fail("--images goes with --captured")
    actor = _actor(args)
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


@offline
async def expire_entry(args: argparse.Namespace, settings: Settings) -> int:
    actor = _actor(args)
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
