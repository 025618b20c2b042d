"""Every configured upstream's client, on one shared session, and the result downloader.

The configured list changes on reload: an added upstream gets a client, a changed one a new
client, a removed one is *retired*: no request is routed to it any more, but its async tasks are
still polled and its result files still fetched there, for as long as this process runs (its
key is only in memory: after a restart, an upstream missing from the config cannot be asked).
"""

from __future__ import annotations

from collections.abc import Iterable

import aiohttp

from gateway.core.config import UpstreamConfig
from gateway.upstream.client import HttpUpstream
from gateway.upstream.downloader import Downloader


class UpstreamPool:
    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        self._clients: dict[str, HttpUpstream] = {}
        self._current: tuple[UpstreamConfig, ...] = ()
        self.downloader = Downloader(self.known, session)

    def sync(self, configs: tuple[UpstreamConfig, ...]) -> tuple[list[str], list[str]]:
        """Make ``configs`` the routable upstreams; returns the names added and retired."""
        before = {c.name for c in self._current}
        for config in configs:
            client = self._clients.get(config.name)
            if client is None or client.config != config:
                self._clients[config.name] = HttpUpstream(config, self._session)
        self._current = configs
        after = {c.name for c in configs}
        return sorted(after - before), sorted(before - after)

    @property
    def current(self) -> tuple[UpstreamConfig, ...]:
        return self._current

    def client(self, name: str) -> HttpUpstream | None:
        """A configured or retired upstream's client; None for a name this process never had."""
        return self._clients.get(name)

    def retired(self, name: str) -> bool:
        return name in self._clients and all(c.name != name for c in self._current)

    def known(self) -> Iterable[UpstreamConfig]:
        """The configured upstreams, then the retired ones."""
        current = {c.name for c in self._current}
        yield from self._current
        yield from (c.config for name, c in self._clients.items() if name not in current)
