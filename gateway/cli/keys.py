"""``image-gateway new-key``, ``hash-key`` and ``keys``: making, hashing and listing team keys."""

from __future__ import annotations

import argparse
import json
import sys

from gateway.cli.commands import CommandError
from gateway.cli.support import offline
from gateway.core.auth import key_digest, new_team_key, plausible_key
from gateway.core.config import Settings
from gateway.core.periods import utc_now
from gateway.services.keylist import format_keys, key_listing
from gateway.store.factory import open_store


def new_key(_args: argparse.Namespace) -> int:
    key = new_team_key()
    print(key)
    print("\nGive the key above to the team; put its hash (not the key) in the config:\n")
    print(f'keys_sha256 = ["{key_digest(key)}"]')
    return 0


def hash_key(args: argparse.Namespace) -> int:
    """``sha256 = "..."`` for a key; one trailing newline (from echo or a file) is not the key's."""
    text = args.key if args.key is not None else sys.stdin.read()
    key = text.removesuffix("\n").removesuffix("\r")
    problem = plausible_key(key)
    if problem is not None:
        raise CommandError(f"not a key: {problem}")
    print(f'sha256 = "{key_digest(key)}"')
    return 0


@offline
async def keys(args: argparse.Namespace, settings: Settings) -> int:
    last_used: dict[str, float] = {}
    try:
        db = await open_store(settings, "reader")
    except FileNotFoundError:  # no ledger yet: no key was ever used
        pass
    else:
        try:
            last_used = await db.key_last_used()
        finally:
            await db.close()
    listing = key_listing(settings, utc_now(), last_used)
    print(json.dumps({"keys": listing}, indent=2) if args.json else format_keys(listing), end="")
    if args.json:
        print()
    return 0
