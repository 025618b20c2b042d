"""How long a request had already waited when its handler started: the access log's queued_ms.

aiohttp reads a socket only when the event loop is free, so while the loop is held the request's
bytes sit in the kernel, and no timestamp aiohttp offers sees that wait: its head is parsed, its
request object built (the request factory) and its handler started within microseconds of each
other, all after the loop comes back (measured: 0.09 ms between the head being parsed and the
handler starting, for a request that had waited 204 ms). The kernel does know: Linux's TCP_INFO
gives, per socket, the milliseconds since data last arrived (``tcpi_last_data_recv``, at the
kernel clock's resolution, 1-4 ms). Read as the middleware starts, that is how long the
request's latest bytes waited: its whole wait for a request sent in one write; for a large body
still arriving, about zero. None where there is no TCP socket (unix sockets, tests without one)
or on systems without TCP_INFO.
"""

from __future__ import annotations

import socket

from aiohttp import web

from gateway.core.tcpinfo import LAST_DATA_RECV_OFFSET, TCP_INFO_SIZE, last_data_recv_ms

__all__ = ["LAST_DATA_RECV_OFFSET", "last_data_recv_ms", "queued_ms"]  # the parser, as before


def queued_ms(request: web.Request) -> int | None:
    """Milliseconds since the request's latest bytes reached the kernel (see the module doc)."""
    option = getattr(socket, "TCP_INFO", None)
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if option is None or sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, option, TCP_INFO_SIZE)
    except OSError:
        return None
    return last_data_recv_ms(info)
