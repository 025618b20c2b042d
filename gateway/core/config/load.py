"""The TOML file read and parsed into ``Settings``, or refused with every problem named.

Pure except for ``load_settings``, which reads the file (the credentials it names are read while
parsing: ``table.read_secret``).
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gateway.core.config.settings import (
    DEFAULT_ALIASES,
    MIB,
    ConfigError,
    ConsoleConfig,
    IdempotencyConfig,
    LogConfig,
    MetricsConfig,
    Secret,
    ServerConfig,
    Settings,
    TasksConfig,
)
from gateway.core.config.storage import default_watermark, parse_results, parse_storage
from gateway.core.config.table import (
    Table,
    at_least_one,
    env_names,
    expand_env,
    non_empty,
    port_number,
    positive,
    resolve,
)
from gateway.core.config.teams import (
    check_unique_keys,
    parse_admin_keys,
    parse_key_hashes,
    parse_teams,
)
from gateway.core.config.upstreams import parse_prices, parse_upstreams
from gateway.core.normalize import UPSTREAM_MODEL

INSTANCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}")  # fits a header and a log line


def load_settings(
    path: str | Path, env: Mapping[str, str] | None = None, *, require_central_key: bool = True
) -> Settings:
    """Read and validate a TOML config file; raise ConfigError listing every problem.

    ``require_central_key=False`` is for offline tools (the usage report) that never call the
    upstream and should not need the key.
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError([f"cannot read {path}: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path} is not valid TOML: {exc}"]) from None
    return parse_settings(
        data,
        base_dir=path.resolve().parent,
        env=os.environ if env is None else env,
        require_central_key=require_central_key,
    )


def parse_settings(
    data: Mapping[str, Any],
    *,
    base_dir: Path,
    env: Mapping[str, str],
    require_central_key: bool = True,
) -> Settings:
    root = Table(data, "", [])
    server = _server(root.table("server"))
    prices = parse_prices(root.table("prices"))
    upstreams = parse_upstreams(root, prices, base_dir, env, require_central_key)
    storage = root.table("storage")
    database = resolve(storage.get("database", str, "gateway.db", non_empty), base_dir)
    storage_config = parse_storage(storage, base_dir, env)
    if storage_config.watermark is None:
        storage_config = replace(
            storage_config, watermark=default_watermark(storage_config, database, base_dir, env)
        )
    log_table = root.table("log")
    access = log_table.get("access", str, "-", non_empty)
    log = LogConfig(
        access=access if access == "-" else str(resolve(access, base_dir)),
        prompts=log_table.get("prompts", bool, False),
    )
    teams = parse_teams(root.table("teams"))
    admin = root.table("admin")
    admin_keys = parse_key_hashes(admin, "keys_sha256", required=False)
    named_admin_keys = parse_admin_keys(admin)
    models = root.table("models")
    aliases = _aliases(models)
    settings = Settings(
        server=server,
        upstreams=upstreams,
        database=database,
        log=log,
        prices=prices,
        teams=teams,
        admin_keys_sha256=admin_keys,
        tasks=_tasks(root.table("tasks")),
        idempotency=_idempotency(root.table("idempotency")),
        metrics=_metrics(
            root.table("metrics"), admin_keys + tuple(k.sha256 for k in named_admin_keys)
        ),
        model_aliases=aliases,
        storage=storage_config,
        admin_keys=named_admin_keys,
        console=_console(root.table("console"), base_dir, env),
        results=parse_results(root.table("results"), database, storage_config, base_dir, env),
    )
    for table in (storage, log_table, admin, models):
        table.finish()
    root.finish()
    check_unique_keys(settings, root.errors)
    if root.errors:
        raise ConfigError(root.errors)
    return settings


def _server(t: Table) -> ServerConfig:
    def zone(value: str) -> str | None:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            return "is not an IANA time zone (such as UTC or Asia/Shanghai)"
        return None

    config = ServerConfig(
        host=t.get("host", str, "127.0.0.1", non_empty),
        port=t.get("port", int, 8080, port_number),
        timezone=t.get("timezone", str, "UTC", zone),
        max_body_bytes=int(t.get("max_body_mb", float, 128.0, positive) * MIB),
        max_image_bytes=int(t.get("max_image_mb", float, 20.0, positive) * MIB),
        drain_s=t.get(
            "drain_s", float, 240.0, lambda v: None if v >= 0 else "must not be negative"
        ),
        backlog=t.get("backlog", int, 1024, at_least_one),
        header_timeout_s=t.get("header_timeout_s", float, 10.0, positive),
        keepalive_timeout_s=t.get("keepalive_timeout_s", float, 75.0, positive),
        instance_name=t.get("instance_name", str, "", _instance_name),
        trusted_proxies=_networks(t, "trusted_proxies"),
    )
    t.finish()
    return config


def _instance_name(value: str) -> str | None:
    if INSTANCE_NAME.fullmatch(value):
        return None
    return "must be 1-128 of A-Z a-z 0-9 _ . : @ - (starting with a letter or digit)"


def _networks(t: Table, key: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """A list of CIDRs (``10.0.0.0/8``, ``::1/128``; a bare address is its own /32 or /128)."""
    networks = []
    for index, value in enumerate(t.get(key, list, [])):
        try:
            if not isinstance(value, str):  # ip_network(7) would be 0.0.0.7/32
                raise TypeError(value)
            networks.append(ipaddress.ip_network(value, strict=False))
        except (TypeError, ValueError):
            t.errors.append(
                f"{t.name(key)}[{index}] must be an IP network in CIDR form, such as "
                '"10.0.0.0/8" or "127.0.0.1/32"'
            )
    return tuple(networks)


def _aliases(t: Table) -> dict[str, str]:
    aliases = t.get("aliases", dict, DEFAULT_ALIASES)
    for name, target in aliases.items():
        if target != UPSTREAM_MODEL:
            t.errors.append(f"{t.name('aliases')}.{name} must map to {UPSTREAM_MODEL!r}")
    return {**aliases}


def _tasks(t: Table) -> TasksConfig:
    config = TasksConfig(
        poll_cache_ttl_s=t.get("poll_cache_ttl_s", float, 2.0, positive),
        settle_interval_s=t.get("settle_interval_s", float, 5.0, positive),
        settle_max_interval_s=t.get("settle_max_interval_s", float, 120.0, positive),
        max_pending_age_s=t.get("max_pending_age_s", float, 6 * 3600.0, positive),
    )
    t.finish()
    return config


def _idempotency(t: Table) -> IdempotencyConfig:
    config = IdempotencyConfig(
        keep_hours=t.get(
            "keep_hours", float, 24.0, lambda v: None if v >= 24 else "must be at least 24"
        ),
        retry_dedupe_minutes=t.get("retry_dedupe_minutes", float, 10.0, positive),
    )
    t.finish()
    return config


def _metrics(t: Table, admin_keys: tuple[str, ...]) -> MetricsConfig:
    """``/metrics`` shows every team's name and spend: with admin keys configured it needs one
    by default; ``require_admin = false`` keeps it open, as an explicit choice."""
    require_admin = t.get("require_admin", bool, None)
    if require_admin and not admin_keys:
        t.errors.append(f"{t.name('require_admin')} needs at least one admin.keys_sha256")
    config = MetricsConfig(
        enabled=t.get("enabled", bool, True),
        port=t.get("port", int, 0, port_number),
        require_admin=bool(admin_keys) if require_admin is None else require_admin,
    )
    t.finish()
    return config


CONSOLE_SECRET_CHARS = 32


def _console(t: Table, base_dir: Path, env: Mapping[str, str]) -> ConsoleConfig:
    """``[console]``: ``enabled`` and an optional ``secret_file`` (``${VAR}`` expanded, such as
    a systemd credential) shared by every instance behind one load balancer."""
    enabled = t.get("enabled", bool, True)
    secret_file = t.get("secret_file", str, None, non_empty)
    t.finish()
    if secret_file is None:
        return ConsoleConfig(enabled=enabled)
    source = t.name("secret_file")
    unset = sorted(name for name in env_names(secret_file) if name not in env)
    if unset:
        t.errors.append(f"{source} uses ${unset[0]}, which is not set")
        return ConsoleConfig(enabled=enabled)
    path = resolve(expand_env(secret_file, env), base_dir)
    try:
        value = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        t.errors.append(f"{source}: cannot read {path}: {exc}")
        return ConsoleConfig(enabled=enabled)
    if len(value) < CONSOLE_SECRET_CHARS:
        t.errors.append(
            f"{source}: {path} must hold at least {CONSOLE_SECRET_CHARS} characters (such as "
            "`head -c 32 /dev/urandom | base64`)"
        )
        return ConsoleConfig(enabled=enabled)
    return ConsoleConfig(enabled=enabled, secret=Secret(value))
