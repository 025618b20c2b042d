"""One paid generation from hold to settlement, running apart from the client's connection.

A generation runs as its own asyncio task: if the client disconnects or its handler is
cancelled, the upstream call still completes, the result is stored and the hold settled, so a
retry can collect it. Retries of the OpenAI SDK (``x-stainless-retry-count`` >= 1) attach to the
generation they repeat instead of buying a second image.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from gateway.config import TeamConfig
from gateway.db import Database
from gateway.errors import GatewayError, UpstreamFailure, UpstreamRejected
from gateway.ledger import BudgetRefused, Hold, Settlement
from gateway.metrics import Metrics
from gateway.normalize import ImageRequest
from gateway.periods import Period
from gateway.pricing import budget_refusal, capture, hold_for
from gateway.tasks import TaskTracker
from gateway.upstream import UpstreamClient
from gateway.wire import upstream_body

log = logging.getLogger("gateway.generation")

Mode = Literal["sync", "async"]


@dataclass(frozen=True, slots=True)
class Job:
    request_id: str
    team: TeamConfig
    request: ImageRequest
    path: str
    query: Mapping[str, str]
    mode: Mode
    fingerprint: str
    prices: Mapping[str, int]
    period: Period
    now: datetime


@dataclass(slots=True)
class Outcome:
    """What a generation came to; ``final`` means the upstream took the request (store, replay)."""

    status: int
    request_id: str
    payload: dict[str, Any] | None = None
    error: GatewayError | None = None
    reserved: int = 0
    cost: int = 0
    images: int = 0
    upstream_id: str | None = None
    task_id: str | None = None
    upstream_status: int | None = None
    upstream_ms: float | None = None
    attempts: int = 0
    final: bool = False
    dedupe_of: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Generations:
    def __init__(
        self,
        db: Database,
        upstream: UpstreamClient,
        tasks: TaskTracker,
        metrics: Metrics,
        clock: Callable[[], datetime],
    ) -> None:
        self._db = db
        self._upstream = upstream
        self._tasks = tasks
        self._metrics = metrics
        self._clock = clock
        self._latest: dict[tuple[str, str], asyncio.Task[Outcome]] = {}
        self._by_request: dict[str, asyncio.Task[Outcome]] = {}
        self._drain_started: float | None = None

    def is_running(self, request_id: str) -> bool:
        return request_id in self._by_request

    async def run(self, job: Job) -> Outcome:
        """Start the generation and wait for it; the wait may be cancelled, the generation not."""
        task = asyncio.create_task(self._generate(job), name=f"generation {job.request_id}")
        key = (job.team.name, job.fingerprint)
        self._latest[key] = task
        self._by_request[job.request_id] = task
        task.add_done_callback(lambda done: self._forget(key, job.request_id, done))
        return await asyncio.shield(task)

    async def attach(self, team: str, fingerprint: str, since: float) -> Outcome | None:
        """For a client retry: the outcome of the attempt it repeats, if running or succeeded."""
        running = self._latest.get((team, fingerprint))
        if running is not None:
            outcome = await asyncio.shield(running)
            return _as_dedupe(outcome)
        stored = await self._db.recent_success(team, fingerprint, since)
        if stored is None:
            return None
        request_id, result = stored
        payload = json.loads(result)
        return Outcome(
            200,
            request_id,
            payload=payload,
            upstream_id=payload.get("id"),
            images=len(payload.get("data", [])),
            final=True,
            dedupe_of=request_id,
        )

    def begin_drain(self) -> None:
        """Shutdown has begun: the drain time counts from now."""
        self._drain_started = asyncio.get_running_loop().time()

    async def drain(self, drain_s: float) -> int:
        """Wait out the drain time for running generations; cancel (mark uncertain) the rest."""
        tasks = set(self._by_request.values())
        if not tasks:
            return 0
        now = asyncio.get_running_loop().time()
        started = self._drain_started if self._drain_started is not None else now
        timeout = max(0.0, started + drain_s - now)
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        return len(pending)

    def _forget(self, key: tuple[str, str], request_id: str, task: asyncio.Task[Outcome]) -> None:
        if self._latest.get(key) is task:
            del self._latest[key]
        self._by_request.pop(request_id, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("generation %s failed: %r", request_id, task.exception())

    async def _generate(self, job: Job) -> Outcome:
        hold = hold_for(
            request_id=job.request_id,
            team=job.team,
            request=job.request,
            prices=job.prices,
            period=job.period,
            now=job.now,
            mode=job.mode,
            fingerprint=job.fingerprint,
        )
        started = asyncio.get_running_loop().time()
        try:
            await self._db.reserve(hold)
        except BudgetRefused:
            usage = await self._db.usage(job.team.name, job.period.key)
            error = budget_refusal(job.team, job.period, usage, hold.amount)
            return Outcome(error.status, job.request_id, error=error)
        self._metrics.reserve_seconds.observe(asyncio.get_running_loop().time() - started)
        try:
            return await self._forward(job, hold)
        except BaseException:
            # Cancelled (shutdown past the drain time) or a bug: the upstream may have worked.
            settle = self._settle(hold, Settlement("uncertain", hold.amount, reason="interrupted"))
            await asyncio.shield(settle)
            raise

    async def _forward(self, job: Job, hold: Hold) -> Outcome:
        outcome = Outcome(0, job.request_id, reserved=hold.amount)
        try:
            reply = await self._upstream.submit(
                job.path, upstream_body(job.request), dict(job.query)
            )
        except UpstreamRejected as exc:
            await self._settle(hold, Settlement("released", 0, reason=exc.message[:500]))
            outcome.status, outcome.error, outcome.upstream_status = exc.status, exc, exc.status
            outcome.attempts = exc.attempts
            outcome.final = (
                exc.status < 500 and exc.status != 429 and exc.code != "upstream_auth_failed"
            )
            return outcome
        except UpstreamFailure as exc:
            state = "uncertain" if exc.uncertain else "released"
            amount = hold.amount if exc.uncertain else 0
            await self._settle(hold, Settlement(state, amount, reason=exc.code))
            outcome.status, outcome.error, outcome.final = exc.status, exc, exc.uncertain
            outcome.attempts = exc.attempts
            return outcome
        outcome.upstream_status = reply.status
        outcome.upstream_ms = reply.upstream_ms
        outcome.attempts = reply.attempts
        outcome.payload = reply.payload
        self._metrics.upstream_seconds.labels(job.request.endpoint, job.mode).observe(
            reply.upstream_ms / 1000
        )
        if job.mode == "async":
            outcome.task_id = str(reply.payload["task_id"])
            await self._tasks.submitted(
                outcome.task_id, job.team.name, job.request_id, hold.created_at
            )
            outcome.status, outcome.final = reply.status, True
            return outcome
        upstream_id = reply.payload.get("id")
        settlement = capture(
            hold,
            len(reply.payload["data"]),
            upstream_id if isinstance(upstream_id, str) else None,
            reply.raw.decode("utf-8", "replace"),
        )
        await self._settle(hold, settlement)
        outcome.status, outcome.final = 200, True
        outcome.cost, outcome.images, outcome.upstream_id = (
            settlement.amount,
            settlement.images,
            settlement.upstream_id,
        )
        return outcome

    async def _settle(self, hold: Hold, settlement: Settlement) -> None:
        if await self._db.settle(hold.request_id, settlement, self._clock().timestamp()):
            self._metrics.settled(hold.team, hold.quality, settlement)


def _as_dedupe(outcome: Outcome) -> Outcome:
    return Outcome(
        outcome.status,
        outcome.request_id,
        payload=outcome.payload,
        error=outcome.error,
        images=outcome.images,
        upstream_id=outcome.upstream_id,
        task_id=outcome.task_id,
        final=outcome.final,
        dedupe_of=outcome.request_id,
    )
