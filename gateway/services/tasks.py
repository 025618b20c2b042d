"""Async tasks: owned by the team that submitted them, answered from the database once finished,
polled upstream at most once per cache TTL however many clients ask, and settled exactly once
even when nobody polls (the background settler).

A task's money is closed when it ends: its held amount is settled (``task_settlement``), or, if
its entry was closed meanwhile (uncertain over ``max_pending_age_s``, resolved by an admin),
its outcome is recorded as ``late_outcome`` decides: an uncertain entry is resolved to what
really happened, a closed one that was served after all is corrected. A pending task is polled
until it ends, whatever its money. One bad task (an unreadable answer, a failing write) never
stops the settler from settling the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from cachetools import TTLCache

from gateway.core.config import TasksConfig
from gateway.core.errors import GatewayError, NotFound, UpstreamRejected
from gateway.core.ledger import Capture, Hold
from gateway.core.results import payload_urls
from gateway.core.settlement import expired, late_outcome, task_settlement
from gateway.ops.accesslog import short_id
from gateway.ops.metrics import Metrics
from gateway.services import late
from gateway.services.books import Books, LogSlot, MoneyMoved
from gateway.services.results import Paid
from gateway.services.routing import Routing
from gateway.store.base import NEVER, DuplicateTask, TaskRow
from gateway.store.manager import Store

log = logging.getLogger("gateway.tasks")

TERMINAL = ("completed", "failed")
CACHE_SIZE = 10_000
BATCH = 100
FLEET_WAIT_S = 10.0  # how long to wait for another instance's fetch of a task's answer
FLEET_POLL_S = 0.05


class TaskTracker:
    def __init__(
        self,
        *,
        db: Store,
        routing: Routing,
        metrics: Metrics,
        books: Books,
        clock: Callable[[], datetime],
        config: TasksConfig,
        on_paid: Callable[[Paid], None] = lambda paid: None,
    ) -> None:
        self._db = db
        self._on_paid = on_paid
        self._routing = routing
        self._metrics = metrics
        self._books = books
        self._clock = clock
        self._config = config
        self._pending: TTLCache[str, dict[str, Any]] = TTLCache(
            CACHE_SIZE, config.poll_cache_ttl_s, timer=self._now
        )
        self._fetching: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._wake = asyncio.Event()
        self._one_pass = asyncio.Lock()

    def _now(self) -> float:
        return self._clock().timestamp()

    async def submitted(
        self,
        task_id: str,
        team: str,
        request_id: str,
        created_at: float,
        *,
        upstream: str | None,
        price: int | None,
    ) -> None:
        """Record a new task (created at ``upstream``, whose price per image is ``price``)
        before anyone hears of it. Safe to retry: a row this request already wrote (a commit
        whose acknowledgement was lost) counts as recorded; one of another request is
        DuplicateTask (the upstream reused an id)."""
        first_poll = created_at + self._config.settle_interval_s
        try:
            await self._db.record_task(
                task_id, team, request_id, created_at, first_poll, upstream=upstream,
                unit_price=price,
            )  # fmt: skip
        except DuplicateTask:
            row = await self._db.task(task_id)
            if row is None or row.request_id != request_id:
                raise
        self._metrics.pending_tasks.inc()
        self._wake.set()

    async def completed_at_once(
        self,
        team: str,
        hold: Hold,
        payload: dict[str, Any],
        captured: Capture,
        *,
        slot: LogSlot | None,
        now: float,
    ) -> dict[str, Any]:
        """An async request the upstream answered with its images at once: a finished task,
        recorded and settled in one step (safe to retry with the same ``now``). Its id is the
        upstream's, or this request's own if there is none or the upstream reused one."""
        data = payload["data"]
        ids = [captured.upstream_id] if captured.upstream_id else []
        for task_id in [*ids, hold.request_id]:
            answer = {
                "task_id": task_id,
                "status": "completed",
                "model": payload.get("model", "gpt-image-2"),
                "result_url": data[0]["url"] if data else None,
                "data": data,
            }
            try:
                closed = await self._db.record_completed_task(
                    task_id,
                    team,
                    hold.request_id,
                    hold.created_at,
                    result=json.dumps(answer, ensure_ascii=False),
                    settlement=captured,
                    late=lambda entry: late_outcome(entry, captured),
                    now=now,
                )
            except DuplicateTask:
                row = await self._db.task(task_id)
                if row is None or row.request_id != hold.request_id:
                    log.warning("the upstream reused id %s for a new image", short_id(task_id))
                    continue
                entry = await self._db.find_entry(hold.request_id)  # an earlier try landed
                closed = None if entry is None else late.earlier_try(entry, captured, now)
            if closed is not None:
                late.report(self._books, closed, slot)
            return present(answer)
        raise AssertionError(f"request id {hold.request_id} is already a task")

    async def poll(self, team: str, task_id: str, slot: LogSlot | None = None) -> dict[str, Any]:
        """The task's state for its owner; 404 alike for unknown tasks and other teams' tasks."""
        row = await self._db.task(task_id)
        if row is None or row.team != team:
            raise NotFound(f"No task with id {task_id!r} was found.", param="task_id")
        if row.status in TERMINAL and row.result is not None:
            return present(json.loads(row.result))
        if slot is not None:  # asked of its upstream (or of the fleet's fresh copy of its answer)
            slot.record["upstream"] = self._routing.owner(row.upstream)
        return present(await self._fresh_answer(row, slot))

    async def follow(
        self, task_id: str, team: str, slot: LogSlot | None, timeout_s: float
    ) -> dict[str, Any] | None:
        """For a sync request the upstream turned into a task: its terminal answer once it has
        one, or None after ``timeout_s`` (its upstream's; the settler goes on with it)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                answer = await self.poll(team, task_id, slot)
            except GatewayError as exc:
                log.info("following task %s: %s", short_id(task_id), exc.code)
                answer = {}
            if answer.get("status") in TERMINAL:
                return answer
            if loop.time() >= deadline:
                return None
            await asyncio.sleep(self._config.poll_cache_ttl_s)

    async def settle_due(self) -> int:
        """One pass of the settler over the tasks due for a poll; returns how many it looked at.

        One pass at a time in this process: a pass that starts while another runs waits for
        it, so on return every task due before the call has been settled here or is claimed
        by another instance (whose claim this pass skips)."""
        async with self._one_pass:
            return await self._settle_pass()

    async def _settle_pass(self) -> int:
        now = self._now()
        rows = await self._db.due_tasks(now, BATCH)
        for row in rows:
            try:
                await self._settle_one(row, now)
            except Exception:  # this task stays open; the others must still be settled
                log.exception("settling task %s failed; it is retried later", short_id(row.task_id))
                with contextlib.suppress(Exception):
                    await self._db.reschedule_task(
                        row.task_id, now + self._config.settle_max_interval_s
                    )
        self._metrics.pending_tasks.set(await self._db.unsettled_task_count())
        return len(rows)

    async def run_settler(self) -> None:
        """Forever: settle what is due, then sleep until the next is due or a task is submitted."""
        while True:
            # Cleared before the pass, not after: a task submitted during the pass sets it
            # again, so the wait below returns at once instead of missing the new task.
            self._wake.clear()
            try:
                await self.settle_due()
                next_due = await self._db.next_task_due()
            except Exception:  # the settler must outlive any one bad pass
                log.exception("settler pass failed; retrying later")
                next_due = None
            delay = self._config.settle_max_interval_s
            if next_due is not None:
                delay = min(max(next_due - self._now(), 0.05), delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def _settle_one(self, row: TaskRow, now: float) -> None:
        if row.settled is None and now - row.created_at > self._config.max_pending_age_s:
            await self._expire(row, now)
        owner = self._routing.owner(row.upstream)
        if not self._routing.known(row.upstream):
            log.warning(
                "task %s (%s) belongs to upstream %s, which is not configured: it cannot be "
                "polled until that upstream is back in the config (with its key)",
                short_id(row.task_id),
                row.request_id,
                owner,
            )
        elif self._routing.retired(row.upstream):
            log.info(
                "task %s (%s): polled at upstream %s, removed from the config and kept for "
                "polling only",
                short_id(row.task_id),
                row.request_id,
                owner,
            )
        try:
            answer = await self._fresh_answer(row, None)
        except UpstreamRejected as exc:
            if exc.upstream_status == 404 and row.settled is not None:
                open_money = row.settled == "uncertain" and not row.resolved
                log.warning(
                    "task %s (%s) is unknown upstream: no longer polled%s",
                    short_id(row.task_id),
                    row.request_id,
                    "; its hold is uncertain: resolve it with `image-gateway ledger resolve`"
                    if open_money
                    else "",
                )
                await self._db.reschedule_task(row.task_id, NEVER)
                return
            log.info("settler could not poll task %s: %s", short_id(row.task_id), exc.code)
            answer = {}
        except GatewayError as exc:
            log.info("settler could not poll task %s: %s", short_id(row.task_id), exc.code)
            answer = {}
        if answer.get("status") not in TERMINAL:
            delay = min(
                self._config.settle_interval_s * 2 ** (row.polls + 1),
                self._config.settle_max_interval_s,
            )
            await self._db.reschedule_task(row.task_id, now + delay)

    async def _expire(self, row: TaskRow, now: float) -> None:
        settlement = expired(row.hold_amount)
        if await self._db.settle(row.request_id, settlement, now):
            entry = await self._db.find_entry(row.request_id)
            if entry is not None:
                self._books.moved(MoneyMoved.of_entry(entry))
            self._metrics.pending_tasks.dec()
            log.warning(
                "task %s (%s) still pending after the maximum age: its hold is uncertain; it "
                "is resolved automatically if the task ever ends",
                short_id(row.task_id),
                row.request_id,
            )

    async def _fresh_answer(self, row: TaskRow, slot: LogSlot | None) -> dict[str, Any]:
        cached = self._pending.get(row.task_id)
        if cached is not None:
            return cached
        future = self._fetching.get(row.task_id)
        if future is None:
            future = asyncio.ensure_future(self._fetch(row, slot))
            self._fetching[row.task_id] = future
            future.add_done_callback(lambda done: self._fetched(row.task_id, done))
        return await asyncio.shield(future)

    def _fetched(self, task_id: str, future: asyncio.Future[dict[str, Any]]) -> None:
        self._fetching.pop(task_id, None)
        if not future.cancelled():
            future.exception()  # retrieved here, so an error nobody awaited is not reported twice

    async def _fetch(self, row: TaskRow, slot: LogSlot | None) -> dict[str, Any]:
        """One upstream poll for this process's waiting callers, and, with a fleet, for the
        fleet: the instance that claims the poll asks, the others read its answer."""
        now = self._now()
        poll = await self._db.claim_task_poll(row.task_id, now, self._config.poll_cache_ttl_s)
        if not poll.claimed:
            answer = await self._fleet_answer(row.task_id, poll.answer, now)
            if answer is not None:
                if answer.get("status") not in TERMINAL:
                    self._pending[row.task_id] = answer
                return answer
        answer = (await self._routing.get_task(row.upstream, row.task_id)).payload
        status = answer.get("status")
        if status in TERMINAL:
            await self._finish(row, str(status), answer, slot)
        else:
            self._pending[row.task_id] = answer
            await self._db.store_task_answer(row.task_id, json.dumps(answer), now)
        return answer

    async def _fleet_answer(
        self, task_id: str, cached: str | None, since: float
    ) -> dict[str, Any] | None:
        """Another instance's fresh answer, waited for while it fetches (None: it never came,
        ask the upstream after all)."""
        if cached is not None:
            return dict(json.loads(cached))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FLEET_WAIT_S
        fresh_since = since - self._config.poll_cache_ttl_s  # the fetcher's clock is not ours
        while loop.time() < deadline:
            await asyncio.sleep(FLEET_POLL_S)
            answer = await self._db.task_answer_since(task_id, fresh_since)
            if answer is not None:
                return dict(json.loads(answer))
        return None

    async def _finish(
        self, row: TaskRow, status: str, answer: dict[str, Any], slot: LogSlot | None
    ) -> None:
        result = json.dumps(answer, ensure_ascii=False)
        settlement, warning = task_settlement(
            row.hold_amount, row.n, row.task_id, answer, result, upstream=row.upstream,
            price=row.upstream_unit_price,
        )  # fmt: skip
        closed = await self._db.finish_task(
            row,
            status=status,
            result=result,
            settlement=settlement,
            late=lambda entry: late_outcome(entry, settlement),
            now=self._now(),
        )
        if closed is None:
            return  # another poll or instance stored the answer first
        if warning:
            log.warning("task %s (%s): %s", short_id(row.task_id), row.request_id, warning)
        if closed.late is None:
            self._metrics.pending_tasks.dec()
        late.report(self._books, closed, slot)
        urls = tuple(payload_urls(present(answer)))
        if status == "completed" and settlement.state == "captured" and urls:
            self._on_paid(Paid(row.request_id, row.team, row.upstream, urls, None, row.created_at))


def present(answer: dict[str, Any]) -> dict[str, Any]:
    """The upstream's task fields, plus OpenAI-style ``data`` once completed: one item per
    image, whether the answer lists them (``data[]``, ``result_urls[]``) or gives one
    ``result_url``."""
    shown = dict(answer)
    if answer.get("status") == "completed" and not isinstance(answer.get("data"), list):
        urls = answer.get("result_urls")
        if not isinstance(urls, list) or not urls:
            urls = [answer.get("result_url")]
        data = [{"url": url} for url in urls if isinstance(url, str)]
        if data:
            shown["data"] = data
    return shown
