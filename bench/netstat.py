"""The kernel's count of connections dropped at a full listen queue (all sockets, this host).

A burst of connections larger than a server's ``listen()`` backlog is answered by SYN
retransmits one second later, which shows up as a 1 s step in tail latency; the delta of
``TcpExt: ListenDrops`` around a scenario says whether that happened.
"""

from __future__ import annotations


def listen_drops() -> int:
    """``TcpExt: ListenDrops`` from /proc/net/netstat, or -1 if unreadable."""
    try:
        with open("/proc/net/netstat", encoding="ascii") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return -1
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(table.get("ListenDrops", -1))
    return -1
