"""The command line's shape: every command, its arguments and help, and where its work lives.

Each command names its action as ``module:function``, imported only when that command runs, so
``--help`` and every command load just what they use: ``ledger list`` on SQLite never imports
aiohttp or asyncpg. This module itself imports no more than argparse and the ledger's
vocabulary.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from gateway import __version__
from gateway.core.ledger import Grouping, HoldState

Run = Callable[[argparse.Namespace], int]
if TYPE_CHECKING:  # subscriptable for the type checker only
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]

DEMO_HOST, DEMO_PORT = "127.0.0.1", 8080
ADMIN_KEY_ENV = "IMAGE_GATEWAY_ADMIN_KEY"
CONFIG_HELP = "the gateway's TOML config file"
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


class CommandError(Exception):
    """A command cannot run as asked; the message is the one line to print."""


def fail(message: str) -> int:
    print(f"image-gateway: {message}", file=sys.stderr)
    return 1


def later(module: str, name: str) -> Run:
    """The action ``name`` of ``gateway.cli.<module>``, imported when the command runs."""

    def run(args: argparse.Namespace) -> int:
        action: Run = getattr(importlib.import_module(f"gateway.cli.{module}"), name)
        return action(args)

    return run


class HelpFormatter(argparse.HelpFormatter):
    """Wraps descriptions as usual, but keeps a block under a heading (``examples:``) as
    written: command lines must not be re-flowed."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.partition("\n")[0].endswith(":"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def examples(*lines: str) -> dict[str, Any]:
    """``add_parser`` keywords that end a command's ``--help`` with these example lines."""
    text = "examples:\n" + "\n".join(f"  {line}" for line in lines)
    return {"epilog": text, "formatter_class": HelpFormatter}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="image-gateway",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    top.add_argument(
        "--version",
        action="version",
        version=f"image-gateway {__version__}",
        help="print the version and exit",
    )
    commands = top.add_subparsers(required=True, metavar="COMMAND")
    _serving(commands)
    _keys_and_reports(commands)
    _ledger(commands)
    _db(commands)
    _upstreams(commands)
    _results(commands)
    return top


def _serving(commands: Commands) -> None:
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
    serve.set_defaults(run=later("serving", "serve"))

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
    simulate.set_defaults(run=later("serving", "simulate_upstream"))


def _keys_and_reports(commands: Commands) -> None:
    new_key = commands.add_parser(
        "new-key",
        help="print a new team key and its config line",
        description="Print a new team key (igw_..., 192 random bits) and the line for the config.",
        **examples("image-gateway new-key"),
    )
    new_key.set_defaults(run=later("keys", "new_key"))

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
    check.set_defaults(run=later("check", "check_config"))

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
    usage.add_argument("--by", choices=get_args(Grouping), help="break each team down by this")
    usage.add_argument("--json", action="store_true", help="print JSON")
    usage.set_defaults(run=later("usage", "usage"))

    hash_key = commands.add_parser(
        "hash-key",
        help="print the config line for a key (read from standard input)",
        description="Print the sha256 line for a key, to put in the config (never the key).",
        **examples('printf %s "$KEY" | image-gateway hash-key'),
    )
    hash_key.add_argument("key", nargs="?", help="the key (default: read from standard input)")
    hash_key.set_defaults(run=later("keys", "hash_key"))

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
    keys.set_defaults(run=later("keys", "keys"))


def _ledger(commands: Commands) -> None:
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
    show.add_argument("--state", choices=get_args(HoldState), help="only entries in this state")
    show.add_argument("--team", help="only this team's entries")
    show.add_argument("--period", help="YYYY-MM, YYYY-MM-DD or total (default: the current one)")
    show.add_argument("--id", dest="entry_id", help="one entry, by ledger, upstream or task id")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(run=later("ledger", "list_entries"))

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
    fix.set_defaults(run=later("resolve", "resolve_entry"))

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
    stuck.set_defaults(run=later("resolve", "expire_entry"))

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
    export.set_defaults(run=later("ledger", "export_entries"))

    check = sub.add_parser(
        "verify",
        help="recompute every counter from the ledger's entries",
        **examples("image-gateway ledger verify --config gateway.toml"),
    )
    check.add_argument("--config", type=Path, required=True, help=CONFIG_HELP)
    check.set_defaults(run=later("ledger", "verify_ledger"))


def _db(commands: Commands) -> None:
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
    copy.set_defaults(run=later("copy", "copy_database"))

    backup = sub.add_parser(
        "backup",
        help="copy the ledger to FILE while the gateway serves",
        **examples("image-gateway db backup --config gateway.toml --to /backup/gateway.db"),
    )
    backup.add_argument("--config", type=Path, required=True, help=CONFIG_HELP)
    backup.add_argument("--to", dest="target", type=Path, required=True, help="the backup file")
    backup.set_defaults(run=later("backup", "backup"))


def _upstreams(commands: Commands) -> None:
    upstreams = commands.add_parser(
        "upstreams",
        help="each upstream's health, from the running gateway (or the config)",
        description="Each upstream's state (healthy, cooling, disabled), until when, its last "
        f"error, priority and weight, as the gateway at the config's [server] address sees it "
        f"(an admin key in {ADMIN_KEY_ENV}); the configured upstreams when none answers.",
        **examples(
            f"{ADMIN_KEY_ENV}=igw_... image-gateway upstreams --config gateway.toml",
            "image-gateway upstreams --config gateway.toml --json",
        ),
    )
    upstreams.add_argument("--config", type=Path, required=True, help=CONFIG_HELP)
    upstreams.add_argument("--json", action="store_true", help="print JSON")
    upstreams.set_defaults(run=later("upstreams", "upstreams"))


def _results(commands: Commands) -> None:
    results = commands.add_parser(
        "results",
        help="the result store: purge stored images",
        description="The store of paid result images (see README, Results).",
    )
    actions = results.add_subparsers(dest="action", required=True, metavar="ACTION")
    purge = actions.add_parser(
        "purge",
        help="delete stored result images now (the ledger keeps its entries)",
        description="Delete stored result images: all of them, a team's (--team), those made "
        "before a date (--before), or both narrowed together. Their gateway URLs answer 410 "
        "from then on; the upstream keeps its own copy; the ledger is not touched.",
        **examples(
            "image-gateway results purge --config gateway.toml --team design",
            "image-gateway results purge --config gateway.toml --before 2026-06-01",
        ),
    )
    purge.add_argument("--config", type=Path, required=True, help=CONFIG_HELP)
    purge.add_argument("--team", help="only this team's images")
    purge.add_argument(
        "--before",
        help="only images made before this: YYYY-MM-DD (midnight, [server] timezone) or an "
        "ISO 8601 time with its offset",
    )
    purge.add_argument("--json", action="store_true", help="print JSON")
    purge.set_defaults(run=later("results", "purge"))
