"""Running the app as a service: listen, tell systemd, reload on SIGHUP, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import signal
import socket
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from aiohttp import web

from gateway.core.config import ConfigError, Settings, load_settings
from gateway.http.app import StartupError, create_app, create_metrics_app, instance_name
from gateway.http.keys import ACCESS_LOG, CONFIG, INSTANCE, METRICS
from gateway.http.protocol import (
    ConnectionLimits,
    GatewayRunner,
    install_log_filter,
    max_connections,
)
from gateway.http.sdnotify import monotonic_usec, notify

log = logging.getLogger("gateway")

METRICS_CONNECTIONS = 32  # the separate /metrics listener, if any, is for a scraper or two
FEW_CONNECTIONS = 1000  # below this, the open-file limit is probably the distribution's default
UNLIMITED_FILES = 1 << 20
PRIVILEGED_PORTS = 1024

Simulate = Callable[[Settings], Settings]
"""Puts an embedded simulator in place of each upstream (see gateway.cli.rehearsal)."""


async def serve(
    settings: Settings,
    *,
    config_path: Path | None = None,
    on_ready: Callable[[str], None] | None = None,
    simulate: Simulate | None = None,
    accept_restored_ledger: bool = False,
) -> None:
    """Serve until SIGTERM or SIGINT, then drain in-flight requests and exit.

    With ``simulate``, the settings (at start and at every reload) get the simulated upstream it
    puts in place of the configured one, and everything that reports the gateway's state says so.
    """
    if simulate is not None:
        settings = simulate(settings)
    install_log_filter()
    raise_open_files_limit()
    server = settings.server
    # Ports first: a port in use must fail before the database is opened or migrated.
    sock = listening_socket(server.host, server.port, server.backlog)
    metrics_sock = None
    if settings.metrics.enabled and settings.metrics.port:
        try:
            metrics_sock = listening_socket(server.host, settings.metrics.port, 64)
        except StartupError:
            sock.close()
            raise
    app = create_app(
        settings,
        simulated=simulate is not None,
        accept_restored_ledger=accept_restored_ledger,
        instance=instance_name(settings, sock.getsockname()[1]),
    )
    limits = connection_limits(settings)
    runner = GatewayRunner(
        app,
        limits,
        shutdown_timeout=settings.server.drain_s,
        access_log=None,
        handle_signals=False,
    )
    try:
        await runner.setup()
    except BaseException:
        for unused in (sock, metrics_sock):
            if unused is not None:
                unused.close()
        raise
    metrics_runner: web.AppRunner | None = None
    try:
        await web.SockSite(runner, sock, backlog=server.backlog).start()
        url = _url(runner)
        if metrics_sock is not None:
            metrics_runner = GatewayRunner(
                create_metrics_app(app),
                replace(limits, max_connections=METRICS_CONNECTIONS),
                access_log=None,
                handle_signals=False,
            )
            await metrics_runner.setup()
            await web.SockSite(metrics_runner, metrics_sock).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)  # repeated while draining: no effect
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: reload(app, config_path, simulate))
        _log_listening(url, app[INSTANCE], settings, simulated=simulate is not None)
        notify("READY=1", f"STATUS=listening on {url}")
        if on_ready is not None:
            on_ready(url)
        await stop.wait()
        log.info("stopping: draining in-flight requests for up to %ss", settings.server.drain_s)
        notify("STOPPING=1", "STATUS=draining")
        loop.remove_signal_handler(signal.SIGHUP)
    finally:
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await runner.cleanup()
    log.info("stopped cleanly")


def _log_listening(url: str, instance: str, settings: Settings, *, simulated: bool) -> None:
    if simulated:
        log.warning(
            "SIMULATED UPSTREAM, NOT PRODUCTION: requests are answered by the embedded simulator "
            "at %s (placeholder images; nothing leaves this machine), not by the configured "
            "upstreams; budgets are charged to the ledger %s as usual",
            ", ".join(f"{u.base_url} ({u.name})" for u in settings.upstreams),
            settings.ledger_name(),
        )
    log.info("listening on %s as instance %s (%d teams)", url, instance, len(settings.teams))


def connection_limits(settings: Settings) -> ConnectionLimits:
    """The [server] timeouts, and as many connections as the open-file limit has room for."""
    open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if open_files == resource.RLIM_INFINITY:
        open_files = UNLIMITED_FILES
    server = settings.server
    most = max_connections(open_files - METRICS_CONNECTIONS, server.backlog)
    log_it = log.warning if most < FEW_CONNECTIONS else log.info
    log_it(
        "open-file limit %d: up to %d client connections at once%s",
        open_files,
        most,
        " (raise it: LimitNOFILE= in the systemd unit)" if most < FEW_CONNECTIONS else "",
    )
    return ConnectionLimits(server.header_timeout_s, server.keepalive_timeout_s, most)


def raise_open_files_limit() -> int:
    """Lift the soft open-files limit to the hard one and return it: every held request needs
    two sockets (client and upstream), and the common soft limit of 1,024 would cap the
    gateway near 500 held requests whatever the hard limit (systemd's LimitNOFILE) allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError):  # a sandbox that forbids it: live with the soft limit
            return soft
    return hard


def reload(
    app: web.Application, config_path: Path | None, simulate: Simulate | None = None
) -> None:
    """Re-read the config; apply it whole for new requests, or keep the running one and say why."""
    app[ACCESS_LOG].reopen()
    if config_path is None:
        log.info("SIGHUP: access log reopened (no config file to reload)")
        return
    notify("RELOADING=1", monotonic_usec())
    try:
        new = load_settings(config_path, require_central_key=simulate is None)
    except ConfigError as exc:
        app[METRICS].config_reloads.labels("refused").inc()
        log.error(
            "reload refused, the running config stays in force:\n  %s", "\n  ".join(exc.problems)
        )
    else:
        app[METRICS].config_reloads.labels("applied").inc()
        needs_restart = app[CONFIG].reload(new if simulate is None else simulate(new))
        log.info("config reloaded from %s (%d teams)", config_path, len(new.teams))
        if needs_restart:
            log.warning("changes to %s take effect only after a restart", ", ".join(needs_restart))
    notify("READY=1")


def listening_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A bound, listening TCP socket, or StartupError saying in one line why not."""
    try:
        sock = socket.create_server((host, port), backlog=backlog)
    except OSError as exc:
        why = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        if exc.errno == errno.EACCES and 0 < port < PRIVILEGED_PORTS:
            why += " (ports below 1024 need privileges: use a higher port behind a front proxy)"
        raise StartupError(f"cannot listen on {host}:{port}: {why}") from None
    sock.setblocking(False)
    return sock


def _url(runner: web.AppRunner) -> str:
    host, port = runner.addresses[0][:2]
    return f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
