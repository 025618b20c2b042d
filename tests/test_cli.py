"""The command line as a newcomer meets it: help that explains, examples, and check-config taking
its file the way every other command does (issue 20, item 6)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.cli.commands import parser as cli_parser

HASH = "a" * 64
MAIN_COMMANDS = (
    ("serve",),
    ("new-key",),
    ("check-config",),
    ("usage",),
    ("hash-key",),
    ("keys",),
    ("ledger", "list"),
    ("ledger", "resolve"),
    ("ledger", "export"),
    ("ledger", "verify"),
    ("db", "copy"),
)


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "100", **(env or {})},
        check=False,
        capture_output=True,
        text=True,
    )


def parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, (*path, name))


def test_every_command_and_option_says_what_it_is_for() -> None:
    missing = []
    for path, parser in parsers(cli_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                missing += [
                    f"{' '.join(path)} {choice.dest}"
                    for choice in action._choices_actions
                    if not choice.help
                ]
            elif not action.help:
                missing.append(f"{' '.join(path) or 'image-gateway'} {action.dest}")
    assert missing == []


def test_top_level_help_describes_the_tool_not_its_internals() -> None:
    result = run("--help")
    assert result.returncode == 0
    assert "budget" in result.stdout and "team key (igw_...)" in result.stdout
    assert "The only reader of argv" not in result.stdout  # the module's docstring
    assert "image-gateway serve --demo" in result.stdout


@pytest.mark.parametrize("command", MAIN_COMMANDS, ids=" ".join)
def test_main_commands_show_examples(command: tuple[str, ...]) -> None:
    result = run(*command, "--help")
    assert result.returncode == 0, result.stderr
    examples = result.stdout.partition("examples:\n")[2]
    assert examples.startswith(f"  image-gateway {' '.join(command)}") or (
        command == ("hash-key",) and "| image-gateway hash-key" in examples
    ), result.stdout


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(f'[teams.design]\nkeys_sha256 = ["{HASH}"]\nbudget_cny = "1.50"\n')
    return path


def test_check_config_takes_a_path_or_config(config: Path) -> None:
    env = {"IMAGE_GATEWAY_UPSTREAM_KEY": "sk_x"}
    for args in ((str(config),), ("--config", str(config))):
        result = run("check-config", *args, env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"{config}: OK (1 teams, database ")
    for args in ((), (str(config), "--config", str(config))):
        result = run("check-config", *args, env=env)
        assert result.returncode == 1
        assert result.stderr.strip() == (
            "image-gateway: check-config: give the config file once, as PATH or --config PATH"
        )


def test_check_config_of_a_rehearsal_needs_no_central_key(config: Path) -> None:
    production = run("check-config", "--config", str(config))
    assert production.returncode == 1 and "central key is missing" in production.stderr
    rehearsal = run("check-config", "--config", str(config), "--simulate-upstream")
    assert rehearsal.returncode == 0, rehearsal.stderr
    assert "OK (1 teams" in rehearsal.stdout
    config.write_text(config.read_text() + "[server]\nport = 'x'\n")  # still validated
    broken = run("check-config", "--config", str(config), "--simulate-upstream")
    assert broken.returncode == 1 and "server.port must be int" in broken.stderr
