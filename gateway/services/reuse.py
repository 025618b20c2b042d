"""The opt-in cache: an identical request of the same team answered from the store, unpaid.

Only on request (``X-Gateway-Cache: reuse``, or a team's ``reuse_identical_s``): a new prompt
means a new image, and so does the same prompt without the opt-in. A hit is the stored answer of
the newest identical request of the team within the window whose every image is stored: nothing
is reserved or sent. Identical ``reuse`` requests in flight on this instance share one
generation: the first generates, the others wait until its settlement is committed, then get its
answer (its images are read from the store, or from the download keeping them), and so does any
identical request until its images are stored. If it failed,
they get its failure: none of them sends again (the failure may be an outcome the upstream
still bills, and a burst of identical requests must never become a queue of paid retries).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from gateway.core.errors import GatewayError, InvalidRequest, ShuttingDown, StorageUnavailable
from gateway.core.money import units_to_cny
from gateway.core.results import result_urls
from gateway.ops.metrics import Metrics
from gateway.services.outcomes import (
    Answer,
    Dedupe,
    Failed,
    Outcome,
    Replay,
    Retryable,
    Reused,
    Trace,
)
from gateway.store.manager import Store

log = logging.getLogger("gateway.reuse")

Status = Literal["hit", "miss", "bypass"]
HEADER = "X-Gateway-Cache"
STATUS_HEADER = "X-Gateway-Cache-Status"
DEFAULT_WINDOW_S = 24 * 3600.0


class Reuse:
    def __init__(self, db: Store, metrics: Metrics) -> None:
        self._db = db
        self._metrics = metrics
        self._in_flight: dict[tuple[str, str], asyncio.Future[Outcome]] = {}
        self._releases: set[asyncio.Task[None]] = set()

    async def run(
        self,
        request_id: str,
        team: str,
        key: str,
        since: float,
        *,
        generate: Callable[[], Awaitable[Outcome]],
        settled: Callable[[Outcome], Awaitable[None]],
        kept: Callable[[Outcome], Awaitable[None]],
    ) -> tuple[Outcome, Status]:
        """A hit, or the outcome of ``generate`` (a miss) for ``request_id``. ``settled`` waits
        until the settlement of an outcome of ``generate`` is committed, ``kept`` until its
        images are stored (or given up on); identical requests wait for the first, then answer
        with its result, or its failure (never sending again), until the second."""
        shared_by: set[asyncio.Future[Outcome]] = set()  # each first request waited on once
        while True:
            try:
                found = await self._db.results.reusable(team, key, since)
            except StorageUnavailable as exc:
                log.warning("the opt-in cache could not be read (%s): generating", exc)
                found = None
            hit = None if found is None else await self._hit(team, found)
            if hit is not None:
                return hit, "hit"
            waiting = self._in_flight.get((team, key))
            if waiting is None or waiting in shared_by:
                break  # none in flight, or its answer cannot be read (not captured): generate
            shared_by.add(waiting)
            try:
                first = await asyncio.shield(waiting)  # its refusal (budget, limits) is ours
            except asyncio.CancelledError:
                this = asyncio.current_task()
                if not waiting.cancelled() or (this is not None and this.cancelling()):
                    raise  # this request itself was cancelled
                # The first was cancelled by a shutdown, maybe after it was sent: never send
                # again (what it came to is for recovery to settle), and start nothing now.
                return Retryable(Trace(request_id), _stopped()), "miss"
            failure = _failure(first)
            if failure is not None:  # not this request's own: it may be sent again
                return Retryable(Trace(request_id), failure), "miss"
            shared = await self._hit(team, first.request_id)
            if shared is not None:
                return shared, "hit"
        done: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._in_flight[team, key] = done
        try:
            outcome = await generate()
        except BaseException as exc:
            self._fail(team, key, done, exc)
            raise
        release = asyncio.ensure_future(
            self._release(team, key, done, outcome, settled=settled, kept=kept)
        )
        self._releases.add(release)
        release.add_done_callback(self._releases.discard)
        return outcome, "miss"

    async def _release(
        self,
        team: str,
        key: str,
        done: asyncio.Future[Outcome],
        outcome: Outcome,
        *,
        settled: Callable[[Outcome], Awaitable[None]],
        kept: Callable[[Outcome], Awaitable[None]],
    ) -> None:
        """Answer the identical requests once the outcome is settled; keep answering new ones
        with it until its images are stored (until then the index cannot find it)."""
        try:
            try:
                await settled(outcome)
            finally:
                done.set_result(outcome)
            if _failure(outcome) is None:
                await kept(outcome)
        except Exception:
            log.exception("waiting for a settlement or a result to be stored failed")
        finally:
            if self._in_flight.get((team, key)) is done:
                del self._in_flight[team, key]

    def _fail(self, team: str, key: str, done: asyncio.Future[Outcome], exc: BaseException) -> None:
        if self._in_flight.get((team, key)) is done:
            del self._in_flight[team, key]
        if isinstance(exc, Exception):
            done.set_exception(exc)
            done.exception()  # nobody may be waiting: retrieved, so never reported as lost
        else:
            done.cancel()

    async def _hit(self, team: str, request_id: str) -> Reused | None:
        """The captured answer of ``request_id`` (of ``team``), as a hit; None if it has none."""
        try:
            stored = (await self._db.stored_results([request_id])).get(request_id)
            entry = await self._db.find_entry(request_id)
        except StorageUnavailable as exc:
            log.warning("the opt-in cache could not be read (%s): generating", exc)
            return None
        payload = _answer(stored)
        if payload is None or entry is None or entry.team != team or entry.state != "captured":
            return None
        self._metrics.cache_saved.labels(team).inc(units_to_cny(entry.charged))
        return Reused(Answer(Trace(request_id), payload, upstream_id=entry.upstream_id))


def _stopped() -> ShuttingDown:
    return ShuttingDown(
        "The gateway is stopping: the identical request this one waited for was stopped, and "
        "nothing was reserved or sent for this one. Retry."
    )


def _failure(outcome: Outcome) -> GatewayError | None:
    """The error an outcome came to (None for images)."""
    own = outcome.of if isinstance(outcome, Dedupe | Replay) else outcome
    own = own.of if isinstance(own, Dedupe) else own
    return own.error if isinstance(own, Failed | Retryable) else None


def _answer(stored: str | None) -> dict[str, Any] | None:
    """The stored answer as the client gets it: the upstream's own body, or for a result that
    came as a task, its images in OpenAI's shape."""
    urls = result_urls(stored)
    if not urls or stored is None:
        return None
    answer = json.loads(stored)
    if isinstance(answer.get("data"), list):
        return dict(answer)
    return {"created": answer.get("created", 0), "data": [{"url": url} for url in urls]}


def choose(header: str | None, team_window_s: float | None, usable: bool) -> float | None:
    """The opt-in: the window in seconds to reuse within; 0 for ``bypass`` (opted in, but
    this request cannot be answered from the store: the store is off, an async request, or
    ``X-Gateway-Cache: bypass`` over a team's ``reuse_identical_s``); None when not opted in.
    Any other header value is a 400."""
    value = None if header is None else header.strip().lower()
    if value not in (None, "reuse", "bypass"):
        raise InvalidRequest(
            f"{HEADER} must be reuse or bypass.", param=HEADER, code="invalid_cache_directive"
        )
    if value is None and team_window_s is None:
        return None
    if value == "bypass" or not usable:
        return 0.0
    return team_window_s or DEFAULT_WINDOW_S
