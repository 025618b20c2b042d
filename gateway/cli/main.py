"""The ``image-gateway`` command: serve, new-key, check-config, usage, ledger, upstreams, results.
The only reader of argv. Every failure a user can cause ends in one line on stderr and exit
status 1."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from gateway import __version__
from gateway.cli import ledger as cli_ledger
from gateway.cli import results as cli_results
from gateway.cli import upstreams as cli_upstreams
from gateway.cli.support import (
    CONFIG_HELP,
    STORE_ERRORS,
    CommandError,
    HelpFormatter,
    examples,
    load_config,
    offline,
)
from gateway.core.auth import key_digest, new_team_key, plausible_key
from gateway.core.config import Settings
from gateway.core.periods import utc_now
from gateway.http.app import StartupError
from gateway.ops.repeats import RepeatFilter
from gateway.services.keylist import format_keys, key_listing
from gateway.services.usage import GROUPINGS, check_report_args, format_report, usage_report
from gateway.store.factory import open_store
from gateway.store.migrations import SchemaTooNew, SchemaTooOld
from gateway.store.postgres import PostgresOpenError

DEMO_HOST, DEMO_PORT = "127.0.0.1", 8080
DESCRIPTION = (
    "A gateway between your teams and a paid OpenAI-Images-compatible upstream: teams use "
    "their unmodified OpenAI SDKs with a team key (igw_...); the gateway holds the one central "
    "key and enforces each team's budget in CNY, with every charge in a ledger."
)
EPILOG = """\
start here:
  image-gateway serve --demo          a simulated upstream: no key, nothing leaves the machine
  image-gateway new-key               a team key and its config line
  image-gateway check-config --config gateway.toml
  image-gateway serve --config gateway.toml

`image-gateway COMMAND --help` shows each command's options and examples."""
PIPE_CLOSED = 128 + 13  # what a shell reports for a command ended by SIGPIPE (`... | head`)


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:  # here, not at exit: a reader that went away is then still ours to handle
            sys.stdout.flush()
    except BrokenPipeError:  # `image-gateway ledger export ... | head`: the reader has enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        return PIPE_CLOSED


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except CommandError as exc:
        print(f"image-gateway: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="image-gateway",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"image-gateway {__version__}",
        help="print the version and exit",
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the gateway",
        description="Run the gateway (production, a rehearsal, or the demo).",
        **examples(
            "image-gateway serve --demo",
            "image-gateway serve --demo --port 9000",
            "image-gateway serve --config /etc/image-gateway/gateway.toml",
            "image-gateway serve --config rehearsal.toml --simulate-upstream",
        ),
    )
    source = serve.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help=CONFIG_HELP)
    source.add_argument(
        "--demo", action="store_true", help="run with an embedded simulated upstream"
    )
    serve.add_argument(
        "--simulate-upstream",
        action="store_true",
        help="with --config: a rehearsal, an embedded simulator in place of each upstream",
    )
    serve.add_argument(
        "--accept-restored-ledger",
        action="store_true",
        help="with --config: start on a ledger restored from an older backup (recorded)",
    )
    serve.add_argument("--host", help="demo only: address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="demo only: port to listen on (default 8080)")
    serve.set_defaults(run=_serve)

    simulate = commands.add_parser(
        "simulate-upstream",
        help="run the simulated upstream alone, for several gateways to share (a fleet rehearsal)",
        description="Run the embedded simulated upstream on its own: point every rehearsing "
        "instance's [upstream] base_url at it (any sk_ central key). GET /__served lists what it "
        "delivered, to match against `image-gateway ledger export`.",
        **examples(
            "image-gateway simulate-upstream --port 9300",
            "image-gateway simulate-upstream --port 9300 --host 0.0.0.0 --delay 0.5",
        ),
    )
    simulate.add_argument("--port", type=int, required=True, help="port to listen on (0: any)")
    simulate.add_argument("--host", default=DEMO_HOST, help="address (default 127.0.0.1)")
    simulate.add_argument(
        "--delay",
        type=float,
        default=None,
        metavar="SECONDS",
        help="time a sync generation takes (default 2; a task takes twice as long)",
    )
    simulate.set_defaults(run=_simulate_upstream)

    new_key = commands.add_parser(
        "new-key",
        help="print a new team key and its config line",
        description="Print a new team key (igw_..., 192 random bits) and the line for the config.",
        **examples("image-gateway new-key"),
    )
    new_key.set_defaults(run=_new_key)

    check = commands.add_parser(
        "check-config",
        help="validate a config file",
        description="Validate a config file: exit 0 saying whether its database exists (or, "
        "for PostgreSQL, answers), or 1 naming the key of each problem.",
        **examples(
            "image-gateway check-config --config /etc/image-gateway/gateway.toml",
            "image-gateway check-config /etc/image-gateway/gateway.toml",
            "image-gateway check-config --config rehearsal.toml --simulate-upstream",
        ),
    )
    check.add_argument("path", type=Path, nargs="?", help="the config file (or use --config)")
    check.add_argument("--config", type=Path, dest="config", help=CONFIG_HELP)
    check.add_argument(
        "--simulate-upstream",
        action="store_true",
        help="check it for a rehearsal (serve --simulate-upstream): no central key needed",
    )
    check.set_defaults(run=_check_config)

    usage = commands.add_parser(
        "usage",
        help="report each team's budget and spend",
        description="Each team's budget, spend and images for a period, read from the ledger "
        "(nothing is written).",
        **examples(
            "image-gateway usage --config gateway.toml",
            "image-gateway usage --config gateway.toml --team design --by key",
            "image-gateway usage --config gateway.toml --period 2026-05 --json",
        ),
    )
    usage.add_argument("--config", type=Path, required=True, help=CONFIG_HELP)
    usage.add_argument("--team", help="only this team")
    usage.add_argument("--period", help="YYYY-MM, YYYY-MM-DD or total (default: the current one)")
    usage.add_argument("--by", choices=GROUPINGS, help="break each team down by this")
    usage.add_argument("--json", action="store_true", help="print JSON")
    usage.set_defaults(run=offline(_usage))

    hash_key = commands.add_parser(
        "hash-key",
        help="print the config line for a key (read from standard input)",
        description="Print the sha256 line for a key, to put in the config (never the key).",
        **examples('printf %s "$KEY" | image-gateway hash-key'),
    )
    hash_key.add_argument("key", nargs="?", help="the key (default: read from standard input)")
    hash_key.set_defaults(run=_hash_key)

    keys = commands.add_parser(
        "keys",
        help="every key of every team, never the key itself",
        description="Every key of every team: name, fingerprint, expiry, caps and last use.",
        **examples(
            "image-gateway keys --config gateway.toml",
            "image-gateway keys --config gateway.toml --json",
        ),
    )
    keys.add_argument("--config", type=Path, required=True, help=CONFIG_HELP)
    keys.add_argument("--json", action="store_true", help="print JSON")
    keys.set_defaults(run=offline(_keys))

    cli_ledger.add_commands(commands)
    cli_ledger.add_db_commands(commands)
    cli_upstreams.add_command(commands)
    cli_results.add_command(commands)
    return parser


def _setup_logging() -> None:
    # Under systemd the journal stamps every line itself.
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    logging.basicConfig(
        level=logging.INFO, format=stamp + "%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for handler in logging.getLogger().handlers:  # an outage logs each error once per window
        handler.addFilter(RepeatFilter())


def _serve(args: argparse.Namespace) -> int:
    if args.demo and args.simulate_upstream:
        raise CommandError("--simulate-upstream is only valid with --config (--demo always is)")
    if args.accept_restored_ledger and (args.demo or args.simulate_upstream):
        raise CommandError("--accept-restored-ledger goes with --config alone")
    if args.config is not None and (args.host is not None or args.port is not None):
        raise CommandError("--host and --port are for --demo; set [server] host and port instead")
    _setup_logging()
    if args.demo:
        from gateway.cli.demo import DEMO_DIR, run_demo  # noqa: PLC0415 - loads the simulator

        port = DEMO_PORT if args.port is None else args.port
        return _run_server(run_demo(args.host or DEMO_HOST, port, DEMO_DIR.absolute()))
    if args.simulate_upstream:
        settings = load_config(args.config, require_central_key=False)
        refuse_fleet_rehearsal(settings)
        from gateway.cli.rehearsal import rehearse  # noqa: PLC0415 - loads the simulator

        return _run_server(rehearse(settings, args.config))
    settings = load_config(args.config)
    from gateway.http.server import serve  # noqa: PLC0415 - keeps `new-key` and `check-config` light

    return _run_server(
        serve(
            settings,
            config_path=args.config,
            accept_restored_ledger=args.accept_restored_ledger,
        )
    )


def refuse_fleet_rehearsal(settings: Settings) -> None:
    """``--simulate-upstream`` is for one process: on PostgreSQL, point at the shared one."""
    if settings.storage.backend == "postgres":
        raise CommandError(
            "--simulate-upstream gives each instance a simulator of its own, so a fleet on "
            "PostgreSQL would lose its tasks between instances: run `image-gateway "
            "simulate-upstream --port N` once and point each instance's [upstream] base_url "
            "at it (with any sk_ key), then `serve --config` as usual"
        )


def _simulate_upstream(args: argparse.Namespace) -> int:
    from gateway.cli.simulate import (  # noqa: PLC0415 - loads the simulator
        DEFAULT_DELAY_S,
        banner,
        simulate_upstream,
    )

    delay = DEFAULT_DELAY_S if args.delay is None else args.delay
    if not 0 <= delay <= 600:
        raise CommandError("--delay must be from 0 to 600 seconds")
    if not 0 <= args.port <= 65535:
        raise CommandError("--port must be a port number from 0 to 65535")
    _setup_logging()
    return _run_server(
        simulate_upstream(
            args.host,
            args.port,
            delay_s=delay,
            on_ready=lambda url: print(banner(url, delay), flush=True),
        )
    )


def _run_server(main: object) -> int:
    """Run the server; a failure to start is one line, not a traceback."""
    try:
        asyncio.run(main)  # type: ignore[arg-type]
    except (StartupError, *STORE_ERRORS) as exc:
        raise CommandError(f"cannot start: {exc}") from None
    return 0


def _new_key(_args: argparse.Namespace) -> int:
    key = new_team_key()
    print(key)
    print("\nGive the key above to the team; put its hash (not the key) in the config:\n")
    print(f'keys_sha256 = ["{key_digest(key)}"]')
    return 0


def _hash_key(args: argparse.Namespace) -> int:
    """``sha256 = "..."`` for a key; one trailing newline (from echo or a file) is not the key's."""
    text = args.key if args.key is not None else sys.stdin.read()
    key = text.removesuffix("\n").removesuffix("\r")
    problem = plausible_key(key)
    if problem is not None:
        raise CommandError(f"not a key: {problem}")
    print(f'sha256 = "{key_digest(key)}"')
    return 0


async def _keys(args: argparse.Namespace, settings: Settings) -> int:
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


def _check_config(args: argparse.Namespace) -> int:
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


async def _usage(args: argparse.Namespace, settings: Settings) -> int:
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
