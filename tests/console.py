"""A console user over plain HTTP: a cookie jar, the forms' tokens read from the pages."""

from __future__ import annotations

import asyncio
import html
import json
import re
import sys
from typing import Any

import aiohttp

from tests.conftest import Gateway

TOKEN = re.compile(r'name="csrf" value="([^"]+)"')


class ConsoleUser:
    """``async with ConsoleUser(gateway) as user: await user.sign_in(key)``."""

    def __init__(self, gateway: Gateway) -> None:
        self.url = gateway.url
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))

    async def __aenter__(self) -> ConsoleUser:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.close()

    async def get(self, path: str) -> tuple[int, str, aiohttp.ClientResponse]:
        async with self.http.get(self.url + path, allow_redirects=False) as resp:
            return resp.status, await resp.text(), resp

    async def post(
        self, path: str, form: dict[str, str]
    ) -> tuple[int, str, aiohttp.ClientResponse]:
        async with self.http.post(self.url + path, data=form, allow_redirects=False) as resp:
            return resp.status, await resp.text(), resp

    async def token(self, path: str = "/console/") -> str:
        status, page, _ = await self.get(path)
        assert status == 200, (status, page)
        return html.unescape(TOKEN.search(page)[1])  # type: ignore[index]

    async def sign_in(self, key: str) -> aiohttp.ClientResponse:
        """Sign in through the form; the answer (a 303 on success)."""
        token = await self.token()
        status, page, resp = await self.post("/console/signin", {"key": key, "csrf": token})
        assert status == 303, (status, page)
        return resp

    async def json(self, path: str) -> dict[str, Any]:
        status, body, _ = await self.get(path)
        assert status == 200, (status, body)
        return json.loads(body)

    def session_cookie(self) -> str:
        return next(c.value for c in self.http.cookie_jar if c.key == "igw_console")


async def cli(gateway: Gateway, tmp_path: Any, *args: str) -> tuple[int, str, str]:
    """``image-gateway ARGS --config <this gateway's config>`` in a subprocess."""
    config = gateway.config_file(tmp_path / "cli.toml")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args, "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=gateway.cli_env(),
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()
