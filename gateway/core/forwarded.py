"""Who is on the other end of a request: the socket peer, or, behind trusted proxies, the
client they report in ``X-Forwarded-For``.

A client can send any ``X-Forwarded-For`` it likes, so the header is believed only as far as
the proxies that handled it are trusted: from the peer leftwards, each hop a trusted proxy
appended is taken, up to the first address that is not a trusted proxy (the rightmost untrusted
hop), which is the client. Anything left of it was written by the client and is ignored.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_ip(
    peer: str | None, forwarded_for: Iterable[str], trusted: Sequence[Network]
) -> str | None:
    """The client's address as text: ``peer`` itself unless it is in ``trusted``; then the
    rightmost ``X-Forwarded-For`` hop that is not (``forwarded_for``: the header's values, in
    the order received). A hop that is not an IP address ends the walk at the last trusted
    proxy, which is then the best address known."""
    address = _address(peer)
    if address is None:
        return None
    if not _trusted(address, trusted):
        return str(address)
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",")]
    for hop in reversed(hops):
        reported = _address(hop)
        if reported is None:
            break
        address = reported
        if not _trusted(address, trusted):
            break
    return str(address)


def _address(text: str | None) -> Address | None:
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:10.0.0.1 on a dual-stack socket is 10.0.0.1
    return address


def _trusted(address: Address, trusted: Sequence[Network]) -> bool:
    return any(address.version == network.version and address in network for network in trusted)
