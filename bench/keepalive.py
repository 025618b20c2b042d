"""Stale keep-alive connections to the upstream (issue 12 item 2): how often, and each fix's cost.

``.venv/bin/python -m bench.keepalive [--streams 10] [--per-stream 10]``

The upstream runs in a thread of its own (its own event loop, as a remote host would), behind
one of: aiohttp's own ``keepalive_timeout=1.0``; nginx with ``keepalive_timeout 1s`` (when
installed); or ``tests.fakes.IdleTimeoutFront``, an L4 balancer with a 1 s idle timeout whose FIN
reaches the gateway at once, 25 ms later, or never. Independent streams send generation POSTs
spaced 0.95-1.05 s apart through ``HttpUpstream.submit`` in each client variant; every
uncertain outcome is checked against what the simulator received. ``shipped`` is the gateway
as configured by default (a POST reuses a connection idle under ``reuse_idle_s`` = 2 s, or half
the upstream's ``Keep-Alive: timeout``); ``window-0.5s`` sets the window under the 1 s idle
timeout, as an operator of such an upstream must; ``window-0s`` is a new connection per POST.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import socket
import ssl
import statistics
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from gateway.core.config import Secret, UpstreamConfig
from gateway.core.errors import UpstreamFailure
from gateway.core.normalize import Rules, normalize
from gateway.core.wire import upstream_body
from gateway.upstream import client as upstream_module
from gateway.upstream.client import HttpUpstream
from gateway.upstream.simulator import Simulator
from tests.fakes import IdleTimeoutFront

KEY = "sk_bench_keepalive"


# -- the upstream side, in its own thread --------------------------------------------------------


class ServerThread:
    """An event loop in a thread: the simulator and whatever stands in front of it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()  # type: ignore[arg-type]

    def stop(self) -> None:
        self.run(_cancel_the_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


async def _cancel_the_rest() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _serve(app: web.Application, keepalive_s: float | None, **site: Any) -> int:
    kwargs = {} if keepalive_s is None else {"keepalive_timeout": keepalive_s}
    runner = web.AppRunner(app, access_log=None, **kwargs)
    await runner.setup()
    tcp = web.TCPSite(runner, "127.0.0.1", 0, **site)
    await tcp.start()
    return tcp._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


@asynccontextmanager
async def upstream(kind: str, sim: Simulator) -> AsyncIterator[str]:
    """The base URL of the simulator behind ``kind``."""
    server = ServerThread()
    nginx: subprocess.Popen[bytes] | None = None
    try:
        if kind == "aiohttp-ka1s":
            port = server.run(_serve(sim.app(), 1.0))
        else:
            backend = server.run(_serve(sim.app(), None))
            if kind == "nginx-ka1s":
                port, nginx = _nginx(backend)
            else:
                delay = {"front-fin": 0.0, "front-fin25ms": 0.025, "front-silent": None}[kind]
                front = IdleTimeoutFront(backend, idle_s=1.0, fin_delay_s=delay)
                port = server.run(front.start())
        yield f"http://127.0.0.1:{port}"
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait()
            shutil.rmtree(Path(nginx.args[2]), ignore_errors=True)
        server.stop()


def _nginx(backend: int) -> tuple[int, subprocess.Popen[bytes]]:
    work = Path(tempfile.mkdtemp(prefix="ka-nginx-"))
    port = _free_port()
    (work / "nginx.conf").write_text(
        f"""
worker_processes 1;
error_log {work}/error.log;
pid {work}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    keepalive_timeout 1s;
    client_max_body_size 0;
    upstream sim {{ server 127.0.0.1:{backend}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://sim;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_request_buffering off;
        }}
    }}
}}
"""
    )
    proc = subprocess.Popen(
        [
            shutil.which("nginx") or "nginx",
            "-p",
            str(work),
            "-c",
            str(work / "nginx.conf"),
            "-g",
            "daemon off;",
        ]
    )
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return port, proc
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("nginx did not start")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- the gateway side: client variants ----------------------------------------------------------


class _Split:
    """Looks like a ClientSession to HttpUpstream: POSTs on one session, GETs on another."""

    def __init__(self, gets: aiohttp.ClientSession, posts: Callable[..., Any]) -> None:
        self.get = gets.get
        self.post = posts


def _session(
    config: UpstreamConfig, *, force_close: bool = False, on_reuse: bool = False
) -> aiohttp.ClientSession:
    """What ``HttpUpstream.new_session`` built before the fix, or with force_close."""
    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(upstream_module._mark_sent)
    trace.on_request_chunk_sent.append(upstream_module._count_written)
    if on_reuse:
        trace.on_connection_reuseconn.append(_on_reuse)
    timeout = aiohttp.ClientTimeout(total=config.timeout_s, connect=config.connect_timeout_s)
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, force_close=force_close)
    return aiohttp.ClientSession(timeout=timeout, connector=connector, trace_configs=[trace])


REUSED: dict[int, bool] = {}


async def _on_reuse(_s: Any, ctx: Any, _p: Any) -> None:
    REUSED[id(ctx.trace_request_ctx)] = True


class RetryStaleClient(HttpUpstream):
    """Fix (b): a POST that broke on a *reused* connection before any response byte is resent."""

    async def _post_once(self, url: str, body: Any, query: dict[str, str], state: Any) -> Any:
        REUSED.pop(id(state), None)
        try:
            return await super()._post_once(url, body, query, state)
        except UpstreamFailure as exc:
            # _post_once raises upstream_connection_lost only for an aiohttp error raised before
            # resp.read(), i.e. before a status line was parsed (no response byte was used).
            if exc.code == "upstream_connection_lost" and REUSED.get(id(state)):
                raise upstream_module._NotSent("stale keep-alive connection") from None
            raise


async def make_client(variant: str, config: UpstreamConfig) -> tuple[HttpUpstream, list[Any]]:
    pooled = _session(config, on_reuse=variant == "retry-stale")
    sessions: list[Any] = [pooled]
    if variant == "today":
        return HttpUpstream(config, pooled, backoff_s=0), sessions
    if variant == "shipped":  # as the gateway ships: POSTs reuse within reuse_idle_s (2 s)
        await pooled.close()
        shipped = HttpUpstream.new_session()
        return HttpUpstream(config, shipped, backoff_s=0), [shipped]
    if variant.startswith("window-"):  # window-0.5s: reuse_idle_s = 0.5 (window-0s: reuse off)
        await pooled.close()
        seconds = float(variant.removeprefix("window-").removesuffix("s"))
        windowed = HttpUpstream.new_session()
        return HttpUpstream(replace(config, reuse_idle_s=seconds), windowed, backoff_s=0), [
            windowed
        ]
    if variant == "connection-close":

        def post(url: str, headers: dict[str, str], **kw: Any) -> Any:
            return pooled.post(url, headers={**headers, "Connection": "close"}, **kw)

        return HttpUpstream(config, _Split(pooled, post), backoff_s=0), sessions  # type: ignore[arg-type]
    if variant == "fresh-post":
        fresh = _session(config, force_close=True)
        sessions.append(fresh)
        return HttpUpstream(config, _Split(pooled, fresh.post), backoff_s=0), sessions  # type: ignore[arg-type]
    if variant == "retry-stale":
        return RetryStaleClient(config, pooled, backoff_s=0), sessions
    raise ValueError(variant)


# -- the workload -------------------------------------------------------------------------------


def _body(prompt: str, pad_mb: int = 0) -> Any:
    body = upstream_body(
        normalize({"prompt": prompt}, [], endpoint="generations", rules=Rules(1024, {}))
    )
    return _Padded(body, pad_mb * 1024 * 1024) if pad_mb else body


class _Padded:
    """A large generation body, as with big reference uploads: an ignored field of ``pad`` bytes."""

    def __init__(self, body: Any, pad: int) -> None:
        self.head = b"".join(body.chunks())[:-1] + b',"pad":"'
        self.pad = pad
        self.length = len(self.head) + pad + 2

    def chunks(self) -> Iterator[bytes]:
        yield self.head
        for _ in range(self.pad // 65536):
            yield b"x" * 65536
        yield b"x" * (self.pad % 65536) + b'"}'


async def posts_run(
    kind: str, variant: str, streams: int, per_stream: int, *, mixed: bool = False, pad_mb: int = 0
) -> Counter[str]:
    """Spaced generation POSTs (``mixed``: each followed by a task poll); outcomes counted."""
    sim = Simulator(KEY, task_delay_s=3600)
    tally: Counter[str] = Counter()
    async with upstream(kind, sim) as url:
        config = UpstreamConfig(base_url=url, api_key=Secret(KEY), timeout_s=10)
        prompts: list[tuple[str, str]] = []

        async def stream(index: int) -> None:
            client, sessions = await make_client(variant, config)
            try:
                for seq in range(per_stream):
                    prompt = f"{kind}-{variant}-{index}-{seq}"
                    query = {"async": "1"} if mixed else {}
                    try:
                        reply = await client.submit(
                            "/v1/images/generations", _body(prompt, pad_mb), query
                        )
                        tally["ok"] += 1
                        tally["retried"] += reply.attempts > 1
                        if mixed:
                            await asyncio.sleep(random.uniform(0.95, 1.05))
                            try:
                                await client.get_task(reply.payload["task_id"])
                                tally["get ok"] += 1
                            except UpstreamFailure:
                                tally["get failed"] += 1
                    except UpstreamFailure as exc:
                        prompts.append((prompt, "uncertain" if exc.uncertain else "not sent"))
                    await asyncio.sleep(random.uniform(0.95, 1.05))
            finally:
                for session in sessions:
                    await session.close()

        await asyncio.gather(*(stream(i) for i in range(streams)))
        await asyncio.sleep(0.2)
        received = Counter(r.body["prompt"] for r in sim.generation_requests() if r.body)
        for prompt, outcome in prompts:
            tally[f"{outcome}, {'received' if received[prompt] else 'never received'}"] += 1
        tally["received twice"] = sum(1 for n in received.values() if n > 1)
    return tally


async def died_after_read(variant: str) -> Counter[str]:
    """An upstream that reads the 2nd request, records it, then closes without answering (FIN)."""
    sim = Simulator(KEY)
    seen = Counter[str]()

    @web.middleware
    async def die(request: web.Request, handler: Any) -> web.StreamResponse:
        transport = request.transport
        assert transport is not None
        seen["requests"] += 1
        if seen["requests"] == 2:
            sim._record(request, await request.json())
            transport.close()
            raise asyncio.CancelledError
        return await handler(request)

    tally: Counter[str] = Counter()
    server = ServerThread()
    try:
        port = server.run(_serve(sim.app(middlewares=[die]), None))
        config = UpstreamConfig(base_url=f"http://127.0.0.1:{port}", api_key=Secret(KEY))
        client, sessions = await make_client(variant, config)
        for seq in range(2):
            try:
                await client.submit("/v1/images/generations", _body(f"die-{seq}"), {})
                tally["ok"] += 1
            except UpstreamFailure as exc:
                tally["uncertain" if exc.uncertain else "not sent"] += 1
        for session in sessions:
            await session.close()
        tally["upstream received"] = len(sim.generation_requests())
        tally["generated twice"] = tally["upstream received"] - 2
    finally:
        server.stop()
    return tally


def _self_signed(work: Path) -> None:
    """A throwaway certificate for 127.0.0.1, for the TLS handshake measurement."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(work / "k.pem"), "-out", str(work / "c.pem"), "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip


async def gets_after_burst(kind: str, tasks: int = 8, waves: int = 5) -> Counter[str]:
    """Task polls on the shipped client: a burst of concurrent ones, then the same one by one.

    A burst leaves several connections in the pool; aiohttp resends a GET that broke on a reused
    connection once, but the resend may take the next stale one.
    """
    sim = Simulator(KEY, task_delay_s=3600)
    tally: Counter[str] = Counter()
    async with upstream(kind, sim) as url:
        config = UpstreamConfig(base_url=url, api_key=Secret(KEY), timeout_s=10)
        session = HttpUpstream.new_session(config)
        client = HttpUpstream(config, session)
        try:
            ids = [
                (
                    await client.submit("/v1/images/generations", _body(f"t{i}"), {"async": "1"})
                ).payload["task_id"]
                for i in range(tasks)
            ]
            for _ in range(waves):
                for how in ("concurrent", "sequential"):
                    await asyncio.sleep(1.05)
                    if how == "concurrent":
                        got = await asyncio.gather(
                            *(client.get_task(t) for t in ids), return_exceptions=True
                        )
                    else:
                        got = []
                        for t in ids:
                            try:
                                got.append(await client.get_task(t))
                            except UpstreamFailure as exc:
                                got.append(exc)
                    failed = sum(isinstance(g, Exception) for g in got)
                    tally[f"{how} failed"] += failed
                    tally[f"{how} ok"] += len(got) - failed
        finally:
            await session.close()
    return tally


async def latency(tls: bool, rounds: int) -> dict[str, float]:
    """Median ms of one small POST on a pooled connection vs on a fresh one (loopback)."""

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/p", answer)
    server = ServerThread()
    site: dict[str, Any] = {}
    client_ssl: Any = True
    work = Path(tempfile.mkdtemp(prefix="ka-tls-"))
    if tls:
        _self_signed(work)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(work / "c.pem", work / "k.pem")
        site["ssl_context"] = ctx
        client_ssl = ssl.create_default_context(cafile=str(work / "c.pem"))
    out: dict[str, float] = {}
    try:
        port = server.run(_serve(app, None, **site))
        url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/p"
        for name, force_close in (("pooled", False), ("fresh", True)):
            connector = aiohttp.TCPConnector(force_close=force_close, ssl=client_ssl)
            async with aiohttp.ClientSession(connector=connector) as session:
                times = []
                for i in range(rounds + 20):
                    t0 = time.perf_counter()
                    async with session.post(url, data=b'{"prompt":"x"}') as resp:
                        await resp.read()
                    if i >= 20:
                        times.append((time.perf_counter() - t0) * 1000)
                out[name] = statistics.median(times)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    out["added"] = out["fresh"] - out["pooled"]
    return out


async def main(args: argparse.Namespace) -> None:
    kinds = ["aiohttp-ka1s", "front-fin", "front-fin25ms", "front-silent"]
    if shutil.which("nginx"):
        kinds.insert(1, "nginx-ka1s")
    kinds = [k for k in args.kinds.split(",") if k] if args.kinds is not None else kinds
    variants = args.variants.split(",")
    n = args.streams * args.per_stream
    for kind in kinds:
        runs = await asyncio.gather(
            *(
                posts_run(kind, v, args.streams, args.per_stream, mixed=args.mixed, pad_mb=args.mb)
                for v in variants
            )
        )
        for variant, tally in zip(variants, runs, strict=True):
            bad = tally["uncertain, never received"]
            print(f"{kind:14} {variant:17} uncertain+never-received {bad:3}/{n}  {dict(tally)}")
    if args.gets:
        for kind in ("aiohttp-ka1s", "front-silent"):
            print(f"gets-after-burst {kind:14} {dict(await gets_after_burst(kind))}")
    if args.died:
        for variant in variants:
            print(f"died-after-read {variant:17} {dict(await died_after_read(variant))}")
    if args.latency:
        for tls in (False, True):
            got = await latency(tls, args.latency)
            print(f"latency {'tls ' if tls else 'http'} median ms over {args.latency}: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in got.items()))  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=10)
    parser.add_argument("--per-stream", type=int, default=10)
    parser.add_argument("--kinds", default=None, help="comma-separated; empty for none")
    parser.add_argument(
        "--variants",
        default="today,connection-close,fresh-post,retry-stale,shipped,window-0.5s,window-0s",
    )
    parser.add_argument("--mixed", action="store_true", help="a task poll after each POST")
    parser.add_argument("--mb", type=int, default=0, help="pad each POST body to this size")
    parser.add_argument("--gets", action="store_true", help="task polls after bursts")
    parser.add_argument("--died", action="store_true")
    parser.add_argument("--latency", type=int, default=0)
    asyncio.run(main(parser.parse_args()))
