"""systemd's notify protocol: one datagram to ``$NOTIFY_SOCKET``; a no-op outside systemd."""

from __future__ import annotations

import os
import socket
import time


def notify(*fields: str) -> bool:
    """Send ``READY=1``-style fields; True if a notify socket took them."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
    except OSError:  # the manager went away: like sd_notify(3), say so and carry on
        return False
    return True


def monotonic_usec() -> str:
    """The ``MONOTONIC_USEC=`` field systemd wants alongside ``RELOADING=1``."""
    return f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
