"""Numbered, forward-only schema migrations, one SQL file each, per engine; expand now, contract
a release later.

``sql/<engine>/NNNN_name.sql`` holds step NNNN. Both engines carry the same numbers, so a step
means the same schema everywhere. A database records three things in ``meta``:

- ``schema_step``: the last step it went through (exact).
- ``schema_version``: its *compatibility level*, the step a release must know to use it. Only a
  contracting step (one that drops or narrows what an older release needs; its file says
  ``-- contract: releases before X.Y.Z stop``) raises it; expand-only steps (new tables, new
  nullable columns, relaxed checks) leave it, so the previous release keeps reading and writing
  the database during a rolling upgrade. Steps 1-4 predate this scheme: 0.1.0 requires exactly
  4 (it reads this key), so the level starts there.
- ``min_release``: the oldest release the database still serves, raised by contracting steps; a
  running instance older than that stops taking requests (``/readyz`` says upgrade_required).

At start every later step runs, each in its own transaction with its records; a database whose
level is above what this code knows is refused rather than guessed at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Literal

from gateway.core.versions import FIRST_RELEASE, newest, release_key

Engine = Literal["sqlite", "postgres"]
FILE_NAME = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")
CONTRACT = re.compile(r"^-- contract: releases before (\d+\.\d+\.\d+) stop\b", re.MULTILINE)
BASELINE = 4  # steps 1-4 were each required by the release that shipped them


class SchemaTooNew(Exception):
    """The database was contracted by a newer release; this one must not touch it."""


class SchemaTooOld(Exception):
    """A tool that never migrates found a database the gateway has not migrated yet."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str
    contracts_below: str | None = None  # releases older than this cannot use the schema after it


@dataclass(frozen=True, slots=True)
class SchemaState:
    """What a database's ``meta`` says about its schema (see the module docstring)."""

    step: int
    level: int
    min_release: str = FIRST_RELEASE


@cache
def load(engine: Engine) -> tuple[Migration, ...]:
    """Every migration of ``engine`` in order; their numbers must run 1, 2, 3 ... without gaps."""
    folder = resources.files("gateway.store").joinpath("sql", engine)
    found = []
    for entry in folder.iterdir():
        match = FILE_NAME.fullmatch(entry.name)
        if match:
            sql = entry.read_text(encoding="utf-8")
            contract = CONTRACT.search(sql)
            found.append(Migration(int(match[1]), match[2], sql, contract[1] if contract else None))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"{engine} migrations are not numbered 1..{len(found)} without gaps")
    return tuple(found)


def state_of(meta: dict[str, str]) -> SchemaState:
    """A database's schema state from its ``meta`` rows (a 0.1.0 database has only the level)."""
    level = int(meta.get("schema_version", "0"))
    step = int(meta.get("schema_step", level))
    return SchemaState(step, level, meta.get("min_release", FIRST_RELEASE))


def records_after(
    step: Migration, migrations: tuple[Migration, ...], state: SchemaState
) -> dict[str, str]:
    """The ``meta`` rows to write in the same transaction as ``step``."""
    contracted = [m.version for m in migrations if m.contracts_below and m.version <= step.version]
    level = max(min(step.version, BASELINE), *contracted, state.level)
    floor = newest(state.min_release, step.contracts_below or FIRST_RELEASE)
    return {"schema_version": str(level), "schema_step": str(step.version), "min_release": floor}


def pending(
    current: SchemaState, migrations: tuple[Migration, ...], *, where: str
) -> list[Migration]:
    """The steps a database still needs; SchemaTooNew if a newer release contracted it.

    A database a newer release only expanded needs nothing: this release runs on it."""
    latest = migrations[-1].version
    if current.level > latest:
        raise SchemaTooNew(
            f"{where} is at schema version {current.level} (step {current.step}), newer than "
            f"this release understands ({latest}); run image-gateway {current.min_release} or "
            "newer, or restore a matching backup"
        )
    return [m for m in migrations if m.version > current.step]


def require_current(current: SchemaState, migrations: tuple[Migration, ...], *, where: str) -> None:
    """For tools that read or write without migrating: every step of this code must be in."""
    if pending(current, migrations, where=where):
        latest = migrations[-1].version
        raise SchemaTooOld(
            f"{where} is at schema step {current.step}; this release needs {latest}. Start the "
            "gateway once (it migrates the database at start), then run this command again"
        )


def too_old(version: str, current: SchemaState) -> bool:
    """Whether a release of ``version`` is below the oldest one the database still serves."""
    return release_key(version) < release_key(current.min_release)
