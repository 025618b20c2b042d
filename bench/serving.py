"""Shared main loop of the harness's helper servers (fake upstream, passthrough).

They announce themselves the way the gateway does (``READY=1`` and ``STATUS=listening on URL``
to ``$NOTIFY_SOCKET``), so the harness starts all three processes with the same code and never
sleeps to guess when a server is up.
"""

from __future__ import annotations

import asyncio
import resource
import signal

from aiohttp import web

from gateway.http.sdnotify import notify

WANTED_FDS = 65_536  # the capacity scenario: 10,000 client plus 10,000 upstream sockets


def raise_fd_limit(wanted: int = WANTED_FDS) -> int:
    """Lift the open-files limit to ``wanted`` (raising the hard limit too where allowed, as
    root), else the soft limit to the hard one; children inherit it. Returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def serve_until_signalled(
    app: web.Application, host: str = "127.0.0.1", backlog: int = 128
) -> None:
    """Listen on a free port of ``host``, report readiness, and stop cleanly on SIGTERM/SIGINT.

    ``backlog`` 128 is aiohttp's default, which the gateway also uses; the fake upstream asks
    for more, so that it is never the one dropping a burst of connections.
    """
    raise_fd_limit()
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, 0, backlog=backlog)
        await site.start()
        bound_host, port = runner.addresses[0][:2]
        url = f"http://{bound_host}:{port}"
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        notify("READY=1", f"STATUS=listening on {url}")
        await stop.wait()
    finally:
        await runner.cleanup()
