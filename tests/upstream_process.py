"""A fake upstream as a real process: the simulator with a key of its own, faults set over HTTP.

    python -m tests.upstream_process --key sk_... [--port N] [--price high=0.30]

prints ``listening on http://127.0.0.1:PORT`` once it accepts connections. Its control routes
(loopback only, no key; GET, so that no queued POST fault ever takes one of them):

- ``/__fault?spec=<json>``: queue a fault from ``tests.fakes`` for the next matching request,
  ``{"fault": "json_error", "args": [503, "server_error", "busy"], "kind": "POST"}``;
- ``/__state``: what reached it (generations, task polls per task, images served, task ids);
- ``/__finish?task_id=ID&status=completed``: make a task terminal now.

``UpstreamProcess`` is the test side: start, stop (or kill), restart on the same port, control.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from gateway.upstream.simulator import Simulator
from tests import fakes

ROOT = Path(__file__).resolve().parent.parent
FAULTS = {
    "json_error": fakes.json_error,
    "html_error": fakes.html_error,
    "hang": fakes.hang,
    "reset_after_read": fakes.reset_after_read,
    "reset_mid_body": fakes.reset_mid_body,
    "truncated_body": fakes.truncated_body,
}
READY = "listening on "


# -- the process ------------------------------------------------------------------------------


def control_routes(
    app: web.Application, sim: Simulator, plan: fakes.FaultPlan, posts: list[int]
) -> None:
    async def fault(request: web.Request) -> web.Response:
        spec = json.loads(request.query["spec"])
        make = FAULTS[spec["fault"]]
        plan.add(make(*spec.get("args", []), **spec.get("kwargs", {})), spec.get("kind", "POST"))
        return web.json_response({"queued": len(plan.queue)})

    async def state(request: web.Request) -> web.Response:
        polls: dict[str, int] = {}
        for received in sim.task_polls():
            task_id = received.path.rsplit("/", 1)[-1]
            polls[task_id] = polls.get(task_id, 0) + 1
        return web.json_response(
            {
                "generations": posts[0],  # every POST that arrived, faults included
                "task_polls": polls,
                "served": [[served.id, served.images] for served in sim.served],
                "served_images": sim.served_images(),
                "tasks": sorted(sim.tasks),
                "faults_left": len(plan.queue),
            }
        )

    async def finish(request: web.Request) -> web.Response:
        sim.finish_task(request.query["task_id"], request.query.get("status", "completed"))
        return web.json_response({"finished": True})

    app.router.add_get("/__fault", fault)
    app.router.add_get("/__state", state)
    app.router.add_get("/__finish", finish)


async def serve(key: str, port: int, prices: dict[str, float]) -> None:
    sim = Simulator(key, task_delay_s=3600, prices=prices)  # tasks finish when a test says so
    plan = fakes.FaultPlan()
    posts = [0]

    @web.middleware
    async def count(request: web.Request, handler: Any) -> web.StreamResponse:
        posts[0] += request.method == "POST"
        return await handler(request)

    app = sim.app(middlewares=[count, plan.middleware])
    control_routes(app, sim, plan, posts)
    # a hung handler (the "hang" fault) must not hold a stop for long: nothing waits on it
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    print(f"{READY}http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--key", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--price", action="append", default=[], help="quality=CNY")
    args = parser.parse_args()
    prices = {q: float(v) for q, _, v in (p.partition("=") for p in args.price)}
    asyncio.run(serve(args.key, args.port, prices))


# -- the test side ----------------------------------------------------------------------------


class UpstreamProcess:
    """One fake upstream process, named as the gateway's config names it."""

    def __init__(self, name: str, key: str, prices: dict[str, str] | None = None) -> None:
        self.name = name
        self.key = key
        self.prices = prices or {}
        self.url = ""
        self.port = 0
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> str:
        prices = [arg for q, v in self.prices.items() for arg in ("--price", f"{q}={v}")]
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.upstream_process", "--key", self.key,
            "--port", str(self.port), *prices,
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = (await asyncio.wait_for(self.proc.stdout.readline(), 30)).decode()
        assert line.startswith(READY), f"the fake upstream {self.name} did not start: {line!r}"
        self.url = line[len(READY) :].strip()
        self.port = int(self.url.rsplit(":", 1)[1])
        return self.url

    async def kill(self) -> None:
        """Gone at once, as a crashed host: its port refuses connections."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    async def restart(self) -> None:
        """Back on the same port (with an empty memory)."""
        await self.kill()
        await self.start()

    async def fault(self, fault: str, *args: Any, kind: str = "POST", **kwargs: Any) -> None:
        spec = json.dumps({"fault": fault, "args": args, "kwargs": kwargs, "kind": kind})
        await self._get("/__fault", spec=spec)

    async def state(self) -> dict[str, Any]:
        return await self._get("/__state")

    async def finish(self, task_id: str, status: str = "completed") -> None:
        await self._get("/__finish", task_id=task_id, status=status)

    async def _get(self, path: str, **query: str) -> dict[str, Any]:
        async with aiohttp.ClientSession() as http:
            async with http.get(self.url + path, params=query) as resp:
                assert resp.status == 200, await resp.text()
                return dict(await resp.json())

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                await self.kill()


if __name__ == "__main__":
    main()
