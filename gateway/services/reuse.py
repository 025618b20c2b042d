"""The opt-in cache: an identical request of the same team answered from the store, unpaid.

Only on request (``X-Gateway-Cache: reuse``, or a team's ``reuse_identical_s``): a new prompt
means a new image, and so does the same prompt without the opt-in. A hit is the stored answer of
the newest identical request of the team within the window whose every image is stored: nothing
is reserved or sent. Identical ``reuse`` requests in flight on this instance share one
generation: the first generates, the others wait until its images are stored (or given up on: a
store that cannot be written must not make each of them buy its own), then get its answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from gateway.core.errors import InvalidRequest, StorageUnavailable
from gateway.core.money import units_to_cny
from gateway.core.results import result_urls
from gateway.ops.metrics import Metrics
from gateway.services.outcomes import Answer, Outcome, Reused, Trace
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
        self._in_flight: dict[tuple[str, str], asyncio.Future[str]] = {}
        self._releases: set[asyncio.Task[None]] = set()

    async def run(
        self,
        request_id: str,
        team: str,
        key: str,
        since: float,
        *,
        generate: Callable[[], Awaitable[Outcome]],
        kept: Callable[[], Awaitable[None]],
    ) -> tuple[Outcome, Status]:
        """A hit, or the outcome of ``generate`` (a miss) for ``request_id``. ``kept`` waits
        until what ``generate`` started is settled and stored; identical requests wait for it
        meanwhile, then answer with its result (captured, whether or not it could be stored)."""
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
            if waiting is None:
                break
            shared = await self._hit(team, await asyncio.shield(waiting))
            if shared is not None:
                return shared, "hit"
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._in_flight[team, key] = done
        try:
            return await generate(), "miss"
        finally:
            release = asyncio.ensure_future(self._release(team, key, done, request_id, kept))
            self._releases.add(release)
            release.add_done_callback(self._releases.discard)

    async def _release(
        self,
        team: str,
        key: str,
        done: asyncio.Future[str],
        request_id: str,
        kept: Callable[[], Awaitable[None]],
    ) -> None:
        try:
            await kept()
        except Exception:
            log.exception("waiting for a result to be stored failed")
        finally:
            if self._in_flight.get((team, key)) is done:
                del self._in_flight[team, key]
            done.set_result(request_id)

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
