"""``[upstream]`` or ``[upstreams.NAME]``, and ``[prices]``: each upstream account, its central
key and what it charges per quality."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from gateway.core.config.settings import DEFAULT_UPSTREAM, MIB, Secret, UpstreamConfig
from gateway.core.config.table import (
    Table,
    at_least_one,
    cny_amount,
    non_empty,
    positive,
    read_secret,
)
from gateway.core.normalize import QUALITIES

DEFAULT_KEY_ENV = "IMAGE_GATEWAY_UPSTREAM_KEY"
DEFAULT_PRICES_CNY = {"low": "0.10", "medium": "0.20", "high": "0.40", "auto": "0.20"}
FILE_HOST = re.compile(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?")
UPSTREAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def parse_upstreams(
    root: Table,
    prices: Mapping[str, int],
    base_dir: Path,
    env: Mapping[str, str],
    require_key: bool,
) -> tuple[UpstreamConfig, ...]:
    """``[upstreams.NAME]`` tables, or the one ``[upstream]`` (named ``default``), never both."""
    if "upstream" in root.data and "upstreams" in root.data:
        root.errors.append(
            "upstream and upstreams: use [upstreams.NAME] tables for several upstreams, or one "
            "[upstream] table, not both"
        )
    if "upstreams" not in root.data:
        return (_upstream(root.table("upstream"), prices, base_dir, env, require_key),)
    root.seen.add("upstream")
    tables = root.table("upstreams")
    if not tables.data:
        tables.errors.append(f"{tables.path} must name at least one upstream")
    found = []
    for name in tables.data:
        table = tables.table(name)
        if not UPSTREAM_NAME.fullmatch(name):
            tables.errors.append(
                f"{table.path}: upstream names are 1-63 letters, digits, _ . - (starting with "
                "a letter or digit)"
            )
        if "api_key_env" not in table.data and "api_key_file" not in table.data:
            tables.errors.append(
                f"{table.path}: set api_key_env or api_key_file (each upstream has its own key)"
            )
        found.append(_upstream(table, prices, base_dir, env, require_key, name=name))
    return tuple(found)


def _upstream(
    t: Table,
    prices: Mapping[str, int],
    base_dir: Path,
    env: Mapping[str, str],
    require_key: bool,
    *,
    name: str = DEFAULT_UPSTREAM,
) -> UpstreamConfig:
    def url(value: str) -> str | None:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return "must be an http(s) URL with a host, such as https://jp.icodeeasy.cc"
        if parts.path not in ("", "/") or parts.query:
            return "must be the host only; the gateway keeps the request's own path"
        return None

    base_url = t.get("base_url", str, "https://jp.icodeeasy.cc", url).rstrip("/")
    key_env = t.get("api_key_env", str, None, non_empty)
    key_file = t.get("api_key_file", str, None, non_empty)
    hosts = t.get("file_hosts", list, [])
    if not all(isinstance(h, str) and FILE_HOST.fullmatch(h) for h in hosts):
        t.errors.append(f"{t.name('file_hosts')} must be a list of host names (or host:port)")
        hosts = []
    config = UpstreamConfig(
        base_url=base_url,
        api_key=_central_key(t, key_env, key_file, base_dir, env) if require_key else Secret(""),
        timeout_s=t.get("timeout_s", float, 300.0, positive),
        connect_timeout_s=t.get("connect_timeout_s", float, 10.0, positive),
        file_hosts=tuple(h.lower() for h in hosts),
        max_attempts=t.get(
            "max_attempts", int, 2, lambda v: None if 1 <= v <= 5 else "must be 1..5"
        ),
        retry_after_cap_s=t.get("retry_after_cap_s", float, 10.0, positive),
        download_max_bytes=int(t.get("download_max_mb", float, 50.0, positive) * MIB),
        download_timeout_s=t.get("download_timeout_s", float, 60.0, positive),
        proxy_results=t.get("proxy_results", bool, False),
        name=name,
        priority=t.get("priority", int, 1, at_least_one),
        weight=t.get("weight", int, 1, at_least_one),
        prices={**prices, **parse_prices(t.table("prices"), only_given=True)},
        cooldown_s=t.get("cooldown_s", float, 30.0, positive),
        max_fails=t.get("max_fails", int, 3, at_least_one),
        quota_retry_s=t.get("quota_retry_s", float, 3600.0, positive),
        reuse_idle_s=t.get(
            "reuse_idle_s", float, 2.0, lambda v: None if v >= 0 else "must not be negative"
        ),
    )
    t.finish()
    return config


def _central_key(
    t: Table, key_env: str | None, key_file: str | None, base_dir: Path, env: Mapping[str, str]
) -> Secret:
    source, value = read_secret(
        t, env_key="api_key_env", env_name=key_env, file_key="api_key_file", file_value=key_file,
        default_env=DEFAULT_KEY_ENV, base_dir=base_dir, env=env, what="central key",
    )  # fmt: skip
    if not value:
        return Secret("")
    if not value.startswith("sk_") or any(ch.isspace() for ch in value):
        t.errors.append(f"{source}: the central key must be the upstream's sk_... key")
        return Secret("")
    return Secret(value)


def parse_prices(t: Table, *, only_given: bool = False) -> dict[str, int]:
    """``[prices]``, or with ``only_given`` (an upstream's own table) the qualities it names."""
    prices = {}
    for quality in QUALITIES:
        if only_given and quality not in t.data:
            t.seen.add(quality)
            continue
        value = t.get_either(quality, (float, str), DEFAULT_PRICES_CNY[quality])
        prices[quality] = cny_amount(t, quality, value)
    t.finish()
    return prices
