"""Result images, fetched from the upstream's own hosts only.

A result URL is a credential of its own: no key is sent with it, redirects are followed only to
the upstreams' origins (each one's ``base_url`` and ``file_hosts``), and a whole download is
capped at the ``download_max_mb`` of the upstream whose origin the URL is on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from urllib.parse import urljoin, urlsplit

import aiohttp

from gateway.core.config import DEFAULT_PORTS, UpstreamConfig
from gateway.upstream.base import DownloadError
from gateway.upstream.streams import TooLarge, read_capped

MAX_REDIRECTS = 3
REDIRECTS = (301, 302, 303, 307, 308)


class Downloader:
    """``configs`` gives every upstream whose results may be fetched (a removed upstream's too,
    while its tasks are kept)."""

    def __init__(
        self, configs: Callable[[], Iterable[UpstreamConfig]], session: aiohttp.ClientSession
    ) -> None:
        self._configs = configs
        self._session = session

    @asynccontextmanager
    async def open_image(self, url: str) -> AsyncIterator[aiohttp.ClientResponse]:
        """A result image's response, following redirects only to the upstreams' own hosts."""
        config = self._check(url)
        timeout = aiohttp.ClientTimeout(total=config.download_timeout_s)
        for _ in range(MAX_REDIRECTS + 1):
            self._check(url)
            try:
                response = await self._session.get(url, allow_redirects=False, timeout=timeout)
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise DownloadError(f"the image download failed ({_describe(exc)})") from None
            try:
                if response.status in REDIRECTS:
                    url = urljoin(url, response.headers.get("Location", ""))
                    continue
                if response.status != 200:
                    raise DownloadError(f"the image host answered HTTP {response.status}")
                yield response
                return
            finally:
                response.release()
        raise DownloadError("too many redirects")

    async def fetch_image(self, url: str) -> bytes:
        """Download a result image whole (for b64_json), up to ``download_max_mb``."""
        max_bytes = self._check(url).download_max_bytes
        try:
            async with self.open_image(url) as response:
                if (response.content_length or 0) > max_bytes:
                    raise TooLarge(max_bytes)
                return bytes(await read_capped(response.content, max_bytes))
        except TooLarge:
            raise DownloadError(f"the image is larger than {max_bytes} bytes") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DownloadError(f"the image download failed ({_describe(exc)})") from None

    def _check(self, url: str) -> UpstreamConfig:
        """The upstream ``url`` is a result of, or DownloadError."""
        for config in self._configs():
            if is_result_origin(url, config):
                return config
        parts = urlsplit(url)
        raise DownloadError(
            f"refusing to download from {parts.scheme}://{parts.hostname}: not an upstream host"
        )


def is_result_origin(url: str, config: UpstreamConfig) -> bool:
    """Whether ``url`` is on one of the upstream's own origins (scheme, host and port)."""
    try:
        parts = urlsplit(url)
        port = parts.port or DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return False
    allowed_schemes = {"https", urlsplit(config.base_url).scheme}
    return (
        parts.scheme in allowed_schemes and ((parts.hostname or ""), port) in config.result_origins
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"connection failed: {exc.os_error.strerror or type(exc.os_error).__name__}"
    return type(exc).__name__
