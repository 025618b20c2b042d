"""What every offline command shares: loading the config, running async work, one-line errors."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from gateway.core.config import ConfigError, Settings, load_settings
from gateway.core.errors import StorageUnavailable
from gateway.store.migrations import SchemaTooNew, SchemaTooOld
from gateway.store.postgres import PostgresOpenError
from gateway.store.sqlite import StoreLocked, StoreOpenError

Action = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]


class CommandError(Exception):
    """A command cannot run as asked; the message is the one line to print."""


STORE_ERRORS = (
    StoreOpenError,
    StoreLocked,
    PostgresOpenError,
    SchemaTooNew,
    SchemaTooOld,
    StorageUnavailable,
    FileNotFoundError,
)


def offline(action: Action) -> Callable[[argparse.Namespace], int]:
    """A command that reads the config (no central key needed) and works on the database."""

    def run(args: argparse.Namespace) -> int:
        settings = load_config(args.config, require_central_key=False)
        try:
            return asyncio.run(action(args, settings))
        except STORE_ERRORS as exc:
            raise CommandError(str(exc)) from None

    return run


def load_config(path: Path, *, require_central_key: bool = True) -> Settings:
    try:
        return load_settings(path, require_central_key=require_central_key)
    except ConfigError as exc:
        raise CommandError(config_problems(path, exc.problems)) from None


def config_problems(path: Path, problems: list[str]) -> str:
    """One line for one problem; a header and one indented line per problem for several."""
    if len(problems) == 1:
        return f"{path}: invalid config: {problems[0]}"
    return f"{path}: invalid config ({len(problems)} problems):" + "".join(
        f"\n  - {problem}" for problem in problems
    )


CONFIG_HELP = "the gateway's TOML config file"


class HelpFormatter(argparse.HelpFormatter):
    """Wraps descriptions as usual, but keeps a block under a heading (``examples:``) as
    written: command lines must not be re-flowed."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.partition("\n")[0].endswith(":"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def examples(*lines: str) -> dict[str, Any]:
    """``add_parser`` keywords that end a command's ``--help`` with these example lines."""
    text = "examples:\n" + "\n".join(f"  {line}" for line in lines)
    return {"epilog": text, "formatter_class": HelpFormatter}


def fail(message: str) -> int:
    print(f"image-gateway: {message}", file=sys.stderr)
    return 1
