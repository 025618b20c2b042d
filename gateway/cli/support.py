"""What the commands that read a config share: loading it, running async work on the store,
one-line errors."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from gateway.cli.commands import CommandError
from gateway.core.config import ConfigError, Settings, load_settings
from gateway.core.errors import StorageUnavailable
from gateway.store.errors import PostgresOpenError, StoreLocked, StoreOpenError
from gateway.store.migrations import SchemaTooNew, SchemaTooOld

Action = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]

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


def refuse_fleet_rehearsal(settings: Settings) -> None:
    """``--simulate-upstream`` is for one process: on PostgreSQL, point at the shared one."""
    if settings.storage.backend == "postgres":
        raise CommandError(
            "--simulate-upstream gives each instance a simulator of its own, so a fleet on "
            "PostgreSQL would lose its tasks between instances: run `image-gateway "
            "simulate-upstream --port N` once and point each instance's [upstream] base_url "
            "at it (with any sk_ key), then `serve --config` as usual"
        )
