"""A real gateway process for tests: started from a TOML file, synchronized through sd_notify."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from datetime import date, datetime
from pathlib import Path
from typing import Any

from tests.conftest import SECRETS, UPSTREAM_KEY

STARTUP_TIMEOUT_S = 30


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Just enough TOML for test configs: scalars, dates, lists of scalars, nested tables and
    arrays of tables."""
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict) and not _tables(v)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    arrays = {k: v for k, v in data.items() if _tables(v)}
    lines = [f"[{prefix}]"] if prefix and scalars else []
    lines += [f"{key} = {_scalar(value)}" for key, value in scalars.items()]
    text = "\n".join(lines) + ("\n" if lines else "")
    for key, value in tables.items():
        text += to_toml(value, f"{prefix}.{key}" if prefix else key)
    for key, items in arrays.items():
        for item in items:
            name = f"{prefix}.{key}" if prefix else key
            text += f"[[{name}]]\n" + to_toml(item, "").replace(f"[{name}]\n", "")
    return text


def _tables(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _scalar(value: Any) -> str:
    if isinstance(value, date | datetime):
        return value.isoformat()  # a TOML date or date-time, unquoted
    return json.dumps(value)


class GatewayProcess:
    """``python -m gateway serve --config`` (or ``serve ARGS``) with its own NOTIFY_SOCKET.

    Its stdout and stderr are read all along (a full pipe would stall it); stderr is checked
    when it is closed: no key of any kind and no base64 data may ever appear there, however it
    ended.
    """

    def __init__(
        self,
        config: Path | None,
        *,
        args: tuple[str, ...] = (),
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
        command: str = "serve",
    ) -> None:
        self.config = config
        self.command = command  # or "simulate-upstream", which notifies READY=1 the same way
        self.args = args  # after `serve [--config PATH]`, e.g. ("--simulate-upstream",)
        self.cwd = cwd
        self.env = env or {}  # added to the test's own environment
        self.preexec_fn = preexec_fn  # run in the child before exec, e.g. to set an rlimit
        self._dir = Path(tempfile.mkdtemp(prefix="gw-notify-"))  # sun_path is short: keep it short
        self.notify_path = self._dir / "n.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify.setblocking(False)
        self.messages: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""
        self._stderr = bytearray()
        self._stdout = bytearray()
        self._stdout_grew = asyncio.Condition()
        self._stdout_closed = False
        self._reader: asyncio.Task[None] | None = None
        self._out_reader: asyncio.Task[None] | None = None

    async def start(self) -> str:
        env = {
            **os.environ,
            "NOTIFY_SOCKET": str(self.notify_path),
            "TEST_UPSTREAM_KEY": UPSTREAM_KEY,
            **self.env,
        }
        config = () if self.config is None else ("--config", str(self.config))
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", self.command, *config, *self.args,
            env=env, cwd=self.cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            preexec_fn=self.preexec_fn,
        )  # fmt: skip
        self._reader = asyncio.create_task(self._read_stderr(self.proc))
        self._out_reader = asyncio.create_task(self._read_stdout(self.proc))
        ready = await self.expect("READY=1", seconds=STARTUP_TIMEOUT_S)
        status = next(line for line in ready.splitlines() if line.startswith("STATUS="))
        self.url = status.removeprefix("STATUS=listening on ")
        return self.url

    async def expect(self, field: str, seconds: float = 20) -> str:
        """The next notify datagram containing ``field`` (earlier ones are kept in ``messages``)."""
        loop = asyncio.get_running_loop()

        async def receive() -> str:
            while True:
                message = (await loop.sock_recv(self.notify, 4096)).decode()
                self.messages.append(message)
                if field in message.splitlines():
                    return message

        return await asyncio.wait_for(receive(), seconds)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def stop(self, *, signal_it: bool = True) -> tuple[int, str]:
        """SIGTERM (unless already sent), then the exit code and everything it wrote to stderr."""
        assert self.proc is not None
        if signal_it and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(self.proc.wait(), 60)
        return self.proc.returncode or 0, await self.stderr()

    async def stderr(self) -> str:
        """Everything written to stderr, once the process has ended."""
        if self._reader is not None:
            await asyncio.wait_for(asyncio.shield(self._reader), 30)
        return self._stderr.decode(errors="replace")

    async def stdout_until(self, text: str, seconds: float = 20) -> str:
        """Its stdout so far, once it contains ``text`` (e.g. the end of a banner)."""

        async def grown() -> str:
            async with self._stdout_grew:
                await self._stdout_grew.wait_for(
                    lambda: text.encode() in self._stdout or self._stdout_closed
                )
                out = self._stdout.decode(errors="replace")
            assert text in out, f"stdout closed without {text!r}: {out!r}"
            return out

        return await asyncio.wait_for(grown(), seconds)

    async def stdout(self) -> str:
        """Everything written to stdout, once the process has ended."""
        if self._out_reader is not None:
            await asyncio.wait_for(asyncio.shield(self._out_reader), 30)
        return self._stdout.decode(errors="replace")

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        await self.proc.wait()

    async def close(self) -> None:
        if self.proc is not None:
            if self.proc.returncode is None:
                self.proc.kill()
            await self.proc.wait()
            await self.stdout()
            text = await self.stderr()
            for needle in (*SECRETS, "base64,"):
                assert needle not in text, f"{needle[:8]}... found in a gateway's stderr"
        self.notify.close()
        self.notify_path.unlink(missing_ok=True)
        self._dir.rmdir()

    async def _read_stderr(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        while chunk := await proc.stderr.read(65536):
            self._stderr += chunk

    async def _read_stdout(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(65536):
            async with self._stdout_grew:
                self._stdout += chunk
                self._stdout_grew.notify_all()
        async with self._stdout_grew:
            self._stdout_closed = True
            self._stdout_grew.notify_all()


async def wait_for_lines(path: Path, count: int, seconds: float = 10) -> list[str]:
    """The file's lines once it has ``count`` of them (a real process writes a sync request's
    access-log line just after its settlement, which follows the answer)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        if len(lines) >= count or loop.time() > deadline:
            return lines
        await asyncio.sleep(0.01)
