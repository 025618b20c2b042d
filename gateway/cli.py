"""The ``image-gateway`` command: serve, new-key, check-config, usage. The only reader of argv."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from gateway import __version__
from gateway.auth import key_digest, new_team_key
from gateway.config import ConfigError, load_settings
from gateway.db import Database
from gateway.periods import utc_now
from gateway.usage import format_report, usage_report


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return int(args.run(args) or 0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="image-gateway", description=__doc__)
    parser.add_argument("--version", action="version", version=f"image-gateway {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gateway")
    source = serve.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="the TOML config file")
    source.add_argument(
        "--demo", action="store_true", help="run with an embedded simulated upstream"
    )
    serve.add_argument("--host", default="127.0.0.1", help="demo only: address to listen on")
    serve.add_argument("--port", type=int, default=8080, help="demo only: port to listen on")
    serve.set_defaults(run=_serve)

    new_key = commands.add_parser("new-key", help="print a new team key and its config line")
    new_key.set_defaults(run=_new_key)

    check = commands.add_parser("check-config", help="validate a config file")
    check.add_argument("path", type=Path)
    check.set_defaults(run=_check_config)

    usage = commands.add_parser("usage", help="report each team's budget and spend")
    usage.add_argument("--config", type=Path, required=True)
    usage.add_argument("--team", help="only this team")
    usage.add_argument("--json", action="store_true", help="print JSON")
    usage.set_defaults(run=_usage)
    return parser


def _setup_logging() -> None:
    # Under systemd the journal stamps every line itself.
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    logging.basicConfig(
        level=logging.INFO, format=stamp + "%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def _serve(args: argparse.Namespace) -> int:
    _setup_logging()
    if args.demo:
        from gateway.demo import run_demo  # noqa: PLC0415 - the simulator loads only for the demo

        asyncio.run(run_demo(args.host, args.port))
        return 0
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        _print_problems(args.config, exc)
        return 1
    from gateway.server import serve  # noqa: PLC0415 - keeps `new-key` and `check-config` light

    asyncio.run(serve(settings, config_path=args.config))
    return 0


def _new_key(_args: argparse.Namespace) -> int:
    key = new_team_key()
    print(key)
    print("\nGive the key above to the team; put its hash (not the key) in the config:\n")
    print(f'keys_sha256 = ["{key_digest(key)}"]')
    return 0


def _check_config(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.path)
    except ConfigError as exc:
        _print_problems(args.path, exc)
        return 1
    print(f"{args.path}: OK ({len(settings.teams)} teams, database {settings.database})")
    return 0


def _usage(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config, require_central_key=False)
    except ConfigError as exc:
        _print_problems(args.config, exc)
        return 1
    if args.team is not None and args.team not in settings.teams:
        print(f"unknown team {args.team!r}", file=sys.stderr)
        return 1

    async def report() -> dict:
        db = await Database.open_read_only(settings.database)
        try:
            return await usage_report(db, settings, utc_now(), only=args.team)
        finally:
            await db.close()

    try:
        result = asyncio.run(report())
    except FileNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(
        json.dumps(result, indent=2) if args.json else format_report(result),
        end="\n" if args.json else "",
    )
    return 0


def _print_problems(path: Path, exc: ConfigError) -> None:
    print(f"{path}: invalid config", file=sys.stderr)
    for problem in exc.problems:
        print(f"  - {problem}", file=sys.stderr)
