"""``image-gateway serve --demo``: the gateway in front of an embedded simulated upstream.

No key, no network. Prints a team key and commands that work as printed, and keeps working
after a restart: the keys and the database live in ``./.image-gateway-demo/`` (made 0700, the
key file 0600), so a snippet printed yesterday still runs and the ledger carries on.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import replace
from pathlib import Path

from gateway.cli.rehearsal import SIM_DELAY_S, serve_simulated
from gateway.core.auth import key_digest, new_team_key
from gateway.core.config import SignInLink, parse_settings
from gateway.core.sessions import link_digest
from gateway.http.app import StartupError

DEMO_DIR = Path(".image-gateway-demo")  # in the current directory
KEYS_FILE = "keys.json"
DATABASE = "gateway.db"
DEMO_BUDGET_CNY = "100.00"  # daily: a long exploration (500 medium images)


async def run_demo(host: str, port: int, folder: Path) -> None:
    """Serve the demo; ``folder`` (absolute) keeps its keys and database."""
    team_key, admin_key = demo_keys(folder)
    settings = parse_settings(
        {
            "server": {"host": host, "port": port},
            "storage": {"database": DATABASE},
            "teams": {
                "demo": {
                    "keys_sha256": [key_digest(team_key)],
                    "budget_cny": DEMO_BUDGET_CNY,
                    "period": "daily",
                }
            },
            "admin": {"keys_sha256": [key_digest(admin_key)]},
        },
        base_dir=folder,
        env={},
        require_central_key=False,
    )
    # The banner's console link signs the demo team in once; a new one at every start.
    token = secrets.token_urlsafe(24)
    link = SignInLink(link_digest(token), key_digest(team_key))
    settings = replace(settings, console=replace(settings.console, links=(link,)))
    await serve_simulated(
        settings,
        on_ready=lambda url: print(
            banner(url, team_key, admin_key, folder, settings.ledger_name(), link_token=token),
            flush=True,
        ),
    )


def demo_keys(folder: Path) -> tuple[str, str]:
    """The demo's team and admin keys: made on the first run, read from ``folder`` after."""
    path = folder / KEYS_FILE
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        if not path.exists():
            keys = {"team": new_team_key(), "admin": new_team_key()}
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(keys, fh)
        keys = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise StartupError(f"cannot keep the demo's keys in {path}: {exc.strerror}") from None
    except ValueError:
        keys = None
    if not (
        isinstance(keys, dict)
        and all(isinstance(keys.get(k), str) and keys[k] for k in ("team", "admin"))
    ):
        raise StartupError(f"{path} is not the demo's key file (delete {folder} to start over)")
    return keys["team"], keys["admin"]


def banner(
    url: str, team_key: str, admin_key: str, folder: Path, ledger: str, *, link_token: str
) -> str:
    return f"""
image-gateway demo is running on {url} (simulated upstream: nothing leaves this machine).
Team "demo" has a daily budget of {DEMO_BUDGET_CNY} CNY. Its key:

    {team_key}

The keys and the database are kept in {folder}
(the same key works after a restart from this directory; delete the folder to start over).
The ledger: {ledger}

Generate an image with curl (about {SIM_DELAY_S:.0f} s), then open the URL it returns:

    curl -s {url}/v1/images/generations \\
      -H "Authorization: Bearer {team_key}" \\
      -H "Content-Type: application/json" \\
      -d '{{"model": "gpt-image-2", "prompt": "an orange cat", "size": "1536x1024"}}'

Or, after `pip install openai`, with the OpenAI Python SDK:

    from openai import OpenAI
    client = OpenAI(base_url="{url}/v1", api_key="{team_key}")
    print(client.images.generate(model="gpt-image-2", prompt="a corgi astronaut").data[0].url)

The team's own budget, with its key (every image answer also carries
X-Gateway-Budget-Remaining):

    curl -s {url}/v1/gateway/usage -H "Authorization: Bearer {team_key}"

Usage so far (admin key):

    curl -s {url}/admin/usage -H "Authorization: Bearer {admin_key}"

The web console is at {url}/console/ (sign in with either key). This link signs
team "demo" in with one click, once:

    {url}/console/link?token={link_token}

Press Ctrl-C to stop.
"""
