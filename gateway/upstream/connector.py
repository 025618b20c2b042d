"""Which connection a request to the upstream rides: pooled for GETs, pooled for a POST only
while the connection is recently used, else a new one.

A POST sent on a pooled connection that the upstream (or a balancer in front of it) has just
closed breaks after its bytes left: its hold turns uncertain although nothing arrived, and
nobody can prove that nothing did. Every idle-close happens after some idle time, so a POST
takes a pooled connection only while it has been idle for less than ``[upstream]
reuse_idle_s`` (well under common idle timeouts: nginx 60-75 s, cloud balancers 60-350 s),
and less than half of the ``Keep-Alive: timeout=N`` the upstream announces, if it announces one
(the smaller wins, for good; an announced timeout under 1 s turns reuse off). Idle time is the
kernel's (TCP_INFO: since the upstream last sent a byte), so a busy event loop that read the
answer late does not make an old connection look fresh. The newest idle connection is taken,
and only if the kernel has nothing pending on it (a FIN or reset that arrived but was not yet
read means it is closed).
Otherwise a POST gets a new connection of its own; ``reuse_idle_s = 0`` means always. A retry of
a POST that provably never started is always sent on a new connection (``fresh_only``).

GETs are harmless to repeat; they take any pooled connection, and aiohttp resends one that
broke on a reused connection.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import select
import socket
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.connector import Connection
from yarl import URL

from gateway.core.tcpinfo import TCP_INFO_SIZE, last_data_recv_ms

IDEMPOTENT = frozenset({"GET", "HEAD"})
TCP_INFO: int | None = getattr(socket, "TCP_INFO", None)  # Linux
MIN_ANNOUNCED_S = 1.0  # an upstream announcing less than this gets no reuse at all
_KEEP_ALIVE_TIMEOUT = re.compile(r"(?:^|[,;\s])timeout\s*=\s*([0-9]+(?:\.[0-9]+)?)", re.I)
_fresh: contextvars.ContextVar[bool] = contextvars.ContextVar("fresh_only", default=False)


def fresh_only(fresh: bool = True) -> contextlib.AbstractContextManager[None]:
    """Within the block, a POST of this task gets a new connection whatever the pool holds.

    ``fresh_only(False)`` is a shared do-nothing block: a first attempt, held for as long as its
    generation takes, allocates nothing here (a generator-based one cost ~0.9 KiB per held
    request, by tracemalloc).
    """
    return _FreshOnly() if fresh else _AS_USUAL


class _FreshOnly:
    __slots__ = ("_token",)

    def __enter__(self) -> None:
        self._token = _fresh.set(True)

    def __exit__(self, *exc: object) -> None:
        _fresh.reset(self._token)


_AS_USUAL = contextlib.nullcontext()


class UpstreamConnector(aiohttp.TCPConnector):
    """``TCPConnector`` whose POSTs reuse only connections idle under the reuse window."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._fresh_connector = aiohttp.TCPConnector(force_close=True, **kwargs)
        self._windows: dict[tuple[str, int], float] = {}  # per upstream origin; 0: no reuse
        self.reused = 0  # POSTs sent on a pooled connection
        self.fresh = 0  # POSTs sent on a new one
        self._skip_next_get = False  # see connect()

    def reuse(self, base_url: str, reuse_idle_s: float) -> None:
        """POSTs to this upstream origin may reuse connections idle under ``reuse_idle_s``
        (every upstream of a gateway shares this connector; an origin never named gets a new
        connection per POST)."""
        self._windows[_origin(URL(base_url))] = reuse_idle_s

    def window_s(self, url: URL) -> float:
        return self._windows.get(_origin(url), 0.0)

    def learn(self, url: URL, headers: Mapping[str, str]) -> None:
        """Narrow the origin's window to half of its announced idle timeout, if any; below
        MIN_ANNOUNCED_S, to nothing (a race with the upstream's own loop at every reuse)."""
        value = headers.get("Keep-Alive")
        found = _KEEP_ALIVE_TIMEOUT.search(value) if value else None
        if found is not None:
            announced = float(found[1])
            origin = _origin(url)
            window = announced / 2 if announced >= MIN_ANNOUNCED_S else 0.0
            self._windows[origin] = min(self._windows.get(origin, 0.0), window)

    async def connect(
        self,
        req: aiohttp.ClientRequest,
        traces: list[aiohttp.tracing.Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 (aiohttp's signature)
    ) -> Connection:
        if req.method in IDEMPOTENT:
            return await super().connect(req, traces, timeout)
        window = self.window_s(req.url)
        if window > 0 and not _fresh.get() and req.proxy is None:
            conn = self._take_recent(req.connection_key, window)
            if conn is not None:
                self.reused += 1
                return conn
        self.fresh += 1
        # A new connection of the pooled kind, kept for the next request when it is soon enough;
        # with reuse off, one closed after its answer, as before the window existed.
        if window <= 0:
            return await self._fresh_connector.connect(req, traces, timeout)
        # aiohttp's connect() looks at the pool first, in _get, which it enters before its first
        # await: a flag set here is seen by this call only. (A ContextVar would cost a context
        # mapping per held request.)
        self._skip_next_get = True
        try:
            return await super().connect(req, traces, timeout)
        finally:
            self._skip_next_get = False

    async def _get(
        self, key: ConnectionKey, traces: list[aiohttp.tracing.Trace]
    ) -> Connection | None:
        if self._skip_next_get:
            self._skip_next_get = False
            return None
        return await super()._get(key, traces)

    def _take_recent(self, key: ConnectionKey, window: float) -> Connection | None:
        """The newest pooled connection, if it was idle under ``window`` and is still open;
        closed ones met on the way are dropped, older idle ones are left for GETs."""
        conns = self._conns.get(key)
        now = time.monotonic()
        while conns:
            proto, released = conns[-1]
            if now - released >= window:
                return None  # the newest is too old, so is every other
            quiet_s = _quiet_s(proto) if proto.is_connected() else None
            if quiet_s is None:  # closed by the other side: dropped
                conns.pop()
                proto.close()
                continue
            if quiet_s >= window:
                return None  # open, but the upstream has been silent too long: left for GETs
            conns.pop()
            if not conns:
                del self._conns[key]
            self._acquired.add(proto)
            if self._limit_per_host:
                self._acquired_per_host[key].add(proto)
            return Connection(self, key, proto, self._loop)
        if conns is not None and not conns:
            del self._conns[key]
        return None

    async def close(self, *, abort_ssl: bool = False) -> None:
        await self._fresh_connector.close(abort_ssl=abort_ssl)
        await super().close(abort_ssl=abort_ssl)


def _quiet_s(proto: ResponseHandler) -> float | None:
    """Seconds since the upstream last sent anything on this idle connection, by the kernel's
    clock (TCP_INFO), or None if it is closed: anything waiting to be read (bytes, a FIN, a
    reset) means the other side closed it or spoke out of turn.

    The upstream's idle timer runs from its last byte, which the pool's release time follows by
    however long this event loop took to read the answer: seconds, in a long GC pause. The
    kernel's count does not wait for the loop (0 where TCP_INFO is not available).
    """
    transport = proto.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.fileno() < 0:
        return None
    fileno = sock.fileno()
    poller = select.poll()
    poller.register(fileno, select.POLLIN | select.POLLPRI)
    try:
        if poller.poll(0):  # POLLHUP and POLLERR are reported even if not asked for
            return None
        info = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, TCP_INFO_SIZE) if TCP_INFO else b""
    except OSError:
        return None
    quiet_ms = last_data_recv_ms(info)
    return quiet_ms / 1000 if quiet_ms is not None else 0.0


def _origin(url: URL) -> tuple[str, int]:
    return (url.host or "", url.port or 0)
