"""Client addresses and TLS behind trusted proxies (gateway/http/peer.py)."""

from __future__ import annotations

from ipaddress import ip_network
from unittest import mock

from aiohttp.test_utils import make_mocked_request

from gateway.http.peer import came_over_tls, client_address

PROXIES = [ip_network("10.0.0.0/8")]


def request(peer: str, **headers: str):  # type: ignore[no-untyped-def]
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        (peer, 1234) if name == "peername" else default
    )
    return make_mocked_request("GET", "/console/", headers=headers, transport=transport)


def test_forwarded_headers_count_only_from_a_trusted_proxy() -> None:
    forwarded = {"X-Forwarded-For": "203.0.113.7, 10.0.0.9", "X-Forwarded-Proto": "https"}
    assert client_address(request("10.0.0.5", **forwarded), PROXIES) == "203.0.113.7"
    assert came_over_tls(request("10.0.0.5", **forwarded), PROXIES)
    assert client_address(request("198.51.100.1", **forwarded), PROXIES) == "198.51.100.1"
    assert not came_over_tls(request("198.51.100.1", **forwarded), PROXIES)
    assert client_address(request("10.0.0.5", **forwarded), []) == "10.0.0.5"
    assert not came_over_tls(request("10.0.0.5", **forwarded), [])


def test_a_garbled_forwarded_header_falls_back_to_the_peer() -> None:
    odd = request("10.0.0.5", **{"X-Forwarded-For": "not-an-ip"})
    assert client_address(odd, PROXIES) == "10.0.0.5"
    only_proxies = request("10.0.0.5", **{"X-Forwarded-For": "10.1.1.1"})
    assert client_address(only_proxies, PROXIES) == "10.0.0.5"
