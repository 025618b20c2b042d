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
import struct

from aiohttp import web

TCP_INFO_SIZE = 104  # struct tcp_info up to tcpi_rcv_space: present in every Linux since 2.6
LAST_DATA_RECV = struct.Struct("=I")
LAST_DATA_RECV_OFFSET = 52  # 8 one-byte fields, then u32: rto ... fackets (9), last_data_sent,
#                             last_ack_sent, then last_data_recv


def last_data_recv_ms(tcp_info: bytes) -> int | None:
    """``tcpi_last_data_recv`` from a raw ``struct tcp_info``, or None if it is too short."""
    if len(tcp_info) < LAST_DATA_RECV_OFFSET + LAST_DATA_RECV.size:
        return None
    return LAST_DATA_RECV.unpack_from(tcp_info, LAST_DATA_RECV_OFFSET)[0]


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
