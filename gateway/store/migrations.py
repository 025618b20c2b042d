"""Numbered, forward-only schema migrations, one SQL file each, per engine.

``sql/<engine>/NNNN_name.sql`` holds step NNNN. A database records the last step it went
through (``meta.schema_version``); at start every later step runs, each in its own transaction,
and a database newer than this code is refused rather than guessed at. Both engines carry the
same numbers, so a version means the same schema everywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Literal

Engine = Literal["sqlite", "postgres"]
FILE_NAME = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")


class SchemaTooNew(Exception):
    """The database was migrated by a newer release; this one must not touch it."""


class SchemaTooOld(Exception):
    """A tool that never migrates found a database the gateway has not migrated yet."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


@cache
def load(engine: Engine) -> tuple[Migration, ...]:
    """Every migration of ``engine`` in order; their numbers must run 1, 2, 3 ... without gaps."""
    folder = resources.files("gateway.store").joinpath("sql", engine)
    found = []
    for entry in folder.iterdir():
        match = FILE_NAME.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"{engine} migrations are not numbered 1..{len(found)} without gaps")
    return tuple(found)


def pending(current: int, migrations: tuple[Migration, ...], *, where: str) -> list[Migration]:
    """The steps a database at ``current`` still needs; SchemaTooNew if it is ahead of the code."""
    latest = migrations[-1].version
    if current > latest:
        raise SchemaTooNew(
            f"{where} is at schema version {current}, newer than this release understands "
            f"({latest}); run the newer image-gateway release, or restore a matching backup"
        )
    return [m for m in migrations if m.version > current]


def require_current(current: int, migrations: tuple[Migration, ...], *, where: str) -> None:
    """For tools that read or write without migrating: the schema must be exactly this code's."""
    pending(current, migrations, where=where)
    latest = migrations[-1].version
    if current < latest:
        raise SchemaTooOld(
            f"{where} is at schema version {current}; this release needs {latest}. Start the "
            "gateway once (it migrates the database at start), then run this command again"
        )
