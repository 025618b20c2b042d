"""The kernel's count of connections dropped at a full listen queue (all sockets, this host).

A burst of connections larger than a server's ``listen()`` backlog is answered by SYN
retransmits one second later, which shows up as a 1 s step in tail latency; the delta of
``TcpExt: ListenDrops`` around a scenario says whether that happened.
"""

from __future__ import annotations

COUNTERS = ("ListenDrops", "SyncookiesSent", "SyncookiesFailed", "TCPAbortOnData")


def listen_drops() -> int:
    """``TcpExt: ListenDrops`` from /proc/net/netstat, or -1 if unreadable."""
    return tcp_counters().get("ListenDrops", -1)


def tcp_counters() -> dict[str, int]:
    """The ``TcpExt`` counters of COUNTERS (empty if unreadable): listen-queue drops, SYN
    cookies sent and failed (a failed one is answered with a reset), and sockets closed with
    unread data (a reset too)."""
    try:
        with open("/proc/net/netstat", encoding="ascii") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return {}
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return {name: int(table[name]) for name in COUNTERS if name in table}
    return {}
