"""A simulated upstream that behaves like the real one: the demo's backend and the tests' fake.

It validates requests the way ``docs/upstream.md`` documents (and independently of the
gateway's own normalizer, so the two check each other), answers sync and ``?async=1`` requests,
keeps tasks, and serves result URLs that answer 302 to a real PNG. Everything it receives is
recorded in ``received`` so tests can assert exactly what reached it, and everything it delivered
(and would bill) in ``served``, which ``GET /__served`` lists for a rehearsed reconciliation.

Prompts containing ``[refuse]`` are refused like a content-policy rejection; ``[fail]`` makes the
generation fail (a JSON 500, or a ``failed`` task).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from gateway.upstream.pngs import solid_png

RATIOS = {
    "1:1",
    "3:2",
    "2:3",
    "4:3",
    "3:4",
    "5:4",
    "4:5",
    "16:9",
    "9:16",
    "2:1",
    "1:2",
    "21:9",
    "9:21",
}
PRICES = {"low": 0.10, "medium": 0.20, "high": 0.40, "auto": 0.20}
PIXELS = re.compile(r"\d{1,5}x\d{1,5}")
DATA_URL = re.compile(r"data:image/[a-z+.-]+;base64,(.*)", re.S)
PROVIDER = "icodeeasy.cc"


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: dict[str, Any] | None
    content_type: str


@dataclass(frozen=True)
class Served:
    """Images delivered, as a provider's usage details would bill them."""

    id: str  # the generation's id, or the task's
    kind: str  # "generation" (a sync answer) or "task" (once it reported completed)
    quality: str
    images: int
    cost_cny: float
    served_at: float

    def as_json(self) -> dict[str, Any]:
        at = datetime.fromtimestamp(self.served_at, UTC).isoformat(timespec="milliseconds")
        return {
            "id": self.id,
            "kind": self.kind,
            "quality": self.quality,
            "images": self.images,
            "cost_cny": self.cost_cny,
            "served_at": at.replace("+00:00", "Z"),
        }


@dataclass
class SimTask:
    task_id: str
    request: dict[str, Any]
    ready_at: float
    status: str = "pending"
    urls: list[str] = field(default_factory=list)


class Simulator:
    """Mount ``.app()`` on a server. ``api_key`` None accepts any ``sk_`` key (a simulator
    shared by several gateways); ``record=False`` keeps no copy of what it receives (a long
    rehearsal, whose bodies carry images)."""

    def __init__(
        self,
        api_key: str | None,
        *,
        delay_s: float = 0.0,
        task_delay_s: float | None = None,
        record: bool = True,
        prices: dict[str, float] | None = None,
    ) -> None:
        self.api_key = api_key
        self.prices = {**PRICES, **(prices or {})}  # what a task reports as its cost, per image
        self.delay_s = delay_s
        self.task_delay_s = delay_s if task_delay_s is None else task_delay_s
        self.record = record
        self.received: list[Received] = []
        self.tasks: dict[str, SimTask] = {}
        self.generated = 0
        self.served: list[Served] = []
        self._images: dict[str, tuple[int, int, tuple[int, int, int]]] = {}

    def app(self, middlewares: Iterable[Any] = ()) -> web.Application:
        app = web.Application(middlewares=list(middlewares), client_max_size=512 * 1024 * 1024)
        for prefix in ("/v1", ""):
            app.router.add_post(f"{prefix}/images/generations", self._generate)
            app.router.add_post(f"{prefix}/images/edits", self._generate)
        app.router.add_get("/v1/images/tasks/{task_id}", self._task)
        app.router.add_get("/v1/images/files/gpt-image-2/{day}/{name}", self._file)
        app.router.add_get("/objects/{name}", self._object)
        app.router.add_get("/__served", self._served)
        return app

    def served_images(self) -> int:
        """Images delivered: in sync answers, and in tasks once they reported completed."""
        return sum(served.images for served in self.served)

    def served_json(self) -> dict[str, Any]:
        """``GET /__served``: what was delivered, oldest first, and the totals."""
        return {
            "served": [served.as_json() for served in self.served],
            "count": len(self.served),
            "images": self.served_images(),
            "cost_cny": round(sum(served.cost_cny for served in self.served), 4),
        }

    def generation_requests(self) -> list[Received]:
        return [r for r in self.received if r.method == "POST"]

    def task_polls(self, task_id: str | None = None) -> list[Received]:
        return [
            r
            for r in self.received
            if r.method == "GET"
            and "/tasks/" in r.path
            and (task_id is None or r.path.endswith(task_id))
        ]

    def finish_task(self, task_id: str, status: str = "completed") -> None:
        """Make a task terminal now, whatever its delay."""
        task = self.tasks[task_id]
        task.ready_at = 0.0
        if status == "failed":
            task.request["prompt"] = "[fail]"

    # -- handlers ---------------------------------------------------------------------------

    async def _generate(self, request: web.Request) -> web.Response:
        body = await self._read(request)
        self._record(request, body)
        denied = self._check_auth(request)
        if denied is not None:
            return denied
        if body is None:
            return _error(400, "invalid_request_error", "body must be JSON or multipart/form-data")
        problem = validate(body)
        if problem:
            return _error(400, "invalid_request_error", problem)
        prompt = body["prompt"]
        if "[refuse]" in prompt:
            return _error(
                400, "invalid_request_error", "Your request was rejected by the safety system."
            )
        if request.query.get("async", "").lower() in ("1", "true", "yes"):
            task = SimTask(str(uuid.uuid4()), body, time.monotonic() + self.task_delay_s)
            self.tasks[task.task_id] = task
            self.generated += 1
            return web.json_response({"status": "pending", "task_id": task.task_id}, status=202)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if "[fail]" in prompt:
            return _error(500, "server_error", "Image generation failed; you were not charged.")
        request_id = str(uuid.uuid4())
        urls = self._make_images(request, request_id, body)
        self.generated += 1
        self._serve(request_id, "generation", body, len(urls))
        return web.json_response(
            {"created": int(time.time()), "data": [{"url": url} for url in urls], "id": request_id}
        )

    async def _task(self, request: web.Request) -> web.Response:
        self._record(request, None)
        denied = self._check_auth(request)
        if denied is not None:
            return denied
        task = self.tasks.get(request.match_info["task_id"])
        if task is None:
            return _error(404, "invalid_request_error", "task not found")
        if task.status == "pending" and time.monotonic() >= task.ready_at:
            if "[fail]" in task.request["prompt"]:
                task.status = "failed"
            else:
                task.status = "completed"
                task.urls = self._make_images(request, task.task_id, task.request)
                self._serve(task.task_id, "task", task.request, len(task.urls))
        answer: dict[str, Any] = {
            "task_id": task.task_id,
            "status": task.status,
            "model": "gpt-image-2",
        }
        if task.status == "completed":
            answer["cost"] = self._cost(task.request, task.request.get("n", 1))
            answer["result_url"] = task.urls[0]
            if len(task.urls) > 1:  # one URL per image besides the documented result_url
                answer["data"] = [{"url": url} for url in task.urls]
        if task.status == "failed":
            answer["error"] = "generation failed"
        return web.json_response(answer)

    async def _served(self, request: web.Request) -> web.Response:
        return web.json_response(self.served_json())

    async def _file(self, request: web.Request) -> web.StreamResponse:
        self._record(request, None)
        name = request.match_info["name"]
        if name.removesuffix(".png") not in self._images:
            return _error(404, "invalid_request_error", "no such file")
        raise web.HTTPFound(f"/objects/{name}")

    async def _object(self, request: web.Request) -> web.Response:
        width, height, rgb = self._images.get(
            request.match_info["name"].removesuffix(".png"), (0, 0, (0, 0, 0))
        )
        if not width:
            raise web.HTTPNotFound()
        return web.Response(body=solid_png(width, height, rgb), content_type="image/png")

    # -- helpers ----------------------------------------------------------------------------

    def _cost(self, body: dict[str, Any], images: int) -> float:
        """What the provider bills: this simulator's price of the quality, per image."""
        return round(self.prices[body.get("quality", "medium")] * images, 4)

    def _check_auth(self, request: web.Request) -> web.Response | None:
        presented = request.headers.get("Authorization", "")
        if self.api_key is None:
            scheme, _, key = presented.partition(" ")
            accepted = scheme == "Bearer" and key.startswith("sk_") and len(key) > 3
            accepted = accepted and key.isprintable() and not any(ch.isspace() for ch in key)
        else:
            accepted = presented == f"Bearer {self.api_key}"
        if not accepted:
            return _error(401, "authentication_error", "Invalid API key.")
        return None

    def _serve(self, served_id: str, kind: str, body: dict[str, Any], images: int) -> None:
        quality = body.get("quality", "medium")
        self.served.append(
            Served(served_id, kind, quality, images, self._cost(body, images), time.time())
        )

    def _record(self, request: web.Request, body: dict[str, Any] | None) -> None:
        if not self.record:
            return
        self.received.append(
            Received(
                request.method,
                request.path,
                dict(request.query),
                dict(request.headers),
                body,
                request.content_type,
            )
        )

    async def _read(self, request: web.Request) -> dict[str, Any] | None:
        if request.content_type == "multipart/form-data":
            form = await request.post()
            body: dict[str, Any] = {}
            for name, value in form.items():
                if isinstance(value, web.FileField):
                    data = base64.b64encode(value.file.read()).decode()
                    body.setdefault("image_urls", []).append(f"data:image/png;base64,{data}")
                else:
                    body[name] = int(value) if name == "n" and value.isdigit() else value
            return body
        try:
            value = json.loads(await request.read())
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def _make_images(
        self, request: web.Request, request_id: str, body: dict[str, Any]
    ) -> list[str]:
        ratio = body.get("size", "1:1")
        width, height = _dimensions(ratio if ratio in RATIOS else "1:1")
        digest = hashlib.sha256(body["prompt"].encode()).digest()
        day = datetime.now(UTC).strftime("%Y%m%d")
        urls = []
        for seq in range(1, int(body.get("n", 1)) + 1):
            name = f"{request_id}-{seq}"
            self._images[name] = (
                width,
                height,
                (digest[0], digest[1], (digest[2] + 40 * seq) % 256),
            )
            urls.append(
                f"{request.scheme}://{request.host}/v1/images/files/gpt-image-2/{day}/{name}.png"
            )
        return urls


def validate(body: dict[str, Any]) -> str | None:
    """The upstream's own checks, as documented; None when the request is acceptable."""
    if body.get("model") != "gpt-image-2":
        return "model must be gpt-image-2"
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        return "prompt is required"
    n = body.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 10:
        return "n must be an integer from 1 to 10"
    size = body.get("size", "1:1")
    if not isinstance(size, str) or not (
        size in RATIOS or size == "auto" or PIXELS.fullmatch(size)
    ):
        return f"unsupported size {size!r}"
    if body.get("resolution", "1k") not in ("1k", "2k"):
        return "resolution must be 1k or 2k"
    if body.get("quality", "medium") not in PRICES:
        return "quality must be low, medium, high or auto"
    refs = [*(body.get("image_urls") or []), *(body.get("image_input") or [])]
    if len(refs) > 16:
        return "at most 16 reference images"
    for ref in refs:
        problem = _check_ref(ref)
        if problem:
            return problem
    return None


def _check_ref(ref: object) -> str | None:
    if not isinstance(ref, str):
        return "reference images must be strings"
    match = DATA_URL.fullmatch(ref)
    if match:
        try:
            base64.b64decode(match[1], validate=True)
        except (binascii.Error, ValueError):
            return "invalid base64 image"
        return None
    if not ref.startswith("https://") or len(ref) <= len("https://"):
        return "reference URLs must be https://"
    return None


def _dimensions(ratio: str) -> tuple[int, int]:
    w, h = (int(x) for x in ratio.split(":"))
    scale = 96 / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _error(status: int, type_: str, message: str) -> web.Response:
    return web.json_response(
        {"error": {"type": type_, "message": message, "provider": PROVIDER}}, status=status
    )
