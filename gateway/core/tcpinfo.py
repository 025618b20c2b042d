"""Reading Linux's ``struct tcp_info`` (``getsockopt(TCP_INFO)``): how long ago a socket last
received data, by the kernel's clock, which a busy event loop cannot delay.

The request's wait before its handler (``queued_ms``, gateway/http/queueing.py) and an upstream
connection's idle time (gateway/upstream/connector.py) both read it. Pure: the caller does the
``getsockopt``.
"""

from __future__ import annotations

import struct

TCP_INFO_SIZE = 104  # struct tcp_info up to tcpi_rcv_space: present in every Linux since 2.6
LAST_DATA_RECV = struct.Struct("=I")
LAST_DATA_RECV_OFFSET = 52  # 8 one-byte fields, then u32: rto ... fackets (9), last_data_sent,
#                             last_ack_sent, then last_data_recv


def last_data_recv_ms(tcp_info: bytes) -> int | None:
    """``tcpi_last_data_recv`` from a raw ``struct tcp_info``, or None if it is too short."""
    if len(tcp_info) < LAST_DATA_RECV_OFFSET + LAST_DATA_RECV.size:
        return None
    value: int = LAST_DATA_RECV.unpack_from(tcp_info, LAST_DATA_RECV_OFFSET)[0]
    return value
