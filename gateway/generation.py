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
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

from gateway.config import TeamConfig
from gateway.db import Database
from gateway.errors import GatewayError, UpstreamFailure, UpstreamRejected
from gateway.ledger import BudgetRefused, Hold, Settlement, Usage
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
    raw: bytes | None = None  # the upstream's body as received, when it can be passed on as is
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
    usage: Usage | None = None  # the team's usage once this request's hold was placed
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class _Running:
    """A generation in progress: ``ready`` resolves when its answer is known, ``task`` ends
    once its settlement is committed too."""

    task: asyncio.Task[None]
    ready: asyncio.Future[Outcome]


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
        self._latest: dict[tuple[str, str], _Running] = {}
        self._by_request: dict[str, _Running] = {}
        self._drain_started: float | None = None

    def is_running(self, request_id: str) -> bool:
        return request_id in self._by_request

    async def run(self, job: Job) -> Outcome:
        """Start the generation and wait for its answer (the wait may be cancelled, not the work).

        The answer comes as soon as the upstream's reply is in; its settlement is committed
        right after, while the client already reads. That is safe because a settlement never
        raises the money counted against the budget (a capture moves at most the held amount
        from reserved to spent), so if the process dies before it commits, the hold recovers
        as uncertain: still counted, never lost. Retries and drains wait for the settlement.
        """
        ready: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._generate(job, ready), name=f"generation {job.request_id}")
        running = _Running(task, ready)
        key = (job.team.name, job.fingerprint)
        self._latest[key] = running
        self._by_request[job.request_id] = running
        task.add_done_callback(lambda done: self._forget(key, job.request_id, running))
        return await asyncio.shield(ready)

    async def attach(self, team: str, fingerprint: str, since: float) -> Outcome | None:
        """For a client retry: the outcome of the attempt it repeats, if running or succeeded."""
        running = self._latest.get((team, fingerprint))
        if running is not None:
            outcome = await asyncio.shield(running.ready)
            if outcome.error is None or outcome.final:
                return _as_dedupe(outcome)  # its image, or its unknown outcome: never buy again
            # It failed for sure and cost nothing: the retry may try again.
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
            final=True,
            dedupe_of=request_id,
        )

    async def settled(self) -> None:
        """Wait until every generation started so far has committed its settlement."""
        tasks = [running.task for running in self._by_request.values()]
        if tasks:
            await asyncio.wait(tasks)

    def begin_drain(self) -> None:
        """Shutdown has begun: the drain time counts from now."""
        self._drain_started = asyncio.get_running_loop().time()

    async def drain(self, drain_s: float) -> int:
        """Wait out the drain time for running generations; cancel (mark uncertain) the rest."""
        tasks = {running.task for running in self._by_request.values()}
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

    def _forget(self, key: tuple[str, str], request_id: str, running: _Running) -> None:
        if self._latest.get(key) is running:
            del self._latest[key]
        self._by_request.pop(request_id, None)
        task = running.task
        failure = None if task.cancelled() else task.exception()
        if failure is not None:
            log.error("generation %s failed: %r", request_id, failure)
        if not running.ready.done():
            if failure is None:
                running.ready.cancel()
            else:
                running.ready.set_exception(failure)

    async def _generate(self, job: Job, ready: asyncio.Future[Outcome]) -> None:
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
            usage = await self._db.reserve(hold)
        except BudgetRefused as refused:
            error = budget_refusal(job.team, job.period, refused.usage, hold.amount)
            ready.set_result(
                Outcome(error.status, job.request_id, error=error, usage=refused.usage)
            )
            return
        self._metrics.reserve_seconds.observe(asyncio.get_running_loop().time() - started)
        outcome = Outcome(0, job.request_id, reserved=hold.amount, usage=usage)
        try:
            settlement = await self._forward(job, hold, outcome)
        except BaseException:
            # Cancelled (shutdown past the drain time) or a bug: the upstream may have worked.
            interrupted = Settlement("uncertain", hold.amount, reason="interrupted")
            await asyncio.shield(self._settle(hold, interrupted))
            raise
        ready.set_result(outcome)
        if settlement is not None:
            await self._settle(hold, settlement)

    async def _forward(self, job: Job, hold: Hold, outcome: Outcome) -> Settlement | None:
        """Send the request, fill in ``outcome``; the settlement it calls for (None: async)."""
        try:
            reply = await self._upstream.submit(
                job.path, upstream_body(job.request), dict(job.query)
            )
        except UpstreamRejected as exc:  # the upstream said no: nothing was generated
            outcome.status, outcome.error, outcome.upstream_status = exc.status, exc, exc.status
            outcome.attempts = exc.attempts
            outcome.final = (
                exc.status < 500 and exc.status != 429 and exc.code != "upstream_auth_failed"
            )
            return Settlement("released", 0, reason=exc.message[:500])
        except UpstreamFailure as exc:  # never sent (released) or the answer was lost (uncertain)
            outcome.status, outcome.error, outcome.final = exc.status, exc, exc.uncertain
            outcome.attempts = exc.attempts
            if exc.uncertain:
                return Settlement("uncertain", hold.amount, reason=exc.code)
            return Settlement("released", 0, reason=exc.code)
        outcome.status, outcome.final = reply.status, True
        outcome.payload, outcome.raw = reply.payload, reply.raw
        outcome.upstream_status, outcome.upstream_ms = reply.status, reply.upstream_ms
        outcome.attempts = reply.attempts
        self._metrics.upstream_seconds.labels(job.request.endpoint, job.mode).observe(
            reply.upstream_ms / 1000
        )
        if job.mode == "async":  # settled when the task ends; recorded before the 202 goes out
            outcome.task_id = str(reply.payload["task_id"])
            await self._tasks.submitted(
                outcome.task_id, job.team.name, job.request_id, hold.created_at
            )
            return None
        upstream_id = reply.payload.get("id")
        captured = capture(
            hold,
            len(reply.payload["data"]),
            upstream_id if isinstance(upstream_id, str) else None,
            reply.raw.decode("utf-8", "replace"),
        )
        outcome.cost, outcome.images, outcome.upstream_id = (
            captured.amount,
            captured.images,
            captured.upstream_id,
        )
        return captured

    async def _settle(self, hold: Hold, settlement: Settlement) -> None:
        stored = await self._db.settle(hold.request_id, settlement, self._clock().timestamp())
        if stored and settlement.state == "captured":
            self._metrics.captured(
                hold.team, "-", hold.quality, settlement.amount, settlement.images
            )


def _as_dedupe(outcome: Outcome) -> Outcome:
    """The same answer for a retry, which itself holds, costs and sends nothing."""
    return replace(
        outcome,
        raw=None,
        reserved=0,
        cost=0,
        images=0,
        attempts=0,
        usage=None,
        dedupe_of=outcome.request_id,
    )
