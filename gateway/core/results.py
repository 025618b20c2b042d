"""The image URLs of a stored answer (a sync body or a task's last answer), in their order.

Read where a paid result must be found again (the console's thumbnails) and never shown: a
result URL is a credential.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any
from urllib.parse import urlsplit


def result_urls(stored: str | None) -> list[str]:
    """``data[].url`` of the answer, else its ``result_url``; [] for anything else."""
    if not stored:
        return []
    try:
        answer: Any = json.loads(stored)
    except (ValueError, RecursionError):
        return []
    if not isinstance(answer, dict):
        return []
    data = answer.get("data")
    if isinstance(data, list):
        urls = [item["url"] for item in data if isinstance(item, dict) and _is_url(item.get("url"))]
        if urls:
            return urls
    single = answer.get("result_url")
    return [single] if isinstance(single, str) and _is_url(single) else []


def _is_url(value: object) -> bool:
    return isinstance(value, str) and value.startswith(("https://", "http://"))


def url_key(url: str) -> str:
    """What finds a result image by its URL in the store's index: the SHA-256 of the URL's path
    and query, which the gateway's own ``/v1/images/files/...`` URL keeps from the upstream's."""
    parts = urlsplit(url)
    return hashlib.sha256(
        (parts.path + ("?" + parts.query if parts.query else "")).encode()
    ).hexdigest()


def payload_urls(payload: dict[str, Any] | None) -> list[str]:
    """``data[].url`` of an answer about to be sent (a dict, not yet text)."""
    items = (payload or {}).get("data")
    return [
        item["url"]
        for item in (items if isinstance(items, list) else [])
        if isinstance(item, dict) and _is_url(item.get("url"))
    ]
