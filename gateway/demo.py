"""``image-gateway serve --demo``: the gateway in front of an embedded simulated upstream.

No key, no network, a throwaway database; prints a team key and commands that work as printed.
"""

from __future__ import annotations

import secrets
import tempfile
from pathlib import Path

from aiohttp import web

from gateway.auth import key_digest, new_team_key
from gateway.config import parse_settings
from gateway.server import serve
from gateway.simulator import Simulator

DEMO_KEY_ENV = "DEMO_UPSTREAM_KEY"
DEMO_DELAY_S = 2.0


async def run_demo(host: str = "127.0.0.1", port: int = 8080) -> None:
    upstream_key = "sk_demo_" + secrets.token_hex(16)
    simulator = Simulator(upstream_key, delay_s=DEMO_DELAY_S, task_delay_s=2 * DEMO_DELAY_S)
    sim_runner = web.AppRunner(simulator.app(), access_log=None, handle_signals=False)
    await sim_runner.setup()
    try:
        await web.TCPSite(sim_runner, "127.0.0.1", 0).start()
        sim_port = sim_runner.addresses[0][1]
        team_key, admin_key = new_team_key(), new_team_key()
        with tempfile.TemporaryDirectory(prefix="image-gateway-demo-") as tmp:
            settings = parse_settings(
                {
                    "server": {"host": host, "port": port},
                    "upstream": {
                        "base_url": f"http://127.0.0.1:{sim_port}",
                        "api_key_env": DEMO_KEY_ENV,
                    },
                    "storage": {"database": "gateway.db"},
                    "teams": {
                        "demo": {
                            "keys_sha256": [key_digest(team_key)],
                            "budget_cny": 5.0,
                            "period": "daily",
                        }
                    },
                    "admin": {"keys_sha256": [key_digest(admin_key)]},
                },
                base_dir=Path(tmp),
                env={DEMO_KEY_ENV: upstream_key},
            )
            await serve(
                settings, on_ready=lambda url: print(banner(url, team_key, admin_key), flush=True)
            )
    finally:
        await sim_runner.cleanup()


def banner(url: str, team_key: str, admin_key: str) -> str:
    return f"""
image-gateway demo is running on {url} (simulated upstream, throwaway database).
Team "demo" has a daily budget of 5.00 CNY. Its key:

    {team_key}

Generate an image with curl (about {DEMO_DELAY_S:.0f} s), then open the URL it returns:

    curl -s {url}/v1/images/generations \\
      -H "Authorization: Bearer {team_key}" \\
      -H "Content-Type: application/json" \\
      -d '{{"model": "gpt-image-2", "prompt": "an orange cat", "size": "1536x1024"}}'

Or with the OpenAI Python SDK:

    from openai import OpenAI
    client = OpenAI(base_url="{url}/v1", api_key="{team_key}")
    print(client.images.generate(model="gpt-image-2", prompt="a corgi astronaut").data[0].url)

Usage so far (admin key):

    curl -s {url}/admin/usage -H "Authorization: Bearer {admin_key}"

Press Ctrl-C to stop.
"""
