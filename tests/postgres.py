"""A throwaway PostgreSQL for tests.

If ``IMAGE_GATEWAY_TEST_DATABASE_URL`` is set (a ``postgresql://`` URL of a role that may run
CREATE DATABASE), that server is used. Otherwise one server per test session is started from
the PostgreSQL 16 binaries that the ``pgserver`` wheel ships, in a temporary folder, listening
on 127.0.0.1 (a free port) and on a unix socket in that folder; it is stopped, and the folder
removed, at the end of the session.

Either way ``postgres_dsn`` hands each test a fresh empty database, dropped afterwards (one
already migrated: ``migrated_postgres_dsn`` in ``tests/ledgers.py``).

pgserver's own ``get_server()`` is not used: it listens on a unix socket only (``-h ""``), has no
way to pass server settings, daemonizes the server (an orphan outlives a killed pytest), and as
root adds a system user with ``useradd`` and widens the permissions of every parent folder of
the data folder and of the venv. Here the bundled ``initdb`` and ``postgres`` are run directly:
as root they run as ``nobody``, the server is a child of pytest that Linux stops (SIGQUIT,
an immediate shutdown) if pytest dies, and folders left by a killed session are swept at the
next start.

The fixtures reach every test through this line in ``tests/conftest.py``::

    from tests.postgres import postgres_dsn, postgres_server  # noqa: F401 (fixtures)

Server settings: ``LocalPostgres(settings={...})`` (passed as ``postgres -c key=value``); the
session server uses ``FAST_SETTINGS``, ``settings={}`` keeps PostgreSQL's durable defaults.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import asyncpg
import pytest

ENV_URL = "IMAGE_GATEWAY_TEST_DATABASE_URL"
SUPERUSER = "postgres"
DIR_PREFIX = "igw-pg-"

# A test server need not survive a power cut: these make commits and CREATE DATABASE cheaper.
# Production keeps PostgreSQL's defaults (fsync, synchronous_commit, full_page_writes all on).
FAST_SETTINGS: Mapping[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}
BASE_SETTINGS: Mapping[str, str] = {
    "max_connections": "200",
    "logging_collector": "off",
    "log_min_messages": "warning",
}
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0


class PgserverMissing(RuntimeError):
    """The pgserver wheel is not installed (it has wheels for CPython 3.9 to 3.12 only)."""


@dataclass(frozen=True)
class PostgresServer:
    """Where a server is. ``dsn`` names its maintenance database, over TCP."""

    dsn: str
    external: bool
    socket_dir: Path | None = None
    port: int | None = None
    data_dir: Path | None = None
    log_file: Path | None = None

    def dsn_for(self, database: str) -> str:
        return with_database(self.dsn, database)

    @property
    def socket_dsn(self) -> str | None:
        """The same maintenance database over the unix socket (local server only)."""
        if self.socket_dir is None:
            return None
        return f"postgresql://{SUPERUSER}@/postgres?host={quote(str(self.socket_dir))}&port={self.port}"


def with_database(dsn: str, database: str) -> str:
    """``dsn`` with its database replaced by ``database``."""
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError(f"{ENV_URL} must be a postgresql:// URL")
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("dbname", "database")]
    return urlunsplit(parts._replace(path="/" + quote(database), query=urlencode(query)))


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def create_database(maintenance_dsn: str, name: str, template: str | None = None) -> str:
    """CREATE DATABASE ``name`` (optionally from ``template``); returns its DSN."""
    conn = await asyncpg.connect(maintenance_dsn, timeout=CONNECT_TIMEOUT)
    try:
        sql = f"CREATE DATABASE {quote_ident(name)}"
        if template is not None:
            sql += f" TEMPLATE {quote_ident(template)}"
        await conn.execute(sql, timeout=60)
    finally:
        await conn.close()
    return with_database(maintenance_dsn, name)


async def drop_database(maintenance_dsn: str, name: str) -> None:
    """DROP DATABASE ``name``, disconnecting whoever is still in it (PostgreSQL 13+)."""
    conn = await asyncpg.connect(maintenance_dsn, timeout=CONNECT_TIMEOUT)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)", timeout=60)
    finally:
        await conn.close()


# -- the local server -----------------------------------------------------------------------


def pg_bin_dir() -> Path:
    """The bin folder of the PostgreSQL that pgserver ships, found without importing pgserver
    (its import warns about XDG_RUNTIME_DIR and sets up a lock file we do not need)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise PgserverMissing("pgserver is not installed: pip install -e '.[test]'")
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bin_dir / "postgres").is_file():
        raise PgserverMissing(f"no postgres binary in {bin_dir}")
    return bin_dir


@dataclass(frozen=True)
class _RunAs:
    """Whom the server runs as: the current user, or ``nobody`` when we are root (postgres
    refuses to run as root)."""

    uid: int | None = None
    gid: int | None = None

    @classmethod
    def pick(cls) -> _RunAs:
        if os.name != "posix" or os.geteuid() != 0:
            return cls()
        entry = pwd.getpwnam("nobody")
        return cls(entry.pw_uid, entry.pw_gid)

    def kwargs(self) -> dict[str, object]:
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def chown(self, path: Path, *, recursive: bool = False) -> None:
        if self.uid is None:
            return
        os.chown(path, self.uid, self.gid)
        if recursive:
            for root, dirs, files in os.walk(path):
                for name in dirs + files:
                    os.lchown(os.path.join(root, name), self.uid, self.gid)


def _world_traversable(path: Path) -> bool:
    return all(p.stat().st_mode & 0o001 for p in [path, *path.parents])


def _base_parent() -> Path:
    """A folder for the server's own: /dev/shm when it has room (CREATE DATABASE takes ~12 ms
    there against 50-130 ms on this machine's disk, fsync off either way), else the temp
    folder; short enough for a unix socket path (108 bytes) and, for ``nobody``, reachable."""
    shm = Path("/dev/shm")
    with contextlib.suppress(OSError):
        if (
            shm.is_dir()
            and os.access(shm, os.W_OK | os.X_OK)
            and _world_traversable(shm)
            and shutil.disk_usage(shm).free >= 1 << 30
        ):
            return shm
    parent = Path(tempfile.gettempdir()).resolve()
    if len(str(parent)) > 60 or not _world_traversable(parent):
        parent = Path("/tmp")
    return parent


def _binaries_for(run_as: _RunAs, bin_dir: Path, base: Path) -> Path:
    """``bin_dir``, or a copy of the install in ``base`` when ``run_as`` cannot execute it
    (a venv under /root, mode 0700, say). The copy keeps the layout that the binaries' paths
    (share/, lib/, and ../../../pgserver.libs for libpq) are relative to."""
    try:
        subprocess.run(
            [str(bin_dir / "postgres"), "--version"],
            check=True,
            capture_output=True,
            timeout=10,
            **run_as.kwargs(),
        )
        subprocess.run(
            [str(bin_dir / "initdb"), "--version"],
            check=True,
            capture_output=True,
            timeout=10,
            **run_as.kwargs(),
        )
    except (PermissionError, subprocess.CalledProcessError):
        pass
    else:
        if run_as.uid is None or _readable_tree(bin_dir.parent / "share"):
            return bin_dir
    install = bin_dir.parent
    copy = base / "pg" / install.parent.name / install.name
    for sub in ("bin", "lib", "share"):
        shutil.copytree(install / sub, copy / sub, symlinks=True)
    libs = install.parent.parent / f"{install.parent.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, base / "pg" / libs.name, symlinks=True)
    run_as.chown(base / "pg", recursive=True)
    return copy / "bin"


def _readable_tree(path: Path) -> bool:
    return _world_traversable(path) and all(
        (Path(root) / f).stat().st_mode & 0o004 for root, _, files in os.walk(path) for f in files
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that makes Linux send the server SIGQUIT (immediate shutdown) when pytest
    dies, so that a killed session leaves no server running. It runs after the switch to
    ``nobody``, which would otherwise clear the setting."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGQUIT, 0, 0, 0)
        if os.getppid() != parent:  # pytest died before the prctl
            os._exit(1)

    return preexec


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(parent: Path) -> list[Path]:
    """Remove the folders of sessions that died without cleaning up (their pytest and their
    postmaster both gone)."""
    removed = []
    for base in parent.glob(DIR_PREFIX + "*"):
        try:
            owner = int((base / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        postmaster = base / "data" / "postmaster.pid"
        try:
            server = int(postmaster.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            server = None
        if _alive(owner) or (server is not None and _alive(server)):
            continue
        shutil.rmtree(base, ignore_errors=True)
        removed.append(base)
    return removed


class LocalPostgres:
    """One PostgreSQL server in a temporary folder. Use as a context manager."""

    def __init__(
        self, settings: Mapping[str, str] | None = None, parent: Path | None = None
    ) -> None:
        self.parent = parent
        self.settings = {**BASE_SETTINGS, **(FAST_SETTINGS if settings is None else settings)}
        self.process: subprocess.Popen[bytes] | None = None
        self.base: Path | None = None
        self.info: PostgresServer | None = None
        self.timings: dict[str, float] = {}
        self._bin_dir = Path()
        self._run_as = _RunAs()

    def __enter__(self) -> PostgresServer:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> PostgresServer:
        t0 = time.perf_counter()
        bin_dir = pg_bin_dir()
        run_as = _RunAs.pick()
        parent = self.parent or _base_parent()
        sweep_stale(parent)
        self.base = base = Path(tempfile.mkdtemp(prefix=DIR_PREFIX, dir=parent))
        (base / "owner.pid").write_text(str(os.getpid()))
        run_as.chown(base)
        bin_dir = _binaries_for(run_as, bin_dir, base)
        data = base / "data"
        log = base / "postgres.log"
        initdb = subprocess.run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            **run_as.kwargs(),
        )
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb failed ({initdb.returncode}):\n{initdb.stderr}")
        t1 = time.perf_counter()
        self._bin_dir, self._run_as = bin_dir, run_as
        for attempt in range(3):
            port = _free_port()
            if self._launch(port):
                break
            text = log.read_text(errors="replace")
            if "could not bind" not in text or attempt == 2:
                raise RuntimeError(f"postgres did not start; its log:\n{text}")
        self.timings = {"initdb": t1 - t0, "start": time.perf_counter() - t1}
        self.info = PostgresServer(
            dsn=f"postgresql://{SUPERUSER}@127.0.0.1:{port}/postgres",
            external=False,
            socket_dir=base,
            port=port,
            data_dir=data,
            log_file=log,
        )
        return self.info

    def halt(self) -> None:
        """Stop the server as an outage would (a fast shutdown: sessions are cut), keeping its
        data; ``resume`` starts it again."""
        self._signal_and_wait()

    def resume(self) -> None:
        """Start a halted server again, on the same port and data."""
        assert self.info is not None and self.info.port is not None
        if not self._launch(self.info.port):
            text = self.info.log_file.read_text(errors="replace") if self.info.log_file else ""
            raise RuntimeError(f"postgres did not start again; its log:\n{text}")

    def _launch(self, port: int) -> bool:
        """Run the server on ``port``; whether it became ready."""
        assert self.base is not None
        base, data, log = self.base, self.base / "data", self.base / "postgres.log"
        args = [str(self._bin_dir / "postgres"), "-D", str(data), "-p", str(port)]
        for key, value in {
            **self.settings,
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(base),
        }.items():
            args += ["-c", f"{key}={value}"]
        with log.open("ab") as log_fd:
            self.process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a ^C in the terminal reaches pytest only
                preexec_fn=_die_with_parent(),  # noqa: PLW1509
                **self._run_as.kwargs(),
            )
        return self._wait_ready(data / "postmaster.pid")

    def _wait_ready(self, pid_file: Path) -> bool:
        """Until postmaster.pid says ``ready`` (True) or the server exits (False)."""
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            with contextlib.suppress(OSError):
                lines = pid_file.read_text().splitlines()
                if len(lines) >= 8 and lines[7].strip() == "ready":
                    return True
            time.sleep(0.01)
        self._signal_and_wait()
        raise TimeoutError(f"postgres was not ready within {START_TIMEOUT} s")

    def _signal_and_wait(self) -> None:
        """Fast shutdown (SIGINT), then immediate (SIGQUIT), then SIGKILL."""
        proc = self.process
        if proc is None:
            return
        for sig, wait in (
            (signal.SIGINT, STOP_TIMEOUT),
            (signal.SIGQUIT, 5.0),
            (signal.SIGKILL, 5.0),
        ):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait)
        self.process = None

    def stop(self) -> None:
        self._signal_and_wait()
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL: the external one, or a local one stopped at session end."""
    url = os.environ.get(ENV_URL)
    if url:
        with_database(url, "check")  # fail early on a malformed URL
        yield PostgresServer(dsn=url, external=True)
        return
    try:
        pg_bin_dir()
    except PgserverMissing as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{exc}; or set {ENV_URL}")
    with LocalPostgres() as server:
        yield server


@contextlib.asynccontextmanager
async def fresh_database(server: PostgresServer, template: str | None = None) -> AsyncIterator[str]:
    """A fresh database on ``server``, empty or a copy of ``template``, dropped afterwards."""
    name = f"test_{secrets.token_hex(6)}"
    dsn = await create_database(server.dsn, name, template)
    try:
        yield dsn
    finally:
        await drop_database(server.dsn, name)


@pytest.fixture
async def postgres_dsn(postgres_server: PostgresServer) -> AsyncIterator[str]:
    """A fresh empty database, dropped after the test."""
    async with fresh_database(postgres_server) as dsn:
        yield dsn
