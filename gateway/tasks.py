"""Async tasks: owned by the team that submitted them, answered from SQLite once finished, polled
upstream at most once per cache TTL however many clients ask, and settled exactly once even when
nobody polls (the background settler).
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

from gateway.config import TasksConfig
from gateway.db import Database, TaskRow
from gateway.errors import GatewayError, NotFound
from gateway.ledger import Settlement
from gateway.metrics import Metrics
from gateway.money import MoneyError, cny_to_units
from gateway.upstream import UpstreamClient

log = logging.getLogger("gateway.tasks")

TERMINAL = ("completed", "failed")
CACHE_SIZE = 10_000
BATCH = 100


class TaskTracker:
    def __init__(
        self,
        db: Database,
        upstream: UpstreamClient,
        metrics: Metrics,
        clock: Callable[[], datetime],
        config: TasksConfig,
    ) -> None:
        self._db = db
        self._upstream = upstream
        self._metrics = metrics
        self._clock = clock
        self._config = config
        self._pending: TTLCache[str, dict[str, Any]] = TTLCache(
            CACHE_SIZE, config.poll_cache_ttl_s, timer=self._now
        )
        self._fetching: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._wake = asyncio.Event()

    def _now(self) -> float:
        return self._clock().timestamp()

    async def submitted(self, task_id: str, team: str, request_id: str, created_at: float) -> None:
        """Record a new task before its 202 reaches the client."""
        first_poll = created_at + self._config.settle_interval_s
        await self._db.record_task(task_id, team, request_id, created_at, first_poll)
        self._metrics.pending_tasks.inc()
        self._wake.set()

    async def poll(self, team: str, task_id: str) -> dict[str, Any]:
        """The task's state for its owner; 404 alike for unknown tasks and other teams' tasks."""
        row = await self._db.task(task_id)
        if row is None or row.team != team:
            raise NotFound(f"No task with id {task_id!r} was found.", param="task_id")
        if row.status in TERMINAL and row.result is not None:
            return present(json.loads(row.result))
        return present(await self._fresh_answer(row))

    async def settle_due(self) -> int:
        """One pass of the settler over the tasks due for a poll; returns how many it looked at."""
        now = self._now()
        rows = await self._db.due_tasks(now, BATCH)
        for row in rows:
            if now - row.created_at > self._config.max_pending_age_s:
                if await self._db.expire_task(row, now):
                    log.warning(
                        "task %s still pending after the maximum age: hold kept as uncertain",
                        row.task_id,
                    )
                continue
            try:
                answer = await self._fresh_answer(row)
            except GatewayError as exc:
                log.info("settler could not poll task %s: %s", row.task_id, exc.code)
                answer = {}
            if answer.get("status") not in TERMINAL:
                delay = min(
                    self._config.settle_interval_s * 2 ** (row.polls + 1),
                    self._config.settle_max_interval_s,
                )
                await self._db.reschedule_task(row.task_id, now + delay)
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

    async def _fresh_answer(self, row: TaskRow) -> dict[str, Any]:
        cached = self._pending.get(row.task_id)
        if cached is not None:
            return cached
        future = self._fetching.get(row.task_id)
        if future is None:
            future = asyncio.ensure_future(self._fetch(row))
            self._fetching[row.task_id] = future
            future.add_done_callback(lambda done: self._fetched(row.task_id, done))
        return await asyncio.shield(future)

    def _fetched(self, task_id: str, future: asyncio.Future[dict[str, Any]]) -> None:
        self._fetching.pop(task_id, None)
        if not future.cancelled():
            future.exception()  # retrieved here, so an error nobody awaited is not reported twice

    async def _fetch(self, row: TaskRow) -> dict[str, Any]:
        answer = (await self._upstream.get_task(row.task_id)).payload
        status = answer.get("status")
        if status in TERMINAL:
            await self._finish(row, str(status), answer)
        else:
            self._pending[row.task_id] = answer
        return answer

    async def _finish(self, row: TaskRow, status: str, answer: dict[str, Any]) -> None:
        result = json.dumps(answer, ensure_ascii=False)
        if row.settled is not None:  # expired as uncertain earlier: keep the result, not the money
            await self._db.store_late_result(row.task_id, status, result)
            return
        settlement = _settlement_for(row, status, answer, result)
        if await self._db.finish_task(row, status, result, settlement, self._now()):
            if settlement.state == "captured":
                self._metrics.captured(
                    row.team, "-", row.quality, settlement.amount, settlement.images
                )
            self._metrics.pending_tasks.dec()


def _settlement_for(row: TaskRow, status: str, answer: dict[str, Any], result: str) -> Settlement:
    if status == "failed":
        return Settlement(
            "released", 0, upstream_id=row.task_id, reason="upstream task failed", result=result
        )
    amount = row.hold_amount
    cost = answer.get("cost")
    if cost is not None:
        try:
            amount = cny_to_units(cost)
        except MoneyError:
            log.warning(
                "task %s reported an unreadable cost; charging the price table", row.task_id
            )
    if amount > row.hold_amount:
        log.warning("task %s cost more than reserved: is the price table out of date?", row.task_id)
    data = answer.get("data")
    images = len(data) if isinstance(data, list) else row.n
    return Settlement("captured", amount, images=images, upstream_id=row.task_id, result=result)


def present(answer: dict[str, Any]) -> dict[str, Any]:
    """The upstream's task fields, plus OpenAI-style ``data`` once completed."""
    shown = dict(answer)
    url = answer.get("result_url")
    if answer.get("status") == "completed" and isinstance(url, str) and "data" not in shown:
        shown["data"] = [{"url": url}]
    return shown
