"""The embedded simulator in place of the upstream: the demo, and rehearsals of a real config.

``serve --config PATH --simulate-upstream`` runs the config as it is (teams, keys, budgets,
prices, limits, log, metrics and its ledger) with a simulator of ``gateway.upstream.simulator``
answering instead of each configured upstream: no central key, nothing leaves the machine. The
demo is the same with a config of its own. It can never pass for production: the banner, a
WARNING at start and ``/readyz`` (``"upstream": "simulated"``) all say so.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from aiohttp import web

from gateway.core.config import DEFAULT_UPSTREAM, Secret, Settings, UpstreamConfig
from gateway.http.server import serve
from gateway.upstream.simulator import Simulator

SIM_DELAY_S = 2.0  # a sync generation; a task takes twice as long


class Simulators:
    """One simulator per configured upstream, each on a loopback port of its own with a key of
    its own, so that failover can be rehearsed like the real thing. An upstream a reload adds
    gets its simulator then: its port is bound at once (requests wait in its backlog) and its
    server starts a moment later."""

    def __init__(self) -> None:
        self._running: dict[str, tuple[str, str]] = {}  # name: (base_url, key)
        self._runners: list[web.AppRunner] = []
        self._starting: list[asyncio.Task[None]] = []

    def in_place(self, settings: Settings) -> Settings:
        """``settings`` with a simulator in place of each upstream: its URL, its key, no other
        file host."""
        return replace(settings, upstreams=tuple(self._simulated(u) for u in settings.upstreams))

    def _simulated(self, upstream: UpstreamConfig) -> UpstreamConfig:
        if upstream.name not in self._running:
            self._running[upstream.name] = self._start()
        base_url, key = self._running[upstream.name]
        return replace(upstream, base_url=base_url, api_key=Secret(key), file_hosts=())

    def _start(self) -> tuple[str, str]:
        key = "sk_simulated_" + secrets.token_hex(16)  # the simulator's own, made for this run
        simulator = Simulator(key, delay_s=SIM_DELAY_S, task_delay_s=2 * SIM_DELAY_S, record=False)
        runner = web.AppRunner(simulator.app(), access_log=None, handle_signals=False)
        sock = socket.create_server(("127.0.0.1", 0))
        sock.setblocking(False)
        self._runners.append(runner)
        self._starting.append(asyncio.get_running_loop().create_task(_serve(runner, sock)))
        return f"http://127.0.0.1:{sock.getsockname()[1]}", key

    async def close(self) -> None:
        for task in self._starting:
            task.cancel()
        await asyncio.gather(*self._starting, return_exceptions=True)
        for runner in self._runners:
            await runner.cleanup()


async def _serve(runner: web.AppRunner, sock: socket.socket) -> None:
    await runner.setup()
    await web.SockSite(runner, sock).start()


async def serve_simulated(
    settings: Settings,
    *,
    config_path: Path | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve ``settings`` with a simulator in place of every upstream."""
    simulators = Simulators()
    try:
        await serve(
            settings, config_path=config_path, on_ready=on_ready, simulate=simulators.in_place
        )
    finally:
        await simulators.close()


async def rehearse(settings: Settings, config_path: Path) -> None:
    """``serve --config PATH --simulate-upstream``."""
    await serve_simulated(
        settings,
        config_path=config_path,
        on_ready=lambda url: print(rehearsal_banner(url, settings, config_path), flush=True),
    )


def rehearsal_banner(url: str, settings: Settings, config_path: Path) -> str:
    teams = f"{len(settings.teams)} team{'s' if len(settings.teams) != 1 else ''}"
    names = [u.name for u in settings.upstreams]
    upstreams = (
        "an embedded simulator in place of [upstream]:"
        if names == [DEFAULT_UPSTREAM]
        else f"an embedded simulator in place of each of [upstreams]: {', '.join(names)};"
    )
    return f"""
image-gateway REHEARSAL on {url}: SIMULATED UPSTREAM, NOT PRODUCTION.

  config    {config_path}: its {teams}, keys, budgets, prices, limits, log, metrics
  upstream  {upstreams}
            placeholder images, no central key, nothing leaves this machine
  ledger    {settings.ledger_name()}
            charged as in production; `image-gateway usage --config {config_path}` reads it.
            Give a rehearsal its own database, never the production one.

Press Ctrl-C to stop.
"""
