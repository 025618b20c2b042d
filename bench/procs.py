"""Starting and stopping the harness's child processes, each known ready by its notify message.

Every child gets its own ``$NOTIFY_SOCKET`` (a unix datagram socket the harness binds and keeps
until the child has exited, as systemd does), writes its output to a log file in the scenario's
work directory, and is stopped with SIGTERM (SIGKILL after a bound), so no process outlives the
harness and no step waits on a guessed sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
LISTENING = re.compile(r"STATUS=listening on (\S+)")
PROBLEM = re.compile(r"Traceback|\b(ERROR|CRITICAL|WARNING)\b")


class StartError(RuntimeError):
    """A child did not become ready; the message carries the tail of its log."""


@dataclass
class Proc:
    name: str
    process: asyncio.subprocess.Process
    url: str
    log_path: Path
    notify_sock: socket.socket

    @property
    def pid(self) -> int:
        return self.process.pid

    async def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL; returns the exit status."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        self.notify_sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.notify_sock.getsockname())
        return self.process.returncode

    def problems(self, limit: int = 40) -> list[str]:
        """Log lines that look like errors, warnings or tracebacks (with the traceback body)."""
        lines = self.log_path.read_text(errors="replace").splitlines()
        found: list[str] = []
        in_traceback = False
        for line in lines:
            if PROBLEM.search(line):
                in_traceback = "Traceback" in line
                found.append(line)
            elif in_traceback and (line.startswith((" ", "\t")) or ":" in line):
                found.append(line)
                in_traceback = line.startswith((" ", "\t"))
            else:
                in_traceback = False
        return found[:limit]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


async def start(
    name: str,
    argv: list[str],
    workdir: Path,
    env: dict[str, str],
    timeout_s: float = 30.0,
    *,
    cwd: Path = REPO,
) -> Proc:
    """Start ``argv`` in ``cwd`` and return once it reports ``READY=1`` with its listening URL."""
    notify_path = workdir / f"{name}.notify"
    log_path = workdir / f"{name}.log"
    with contextlib.suppress(FileNotFoundError):
        notify_path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    sock.bind(str(notify_path))
    sock.setblocking(False)
    try:
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env={**env, "NOTIFY_SOCKET": str(notify_path)},
                cwd=cwd,
            )
        url = await _wait_ready(name, process, sock, log_path, timeout_s)
    except BaseException:
        sock.close()
        notify_path.unlink(missing_ok=True)
        raise
    # The socket stays bound while the child runs: the gateway notifies again when it stops.
    return Proc(name, process, url, log_path, sock)


async def _wait_ready(
    name: str,
    process: asyncio.subprocess.Process,
    sock: socket.socket,
    log_path: Path,
    timeout_s: float,
) -> str:
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout_s
    url: str | None = None
    ready = False
    while not (ready and url):
        left = deadline - time.monotonic()
        if left <= 0 or process.returncode is not None:
            break
        try:
            message = (await asyncio.wait_for(loop.sock_recv(sock, 4096), min(left, 0.5))).decode()
        except TimeoutError:
            continue
        ready = ready or "READY=1" in message.splitlines()
        match = LISTENING.search(message)
        url = match[1] if match else url
    if ready and url:
        return url
    if process.returncode is None:
        process.kill()
        await process.wait()
    raise StartError(f"{name} did not become ready (exit {process.returncode}):\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
