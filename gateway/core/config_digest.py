"""The effective config's fingerprint, for ``gateway_config_info{sha256}``; pure.

"Effective" is the parsed ``Settings`` in force (after a reload's merge, so a setting that
needs a restart counts as the running value), rendered as canonical JSON: dataclass fields by
name, mappings with sorted keys, paths and dates as text, and every ``Secret`` as ``"<secret>"``
(a key rotation is not drift, and no hash of a secret is ever published). What differs between
the instances of one fleet by design is left out: where each listens and writes its own files
(``PER_INSTANCE``), and the unused SQLite path of a PostgreSQL config. Two instances with the
same sha256 enforce the same teams, keys, budgets, prices and limits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from datetime import date, datetime, time
from pathlib import PurePath
from typing import Any

from gateway.core.config import Secret, Settings

DIGEST_HEX = 12
PER_INSTANCE = (
    ("server", "host"),
    ("server", "port"),
    ("server", "instance_name"),
    ("metrics", "port"),
    ("log", "access"),
    ("storage", "watermark"),
    ("console", "links"),  # one-time sign-in links (the demo's), new at every start
)


def config_sha256(settings: Settings) -> str:
    """The first 12 hex digits of the SHA-256 of the canonical JSON of ``settings``."""
    data = canonical(settings)
    for table, key in PER_INSTANCE:
        del data[table][key]
    if settings.storage.backend == "postgres":
        del data["database"]
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_HEX]


def canonical(value: Any) -> Any:
    """``value`` as plain JSON data, the same for equal settings in any process."""
    if isinstance(value, Secret):
        return "<secret>"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(key): canonical(item) for key, item in value.items()}
    if isinstance(value, frozenset | set):
        return sorted((canonical(item) for item in value), key=repr)
    if isinstance(value, list | tuple):
        return [canonical(item) for item in value]
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)  # an unforeseen type: still deterministic for equal values
