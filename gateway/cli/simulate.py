"""``image-gateway simulate-upstream --port N``: the embedded simulator on its own, for a fleet.

``serve --simulate-upstream`` gives each gateway a simulator of its own, so a task created on one
instance is unknown to the others. Run this once instead, and point every instance's ``[upstream]
base_url`` at it (with any ``sk_`` central key): they then share its tasks and result files, as
they share the real upstream. ``GET /__served`` lists what it delivered, for a rehearsed
reconciliation against ``image-gateway ledger export``. It keeps no ledger: each gateway charges
the one of its own config.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

from aiohttp import web

from gateway.http.sdnotify import notify
from gateway.http.server import listening_socket
from gateway.upstream.simulator import Simulator

log = logging.getLogger("gateway")

DEFAULT_DELAY_S = 2.0  # a sync generation; a task takes twice as long (as in the rehearsal)
BACKLOG = 1024


async def simulate_upstream(
    host: str, port: int, *, delay_s: float, on_ready: Callable[[str], None]
) -> None:
    """Serve the simulator until SIGTERM or SIGINT, then stop (requests in flight are cut)."""
    sock = listening_socket(host, port, BACKLOG)  # first: a port in use is one line
    simulator = Simulator(None, delay_s=delay_s, task_delay_s=2 * delay_s, record=False)
    runner = web.AppRunner(simulator.app(), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.SockSite(runner, sock, backlog=BACKLOG).start()
        bound_host, bound_port = sock.getsockname()[:2]
        url = (
            f"http://{bound_host}:{bound_port}"
            if ":" not in bound_host
            else (f"http://[{bound_host}]:{bound_port}")
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        log.warning(
            "SIMULATED UPSTREAM, NOT PRODUCTION: listening on %s for gateways whose [upstream] "
            "base_url points here",
            url,
        )
        notify("READY=1", f"STATUS=listening on {url}")
        on_ready(url)
        await stop.wait()
        notify("STOPPING=1", "STATUS=stopping")
        log.info(
            "stopping: served %d generation(s) and task(s), %d image(s)",
            len(simulator.served),
            simulator.served_images(),
        )
    finally:
        await runner.cleanup()
    log.info("stopped cleanly")


def banner(url: str, delay_s: float) -> str:
    return f"""
image-gateway SIMULATED UPSTREAM on {url}: NOT PRODUCTION.

  for       every gateway whose config says [upstream] base_url = "{url}"
            (any number of them); any central key starting with sk_ is accepted
  answers   placeholder images behind a 302, like the real result URLs, about {delay_s:g} s
            per generation ({2 * delay_s:g} s per task); nothing leaves this machine
  ledger    none here: each gateway charges the ledger of its own config
  served    GET {url}/__served lists what was delivered (ids, images, cost),
            to match against `image-gateway ledger export`

Press Ctrl-C to stop.
"""
