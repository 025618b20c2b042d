"""Why a store cannot be opened, apart from the engines: a command names these without
loading a database driver it will not use."""

from __future__ import annotations


class StoreLocked(Exception):
    """Another gateway process has this SQLite database open."""


class StoreOpenError(Exception):
    """The SQLite database cannot be opened; the message names the file and why."""


class PostgresOpenError(Exception):
    """The database cannot be reached or used; the message says which and why (no secrets)."""
