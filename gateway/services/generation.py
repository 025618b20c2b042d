"""One paid generation from hold to settlement, running apart from the client's connection.

A generation runs as its own asyncio task: if the client disconnects or its handler is
cancelled, the upstream call still completes, the result is stored and the hold settled, so a
retry can collect it. Retries of the OpenAI SDK (``x-stainless-retry-count`` >= 1) attach to the
generation they repeat instead of buying a second image.

What settles is decided by ``gateway.core.settlement``; this module only orchestrates: reserve,
send, answer, then commit the settlement (retried until it lands, the result kept in memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from functools import partial
from typing import Literal

from gateway.core.config import KeyConfig, TeamConfig
from gateway.core.errors import (
    GatewayError,
    StorageUnavailable,
    UpstreamFailure,
    UpstreamRejected,
    UpstreamUnavailable,
)
from gateway.core.ledger import BudgetRefused, Hold, Settlement, Usage
from gateway.core.normalize import ImageRequest
from gateway.core.periods import Period
from gateway.core.pricing import budget_refusal, hold_for
from gateway.core.results import payload_urls
from gateway.core.settlement import capture_reply, interrupted, release, uncertain
from gateway.core.wire import upstream_body
from gateway.ops.metrics import Metrics
from gateway.services import late
from gateway.services.books import Books, LogSlot, MoneyMoved
from gateway.services.durable import Durable
from gateway.services.outcomes import (
    Answer,
    Dedupe,
    Failed,
    Fresh,
    Retryable,
    Task,
    Trace,
    from_attempt,
    still_running,
)
from gateway.services.results import Paid
from gateway.services.routing import Plan, Routed, Routing
from gateway.services.tasks import TaskTracker
from gateway.store.base import Closed, DuplicateTask
from gateway.store.manager import Store
from gateway.upstream.base import Reply, SendState

log = logging.getLogger("gateway.generation")

Mode = Literal["sync", "async"]
CANCEL_GRACE_S = 5.0
ATTACH_POLL_S = 0.1  # how often a retry looks at the shared ledger for its original's outcome


@dataclass(frozen=True, slots=True)
class Job:
    request_id: str
    team: TeamConfig
    request: ImageRequest
    path: str
    query: Mapping[str, str]
    mode: Mode
    fingerprint: str
    period: Period
    now: datetime
    slot: LogSlot | None = None  # the request's access-log line, while money can join it
    key: KeyConfig | None = None
    reuse_key: str | None = None  # what the opt-in cache finds its result by (core.wire)
    retry_count: int = 0  # x-stainless-retry-count: the OpenAI SDK's retries of one request


@dataclass(slots=True)
class _Running:
    """A generation in progress: ``ready`` resolves when its answer is known, ``task`` ends
    once its settlement is committed too."""

    task: asyncio.Task[None]
    ready: asyncio.Future[Fresh]


class Generations:
    def __init__(
        self,
        *,
        db: Store,
        routing: Routing,
        tasks: TaskTracker,
        metrics: Metrics,
        books: Books,
        durable: Durable,
        clock: Callable[[], datetime],
        attach_timeout_s: float = 300.0,
        on_paid: Callable[[Paid], None] = lambda paid: None,
    ) -> None:
        self._db = db
        self._on_paid = on_paid
        self._routing = routing
        self._tasks = tasks
        self._metrics = metrics
        self._books = books
        self._durable = durable
        self._clock = clock
        self._attach_timeout_s = attach_timeout_s
        self._latest: dict[tuple[str, str], _Running] = {}
        self._by_request: dict[str, _Running] = {}
        self._drain_started: float | None = None

    def is_running(self, request_id: str) -> bool:
        return request_id in self._by_request

    def settling(self, request_id: str) -> asyncio.Task[None] | None:
        """The generation's task while its settlement is not yet committed."""
        running = self._by_request.get(request_id)
        return running.task if running is not None else None

    async def answer(self, job: Job, *, dedupe_window_s: float) -> Fresh | Dedupe:
        """The request's outcome. An SDK retry (``job.retry_count`` >= 1) gets the outcome of
        the attempt it repeats, if one of the last ``dedupe_window_s`` seconds did not fail for
        sure (see ``attach``); any other request runs a generation of its own."""
        if job.retry_count >= 1:
            since = job.now.timestamp() - dedupe_window_s
            attached = await self.attach(job.team.name, job.fingerprint, since)
            if attached is not None:
                return attached
        return await self.run(job)

    async def run(self, job: Job) -> Fresh:
        """Start the generation and wait for its answer (the wait may be cancelled, not the work).

        The answer comes as soon as the upstream's reply is in; its settlement is committed
        right after, while the client already reads. That is safe because a sync settlement
        never raises the money counted against the budget (a capture moves at most the held
        amount from reserved to spent), so if the process dies before it commits, the hold
        recovers as uncertain: still counted, never lost. Retries and drains wait for it.
        """
        ready: asyncio.Future[Fresh] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._generate(job, ready), name=f"generation {job.request_id}")
        running = _Running(task, ready)
        key = (job.team.name, job.fingerprint)
        self._latest[key] = running
        self._by_request[job.request_id] = running
        task.add_done_callback(partial(self._forget, key, job.request_id, running))
        return await asyncio.shield(ready)

    async def attach(self, team: str, fingerprint: str, since: float) -> Dedupe | Failed | None:
        """For a client retry: the outcome of the attempt it repeats, wherever it ran.

        Running here: its answer. Running on another live instance: waited for (a bounded
        poll of the shared ledger). Captured: its stored result. Uncertain: a clear error,
        never a second paid generation. Failed for sure (released): None, try again.
        """
        running = self._latest.get((team, fingerprint))
        if running is not None:
            outcome = await asyncio.shield(running.ready)
            if isinstance(outcome, Retryable):
                return None  # it failed for sure and cost nothing: the retry may try again
            return Dedupe(outcome)  # its image, or its unknown outcome: never buy again
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._attach_timeout_s
        attempt = await self._db.latest_attempt(team, fingerprint, since)
        while attempt is not None and attempt.state == "held" and attempt.live:
            if loop.time() >= deadline:
                return still_running(attempt.request_id)
            await asyncio.sleep(ATTACH_POLL_S)
            attempt = await self._db.latest_attempt(team, fingerprint, since)
        return from_attempt(attempt)

    async def settled(self) -> None:
        """Wait until every generation started so far has committed its settlement."""
        tasks = [running.task for running in self._by_request.values()]
        if tasks:
            await asyncio.wait(tasks)

    def begin_drain(self) -> None:
        """Shutdown has begun: the drain time counts from now."""
        self._drain_started = asyncio.get_running_loop().time()

    async def drain(self, drain_s: float) -> int:
        """Wait out the drain time for running generations; cancel the rest (a request that
        never left is released, one that did is uncertain)."""
        tasks = {running.task for running in self._by_request.values()}
        if not tasks:
            return 0
        now = asyncio.get_running_loop().time()
        started = self._drain_started if self._drain_started is not None else now
        timeout = max(0.0, started + drain_s - now)
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:  # a settlement that cannot be stored must not hold the shutdown forever
            await asyncio.wait(pending, timeout=CANCEL_GRACE_S)
        return len(pending)

    def _forget(
        self, key: tuple[str, str], request_id: str, running: _Running, _: object = None
    ) -> None:
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

    async def _generate(self, job: Job, ready: asyncio.Future[Fresh]) -> None:
        refused = Trace(job.request_id)
        try:
            plan = self._routing.plan(job.request.quality)
        except UpstreamUnavailable as exc:  # nothing is reserved
            ready.set_result(Retryable(refused, exc))
            return
        hold = hold_for(
            request_id=job.request_id,
            team=job.team,
            request=job.request,
            price=plan.price,
            period=job.period,
            now=job.now,
            mode=job.mode,
            fingerprint=job.fingerprint,
            key=job.key,
        )
        started = time.perf_counter()
        try:
            usage = await self._reserve(hold)
        except BudgetRefused as budget:
            key = job.key if budget.scope == "key" else None
            error = budget_refusal(job.team, job.period, budget.usage, hold.amount, key)
            ready.set_result(Retryable(replace(refused, usage=budget.usage), error))
            return
        except StorageUnavailable as exc:  # nothing is sent
            # The hold may have committed all the same (its acknowledgement lost): release it,
            # a no-op if there is none; once before answering, and if that fails, durably.
            unsent = release("not sent: the reservation was not acknowledged")
            now = self._clock().timestamp()

            async def release_unsent() -> None:
                self._report(hold, unsent, await self._settle(hold.request_id, unsent, now), job)

            try:
                await release_unsent()
            except StorageUnavailable:
                self._durable.later(f"release of {hold.request_id}", release_unsent)
            ready.set_result(Retryable(refused, exc))
            return
        self._metrics.reserve_seconds.observe(time.perf_counter() - started)
        state = SendState()
        try:
            outcome, settlement = await self._forward(job, hold, usage, plan, state)
        except BaseException:
            # Cancelled (shutdown past the drain time) or a bug: the upstream may have worked.
            config = self._routing.config(state.upstream) if state.upstream else None
            price = config.prices[hold.quality] if config is not None else None
            cut = interrupted(hold, sent=state.whole, upstream=state.upstream, price=price)
            await asyncio.shield(self._commit(job, hold, cut))
            raise
        if isinstance(outcome, Answer):
            self._kept(job, outcome, hold.created_at)
        ready.set_result(outcome)
        if settlement is not None:
            await self._commit(job, hold, settlement)

    def _kept(self, job: Job, outcome: Answer, created_at: float) -> None:
        """Hand a paid result's images to the result store (it fetches them in the background)."""
        urls = tuple(payload_urls(outcome.payload))
        sync = job.mode == "sync"
        paid = Paid(
            job.request_id,
            job.team.name,
            outcome.trace.upstream,
            urls,
            job.reuse_key if sync else None,
            created_at,
            urgent=sync and job.request.response_format != "url",
        )
        try:
            self._on_paid(paid)
        except Exception:  # never the paid answer's problem
            log.exception("handing %s to the result store failed", job.request_id)

    async def _reserve(self, hold: Hold) -> Usage:
        """The durable hold. Cancelled while it is being written, the write may land all the
        same: then nothing was sent, so it is released at once instead of left to recovery."""
        reserving = asyncio.ensure_future(self._db.reserve(hold))
        try:
            return await asyncio.shield(reserving)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await reserving
                cancelled = release("cancelled before the request was sent")
                await self._db.settle(hold.request_id, cancelled, self._clock().timestamp())
            raise

    async def _forward(
        self, job: Job, hold: Hold, usage: Usage, plan: Plan, state: SendState
    ) -> tuple[Fresh, Settlement | None]:
        """Send the request: its outcome, and the settlement it calls for (None: a task, which
        the tracker settles when it ends)."""
        body = upstream_body(job.request)
        routed = await self._routing.submit(plan, job.path, body, dict(job.query), state)
        sent = Trace(
            job.request_id, reserved=hold.amount, usage=usage, upstream=routed.upstream,
            failovers=routed.failovers,
        )  # fmt: skip
        result, upstream = routed.result, routed.upstream
        if isinstance(result, UpstreamUnavailable):  # every upstream went away meanwhile
            return Retryable(sent, result), release("not sent: no upstream could take it")
        if isinstance(result, UpstreamRejected):  # the upstream said no: nothing was generated
            final = (
                result.status < 500 and result.status != 429
                and result.code != "upstream_auth_failed"
            )  # fmt: skip
            outcome = _failed(result, sent, routed, final=final)
            return outcome, release(result.message, upstream=upstream)
        if isinstance(result, UpstreamFailure):  # never sent (released) or the answer was lost
            if result.uncertain:  # the id an admin needs to resolve it
                result.message = f"{result.message} (ledger id {job.request_id})"
            outcome = _failed(result, sent, routed, final=result.uncertain)
            reason = result.code or "upstream_error"
            if result.uncertain:
                return outcome, uncertain(hold, reason, upstream=upstream, price=routed.price)
            return outcome, release(reason, upstream=upstream)
        reply = result
        self._metrics.upstream_seconds.labels(job.request.endpoint, job.mode).observe(
            reply.upstream_ms / 1000
        )
        trace = replace(
            sent, upstream_status=reply.status, upstream_ms=reply.upstream_ms,
            attempts=routed.attempts,
        )  # fmt: skip
        if reply.status == 202:
            try:
                return await self._task_reply(job, hold, reply, routed, trace), None
            except DuplicateTask:
                error = UpstreamFailure(
                    "The upstream answered with the id of an earlier task; the image may have "
                    f"been generated. Do not retry blindly: ask your admin about ledger id "
                    f"{job.request_id}.",
                    code="upstream_bad_response",
                    uncertain=True,
                )
                log.error("the upstream reused a task id for %s", job.request_id)
                reason = "the upstream reused a task id"
                settlement = uncertain(hold, reason, upstream=upstream, price=routed.price)
                return Failed(trace, error), settlement
        upstream_id = reply.payload.get("id")
        captured = capture_reply(
            hold,
            len(reply.payload["data"]),
            upstream_id if isinstance(upstream_id, str) else None,
            reply.raw.decode("utf-8", "replace"),
            upstream=upstream,
            price=routed.price,
        )
        if job.mode == "async":  # it answered at once: a task that is already complete
            now = self._clock().timestamp()
            answer = await self._durable.write(
                f"settlement of {hold.request_id}",
                lambda: self._tasks.completed_at_once(
                    job.team.name, hold, reply.payload, captured, slot=job.slot, now=now
                ),
            )
            return Answer(trace, answer, task_id=answer["task_id"]), None
        return Answer(trace, reply.payload, reply.raw, captured.upstream_id), captured

    async def _task_reply(
        self, job: Job, hold: Hold, reply: Reply, routed: Routed, trace: Trace
    ) -> Answer | Task | Failed:
        """A 202: recorded before anyone hears of it; a sync caller waits for it to end."""
        task_id = str(reply.payload["task_id"])
        await self._durable.write(
            f"task record of {job.request_id}",
            lambda: self._tasks.submitted(
                task_id,
                job.team.name,
                job.request_id,
                hold.created_at,
                upstream=routed.upstream,
                price=routed.price,
            ),
        )
        if job.mode == "async":
            return Task(trace, reply.payload, task_id, reply.raw)
        config = self._routing.config(routed.upstream)
        assert config is not None  # the upstream that just answered
        answer = await self._tasks.follow(task_id, job.team.name, job.slot, config.timeout_s)
        if answer is None:
            error: GatewayError = UpstreamFailure(
                f"The upstream turned this request into task {task_id}, which is still "
                f"running; poll GET /v1/images/tasks/{task_id} for its result. Do not retry.",
                status=504,
                code="upstream_timeout",
                uncertain=True,
            )
            return Failed(trace, error, task_id)
        if answer.get("status") != "completed":
            error = UpstreamRejected(
                502,
                "upstream_error",
                "The upstream ran this request as a task, and the task failed; nothing was "
                "charged.",
                code="upstream_task_failed",
            )
            return Failed(trace, error, task_id)
        payload = {
            "created": int(self._clock().timestamp()),
            "data": answer.get("data") or [{"url": answer.get("result_url")}],
            "id": task_id,
        }
        return Answer(trace, payload, upstream_id=task_id)

    async def _commit(self, job: Job, hold: Hold, settlement: Settlement) -> None:
        now = self._clock().timestamp()
        settled = await self._durable.write(
            f"settlement of {hold.request_id}",
            lambda: self._settle(hold.request_id, settlement, now),
        )
        self._report(hold, settlement, settled, job)

    async def _settle(self, request_id: str, settlement: Settlement, now: float) -> bool | Closed:
        """The settlement, or, if the hold was closed meanwhile (its instance taken for dead,
        a recovery), what its outcome does to the entry now: never dropped."""
        return await late.settle(self._db, request_id, settlement, now)

    def _report(self, hold: Hold, settlement: Settlement, settled: bool | Closed, job: Job) -> None:
        if settled is True:
            self._books.moved(MoneyMoved.settled(hold, settlement), job.slot)
        elif isinstance(settled, Closed):
            late.report(self._books, settled, job.slot)


def _failed(
    error: UpstreamFailure | UpstreamRejected, sent: Trace, routed: Routed, *, final: bool
) -> Failed | Retryable:
    trace = replace(
        sent, upstream_status=error.upstream_status, upstream_ms=error.upstream_ms,
        attempts=routed.attempts,
    )  # fmt: skip
    return Failed(trace, error) if final else Retryable(trace, error)
