"""A fast fake of the upstream images API, run as its own process by the harness.

It answers like ``gateway.simulator.Simulator`` (same JSON shapes, same key check, same request
validation for small bodies) but keeps only counters, never a list of what it received, so it
stays small and quick however long a benchmark runs. ``GET /_bench/stats`` returns the counters
(the polling storm needs the number of task polls that reached it).

Delays: ``--delay-s`` for sync generations and ``--task-delay-s`` for async tasks, overridable
per request by a ``[sleep=S]`` or ``[task=S]`` tag in the prompt, so one process can answer a
warm-up quickly and then hold 2,000 requests for 20 s. Bodies over 1 MiB (or of unknown length)
are neither parsed nor held: they are read a chunk at a time and their reference images counted
from the bytes, so a 100 MB upload never stalls this process (the upload and fairness scenarios
measure the gateway, not the fake).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import time
import uuid
from collections import Counter
from typing import Any

from aiohttp import web

from bench.serving import serve_until_signalled
from gateway.upstream.simulator import validate

PARSE_LIMIT = 1024 * 1024
SLEEP_TAG = re.compile(r"\[sleep=([0-9.]+)\]")
TASK_TAG = re.compile(r"\[task=([0-9.]+)\]")
DATA_URL_MARK = b"data:image/"
PART_MARK = b'name="image'


class FakeUpstream:
    """The handlers and counters of the fake upstream."""

    def __init__(self, api_key: str, delay_s: float, task_delay_s: float) -> None:
        self.auth = f"Bearer {api_key}"
        self.delay_s = delay_s
        self.task_delay_s = task_delay_s
        self.stats: Counter[str] = Counter()
        self.tasks: dict[str, float] = {}
        self.day = time.strftime("%Y%m%d")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=512 * 1024 * 1024)
        for prefix in ("/v1", ""):
            app.router.add_post(f"{prefix}/images/generations", self.generate)
            app.router.add_post(f"{prefix}/images/edits", self.generate)
        app.router.add_get("/v1/images/tasks/{task_id}", self.task)
        app.router.add_get("/_bench/stats", self.get_stats)
        app.router.add_post("/_bench/reset", self.reset)
        return app

    async def generate(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != self.auth:
            self.stats["unauthorized"] += 1
            return _error(401, "authentication_error", "Invalid API key.")
        length = request.content_length
        if length is None or length > PARSE_LIMIT or request.content_type != "application/json":
            prompt, problem = await self._swallow(request)
        else:
            raw = await request.read()
            self.stats["bytes_in"] += len(raw)
            prompt, problem = self._inspect(raw)
        if problem:
            self.stats["invalid"] += 1
            return _error(400, "invalid_request_error", problem)
        if request.query.get("async", "").lower() in ("1", "true", "yes"):
            task_id = str(uuid.uuid4())
            self.tasks[task_id] = time.monotonic() + _tag(TASK_TAG, prompt, self.task_delay_s)
            self.stats["async_submits"] += 1
            return web.json_response({"status": "pending", "task_id": task_id}, status=202)
        delay = _tag(SLEEP_TAG, prompt, self.delay_s)
        self.stats["held_now"] += 1
        self.stats["held_peak"] = max(self.stats["held_peak"], self.stats["held_now"])
        try:
            if delay:
                await asyncio.sleep(delay)
        finally:
            self.stats["held_now"] -= 1
        self.stats["generations"] += 1
        request_id = str(uuid.uuid4())
        url = f"http://{request.host}/v1/images/files/gpt-image-2/{self.day}/{request_id}-1.png"
        body = {"created": int(time.time()), "data": [{"url": url}], "id": request_id}
        return web.Response(body=json.dumps(body).encode(), content_type="application/json")

    async def task(self, request: web.Request) -> web.Response:
        self.stats["task_polls"] += 1
        if request.headers.get("Authorization") != self.auth:
            return _error(401, "authentication_error", "Invalid API key.")
        task_id = request.match_info["task_id"]
        ready_at = self.tasks.get(task_id)
        if ready_at is None:
            return _error(404, "invalid_request_error", "task not found")
        answer: dict[str, Any] = {"task_id": task_id, "status": "pending", "model": "gpt-image-2"}
        if time.monotonic() >= ready_at:
            answer.update(
                status="completed",
                cost=0.2,
                result_url=f"http://{request.host}/v1/images/files/gpt-image-2/{self.day}/"
                f"{task_id}-1.png",
            )
        return web.json_response(answer)

    async def get_stats(self, _request: web.Request) -> web.Response:
        return web.json_response(dict(self.stats))

    async def reset(self, _request: web.Request) -> web.Response:
        held = self.stats["held_now"]
        self.stats.clear()
        self.stats["held_now"] = held
        return web.json_response({"ok": True})

    async def _swallow(self, request: web.Request) -> tuple[str, None]:
        """Read a big body chunk by chunk, counting its reference images; keep none of it."""
        mark = DATA_URL_MARK if request.content_type == "application/json" else PART_MARK
        refs = total = 0
        tail = b""
        async for chunk in request.content.iter_any():
            total += len(chunk)
            window = tail + chunk[: len(mark) - 1] if tail else b""
            refs += window.count(mark) + chunk.count(mark)
            tail = chunk[-(len(mark) - 1) :]
        self.stats["bytes_in"] += total
        self._count_refs(refs)
        return "", None

    def _count_refs(self, refs: int) -> None:
        self.stats["refs_seen"] += refs
        self.stats["max_refs"] = max(self.stats["max_refs"], refs)

    def _inspect(self, raw: bytes) -> tuple[str, str | None]:
        """The prompt (for delay tags) and a validation problem, or None when acceptable."""
        try:
            body = json.loads(raw)
        except ValueError:
            return "", "body must be JSON"
        if not isinstance(body, dict):
            return "", "body must be a JSON object"
        self._count_refs(len(body.get("image_urls") or []))
        return str(body.get("prompt", "")), validate(body)


def _tag(pattern: re.Pattern[str], prompt: str, default: float) -> float:
    match = pattern.search(prompt)
    return float(match[1]) if match else default


def _error(status: int, type_: str, message: str) -> web.Response:
    return web.json_response(
        {"error": {"type": type_, "message": message, "provider": "bench"}}, status=status
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--key-env", default="BENCH_UPSTREAM_KEY")
    parser.add_argument("--delay-s", type=float, default=0.0)
    parser.add_argument("--task-delay-s", type=float, default=60.0)
    args = parser.parse_args()
    fake = FakeUpstream(os.environ[args.key_env], args.delay_s, args.task_delay_s)
    asyncio.run(serve_until_signalled(fake.app(), backlog=4096))


if __name__ == "__main__":
    main()
