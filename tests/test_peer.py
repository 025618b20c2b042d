"""Whether a request came over TLS, behind trusted proxies (gateway/http/peer.py)."""

from __future__ import annotations

from ipaddress import ip_network
from unittest import mock

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from gateway.http.peer import came_over_tls

PROXIES = [ip_network("10.0.0.0/8")]


def request(peer: str, **headers: str) -> web.Request:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        (peer, 1234) if name == "peername" else default
    )
    return make_mocked_request("GET", "/console/", headers=headers, transport=transport)


def test_forwarded_proto_counts_only_from_a_trusted_proxy() -> None:
    https = {"X-Forwarded-Proto": "https"}
    assert came_over_tls(request("10.0.0.5", **https), PROXIES)
    assert came_over_tls(request("::ffff:10.0.0.5", **https), PROXIES)  # dual-stack socket
    assert not came_over_tls(request("198.51.100.1", **https), PROXIES)
    assert not came_over_tls(request("10.0.0.5", **https), [])
    assert not came_over_tls(request("10.0.0.5"), PROXIES)
    # the value the proxy next to us appended is the one that counts
    assert not came_over_tls(request("10.0.0.5", **{"X-Forwarded-Proto": "https, http"}), PROXIES)
