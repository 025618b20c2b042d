"""Backups of the ledger while the gateway serves.

SQLite: SQLite's online backup API copies every page in one read transaction (``pages=-1``),
so the copy is one consistent snapshot however busy the gateway is; it is written beside the
target, switched to a plain rollback journal (one self-contained file), fsynced, then renamed
over the target. PostgreSQL: ``pg_dump`` (custom format, itself one consistent snapshot), with
the password handed over in ``PGPASSWORD`` rather than on a command line others can read.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import sqlite3
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

PG_DUMP_TIMEOUT_S = 3600


class BackupFailed(Exception):
    """The backup was not made; the message says why (never a password)."""


def backup_sqlite(source: Path, target: Path) -> None:
    """Copy the live database at ``source`` to ``target`` (replaced atomically)."""
    source, target = source.absolute(), target.absolute()
    if not source.exists():
        raise BackupFailed(f"no database at {source}")
    if target == source:
        raise BackupFailed("the backup must go to another file than the database")
    live = Path(f"{source}-wal").exists()
    uri = f"{source.as_uri()}?{'mode=ro' if live else 'immutable=1'}"
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    except OSError as exc:
        raise BackupFailed(f"cannot write beside {target}: {exc.strerror or exc}") from None
    os.close(fd)
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as src:
            src.execute("PRAGMA busy_timeout=10000")
            with contextlib.closing(sqlite3.connect(temporary)) as out:
                src.backup(out)  # pages=-1: every page in one step, one snapshot
                out.execute("PRAGMA journal_mode=DELETE")
        with open(temporary, "rb+") as copy:
            os.fsync(copy.fileno())
        os.replace(temporary, target)
    except sqlite3.DatabaseError as exc:
        raise BackupFailed(f"cannot back up {source}: {exc}") from None
    except OSError as exc:
        raise BackupFailed(f"cannot write {target}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def pg_dump_line(dsn: str, target: Path) -> str:
    """The documented command, with the password left out (PGPASSWORD or ~/.pgpass gives it)."""
    return shlex.join(_pg_dump_args(_without_password(dsn), target))


def backup_postgres(dsn: str, target: Path) -> None:
    """Run ``pg_dump``; BackupFailed if it is not installed or fails."""
    program = shutil.which("pg_dump")
    if program is None:
        raise BackupFailed("pg_dump is not installed")
    password = urlsplit(dsn).password
    env = {**os.environ, **({"PGPASSWORD": password} if password else {})}
    try:
        done = subprocess.run(  # noqa: S603 - our own arguments, no shell
            [program, *_pg_dump_args(_without_password(dsn), target)[1:]],
            env=env,
            capture_output=True,
            text=True,
            timeout=PG_DUMP_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BackupFailed(f"pg_dump could not run: {exc}") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        if password:
            last = last.replace(password, "********")
        raise BackupFailed(f"pg_dump failed ({done.returncode}): {last}")


def _pg_dump_args(dsn: str, target: Path) -> list[str]:
    return ["pg_dump", "--format=custom", "--no-owner", f"--file={target}", f"--dbname={dsn}"]


def _without_password(dsn: str) -> str:
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
