"""Whether a request reached the gateway over TLS: on this socket, or at a trusted proxy.

``X-Forwarded-Proto`` is believed only from a peer inside ``[server] trusted_proxies`` (the
operator's reverse proxies): anyone else can write it. The client's address behind those
proxies is ``gateway.core.forwarded``'s, in every access-log line as ``client_ip``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from aiohttp import web

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def came_over_tls(request: web.Request, trusted: Sequence[Network]) -> bool:
    """TLS on this socket, or a trusted proxy that says its client used https (the last value
    of ``X-Forwarded-Proto``: the one the proxy next to us wrote)."""
    if request.secure:
        return True
    if not _trusted(request.remote, trusted):
        return False
    proto = request.headers.get("X-Forwarded-Proto", "").split(",")[-1].strip().lower()
    return proto == "https"


def _trusted(peer: str | None, trusted: Sequence[Network]) -> bool:
    try:
        address = ipaddress.ip_address(peer or "")
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address.version == net.version and address in net for net in trusted)
