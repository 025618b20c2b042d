"""``image-gateway upstreams --config PATH``: each upstream's health, as a running gateway sees it.

Health lives in each running instance's memory, so the command asks the gateway at the config's
``[server]`` address (``GET /admin/upstreams``) with an admin key taken from the environment
variable ``IMAGE_GATEWAY_ADMIN_KEY`` (never an argument: argv is visible to every user of the
host). When no gateway answers there, it prints the configured upstreams instead, without a
state, and says so on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

import aiohttp

from gateway.cli.commands import ADMIN_KEY_ENV, CommandError
from gateway.cli.support import load_config
from gateway.core.config import ServerConfig, Settings
from gateway.core.tables import aligned

ASK_TIMEOUT_S = 10.0
# A gateway listening on every address is asked on loopback.
ANY_ADDRESS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104


def upstreams(args: argparse.Namespace) -> int:
    settings = load_config(args.config, require_central_key=False)
    url = gateway_url(settings.server)
    found = asyncio.run(_ask(url, os.environ.get(ADMIN_KEY_ENV))) if url else None
    if found is None:
        print(
            f"image-gateway: no gateway answers at {url or '[server] port 0'}; these are the "
            "configured upstreams (their health is known only to a running gateway)",
            file=sys.stderr,
        )
        found = configured(settings)
    if args.json:
        print(json.dumps({"upstreams": found}, indent=2))
    else:
        print(table(found), end="")
    return 0


def gateway_url(server: ServerConfig) -> str | None:
    """Where the gateway of this config listens (None: port 0, it cannot be known)."""
    if server.port == 0:
        return None
    host = ANY_ADDRESS.get(server.host, server.host)
    return f"http://[{host}]:{server.port}" if ":" in host else f"http://{host}:{server.port}"


async def _ask(url: str, admin_key: str | None) -> list[dict[str, Any]] | None:
    """The running gateway's answer; None when nothing answers at ``url``."""
    timeout = aiohttp.ClientTimeout(total=ASK_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        try:
            async with http.get(url + "/healthz") as resp:
                await resp.read()
        except (aiohttp.ClientError, TimeoutError):
            return None
        if not admin_key:
            raise CommandError(
                f"a gateway answers at {url}: set {ADMIN_KEY_ENV} to one of its admin keys "
                "([admin] keys_sha256) to read its upstreams' health"
            )
        headers = {"Authorization": f"Bearer {admin_key.strip()}"}
        try:
            async with http.get(url + "/admin/upstreams", headers=headers) as resp:
                if resp.status != 200:
                    raise CommandError(
                        f"the gateway at {url} answered HTTP {resp.status} to "
                        f"GET /admin/upstreams (is {ADMIN_KEY_ENV} one of its admin keys?)"
                    )
                body = await resp.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise CommandError(f"the gateway at {url} did not answer: {exc!r}") from None
    return list(body["upstreams"])


def configured(settings: Settings) -> list[dict[str, Any]]:
    """The config's upstreams in the shape of ``GET /admin/upstreams``, without health."""
    return [
        {"name": u.name, "state": None, "until": None, "last_error": None,
         "priority": u.priority, "weight": u.weight}
        for u in settings.upstreams
    ]  # fmt: skip


def table(found: list[dict[str, Any]]) -> str:
    rows = [("name", "state", "until", "priority", "weight", "last_error")]
    rows += [
        (u["name"], u["state"] or "-", u["until"] or "-", str(u["priority"]), str(u["weight"]),
         u["last_error"] or "-")
        for u in found
    ]  # fmt: skip
    return aligned(rows)
