"""Settings: the TOML file parsed once into frozen dataclasses, or refused naming each bad key.

Pure except for ``load_settings``, which reads the file and the central key (from an environment
variable or a file, typically a systemd credential). Every problem is collected, so one run of
``image-gateway check-config`` lists them all.

    settings.py    the dataclasses the gateway reads (``Settings`` and its parts), ``Secret``
    load.py        ``load_settings``/``parse_settings``: the file, its small tables
    upstreams.py   ``[upstream]``/``[upstreams.NAME]``, ``[prices]``
    teams.py       ``[teams.NAME]`` and their keys, ``[admin]`` keys
    storage.py     ``[storage]``, ``[results]``
    table.py       the parsing primitives: typed TOML access, checks, credentials
"""

from gateway.core.config.load import load_settings, parse_settings
from gateway.core.config.settings import (
    DEFAULT_ALIASES,
    DEFAULT_PORTS,
    DEFAULT_UPSTREAM,
    AdminKey,
    ConfigError,
    ConsoleConfig,
    IdempotencyConfig,
    KeyConfig,
    LogConfig,
    MetricsConfig,
    ResultsConfig,
    Secret,
    ServerConfig,
    Settings,
    SignInLink,
    StorageConfig,
    TasksConfig,
    TeamConfig,
    UpstreamConfig,
    postgres_name,
)

__all__ = [
    "DEFAULT_ALIASES",
    "DEFAULT_PORTS",
    "DEFAULT_UPSTREAM",
    "AdminKey",
    "ConfigError",
    "ConsoleConfig",
    "IdempotencyConfig",
    "KeyConfig",
    "LogConfig",
    "MetricsConfig",
    "ResultsConfig",
    "Secret",
    "ServerConfig",
    "Settings",
    "SignInLink",
    "StorageConfig",
    "TasksConfig",
    "TeamConfig",
    "UpstreamConfig",
    "load_settings",
    "parse_settings",
    "postgres_name",
]
