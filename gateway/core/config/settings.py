"""The settings the gateway runs on: frozen dataclasses, parsed once (``load``), never changed.

``Secret`` keeps a credential out of every ``repr``; ``ConfigError`` lists each bad key.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

from gateway.core.normalize import UPSTREAM_MODEL, FormatSetting
from gateway.core.periods import PeriodKind

# OpenAI's image model names (those @ai-sdk/openai 3.0 lists), all served by the upstream's one
# model; a dated snapshot of any of them (gpt-image-2-2026-04-21) is accepted as the name.
DEFAULT_ALIASES = dict.fromkeys(
    (
        "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5",
        "gpt-image-2.5-flare", "gpt-image-2.5-sunburst",
        "gpt-image-2.6-flare", "gpt-image-2.6-sunburst",
        "chatgpt-image-latest", "dall-e-2", "dall-e-3",
    ),
    UPSTREAM_MODEL,
)  # fmt: skip
FINGERPRINT_CHARS = 16
DEFAULT_PORTS = {"http": 80, "https": 443}
MIB = 1024 * 1024
DEFAULT_UPSTREAM = "default"  # the name of the one upstream of an [upstream] table


class ConfigError(ValueError):
    """The config cannot be used; ``problems`` name each offending key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class Secret:
    """A string that never shows itself in ``repr``, ``str`` or a traceback's locals."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    timezone: str = "UTC"
    max_body_bytes: int = 128 * MIB
    max_image_bytes: int = 20 * MIB
    drain_s: float = 240.0
    backlog: int = 1024
    header_timeout_s: float = 10.0
    keepalive_timeout_s: float = 75.0
    instance_name: str = ""  # "": the host name and the port listened on
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


@dataclass(frozen=True)
class UpstreamConfig:
    """One upstream account: ``[upstreams.NAME]``, or ``[upstream]`` (named ``default``)."""

    base_url: str
    api_key: Secret
    timeout_s: float = 300.0
    connect_timeout_s: float = 10.0
    file_hosts: tuple[str, ...] = ()
    max_attempts: int = 2
    retry_after_cap_s: float = 10.0
    download_max_bytes: int = 50 * MIB
    download_timeout_s: float = 60.0
    proxy_results: bool = False
    name: str = DEFAULT_UPSTREAM
    priority: int = 1  # lower is tried first
    weight: int = 1  # share among the upstreams of the same priority
    prices: Mapping[str, int] = field(default_factory=dict)  # per quality; [prices] filled in
    cooldown_s: float = 30.0  # first cooldown after max_fails consecutive failures
    max_fails: int = 3
    quota_retry_s: float = 3600.0  # how long a 402 disables it (or until a reload)
    # A POST reuses a pooled connection only while it has been idle for less than this (0 = a
    # new connection for every POST); see gateway/upstream/connector.py.
    reuse_idle_s: float = 2.0

    @property
    def host(self) -> str:
        return urlsplit(self.base_url).hostname or ""

    @property
    def result_origins(self) -> frozenset[tuple[str, int]]:
        """Where result images may be fetched from, as (host, port): the API's own origin and
        each of ``file_hosts`` (``host`` or ``host:port``, port 443 by default)."""
        base = urlsplit(self.base_url)
        origins = {(base.hostname or "", base.port or DEFAULT_PORTS[base.scheme])}
        for entry in self.file_hosts:
            host, _, port = entry.rpartition(":") if ":" in entry else (entry, "", "")
            origins.add((host, int(port) if port else 443))
        return frozenset(origins)

    @property
    def files_origin(self) -> str:
        """Where ``proxy_results`` fetches ``/v1/images/files/...`` from."""
        return f"https://{self.file_hosts[0]}" if self.file_hosts else self.base_url


@dataclass(frozen=True)
class LogConfig:
    access: str = "-"
    prompts: bool = False


@dataclass(frozen=True)
class KeyConfig:
    """One team key, known by its SHA-256. Named keys carry their own optional expiry and caps."""

    team: str
    sha256: str
    name: str | None = None
    expires: datetime | None = None
    budget: int | None = None  # per the team's period, inside the team's budget
    rpm: int | None = None
    max_concurrent: int | None = None

    @property
    def fingerprint(self) -> str:
        """What identifies the key in the ledger and in listings (never the key itself)."""
        return self.sha256[:FINGERPRINT_CHARS]

    @property
    def identity(self) -> str:
        """``team/name``, or ``team/sha256:<first 8 hex>`` for an unnamed key."""
        return f"{self.team}/{self.name or 'sha256:' + self.sha256[:8]}"


@dataclass(frozen=True)
class TeamConfig:
    name: str
    keys_sha256: tuple[str, ...]
    budget: int
    period: PeriodKind = "monthly"
    rpm: int | None = None
    max_concurrent: int | None = None
    default_response_format: FormatSetting = "auto"
    keys: tuple[KeyConfig, ...] = ()
    keep_days: float | None = None  # how long its result images are kept (None: [results])
    reuse_identical_s: float | None = None  # answer identical requests from the store (opt-in)

    def all_keys(self) -> tuple[KeyConfig, ...]:
        """Unnamed keys (``keys_sha256``) and named ones (``[[teams.X.keys]]``)."""
        return tuple(KeyConfig(self.name, digest) for digest in self.keys_sha256) + self.keys


@dataclass(frozen=True)
class AdminKey:
    """An admin key, known by its SHA-256; a named one is recorded by name (audit)."""

    sha256: str
    name: str | None = None

    @property
    def identity(self) -> str:
        """Who acted, in the ledger and the access log: the name, or ``sha256:<first 8 hex>``."""
        return self.name or "sha256:" + self.sha256[:8]


@dataclass(frozen=True)
class TasksConfig:
    poll_cache_ttl_s: float = 2.0
    settle_interval_s: float = 5.0
    settle_max_interval_s: float = 120.0
    max_pending_age_s: float = 6 * 3600.0


@dataclass(frozen=True)
class IdempotencyConfig:
    keep_hours: float = 24.0
    retry_dedupe_minutes: float = 10.0


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    port: int = 0
    require_admin: bool = False


@dataclass(frozen=True)
class StorageConfig:
    """Where the ledger lives: a SQLite file (one gateway process), or PostgreSQL (a fleet)."""

    backend: Literal["sqlite", "postgres"] = "sqlite"
    dsn: Secret | None = None  # postgresql:// URL (it may hold a password)
    dsn_source: str = ""  # where it came from, for messages
    instance_lease_s: float = 30.0
    # What this gateway last saw committed, kept outside the database to detect a restored
    # (older) ledger: beside the SQLite file, or in $STATE_DIRECTORY (else beside the config).
    watermark: Path | None = None


@dataclass(frozen=True)
class ResultsConfig:
    """``[results]``: the store of paid result images. ``directory`` None: ``store = "off"``."""

    directory: Path | None
    keep_days: float = 7.0
    max_bytes: int = 20 * 1024 * MIB

    def keep_days_of(self, team: TeamConfig | None) -> float:
        return team.keep_days if team is not None and team.keep_days is not None else self.keep_days


@dataclass(frozen=True)
class SignInLink:
    """A one-time console sign-in (the demo's banner link): the SHA-256 of its token, and of the
    key it signs in as. Made by the program, never read from a file."""

    token_sha256: str
    key_sha256: str


@dataclass(frozen=True)
class ConsoleConfig:
    """The web console. ``secret``: what signs its sessions; None means a random one per
    process (sessions end with the process; a fleet needs one shared ``secret_file``)."""

    enabled: bool = True
    secret: Secret | None = None
    links: tuple[SignInLink, ...] = ()


@dataclass(frozen=True)
class Settings:
    server: ServerConfig
    upstreams: tuple[UpstreamConfig, ...]  # in the config's order; at least one
    database: Path  # the SQLite file (backend sqlite)
    log: LogConfig
    prices: Mapping[str, int]
    teams: Mapping[str, TeamConfig]
    admin_keys_sha256: tuple[str, ...] = ()
    tasks: TasksConfig = field(default_factory=TasksConfig)
    idempotency: IdempotencyConfig = field(default_factory=IdempotencyConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    model_aliases: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_ALIASES))
    storage: StorageConfig = field(default_factory=StorageConfig)
    admin_keys: tuple[AdminKey, ...] = ()  # [[admin.keys]]: named
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    results: ResultsConfig = field(default_factory=lambda: ResultsConfig(None))

    def all_admin_keys(self) -> tuple[AdminKey, ...]:
        """Unnamed admin keys (``keys_sha256``) and named ones (``[[admin.keys]]``)."""
        return tuple(AdminKey(digest) for digest in self.admin_keys_sha256) + self.admin_keys

    def ledger_name(self) -> str:
        """Where the ledger is, for banners and messages: the SQLite file, or the PostgreSQL
        host and database (never the user or password of the URL)."""
        if self.storage.backend == "sqlite" or self.storage.dsn is None:
            return str(self.database)
        return postgres_name(self.storage.dsn.reveal())

    def reloaded(self, new: Settings) -> tuple[Settings, list[str]]:
        """``new``, except what a running process cannot change (kept from ``self``, and named)."""
        kept = [
            name
            for name, old_value, new_value in (
                ("server", self.server, new.server),
                ("storage.database", self.database, new.database),
                ("storage", self.storage, new.storage),
                ("log.access", self.log.access, new.log.access),
                ("metrics", self.metrics, new.metrics),
                ("tasks", self.tasks, new.tasks),
                ("idempotency.keep_hours", self.idempotency.keep_hours, new.idempotency.keep_hours),
                ("console", self.console, new.console),
                ("results.directory", self.results.directory, new.results.directory),
            )
            if old_value != new_value
        ]
        merged = replace(
            new,
            server=self.server,
            database=self.database,
            storage=self.storage,
            log=replace(new.log, access=self.log.access),
            metrics=self.metrics,
            tasks=self.tasks,
            idempotency=replace(new.idempotency, keep_hours=self.idempotency.keep_hours),
            console=self.console,
            results=replace(new.results, directory=self.results.directory),
        )
        return merged, kept


def postgres_name(dsn: str) -> str:
    """``PostgreSQL database NAME on HOST[:PORT]`` from a postgresql:// URL, without its user
    or password (a host or database given as a query parameter counts too)."""
    try:
        parts = urlsplit(dsn)
        query = dict(pair.split("=", 1) for pair in parts.query.split("&") if "=" in pair)
        host = parts.hostname or query.get("host") or "localhost"
        port = parts.port or query.get("port")
    except ValueError:
        return "PostgreSQL (its URL does not parse)"
    database = parts.path.lstrip("/") or query.get("dbname") or parts.username or "postgres"
    return f"PostgreSQL database {database} on {host}{f':{port}' if port else ''}"
