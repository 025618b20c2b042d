"""``image-gateway serve`` (production, a rehearsal, the demo) and ``simulate-upstream``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Coroutine
from typing import Any

from gateway.cli.commands import DEMO_HOST, DEMO_PORT, CommandError
from gateway.cli.support import STORE_ERRORS, load_config, refuse_fleet_rehearsal
from gateway.http.app import StartupError
from gateway.ops.repeats import RepeatFilter


def serve(args: argparse.Namespace) -> int:
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
    from gateway.http.server import serve as serve_forever  # noqa: PLC0415

    return _run_server(
        serve_forever(
            settings,
            config_path=args.config,
            accept_restored_ledger=args.accept_restored_ledger,
        )
    )


def simulate_upstream(args: argparse.Namespace) -> int:
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


def _setup_logging() -> None:
    # Under systemd the journal stamps every line itself.
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    logging.basicConfig(
        level=logging.INFO, format=stamp + "%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for handler in logging.getLogger().handlers:  # an outage logs each error once per window
        handler.addFilter(RepeatFilter())


def _run_server(main: Coroutine[Any, Any, None]) -> int:
    """Run the server; a failure to start is one line, not a traceback."""
    try:
        asyncio.run(main)
    except (StartupError, *STORE_ERRORS) as exc:
        raise CommandError(f"cannot start: {exc}") from None
    return 0
