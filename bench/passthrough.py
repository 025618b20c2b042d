"""The Python floor: a bare aiohttp proxy that reads the body, forwards it, returns the answer.

No auth, no budget, no log, no metrics, one shared ``ClientSession``: whatever the gateway costs
beyond this is the price of its features, not of Python or aiohttp. It swaps the client's key for
the central one, as the gateway does, so the same request works through both.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from bench.serving import serve_until_signalled

SESSION = web.AppKey("session", aiohttp.ClientSession)
FORWARDED = ("Content-Type",)


def make_app(upstream: str, api_key: str) -> web.Application:
    """The passthrough app forwarding every GET and POST to ``upstream``."""
    auth = f"Bearer {api_key}"

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            app[SESSION] = session
            yield

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {name: request.headers[name] for name in FORWARDED if name in request.headers}
        headers["Authorization"] = auth
        async with request.app[SESSION].request(
            request.method, upstream + request.path_qs, data=body or None, headers=headers
        ) as resp:
            data = await resp.read()
            return web.Response(body=data, status=resp.status, content_type=resp.content_type)

    app = web.Application(client_max_size=512 * 1024 * 1024)
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--upstream", required=True, help="base URL of the (fake) upstream")
    parser.add_argument("--key-env", default="BENCH_UPSTREAM_KEY")
    args = parser.parse_args()
    app = make_app(args.upstream.rstrip("/"), os.environ[args.key_env])
    asyncio.run(serve_until_signalled(app))


if __name__ == "__main__":
    main()
