"""The image URLs of a stored answer (a sync body or a task's last answer), in their order.

Read where a paid result must be found again (the console's thumbnails) and never shown: a
result URL is a credential.
"""

from __future__ import annotations

import json
from typing import Any


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
