"""Settings: the TOML file parsed once into frozen dataclasses, or refused naming each bad key.

Pure except for ``load_settings``, which reads the file and the central key (from an environment
variable or a file, typically a systemd credential). Every problem is collected, so one run of
``image-gateway check-config`` lists them all.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar, cast
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gateway.core.ledger import GATEWAY_ACTOR
from gateway.core.money import MoneyError, cny_to_units
from gateway.core.normalize import QUALITIES, UPSTREAM_MODEL, FormatSetting
from gateway.core.periods import PERIOD_KINDS, PeriodKind

DEFAULT_KEY_ENV = "IMAGE_GATEWAY_UPSTREAM_KEY"
DEFAULT_DSN_ENV = "IMAGE_GATEWAY_DATABASE_URL"
DEFAULT_PRICES_CNY = {"low": "0.10", "medium": "0.20", "high": "0.40", "auto": "0.20"}
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
RESPONSE_FORMATS: tuple[FormatSetting, ...] = ("url", "b64_json", "auto")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
PLACEHOLDER_SHA256 = "0" * 64  # the example config's: never a real key
KEY_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
FINGERPRINT_CHARS = 16
DEFAULT_PORTS = {"http": 80, "https": 443}
FILE_HOST = re.compile(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?")
INSTANCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}")  # fits a header and a log line
MIB = 1024 * 1024
UPSTREAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
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
    root = _Table(data, "", [])
    server = _server(root.table("server"))
    prices = _prices(root.table("prices"))
    upstreams = _upstreams(root, prices, base_dir, env, require_central_key)
    storage = root.table("storage")
    database = _resolve(storage.get("database", str, "gateway.db", _non_empty), base_dir)
    storage_config = _storage(storage, base_dir, env)
    if storage_config.watermark is None:
        storage_config = replace(
            storage_config, watermark=_default_watermark(storage_config, database, base_dir, env)
        )
    log_table = root.table("log")
    access = log_table.get("access", str, "-", _non_empty)
    log = LogConfig(
        access=access if access == "-" else str(_resolve(access, base_dir)),
        prompts=log_table.get("prompts", bool, False),
    )
    teams = _teams(root.table("teams"))
    admin = root.table("admin")
    admin_keys = _key_hashes(admin, "keys_sha256", required=False)
    named_admin_keys = _admin_keys(admin)
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
        results=_results(root.table("results"), database, storage_config, base_dir, env),
    )
    for table in (storage, log_table, admin, models):
        table.finish()
    root.finish()
    _check_unique_keys(settings, root.errors)
    if root.errors:
        raise ConfigError(root.errors)
    return settings


V = TypeVar("V")
D = TypeVar("D")
C = TypeVar("C", bound=str)
_MISSING = object()  # a key absent, or present with a value that was refused


class _Table:
    """Typed access to one TOML table that remembers which keys were read, to refuse the rest."""

    def __init__(self, data: object, path: str, errors: list[str]) -> None:
        self.path = path
        self.errors = errors
        self.seen: set[str] = set()
        if not isinstance(data, dict):
            errors.append(f"{path} must be a table")
            data = {}
        self.data: dict[str, Any] = data

    def name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(
        self, key: str, kind: type[V], default: D, check: Callable[[V], str | None] | None = None
    ) -> V | D:
        """The value of ``key`` if it is a ``kind`` (an int is a float) that ``check`` finds no
        problem with; else ``default``, the problem noted."""
        value = self._value(key, (kind,))
        if value is _MISSING:
            return default
        typed = cast(V, value)
        problem = check(typed) if check is not None else None
        if problem:
            self.errors.append(f"{self.name(key)} {problem}")
            return default
        return typed

    def choice(self, key: str, choices: tuple[C, ...], default: C) -> C:
        """One of ``choices`` (a string), typed as the choices are; else ``default``, noted."""
        value = self.get(key, str, None)
        for option in choices:
            if value == option:
                return option
        if value is not None:
            self.errors.append(
                f"{self.name(key)} must be {', '.join(choices[:-1])} or {choices[-1]}"
            )
        return default

    def get_either(self, key: str, kinds: tuple[type, ...], default: object) -> object:
        """Like ``get`` for a value of one of several kinds (the caller tells them apart)."""
        value = self._value(key, kinds)
        return default if value is _MISSING else value

    def _value(self, key: str, kinds: tuple[type, ...]) -> object:
        self.seen.add(key)
        if key not in self.data:
            return _MISSING
        value = self.data[key]
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            wanted = " or ".join(k.__name__ for k in kinds)
            self.errors.append(f"{self.name(key)} must be {wanted}, got {type(value).__name__}")
            return _MISSING
        return value

    def table(self, key: str) -> _Table:
        self.seen.add(key)
        return _Table(self.data.get(key, {}), self.name(key), self.errors)

    def finish(self) -> None:
        """Refuse every key nobody read, suggesting the known key it most likely misspells."""
        for key in sorted(set(self.data) - self.seen):
            close = difflib.get_close_matches(key, sorted(self.seen), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            self.errors.append(f"{self.name(key)} is not a known setting{hint}")


def _non_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _at_least_one(value: int) -> str | None:
    return None if value >= 1 else "must be at least 1"


def _port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else "must be a port number from 0 to 65535"


def _resolve(value: str, base_dir: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base_dir / path


def _server(t: _Table) -> ServerConfig:
    def zone(value: str) -> str | None:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            return "is not an IANA time zone (such as UTC or Asia/Shanghai)"
        return None

    config = ServerConfig(
        host=t.get("host", str, "127.0.0.1", _non_empty),
        port=t.get("port", int, 8080, _port),
        timezone=t.get("timezone", str, "UTC", zone),
        max_body_bytes=int(t.get("max_body_mb", float, 128.0, _positive) * MIB),
        max_image_bytes=int(t.get("max_image_mb", float, 20.0, _positive) * MIB),
        drain_s=t.get(
            "drain_s", float, 240.0, lambda v: None if v >= 0 else "must not be negative"
        ),
        backlog=t.get("backlog", int, 1024, _at_least_one),
        header_timeout_s=t.get("header_timeout_s", float, 10.0, _positive),
        keepalive_timeout_s=t.get("keepalive_timeout_s", float, 75.0, _positive),
        instance_name=t.get("instance_name", str, "", _instance_name),
        trusted_proxies=_networks(t, "trusted_proxies"),
    )
    t.finish()
    return config


def _instance_name(value: str) -> str | None:
    if INSTANCE_NAME.fullmatch(value):
        return None
    return "must be 1-128 of A-Z a-z 0-9 _ . : @ - (starting with a letter or digit)"


def _networks(t: _Table, key: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
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


def _upstreams(
    root: _Table,
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
    t: _Table,
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
    key_env = t.get("api_key_env", str, None, _non_empty)
    key_file = t.get("api_key_file", str, None, _non_empty)
    hosts = t.get("file_hosts", list, [])
    if not all(isinstance(h, str) and FILE_HOST.fullmatch(h) for h in hosts):
        t.errors.append(f"{t.name('file_hosts')} must be a list of host names (or host:port)")
        hosts = []
    config = UpstreamConfig(
        base_url=base_url,
        api_key=_central_key(t, key_env, key_file, base_dir, env) if require_key else Secret(""),
        timeout_s=t.get("timeout_s", float, 300.0, _positive),
        connect_timeout_s=t.get("connect_timeout_s", float, 10.0, _positive),
        file_hosts=tuple(h.lower() for h in hosts),
        max_attempts=t.get(
            "max_attempts", int, 2, lambda v: None if 1 <= v <= 5 else "must be 1..5"
        ),
        retry_after_cap_s=t.get("retry_after_cap_s", float, 10.0, _positive),
        download_max_bytes=int(t.get("download_max_mb", float, 50.0, _positive) * MIB),
        download_timeout_s=t.get("download_timeout_s", float, 60.0, _positive),
        proxy_results=t.get("proxy_results", bool, False),
        name=name,
        priority=t.get("priority", int, 1, _at_least_one),
        weight=t.get("weight", int, 1, _at_least_one),
        prices={**prices, **_prices(t.table("prices"), only_given=True)},
        cooldown_s=t.get("cooldown_s", float, 30.0, _positive),
        max_fails=t.get("max_fails", int, 3, _at_least_one),
        quota_retry_s=t.get("quota_retry_s", float, 3600.0, _positive),
        reuse_idle_s=t.get(
            "reuse_idle_s", float, 2.0, lambda v: None if v >= 0 else "must not be negative"
        ),
    )
    t.finish()
    return config


def _default_watermark(
    storage: StorageConfig, database: Path, base_dir: Path, env: Mapping[str, str]
) -> Path:
    if storage.backend == "sqlite":
        return database.with_name(database.name + ".watermark")
    state = env.get("STATE_DIRECTORY", "").split(":")[0]  # systemd's StateDirectory=
    return (Path(state) if state else base_dir) / "ledger.watermark"


def _storage(t: _Table, base_dir: Path, env: Mapping[str, str]) -> StorageConfig:
    backend = t.get("backend", str, "sqlite", _backend)
    watermark_key = t.get("watermark", str, None, _non_empty)
    watermark = None if watermark_key is None else _resolve(watermark_key, base_dir)
    lease = t.get("instance_lease_s", float, 30.0, _positive)
    dsn_env = t.get("dsn_env", str, None, _non_empty)
    dsn_file = t.get("dsn_file", str, None, _non_empty)
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
    source, value = _read_secret(
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


def _read_secret(
    t: _Table,
    *,
    env_key: str,
    env_name: str | None,
    file_key: str,
    file_value: str | None,
    default_env: str,
    base_dir: Path,
    env: Mapping[str, str],
    what: str,
) -> tuple[str, str]:
    """A credential from an environment variable or a file (``${VAR}`` expanded, typically a
    systemd credential): (where it came from, its value, "" if missing and reported)."""
    if env_name and file_value:
        t.errors.append(f"{t.name(env_key)} and {t.name(file_key)}: set only one")
        return t.name(env_key), ""
    if file_value:
        source = t.name(file_key)
        unset = sorted(name for name in _env_names(file_value) if name not in env)
        if unset:
            t.errors.append(
                f"{source} uses ${unset[0]}, which is not set (systemd sets "
                "$CREDENTIALS_DIRECTORY for the service; set it yourself to check the file)"
            )
            return source, ""
        path = _resolve(_expand_env(file_value, env), base_dir)
        try:
            value = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            t.errors.append(f"{source}: cannot read {path}: {exc}")
            return source, ""
        if not value:
            t.errors.append(f"{source}: {path} is empty; it must hold the {what}")
        return source, value
    name = env_name or default_env
    source = f"{t.name(env_key)} (environment variable {name})"
    value = env.get(name, "").strip()
    if not value:
        t.errors.append(f"{source}: the {what} is missing")
    return source, value


def _central_key(
    t: _Table, key_env: str | None, key_file: str | None, base_dir: Path, env: Mapping[str, str]
) -> Secret:
    source, value = _read_secret(
        t, env_key="api_key_env", env_name=key_env, file_key="api_key_file", file_value=key_file,
        default_env=DEFAULT_KEY_ENV, base_dir=base_dir, env=env, what="central key",
    )  # fmt: skip
    if not value:
        return Secret("")
    if not value.startswith("sk_") or any(ch.isspace() for ch in value):
        t.errors.append(f"{source}: the central key must be the upstream's sk_... key")
        return Secret("")
    return Secret(value)


ENV_REFERENCE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def _env_names(value: str) -> list[str]:
    return [m[1] or m[2] for m in ENV_REFERENCE.finditer(value)]


def _expand_env(value: str, env: Mapping[str, str]) -> str:
    return ENV_REFERENCE.sub(lambda m: env[m[1] or m[2]], value)


def _prices(t: _Table, *, only_given: bool = False) -> dict[str, int]:
    """``[prices]``, or with ``only_given`` (an upstream's own table) the qualities it names."""
    prices = {}
    for quality in QUALITIES:
        if only_given and quality not in t.data:
            t.seen.add(quality)
            continue
        value = t.get_either(quality, (float, str), DEFAULT_PRICES_CNY[quality])
        prices[quality] = _units(t, quality, value)
    t.finish()
    return prices


def _units(t: _Table, key: str, value: object) -> int:
    try:
        units = cny_to_units(value)
    except MoneyError as exc:
        t.errors.append(f"{t.name(key)}: {exc}")
        return 0
    if units < 0:
        t.errors.append(f"{t.name(key)} must not be negative")
        return 0
    return units


def _teams(t: _Table) -> dict[str, TeamConfig]:
    teams = {}
    for name in t.data:
        team = t.table(name)
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            t.errors.append(f"{team.path}: team names are 1-64 letters, digits, _ . -")
        period = team.choice("period", PERIOD_KINDS, "monthly")
        fmt = team.choice("default_response_format", RESPONSE_FORMATS, "auto")
        budget = _units(team, "budget_cny", team.get_either("budget_cny", (float, str), 0.0))
        named = _named_keys(team, name, budget)
        teams[name] = TeamConfig(
            name=name,
            keys_sha256=_key_hashes(team, "keys_sha256", required=not named),
            budget=budget,
            period=period,
            rpm=team.get("rpm", int, None, _at_least_one),
            max_concurrent=team.get("max_concurrent", int, None, _at_least_one),
            default_response_format=fmt,
            keys=named,
            keep_days=team.get("keep_days", float, None, _positive),
            reuse_identical_s=team.get("reuse_identical_s", float, None, _positive),
        )
        if "budget_cny" not in team.data:
            t.errors.append(f"{team.name('budget_cny')} is required")
        team.finish()
    return teams


def _named_keys(team: _Table, team_name: str, team_budget: int) -> tuple[KeyConfig, ...]:
    """``[[teams.<team>.keys]]``: name, sha256 and optional expires, budget_cny, rpm,
    max_concurrent, each checked."""
    items = team.get("keys", list, [])
    keys: list[KeyConfig] = []
    for index, item in enumerate(items):
        entry = _Table(item, f"{team.name('keys')}[{index}]", team.errors)
        name = entry.get("name", str, None)
        if name is None or not KEY_NAME.fullmatch(name):
            team.errors.append(
                f"{entry.name('name')} is required: 1-63 of a-z 0-9 _ . - (starting with a "
                "letter or digit)"
            )
        elif any(k.name == name for k in keys):
            team.errors.append(f"{entry.name('name')}: the name {name!r} is used twice")
        digest = entry.get("sha256", str, None)
        if digest is None or not SHA256_HEX.fullmatch(digest):
            team.errors.append(
                f"{entry.name('sha256')} must be 64 lowercase hex characters (`image-gateway "
                "hash-key` prints it)"
            )
            digest = None
        budget = None
        if "budget_cny" in entry.data:
            budget = _units(entry, "budget_cny", entry.get_either("budget_cny", (float, str), 0.0))
            if budget > team_budget:
                team.errors.append(
                    f"{entry.name('budget_cny')} is above the team's budget_cny: a key's cap "
                    "lives inside its team's budget"
                )
        keys.append(
            KeyConfig(
                team=team_name,
                sha256=digest or "",
                name=name,
                expires=_expiry(entry),
                budget=budget,
                rpm=entry.get("rpm", int, None, _at_least_one),
                max_concurrent=entry.get("max_concurrent", int, None, _at_least_one),
            )
        )
        entry.finish()
    return tuple(k for k in keys if k.sha256)


def _expiry(entry: _Table) -> datetime | None:
    """A TOML offset date-time, or a date (expiring at its midnight, UTC)."""
    entry.seen.add("expires")
    value = entry.data.get("expires")
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            entry.errors.append(
                f"{entry.name('expires')} needs a time zone offset (such as "
                "2027-03-31T00:00:00Z), or write a date: 2027-03-31"
            )
            return None
        return value
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    entry.errors.append(
        f"{entry.name('expires')} must be a TOML date or offset date-time (unquoted, such as "
        f"2027-03-31 or 2027-03-31T00:00:00Z), got {type(value).__name__}"
    )
    return None


def _key_hashes(t: _Table, key: str, *, required: bool) -> tuple[str, ...]:
    values = t.get(key, list, [])
    if required and not values:
        t.errors.append(f"{t.name(key)} must list at least one key hash")
    good = []
    for index, value in enumerate(values):
        if isinstance(value, str) and SHA256_HEX.fullmatch(value):
            good.append(value)
        else:
            t.errors.append(
                f"{t.name(key)}[{index}] must be 64 lowercase hex characters "
                "(the sha256 of a key; `image-gateway new-key` prints one)"
            )
    return tuple(good)


def _admin_keys(admin: _Table) -> tuple[AdminKey, ...]:
    """``[[admin.keys]]``: a name (as team key names) and a sha256 each."""
    keys: list[AdminKey] = []
    for index, item in enumerate(admin.get("keys", list, [])):
        entry = _Table(item, f"{admin.name('keys')}[{index}]", admin.errors)
        name = entry.get("name", str, None)
        if name is None or not KEY_NAME.fullmatch(name):
            admin.errors.append(
                f"{entry.name('name')} is required: 1-63 of a-z 0-9 _ . - (starting with a "
                "letter or digit)"
            )
            name = None
        elif name == GATEWAY_ACTOR:
            admin.errors.append(
                f"{entry.name('name')}: {name!r} names the gateway's own resolutions"
            )
        elif any(k.name == name for k in keys):
            admin.errors.append(f"{entry.name('name')}: the name {name!r} is used twice")
        digest = entry.get("sha256", str, None)
        if digest is None or not SHA256_HEX.fullmatch(digest):
            admin.errors.append(
                f"{entry.name('sha256')} must be 64 lowercase hex characters (`image-gateway "
                "hash-key` prints it)"
            )
        elif name is not None:
            keys.append(AdminKey(digest, name))
        entry.finish()
    return tuple(keys)


def _aliases(t: _Table) -> dict[str, str]:
    aliases = t.get("aliases", dict, DEFAULT_ALIASES)
    for name, target in aliases.items():
        if target != UPSTREAM_MODEL:
            t.errors.append(f"{t.name('aliases')}.{name} must map to {UPSTREAM_MODEL!r}")
    return {**aliases}


def _tasks(t: _Table) -> TasksConfig:
    config = TasksConfig(
        poll_cache_ttl_s=t.get("poll_cache_ttl_s", float, 2.0, _positive),
        settle_interval_s=t.get("settle_interval_s", float, 5.0, _positive),
        settle_max_interval_s=t.get("settle_max_interval_s", float, 120.0, _positive),
        max_pending_age_s=t.get("max_pending_age_s", float, 6 * 3600.0, _positive),
    )
    t.finish()
    return config


def _idempotency(t: _Table) -> IdempotencyConfig:
    config = IdempotencyConfig(
        keep_hours=t.get(
            "keep_hours", float, 24.0, lambda v: None if v >= 24 else "must be at least 24"
        ),
        retry_dedupe_minutes=t.get("retry_dedupe_minutes", float, 10.0, _positive),
    )
    t.finish()
    return config


def _metrics(t: _Table, admin_keys: tuple[str, ...]) -> MetricsConfig:
    """``/metrics`` shows every team's name and spend: with admin keys configured it needs one
    by default; ``require_admin = false`` keeps it open, as an explicit choice."""
    require_admin = t.get("require_admin", bool, None)
    if require_admin and not admin_keys:
        t.errors.append(f"{t.name('require_admin')} needs at least one admin.keys_sha256")
    config = MetricsConfig(
        enabled=t.get("enabled", bool, True),
        port=t.get("port", int, 0, _port),
        require_admin=bool(admin_keys) if require_admin is None else require_admin,
    )
    t.finish()
    return config


RESULT_STORES = ("directory", "off")
GIB = 1024 * MIB


def _results(
    t: _Table, database: Path, storage: StorageConfig, base_dir: Path, env: Mapping[str, str]
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
    directory = _resolve(t.get("directory", str, "results", _non_empty), beside)
    config = ResultsConfig(
        directory=directory if store == "directory" else None,
        keep_days=t.get("keep_days", float, 7.0, _positive),
        max_bytes=int(t.get("max_gb", float, 20.0, _positive) * GIB),
    )
    t.finish()
    return config


CONSOLE_SECRET_CHARS = 32


def _console(t: _Table, base_dir: Path, env: Mapping[str, str]) -> ConsoleConfig:
    """``[console]``: ``enabled`` and an optional ``secret_file`` (``${VAR}`` expanded, such as
    a systemd credential) shared by every instance behind one load balancer."""
    enabled = t.get("enabled", bool, True)
    secret_file = t.get("secret_file", str, None, _non_empty)
    t.finish()
    if secret_file is None:
        return ConsoleConfig(enabled=enabled)
    source = t.name("secret_file")
    unset = sorted(name for name in _env_names(secret_file) if name not in env)
    if unset:
        t.errors.append(f"{source} uses ${unset[0]}, which is not set")
        return ConsoleConfig(enabled=enabled)
    path = _resolve(_expand_env(secret_file, env), base_dir)
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


def _check_unique_keys(settings: Settings, errors: list[str]) -> None:
    """A key hash belongs to one place, and the example's all-zero placeholder to none."""
    owner: dict[str, str] = {}
    for team in settings.teams.values():
        listed = [(d, "keys_sha256") for d in team.keys_sha256]
        for digest, where in [*listed, *((k.sha256, f"keys.{k.name}") for k in team.keys)]:
            if digest == PLACEHOLDER_SHA256:
                errors.append(
                    f"teams.{team.name}.{where}: the all-zero hash is the example's placeholder; "
                    "put a real key's hash (`image-gateway new-key`)"
                )
            if digest in owner:
                errors.append(
                    f"teams.{team.name}.{where}: key hash {digest[:12]}... is also used by "
                    f"{owner[digest]}"
                )
            owner.setdefault(digest, f"teams.{team.name}.{where}")
    for key in settings.all_admin_keys():
        where = f"admin.keys.{key.name}" if key.name else "admin.keys_sha256"
        if key.sha256 in owner:
            used = owner[key.sha256]
            errors.append(f"{where}: key hash {key.sha256[:12]}... is also used by {used}")
        owner.setdefault(key.sha256, where)
