"""Who is at the other end of a request, and whether it reached us over TLS.

``X-Forwarded-For`` and ``X-Forwarded-Proto`` are believed only from a peer inside one of the
``trusted`` networks (the operator's reverse proxies): anyone else can write them.
"""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Network, IPv6Network, ip_address

from aiohttp import web

from gateway.core.config import Settings

Networks = Sequence[IPv4Network | IPv6Network]


def trusted_proxies(settings: Settings) -> Networks:
    """The reverse proxies whose forwarded headers count. None yet: a ``[server]
    trusted_proxies`` setting plugs in here, and every caller follows."""
    return ()


def client_address(request: web.Request, trusted: Networks) -> str:
    """The socket peer; behind a trusted proxy, the nearest ``X-Forwarded-For`` hop that is not
    one of the trusted proxies itself."""
    peer = request.remote or "-"
    if not _trusted(peer, trusted):
        return peer
    hops = [hop.strip() for hop in request.headers.get("X-Forwarded-For", "").split(",")]
    for hop in reversed([h for h in hops if h]):
        if not _trusted(hop, trusted):
            try:
                return str(ip_address(hop))
            except ValueError:
                return peer
    return peer


def came_over_tls(request: web.Request, trusted: Networks) -> bool:
    """TLS on this socket, or a trusted proxy that says its client used https."""
    if request.secure:
        return True
    if not _trusted(request.remote or "", trusted):
        return False
    proto = request.headers.get("X-Forwarded-Proto", "").split(",")[-1].strip().lower()
    return proto == "https"


def _trusted(address: str, trusted: Networks) -> bool:
    try:
        ip = ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)
