"""``[storage]``: the SQLite file, or PostgreSQL (its URL a credential), and the watermark file
that detects a restored ledger; ``[results]``: where paid result images are kept, and for how
long."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from gateway.core.config.settings import MIB, ResultsConfig, Secret, StorageConfig
from gateway.core.config.table import Table, non_empty, positive, read_secret, resolve

DEFAULT_DSN_ENV = "IMAGE_GATEWAY_DATABASE_URL"
RESULT_STORES = ("directory", "off")
GIB = 1024 * MIB


def default_watermark(
    storage: StorageConfig, database: Path, base_dir: Path, env: Mapping[str, str]
) -> Path:
    if storage.backend == "sqlite":
        return database.with_name(database.name + ".watermark")
    state = env.get("STATE_DIRECTORY", "").split(":")[0]  # systemd's StateDirectory=
    return (Path(state) if state else base_dir) / "ledger.watermark"


def parse_storage(t: Table, base_dir: Path, env: Mapping[str, str]) -> StorageConfig:
    backend = t.get("backend", str, "sqlite", _backend)
    watermark_key = t.get("watermark", str, None, non_empty)
    watermark = None if watermark_key is None else resolve(watermark_key, base_dir)
    lease = t.get("instance_lease_s", float, 30.0, positive)
    dsn_env = t.get("dsn_env", str, None, non_empty)
    dsn_file = t.get("dsn_file", str, None, non_empty)
    if backend != "postgres":
        for key in ("dsn_env", "dsn_file", "instance_lease_s"):
            if key in t.data:
                t.errors.append(f'{t.name(key)} goes with backend = "postgres"')
        return StorageConfig(watermark=watermark)
    if "database" in t.data:
        t.errors.append(
            f'{t.name("database")} is the SQLite file: remove it with backend = "postgres" '
            "(the database is named by dsn_env or dsn_file)"
        )
    source, value = read_secret(
        t, env_key="dsn_env", env_name=dsn_env, file_key="dsn_file", file_value=dsn_file,
        default_env=DEFAULT_DSN_ENV, base_dir=base_dir, env=env, what="PostgreSQL URL",
    )  # fmt: skip
    if value and not value.startswith(("postgresql://", "postgres://")):
        t.errors.append(f"{source}: the PostgreSQL URL must start with postgresql://")
        value = ""
    problem = _dsn_problem(value) if value else None
    if problem:
        t.errors.append(f"{source}: the PostgreSQL URL is malformed: {problem}")
        value = ""
    return StorageConfig(
        backend="postgres",
        dsn=Secret(value) if value else None,
        dsn_source=source,
        instance_lease_s=lease,
        watermark=watermark,
    )


def _dsn_problem(dsn: str) -> str | None:
    """What makes a postgresql:// URL unusable, in words that never quote it (it may hold a
    password): the host and port parts, as asyncpg reads them (hosts may be listed, a,b)."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "its host part is not valid (an IPv6 address needs both [ and ])"
    ports = [p for listed in parse_qs(parts.query).get("port", []) for p in listed.split(",")]
    for spec in parts.netloc.rpartition("@")[2].split(","):
        if spec.startswith("["):
            address, bracket, rest = spec[1:].partition("]")
            if not bracket or not address or (rest and not rest.startswith(":")):
                return "an IPv6 address must be written [address] or [address]:port"
            if rest:
                ports.append(rest[1:])
        elif ":" in spec:
            ports.append(spec.rpartition(":")[2])
    for port in ports:
        if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            return "a port must be a number from 1 to 65535"
    return None


def _backend(value: str) -> str | None:
    return None if value in ("sqlite", "postgres") else "must be sqlite or postgres"


def parse_results(
    t: Table, database: Path, storage: StorageConfig, base_dir: Path, env: Mapping[str, str]
) -> ResultsConfig:
    """``[results]``: ``store``, ``directory`` (a relative one beside the SQLite database; on
    PostgreSQL in ``$STATE_DIRECTORY`` when systemd gives one, as the watermark, else beside
    the config), ``keep_days``, ``max_gb``."""
    store = t.get(
        "store",
        str,
        "directory",
        lambda v: None if v in RESULT_STORES else "must be directory or off",
    )
    state = env.get("STATE_DIRECTORY", "").split(":")[0]  # systemd's StateDirectory=
    beside = database.parent if storage.backend == "sqlite" else Path(state) if state else base_dir
    directory = resolve(t.get("directory", str, "results", non_empty), beside)
    config = ResultsConfig(
        directory=directory if store == "directory" else None,
        keep_days=t.get("keep_days", float, 7.0, positive),
        max_bytes=int(t.get("max_gb", float, 20.0, positive) * GIB),
    )
    t.finish()
    return config
