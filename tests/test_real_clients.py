"""Real clients, not recordings, against a real gateway process (issue 20).

The Vercel AI SDK (``ai`` and ``@ai-sdk/openai``, pinned in ``tests/node/package-lock.json``) runs
in Node: ``tests/node/generate_image.mjs`` calls ``generateImage`` as its users do. The packages
are installed once with ``npm ci`` into ``tests/node/node_modules`` (kept between runs). Without
``node``/``npm`` these tests skip, saying so; with ``CI`` set they fail instead (``.ci/run``
installs Node from Debian). The OpenAI Python SDK and curl run against the same process.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from openai import AsyncOpenAI

from gateway.core.config import DEFAULT_ALIASES
from gateway.core.normalize import Rules, normalize
from gateway.upstream.pngs import solid_png
from tests.conftest import TEAM_KEYS, Upstream, base_config
from tests.process import GatewayProcess, to_toml

pytestmark = pytest.mark.process

NODE_DIR = Path(__file__).resolve().parent / "node"
NPM_CI_TIMEOUT_S = 240
NODE_TIMEOUT_S = 60


@pytest.fixture(scope="session")
def node_clients() -> Path:
    """``tests/node`` with its pinned packages installed (``npm ci`` when they are missing or
    older than the lock file)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        reason = "the Vercel AI SDK tests need node and npm (Debian: apt-get install nodejs npm)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so this is a failure, not a skip")
        pytest.skip(reason)
    installed = NODE_DIR / "node_modules" / ".package-lock.json"
    lock = NODE_DIR / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        result = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=NPM_CI_TIMEOUT_S,
            check=False,
        )
        assert result.returncode == 0, f"npm ci failed in {NODE_DIR}:\n{result.stderr}"
    return NODE_DIR


async def generate_image(base_url: str, key: str, *models: str) -> list[dict[str, Any]]:
    """Run ``generate_image.mjs`` for ``models``; one result (or error) per model."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "OPENAI_BASE_URL": base_url + "/v1",
        "OPENAI_API_KEY": key,
    }
    proc = await asyncio.create_subprocess_exec(
        "node", "generate_image.mjs", *models,
        cwd=NODE_DIR, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), NODE_TIMEOUT_S)
    results = [json.loads(line) for line in out.decode().splitlines()]
    assert proc.returncode == 0, (results, err.decode()[-2000:])
    return results


@pytest.fixture
async def gateway_process(tmp_path: Path, upstream: Upstream) -> AsyncIterator[GatewayProcess]:
    """A gateway process with a default config (no response-format setting) in front of the
    simulated upstream, which counts what it is asked for."""
    config = base_config(tmp_path, upstream.url)
    (tmp_path / "gateway.toml").write_text(to_toml(config))
    process = GatewayProcess(tmp_path / "gateway.toml")
    await process.start()
    yield process
    await process.close()


def ledger(path: Path) -> list[tuple[str, int, int]]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT state, held, charged FROM ledger ORDER BY created_at")
        return [tuple(row) for row in rows]


def served_pngs(upstream: Upstream) -> set[str]:
    """The sha256 of every image the simulated upstream made."""
    return {
        hashlib.sha256(solid_png(*image)).hexdigest() for image in upstream.sim._images.values()
    }


async def test_vercel_ai_sdk_generate_image_is_served_and_charged_once_per_call(
    node_clients: Path, gateway_process: GatewayProcess, upstream: Upstream, tmp_path: Path
) -> None:
    results = await generate_image(
        gateway_process.url, TEAM_KEYS["design"], "gpt-image-1", "gpt-image-2"
    )
    assert [r["model"] for r in results] == ["gpt-image-1", "gpt-image-2"]
    for result in results:
        (image,) = result["images"]
        assert image["mediaType"] == "image/png" and image["bytes"] > 0
        assert image["sha256"] in served_pngs(upstream)  # the very image the upstream made
    assert [r["budgetRemaining"] for r in results] == [["99.8000"], ["99.6000"]]

    posts = upstream.sim.generation_requests()  # once each: no retry, no second generation
    assert [p.body["model"] for p in posts] == ["gpt-image-2", "gpt-image-2"]
    assert all("response_format" not in p.body and p.body["n"] == 1 for p in posts)
    assert upstream.sim.served_images() == 2
    assert ledger(tmp_path / "gateway.db") == [("captured", 2000, 2000)] * 2


async def test_openai_python_sdk_and_curl_against_a_gateway_process(
    gateway_process: GatewayProcess, upstream: Upstream, tmp_path: Path
) -> None:
    async with AsyncOpenAI(
        base_url=gateway_process.url + "/v1", api_key=TEAM_KEYS["design"], max_retries=0
    ) as client:
        result = await client.images.generate(model="gpt-image-1", prompt="a kite")
    (item,) = result.data
    assert item.url is not None and item.url.startswith(upstream.url)
    assert item.b64_json is not None
    assert hashlib.sha256(base64.b64decode(item.b64_json)).hexdigest() in served_pngs(upstream)
    curl = shutil.which("curl")
    if curl is not None:  # the upstream documentation's own shape, with the real curl
        proc = await asyncio.create_subprocess_exec(
            curl, "-s", gateway_process.url + "/v1/images/generations",
            "-H", f"Authorization: Bearer {TEAM_KEYS['design']}",
            "-H", "Content-Type: application/json",
            "-d", '{"model": "gpt-image-2", "prompt": "a corgi astronaut", "size": "16:9"}',
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await proc.communicate()
        answer = json.loads(out)
        assert [set(item) for item in answer["data"]] == [{"url"}]
    expected = 2 if curl is not None else 1
    assert upstream.sim.served_images() == expected
    # A sync answer leaves before its settlement commits: wait for the ledger, not for time.
    deadline = asyncio.get_running_loop().time() + 10
    while ledger(tmp_path / "gateway.db") != [("captured", 2000, 2000)] * expected:
        assert asyncio.get_running_loop().time() < deadline, ledger(tmp_path / "gateway.db")
        await asyncio.sleep(0.05)


async def test_the_demo_works_with_the_vercel_ai_sdk_as_it_starts(
    node_clients: Path, tmp_path: Path
) -> None:
    demo = GatewayProcess(None, args=("--demo", "--port", "0"), cwd=tmp_path)
    try:
        url = await demo.start()
        keys = json.loads((tmp_path / ".image-gateway-demo" / "keys.json").read_text())
        (result,) = await generate_image(url, keys["team"], "gpt-image-1")
        assert [image["mediaType"] for image in result["images"]] == ["image/png"]
        deadline = asyncio.get_running_loop().time() + 10
        async with aiohttp.ClientSession() as http:
            while True:  # the answer leaves before its settlement commits
                async with http.get(
                    url + "/v1/gateway/usage", headers={"Authorization": f"Bearer {keys['team']}"}
                ) as resp:
                    usage = await resp.json()
                if usage["spent_cny"] or asyncio.get_running_loop().time() > deadline:
                    break
                await asyncio.sleep(0.05)
        assert (usage["team"], usage["spent_cny"]) == ("demo", 0.2)
    finally:
        await demo.close()


def test_every_gpt_image_name_the_ai_sdk_lists_is_served(node_clients: Path) -> None:
    """The model ids ``@ai-sdk/openai`` offers for images (its ``OpenAIImageModelId``): each
    GPT-image one is accepted by the default config."""
    types = (
        node_clients / "node_modules" / "@ai-sdk" / "openai" / "dist" / "index.d.ts"
    ).read_text()
    union = re.search(r"type OpenAIImageModelId = ([^;]+);", types)
    assert union is not None
    names = re.findall(r"'([^']+)'", union[1])
    gpt_image = [n for n in names if n.startswith(("gpt-image-", "chatgpt-image-"))]
    assert "gpt-image-2" in gpt_image and "chatgpt-image-latest" in gpt_image
    rules = Rules(1024, DEFAULT_ALIASES)
    for name in gpt_image:
        request = normalize({"prompt": "x", "model": name}, [], endpoint="generations", rules=rules)
        assert request.model == "gpt-image-2", name
