"""Result images: as ``b64_json`` for clients written for OpenAI's GPT-image models, which the
upstream lacks, or through the gateway (``proxy_results``) for networks that cannot reach the
upstream.

The images are already paid for when this runs, so a failed download never loses them: the
client gets the URLs instead, with a header saying why.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from multidict import MultiMapping

from gateway.core.config import DEFAULT_UPSTREAM, UpstreamConfig
from gateway.services.results import Expired
from gateway.upstream.base import DownloadError
from gateway.upstream.downloader import is_result_origin

log = logging.getLogger("gateway.results")

WARNING_HEADER = "X-Gateway-Warning"
FILES_PATH = "/v1/images/files/"
RESULT_PATH = re.compile(r"/v1/images/files(?:/[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}){1,8}")


async def as_b64_json(
    payload: dict[str, Any], fetch: Callable[[str], Awaitable[bytes]], *, keep_url: bool = False
) -> tuple[dict[str, Any], dict[str, str]]:
    """``payload`` with ``b64_json`` in each ``data[]`` item (in place of ``url``, or beside it
    with ``keep_url``), or as it was plus a warning. ``fetch``: the result store's reader."""
    items = payload.get("data") or []
    urls = [item.get("url") for item in items]
    try:
        images = await asyncio.gather(*(fetch(url) for url in urls))
    except Expired:
        warning = "b64_json unavailable (the images were deleted from the gateway); URLs only"
        return payload, {WARNING_HEADER: warning}
    except DownloadError as exc:
        log.warning("b64_json download failed, answering with URLs: %s", exc)
        warning = f"b64_json unavailable ({exc}); returning URLs instead"
        return payload, {WARNING_HEADER: "".join(ch if " " <= ch <= "~" else "?" for ch in warning)}
    data = []
    for item, image in zip(items, images, strict=True):
        converted = {k: v for k, v in item.items() if keep_url or k != "url"}
        converted["b64_json"] = base64.b64encode(image).decode("ascii")
        data.append(converted)
    return {**payload, "data": data}, {}


def through_gateway(
    payload: dict[str, Any], origin: str, configs: Iterable[UpstreamConfig]
) -> dict[str, Any]:
    """``payload`` with each result URL (``data[].url``, ``result_url``, ``result_urls[]``) of an
    upstream with ``proxy_results`` pointing at the gateway's own ``/v1/images/files/...``,
    which streams it from that upstream (named in the query, but for the one ``default``
    upstream)."""
    known = list(configs)
    shown = dict(payload)
    if isinstance(shown.get("result_url"), str):
        shown["result_url"] = _proxied(shown["result_url"], origin, known)
    if isinstance(shown.get("result_urls"), list):
        shown["result_urls"] = [
            _proxied(url, origin, known) if isinstance(url, str) else url
            for url in shown["result_urls"]
        ]
    if isinstance(shown.get("data"), list):
        shown["data"] = [
            {**item, "url": _proxied(item["url"], origin, known)}
            if isinstance(item, dict) and isinstance(item.get("url"), str)
            else item
            for item in shown["data"]
        ]
    return shown


def _proxied(url: str, origin: str, configs: list[UpstreamConfig]) -> str:
    parts = urlsplit(url)
    config = next((c for c in configs if is_result_origin(url, c)), None)
    if config is None or not config.proxy_results or not is_result_path(parts.path, parts.query):
        return url
    named = "" if config.name == DEFAULT_UPSTREAM else f"upstream={config.name}"
    query = "&".join(q for q in (named, parts.query) if q)
    return origin + parts.path + (f"?{query}" if query else "")


def file_query(query: MultiMapping[str]) -> tuple[str | None, str] | None:
    """A result file's query through the gateway: (the upstream named, the query to pass on:
    ``""`` or ``download=1``), or None for anything else."""
    if set(query) - {"upstream", "download"} or any(len(query.getall(k)) > 1 for k in query):
        return None
    if query.get("download", "1") != "1":
        return None
    return query.get("upstream"), "download=1" if "download" in query else ""


def is_result_path(raw_path: str, query: str) -> bool:
    """A result image's path as the upstream writes them, and nothing a proxy could be steered
    with: plain segments only (no ``..``, no percent-escapes), and at most ``download=1``."""
    return RESULT_PATH.fullmatch(raw_path) is not None and query in ("", "download=1")
