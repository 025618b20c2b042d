"""Parsing primitives: typed access to a TOML table that names each bad key, the checks its
values pass, paths relative to the config file, and credentials read from the environment or a
file. Every problem is collected (``Table.errors``) rather than raised, so one run lists them all.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

from gateway.core.money import MoneyError, cny_to_units

V = TypeVar("V")
D = TypeVar("D")
C = TypeVar("C", bound=str)
_MISSING = object()  # a key absent, or present with a value that was refused


class Table:
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

    def table(self, key: str) -> Table:
        self.seen.add(key)
        return Table(self.data.get(key, {}), self.name(key), self.errors)

    def finish(self) -> None:
        """Refuse every key nobody read, suggesting the known key it most likely misspells."""
        for key in sorted(set(self.data) - self.seen):
            close = difflib.get_close_matches(key, sorted(self.seen), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            self.errors.append(f"{self.name(key)} is not a known setting{hint}")


def non_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def at_least_one(value: int) -> str | None:
    return None if value >= 1 else "must be at least 1"


def port_number(value: int) -> str | None:
    return None if 0 <= value <= 65535 else "must be a port number from 0 to 65535"


def resolve(value: str, base_dir: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base_dir / path


def read_secret(
    t: Table,
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
        unset = sorted(name for name in env_names(file_value) if name not in env)
        if unset:
            t.errors.append(
                f"{source} uses ${unset[0]}, which is not set (systemd sets "
                "$CREDENTIALS_DIRECTORY for the service; set it yourself to check the file)"
            )
            return source, ""
        path = resolve(expand_env(file_value, env), base_dir)
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


ENV_REFERENCE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def env_names(value: str) -> list[str]:
    return [m[1] or m[2] for m in ENV_REFERENCE.finditer(value)]


def expand_env(value: str, env: Mapping[str, str]) -> str:
    return ENV_REFERENCE.sub(lambda m: env[m[1] or m[2]], value)


def cny_amount(t: Table, key: str, value: object) -> int:
    try:
        units = cny_to_units(value)
    except MoneyError as exc:
        t.errors.append(f"{t.name(key)}: {exc}")
        return 0
    if units < 0:
        t.errors.append(f"{t.name(key)} must not be negative")
        return 0
    return units
