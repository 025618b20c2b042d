"""Each engine's statements: one SQL file per engine, a ``-- name --`` header before each.

``sql/<engine>/queries.sql`` holds every statement the engine runs after opening (the schema
is in the numbered migrations beside it). Comment lines right under a header document the
statement and are dropped with it. Parameters are named (``:request_id``); SQLite binds them
as they are, the PostgreSQL engine numbers them once here. The engine-neutral store
(``manager.Store``) asks for statements by name only, so both files, and the in-memory
engine's Python, answer the same names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Literal

Engine = Literal["sqlite", "postgres"]

HEADER = re.compile(r"(?:\n|^)-- ([a-z0-9_]+) --\n(?:--.*\n)*")
PARAMETER = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)")


@dataclass(frozen=True, slots=True)
class Query:
    """A statement, and for numbered placeholders (``$1``) the names they stand for."""

    sql: str
    names: tuple[str, ...] = ()


def parse(text: str) -> dict[str, str]:
    """``{name: statement}`` of a query file, comment lines dropped; text before the first
    header is its preamble."""
    parts = HEADER.split(text)
    bodies = (_code(part) for part in parts[2::2])
    statements = dict(zip(parts[1::2], bodies, strict=True))
    if len(statements) != len(parts) // 2:
        raise RuntimeError("a query name is used twice")
    return statements


def _code(text: str) -> str:
    lines = (line for line in text.splitlines() if not line.lstrip().startswith("--"))
    return "\n".join(lines).strip()


def numbered(sql: str) -> Query:
    """``:name`` placeholders as ``$1, $2 ...`` (a name used twice keeps its number)."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match[1] not in names:
            names.append(match[1])
        return f"${names.index(match[1]) + 1}"

    return Query(PARAMETER.sub(number, sql), tuple(names))


@cache
def load(engine: Engine) -> dict[str, str]:
    """Every named statement of ``engine``, read once."""
    path = resources.files("gateway.store").joinpath("sql", engine, "queries.sql")
    return parse(path.read_text(encoding="utf-8"))
