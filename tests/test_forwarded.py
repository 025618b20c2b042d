"""The client address behind proxies: X-Forwarded-For believed only as far as trusted hops go."""

from __future__ import annotations

import ipaddress

import pytest

from gateway.core.forwarded import client_ip

PROXIES = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        ("192.0.2.1", ["203.0.113.7"], "192.0.2.1"),  # an untrusted peer: its header is ignored
        ("10.0.0.2", [], "10.0.0.2"),  # a trusted proxy that says nothing: the proxy
        ("10.0.0.2", ["203.0.113.7"], "203.0.113.7"),
        ("10.0.0.2", ["1.1.1.1, 203.0.113.7"], "203.0.113.7"),  # the rightmost untrusted hop
        ("10.0.0.2", ["1.1.1.1", "203.0.113.7, 10.9.9.9"], "203.0.113.7"),  # several headers
        ("10.0.0.2", ["10.1.1.1, 10.2.2.2"], "10.1.1.1"),  # every hop trusted: the leftmost
        ("10.0.0.2", ["203.0.113.7, junk"], "10.0.0.2"),  # not an address: the last trusted hop
        ("10.0.0.2", ["203.0.113.7, junk, 10.3.3.3"], "10.3.3.3"),
        ("::1", ["2001:db8::7"], "2001:db8::7"),
        ("::ffff:10.0.0.2", ["203.0.113.7"], "203.0.113.7"),  # IPv4 on a dual-stack socket
        ("::ffff:192.0.2.1", [], "192.0.2.1"),
        ("10.0.0.2", ["203.0.113.7:4711"], "10.0.0.2"),  # a port is not part of an address
        (None, ["203.0.113.7"], None),  # no socket peer (a Unix socket)
    ],
)
def test_client_ip(peer: str | None, forwarded: list[str], expected: str | None) -> None:
    assert client_ip(peer, forwarded, PROXIES) == expected


def test_with_no_trusted_proxy_the_header_never_counts() -> None:
    assert client_ip("10.0.0.2", ["203.0.113.7"], ()) == "10.0.0.2"
