"""The embedded simulator in place of the upstream: the demo, and rehearsals of a real config.

``serve --config PATH --simulate-upstream`` runs the config as it is (teams, keys, budgets,
prices, limits, log, metrics and its ledger) with the simulator of ``gateway.upstream.simulator``
answering instead of ``[upstream]``: no central key, nothing leaves the machine. The demo is
the same with a config of its own. It can never pass for production: the banner, a WARNING at
start and ``/readyz`` (``"upstream": "simulated"``) all say so.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from aiohttp import web

from gateway.core.config import Secret, Settings
from gateway.http.server import serve
from gateway.upstream.simulator import Simulator

SIM_DELAY_S = 2.0  # a sync generation; a task takes twice as long


async def serve_simulated(
    settings: Settings,
    *,
    config_path: Path | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve ``settings`` with a simulator on a free loopback port as the upstream."""
    key = "sk_simulated_" + secrets.token_hex(16)  # the simulator's own, made for this run
    simulator = Simulator(key, delay_s=SIM_DELAY_S, task_delay_s=2 * SIM_DELAY_S, record=False)
    runner = web.AppRunner(simulator.app(), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        await serve(
            settings,
            config_path=config_path,
            on_ready=on_ready,
            simulate=lambda loaded: in_place_of_upstream(loaded, base_url, key),
        )
    finally:
        await runner.cleanup()


def in_place_of_upstream(settings: Settings, base_url: str, key: str) -> Settings:
    """``settings`` with the simulator as the upstream: its URL, its key, no other file host."""
    upstream = replace(settings.upstream, base_url=base_url, api_key=Secret(key), file_hosts=())
    return replace(settings, upstream=upstream)


async def rehearse(settings: Settings, config_path: Path) -> None:
    """``serve --config PATH --simulate-upstream``."""
    await serve_simulated(
        settings,
        config_path=config_path,
        on_ready=lambda url: print(rehearsal_banner(url, settings, config_path), flush=True),
    )


def rehearsal_banner(url: str, settings: Settings, config_path: Path) -> str:
    teams = f"{len(settings.teams)} team{'s' if len(settings.teams) != 1 else ''}"
    return f"""
image-gateway REHEARSAL on {url}: SIMULATED UPSTREAM, NOT PRODUCTION.

  config    {config_path}: its {teams}, keys, budgets, prices, limits, log, metrics
  upstream  an embedded simulator in place of [upstream]: placeholder images,
            no central key, nothing leaves this machine
  ledger    {settings.ledger_name()}
            charged as in production; `image-gateway usage --config {config_path}` reads it.
            Give a rehearsal its own database, never the production one.

Press Ctrl-C to stop.
"""
