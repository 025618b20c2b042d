"""Serving results as ``b64_json`` for clients written for gpt-image-1, which the upstream lacks.

The images are already paid for when this runs, so a failed download never loses them: the
client gets the URLs instead, with a header saying why.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import Any

from gateway.upstream import DownloadError, UpstreamClient

log = logging.getLogger("gateway.results")

WARNING_HEADER = "X-Gateway-Warning"


async def as_b64_json(
    payload: dict[str, Any], upstream: UpstreamClient
) -> tuple[dict[str, Any], dict[str, str]]:
    """``payload`` with ``data[].url`` replaced by ``b64_json``, or as it was plus a warning."""
    items = payload.get("data") or []
    urls = [item.get("url") for item in items]
    try:
        images = await asyncio.gather(*(upstream.fetch_image(url) for url in urls))
    except DownloadError as exc:
        log.warning("b64_json download failed, answering with URLs: %s", exc)
        return payload, {WARNING_HEADER: f"b64_json unavailable ({exc}); returning URLs instead"}
    data = []
    for item, image in zip(items, images, strict=True):
        converted = {k: v for k, v in item.items() if k != "url"}
        converted["b64_json"] = base64.b64encode(image).decode("ascii")
        data.append(converted)
    return {**payload, "data": data}, {}
