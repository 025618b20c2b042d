"""The systemd unit, its README config and logrotate file: pinned settings, hardening, contract.

- The unit is parsed like systemd does (repeated keys, continuation lines) and its pinned
  settings are checked, including that the real CLI accepts its ExecStart.
- ``systemd-analyze security --offline=yes`` must report an exposure of 2.0 or less, and
  ``systemd-analyze verify`` must be silent; both skip where systemd-analyze cannot run offline.
- The README's example config is valid and points where the unit lets the service write.
- The gateway, started the way the unit starts it (credential directory, notify socket, umask,
  and MemoryDenyWriteExecute where the kernel has PR_SET_MDWE), keeps the protocol the unit
  relies on: READY=1, RELOADING=1/READY=1 around SIGHUP, STOPPING=1 and exit 0 on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import math
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import aiohttp
import pytest

from gateway.cli.commands import parser
from gateway.core.auth import key_digest
from gateway.core.config import ServerConfig, parse_settings
from tests.conftest import SECRETS, TEAM_KEYS, UPSTREAM_KEY, Upstream
from tests.process import wait_for_lines

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "image-gateway.service"
README = ROOT / "systemd" / "README.md"
LOGROTATE = ROOT / "systemd" / "image-gateway.logrotate"
MAX_EXPOSURE = 2.0
STOP_MARGIN_S = 15.0  # TimeoutStopSec must exceed drain_s by at least this much
EXPOSURE = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)")
TIME_UNITS = {
    "us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3, "": 1.0, "s": 1.0, "sec": 1.0,
    "second": 1.0, "seconds": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0, "d": 86400.0, "day": 86400.0,
    "days": 86400.0,
}  # fmt: skip


# --- parsing -----------------------------------------------------------------------------------


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections of key -> every value in order (systemd allows repeated keys)."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue  # comments are skipped inside continuations too
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        lines.append(pending + line)
        pending = ""
    assert not pending, "the unit ends inside a continuation line"
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for line in lines:
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"not a key=value line in a section: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def values(key: str, section: str = "Service") -> list[str]:
    """The effective values of a list setting: an empty assignment resets the list."""
    found = UNIT_SETTINGS.get(section, {}).get(key, [])
    if "" in found:
        found = found[len(found) - found[::-1].index("") :]
    return found


def last(key: str, section: str = "Service") -> str | None:
    found = UNIT_SETTINGS.get(section, {}).get(key)
    return found[-1] if found else None


def timespan_s(value: str) -> float:
    """A systemd time span ("270", "270s", "4min 30s", "infinity") in seconds."""
    if value.strip() == "infinity":
        return math.inf
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    assert parts, f"not a time span: {value!r}"
    assert "".join(n + u for n, u in parts) == re.sub(r"\s", "", value), f"bad span {value!r}"
    assert all(unit in TIME_UNITS for _, unit in parts), f"unknown unit in {value!r}"
    return sum(float(number) * TIME_UNITS[unit] for number, unit in parts)


def exec_start() -> list[str]:
    commands = values("ExecStart")
    assert len(commands) == 1, f"exactly one ExecStart= for Type=notify, got {commands}"
    return shlex.split(commands[0].lstrip("@-:+!"))


def readme_config() -> dict:
    blocks = re.findall(r"```toml\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)
    assert blocks, "systemd/README.md shows no ```toml block"
    return tomllib.loads(blocks[0])


UNIT_SETTINGS = parse_unit(UNIT.read_text(encoding="utf-8"))


# --- the unit's pinned settings ----------------------------------------------------------------


def test_parser_handles_repeated_keys_resets_and_continuations() -> None:
    parsed = parse_unit("[Service]\n# c\nA=1\nA=2 \\\n  3\nB=x\nB=\nB=y\n")["Service"]
    assert parsed == {"A": ["1", "2 3"], "B": ["x", "", "y"]}
    assert timespan_s("4min 30s") == 270.0
    assert timespan_s("270") == 270.0
    with pytest.raises(AssertionError):
        timespan_s("270 furlongs")


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("Type", "notify"),
        ("Restart", "on-failure"),
        ("StateDirectory", "image-gateway"),
        ("LogsDirectory", "image-gateway"),
        ("DynamicUser", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("NoNewPrivileges", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
        ("UMask", "0077"),
        ("CapabilityBoundingSet", ""),
    ],
)
def test_pinned_setting(key: str, expected: str) -> None:
    assert last(key) == expected


def test_exec_start_runs_serve_with_the_config_file() -> None:
    argv = exec_start()
    assert argv[0] == "/opt/image-gateway/.venv/bin/image-gateway"
    assert argv[1:] == ["serve", "--config", "/etc/image-gateway/gateway.toml"]
    scripts = importlib.metadata.entry_points(group="console_scripts", name=Path(argv[0]).name)
    assert [ep.value for ep in scripts] == ["gateway.cli.main:main"]
    args = parser().parse_args(argv[1:])  # the real CLI accepts exactly these arguments
    assert args.config == Path("/etc/image-gateway/gateway.toml")
    assert not args.demo


def test_exec_reload_sends_sighup_to_the_main_process() -> None:
    commands = values("ExecReload")
    assert len(commands) == 1
    argv = shlex.split(commands[0])
    assert Path(argv[0]).is_absolute() and Path(argv[0]).name == "kill"
    sends_hup = "-HUP" in argv or "-SIGHUP" in argv or "-1" in argv
    sends_hup = sends_hup or any(
        argv[i : i + 2] in (["-s", "HUP"], ["-s", "SIGHUP"]) for i in range(len(argv))
    )
    assert sends_hup, argv
    assert argv[-1] == "$MAINPID"


def test_timeout_stop_covers_the_drain() -> None:
    timeout = last("TimeoutStopSec")
    assert timeout is not None, "TimeoutStopSec must be set: the default (90 s) cuts the drain"
    assert timespan_s(timeout) >= ServerConfig().drain_s + STOP_MARGIN_S
    assert last("KillSignal") in (None, "SIGTERM", "TERM", "15")


def test_central_key_comes_from_a_credential() -> None:
    credentials = values("LoadCredential")
    assert "upstream-key:/etc/image-gateway/upstream-key" in credentials
    # never the key itself, nor a variable carrying it, in the unit
    assert not any("KEY" in value or "sk_" in value for value in values("Environment"))
    assert not values("EnvironmentFile")


def test_network_stays_reachable_and_narrow() -> None:
    families = set(" ".join(values("RestrictAddressFamilies")).split())
    assert families == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert last("PrivateNetwork") in (None, "no", "false")
    assert values("SystemCallFilter")[0] == "@system-service"


# --- systemd-analyze ---------------------------------------------------------------------------


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed")
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "cat", "SYSTEMD_LOG_COLOR": "0"}
    return subprocess.run(
        [exe, "--no-pager", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def exposure(unit: Path) -> tuple[float, str]:
    proc = _analyze("security", "--offline=yes", str(unit))
    match = EXPOSURE.search(proc.stdout)
    if match is None:
        if re.search(r"(unrecognized|unknown) option.*offline|offline.*not supported", proc.stderr):
            pytest.skip(f"this systemd-analyze cannot run offline: {proc.stderr.strip()}")
        pytest.fail(f"no exposure level (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return float(match[1]), proc.stdout


def test_security_exposure_is_at_most_2() -> None:
    level, report = exposure(UNIT)
    assert level <= MAX_EXPOSURE, report


def test_security_check_tells_a_weak_unit_apart(tmp_path: Path) -> None:
    weak = tmp_path / "image-gateway.service"
    weak.write_text(
        "[Service]\nType=notify\n" + f"ExecStart={shlex.join(exec_start())}\n", encoding="utf-8"
    )
    level, report = exposure(weak)
    assert level > MAX_EXPOSURE, report


def test_systemd_analyze_verify_is_silent(tmp_path: Path) -> None:
    true = shutil.which("true") or "/bin/true"
    probe = tmp_path / "igw-verify-probe.service"
    probe.write_text(f"[Service]\nType=oneshot\nExecStart={true}\n", encoding="utf-8")
    proc = _analyze("verify", "--man=no", str(probe))
    if proc.returncode != 0 or proc.stdout.strip() or proc.stderr.strip():
        pytest.skip(f"systemd-analyze verify does not work offline here: {proc.stderr.strip()}")
    # verify insists that ExecStart's program exists, which is true only once installed into
    # /opt; otherwise check a copy that runs this checkout's console script instead.
    program = exec_start()[0]
    unit = UNIT
    if not os.access(program, os.X_OK):
        local = Path(sys.executable).with_name("image-gateway")
        text = UNIT.read_text(encoding="utf-8")
        assert text.count(program) == 1
        unit = tmp_path / UNIT.name
        unit.write_text(text.replace(program, str(local) if local.exists() else true), "utf-8")
    proc = _analyze("verify", "--man=no", str(unit))
    assert proc.returncode == 0, proc.stderr
    assert not proc.stderr.strip(), proc.stderr
    assert not proc.stdout.strip(), proc.stdout


# --- the README's config and the logrotate file ------------------------------------------------


def test_readme_config_is_valid_and_matches_the_unit(tmp_path: Path) -> None:
    data = readme_config()
    credential_name, _, source = values("LoadCredential")[0].partition(":")
    assert data["upstream"]["api_key_file"] == f"${{CREDENTIALS_DIRECTORY}}/{credential_name}"
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / credential_name).write_text(UPSTREAM_KEY + "\n", encoding="utf-8")
    config_path = Path(exec_start()[-1])
    settings = parse_settings(
        data, base_dir=config_path.parent, env={"CREDENTIALS_DIRECTORY": str(creds)}
    )
    assert settings.upstreams[0].api_key.reveal() == UPSTREAM_KEY
    assert Path(source).parent == config_path.parent
    assert settings.database.parent == Path("/var/lib") / values("StateDirectory")[0]
    assert Path(settings.log.access).parent == Path("/var/log") / values("LogsDirectory")[0]
    assert timespan_s(last("TimeoutStopSec") or "0") >= settings.server.drain_s + STOP_MARGIN_S


def installed(name: str, package: str) -> str:
    """The path of a tool; skipped without it, except under CI (``.ci/run`` installs it)."""
    path = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name,) if p.exists()), None
    )
    if path is not None:
        return path
    message = f"{name} is not installed (apt-get install {package})"
    if os.environ.get("CI"):
        pytest.fail(message + "; under CI it must run, not skip")
    pytest.skip(message)


def logrotate_directives() -> tuple[list[str], list[str]]:
    """The rotated paths and the directives of the one block, comments stripped."""
    lines = [
        line.split("#", 1)[0].strip() for line in LOGROTATE.read_text(encoding="utf-8").splitlines()
    ]
    lines = [line for line in lines if line]
    assert lines[0].endswith("{") and lines[-1] == "}"
    return lines[0][:-1].split(), lines[1:-1]


def test_logrotate_rotates_every_instances_access_log_without_copytruncate(
    tmp_path: Path,
) -> None:
    paths, directives = logrotate_directives()
    single = parse_settings(
        readme_config(),
        base_dir=Path("/etc/image-gateway"),
        env={},
        require_central_key=False,
    ).log.access
    assert paths == [single, str(Path(single).with_name("access-*.log"))]  # image-gateway@NAME
    for wanted in ("daily", "rotate 14", "compress", "delaycompress", "missingok", "notifempty",
                   "sharedscripts"):  # fmt: skip
        assert wanted in directives
    assert any(re.fullmatch(r"create 0640( \S+ \S+)?", line) for line in directives)
    assert "copytruncate" not in directives
    script = directives[directives.index("postrotate") + 1 : directives.index("endscript")]
    assert script == [
        "systemctl try-reload-or-restart image-gateway.service >/dev/null 2>&1 || true",
        "systemctl try-reload-or-restart 'image-gateway@*.service' >/dev/null 2>&1 || true",
    ]

    exe = installed("logrotate", "logrotate")
    proc = subprocess.run(
        [exe, "--debug", "--state", str(tmp_path / "state"), str(LOGROTATE)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = proc.stdout + proc.stderr
    if "owner is wrong" in output or "bad file mode" in output:
        pytest.skip(f"logrotate refuses this checkout's file ownership: {output.strip()}")
    assert proc.returncode == 0, output
    assert "error:" not in output, output


def test_logrotate_rotates_both_kinds_of_log_and_reloads_every_unit_once(tmp_path: Path) -> None:
    """The shipped file, run for real on a copy whose paths point into ``tmp_path``, with a
    ``systemctl`` that only writes down how it was called."""
    exe = installed("logrotate", "logrotate")
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o750)
    for name in ("access.log", "access-a.log", "access-b.log"):
        (logs / name).write_text('{"n": 1}\n')
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "systemctl-calls"
    fake = bin_dir / "systemctl"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    config = tmp_path / "image-gateway.logrotate"
    config.write_text(
        LOGROTATE.read_text(encoding="utf-8").replace("/var/log/image-gateway/", f"{logs}/")
    )
    config.chmod(0o644)
    proc = subprocess.run(
        [exe, "--force", "--state", str(tmp_path / "state"), str(config)],
        check=False, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"},
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    if "owner is wrong" in output or "bad file mode" in output or "insecure" in output:
        pytest.skip(f"logrotate refuses this temporary directory: {output.strip()}")
    assert proc.returncode == 0, output
    assert sorted(p.name for p in logs.iterdir()) == [
        "access-a.log", "access-a.log.1", "access-b.log", "access-b.log.1", "access.log",
        "access.log.1",
    ]  # fmt: skip
    assert calls.read_text().splitlines() == [  # once for all three files
        "try-reload-or-restart image-gateway.service",
        "try-reload-or-restart image-gateway@*.service",
    ]


# --- the gateway keeps the unit's contract -----------------------------------------------------

PR_SET_MDWE = 65  # with PR_MDWE_REFUSE_EXEC_GAIN (1): what MemoryDenyWriteExecute=yes enforces
# Runs argv[2:] the way the unit does: umask 0077 and, given "mdwe", no writable+executable
# memory; it first checks that such a mapping is really refused.
SANDBOX = """
import ctypes, mmap, os, sys
os.umask(0o077)
if sys.argv[1] == "mdwe":
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(65, 1, 0, 0, 0) != 0:
        sys.exit("PR_SET_MDWE failed: " + os.strerror(ctypes.get_errno()))
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError:
        pass
    else:
        sys.exit("MemoryDenyWriteExecute is set but a W+X mapping was allowed")
os.execv(sys.argv[2], sys.argv[2:])
"""


def mdwe_supported() -> bool:
    """Whether this kernel has PR_SET_MDWE (Linux 6.3+), tried in a throwaway process."""
    if not sys.platform.startswith("linux"):
        return False
    probe = f"import ctypes,sys; sys.exit(ctypes.CDLL(None).prctl({PR_SET_MDWE}, 1, 0, 0, 0))"
    return subprocess.run([sys.executable, "-c", probe], check=False).returncode == 0


def gateway_command(config: Path) -> list[str]:
    argv = exec_start()
    script = Path(sys.executable).with_name(Path(argv[0]).name)
    program = [str(script)] if script.exists() else [sys.executable, "-m", "gateway"]
    args = argv[1:]
    args[args.index("--config") + 1] = str(config)
    return program + args


@pytest.mark.process
async def test_gateway_keeps_the_notify_reload_and_stop_contract(
    upstream: Upstream, tmp_path: Path
) -> None:
    state, logs, creds = tmp_path / "state", tmp_path / "logs", tmp_path / "credentials"
    for folder in (state, logs, creds):
        folder.mkdir(mode=0o700)
    (creds / "upstream-key").write_text(UPSTREAM_KEY + "\n", encoding="utf-8")
    (creds / "upstream-key").chmod(0o400)
    access = logs / "access.log"
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"""
[server]
host = "127.0.0.1"
port = 0
drain_s = 10

[upstream]
base_url = "{upstream.url}"
api_key_file = "${{CREDENTIALS_DIRECTORY}}/upstream-key"

[storage]
database = "{state / "gateway.db"}"

[log]
access = "{access}"

[teams.design]
keys_sha256 = ["{key_digest(TEAM_KEYS["design"])}"]
budget_cny = 10
""",
        encoding="utf-8",
    )
    mdwe = mdwe_supported()
    notify_name = f"image-gateway-test-{secrets.token_hex(8)}"
    env = {k: v for k, v in os.environ.items() if k != "IMAGE_GATEWAY_UPSTREAM_KEY"}
    env.update(NOTIFY_SOCKET="@" + notify_name, CREDENTIALS_DIRECTORY=str(creds))
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify_socket:
        notify_socket.bind("\0" + notify_name)
        notify_socket.setblocking(False)

        async def next_message() -> list[str]:
            data = await asyncio.wait_for(loop.sock_recv(notify_socket, 4096), 30)
            return data.decode().split("\n")

        stderr_path = tmp_path / "stderr.txt"
        with stderr_path.open("wb") as stderr:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                SANDBOX,
                "mdwe" if mdwe else "plain",
                *gateway_command(config),
                env=env,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=stderr,
            )
        try:
            try:
                ready = await next_message()
            except TimeoutError:
                pytest.fail(f"no READY=1; stderr:\n{stderr_path.read_text()}")
            assert ready[0] == "READY=1", ready
            status = [field for field in ready if field.startswith("STATUS=listening on ")]
            assert status, ready
            url = status[0].removeprefix("STATUS=listening on ")

            async with aiohttp.ClientSession() as http:

                async def generate() -> None:
                    async with http.post(
                        f"{url}/v1/images/generations",
                        json={"model": "gpt-image-2", "prompt": "a cat", "size": "1024x1024"},
                        headers={"Authorization": f"Bearer {TEAM_KEYS['design']}"},
                    ) as response:
                        assert response.status == 200, await response.text()

                await generate()
                assert len(await wait_for_lines(access, 1)) == 1
                assert access.stat().st_mode & 0o077 == 0  # UMask=0077 reaches the log

                access.rename(logs / "access.log.1")  # what logrotate does before the reload
                proc.send_signal(signal.SIGHUP)  # ExecReload=
                reloading = await next_message()
                assert reloading[0] == "RELOADING=1", reloading
                assert re.fullmatch(r"MONOTONIC_USEC=\d+", reloading[1]), reloading
                assert await next_message() == ["READY=1"]
                await generate()
                assert len(await wait_for_lines(access, 1)) == 1
                assert len((logs / "access.log.1").read_text(encoding="utf-8").splitlines()) == 1

            proc.send_signal(signal.SIGTERM)  # systemctl stop
            assert (await next_message())[0] == "STOPPING=1"
            code = await asyncio.wait_for(proc.wait(), 60)
            assert code == 0, stderr_path.read_text()
        finally:
            if proc.returncode is None:
                proc.kill()
                with contextlib.suppress(ProcessLookupError):
                    await proc.wait()
            stderr_text = stderr_path.read_text(errors="replace")
            for needle in (*SECRETS, "base64,"):
                assert needle not in stderr_text, f"{needle[:8]}... found in the gateway's stderr"
    if not mdwe:
        pytest.skip("contract kept, but not under MemoryDenyWriteExecute: no PR_SET_MDWE here")


# --- the template for several instances (PostgreSQL) -------------------------------------------

TEMPLATE = ROOT / "systemd" / "image-gateway@.service"
TEMPLATE_SETTINGS = parse_unit(TEMPLATE.read_text(encoding="utf-8"))
PER_INSTANCE = {"Description", "ExecStart", "SyslogIdentifier", "LoadCredential"}


def test_the_template_keeps_every_setting_of_the_unit_but_the_per_instance_ones() -> None:
    for section, values in UNIT_SETTINGS.items():
        for key, value in values.items():
            if key not in PER_INSTANCE:
                assert TEMPLATE_SETTINGS[section][key] == value, (section, key)
    service = TEMPLATE_SETTINGS["Service"]
    assert service["ExecStart"][-1].endswith("serve --config /etc/image-gateway/%i.toml")
    assert service["SyslogIdentifier"] == ["image-gateway-%i"]
    assert service["LoadCredential"] == [
        "upstream-key:/etc/image-gateway/upstream-key",
        "database-url:/etc/image-gateway/database-url",
    ]


def test_the_template_security_exposure_is_at_most_2(tmp_path: Path) -> None:
    instance = tmp_path / "image-gateway@a.service"
    instance.write_text(TEMPLATE.read_text(encoding="utf-8"), encoding="utf-8")
    level, report = exposure(instance)
    assert level <= MAX_EXPOSURE, report


def test_the_nginx_example_is_valid_nginx(tmp_path: Path) -> None:
    nginx = installed("nginx", "nginx")
    example = ROOT / "deploy" / "nginx" / "image-gateway.conf"
    text = example.read_text(encoding="utf-8")
    assert "proxy_read_timeout 330s" in text and "non_idempotent" not in text.split("#")[0]
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{\n access_log off;\n client_body_temp_path {tmp_path};\n"
        f" proxy_temp_path {tmp_path};\n include {example};\n}}\n",
        encoding="utf-8",
    )
    proc = subprocess.run(
        [nginx, "-t", "-q", "-p", str(tmp_path), "-c", str(main)],
        capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
