"""``Idempotency-Key`` (draft-ietf-httpapi-idempotency-key-header), scoped per team.

The first request with a key runs; its outcome is stored once the upstream has taken the request
and replayed to every later request with the same key and the same payload, however many arrive
at once. A request with the same key while the first is running gets 409; with a different
payload, 422. A request refused before anything was spent (validation, budget, an unreachable
upstream) stores nothing. An outcome that cannot be stored yet (disk full) is replayed from
memory while its write is retried.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, assert_never

from gateway.core.errors import (
    GatewayError,
    IdempotencyConflict,
    IdempotencyMismatch,
    InvalidRequest,
    StorageUnavailable,
    UpstreamFailure,
)
from gateway.services.durable import Durable
from gateway.services.outcomes import (
    Answer,
    Dedupe,
    Failed,
    Outcome,
    Replay,
    Retryable,
    Reused,
    Standing,
    Task,
    Trace,
    replayed,
)
from gateway.store.base import StoredOutcome
from gateway.store.manager import Store

MAX_KEY_LENGTH = 255
HEADER = "Idempotency-Key"

Slot = tuple[str, str]  # (team, key)


@dataclass(frozen=True, slots=True)
class _Local:
    """A request with this key in this process: ``original`` says (once its claim is in)
    whether it runs the generation itself; ``answer`` is what it came to."""

    fingerprint: str
    original: asyncio.Future[bool]
    answer: asyncio.Future[Outcome]


def check_key(value: str | None) -> str | None:
    """The key if present and well-formed (1-255 printable ASCII characters), else 400."""
    if value is None:
        return None
    if not 1 <= len(value) <= MAX_KEY_LENGTH or not all(" " <= ch <= "~" for ch in value):
        raise InvalidRequest(
            f"{HEADER} must be 1 to {MAX_KEY_LENGTH} printable ASCII characters.", param=HEADER
        )
    return value


class Idempotency:
    def __init__(
        self,
        db: Store,
        is_running: Callable[[str], bool],
        clock: Callable[[], datetime],
        keep_hours: float,
        durable: Durable,
    ) -> None:
        self._db = db
        self._is_running = is_running
        self._clock = clock
        self._keep_s = keep_hours * 3600
        self._durable = durable
        self._local: dict[Slot, _Local] = {}
        self._storing: set[asyncio.Task[None]] = set()

    async def run(
        self,
        team: str,
        key: str,
        fingerprint: str,
        request_id: str,
        generate: Callable[[], Awaitable[Outcome]],
    ) -> Outcome:
        slot = (team, key)
        local = self._local.get(slot)
        if local is not None:  # another request with this key is (or was just) in this process
            return await self._follow(local, fingerprint)
        loop = asyncio.get_running_loop()
        local = _Local(fingerprint, loop.create_future(), loop.create_future())
        self._local[slot] = local
        try:
            outcome = await self._run(
                team=team, key=key, fingerprint=fingerprint, request_id=request_id,
                generate=generate, local=local,
            )  # fmt: skip
        except BaseException:
            self._forget(slot, local)
            local.original.cancel()
            local.answer.cancel()
            raise
        local.answer.set_result(outcome)
        if local.original.result() and not isinstance(outcome, Retryable | Reused):
            await self._store(slot, outcome, local)
        else:
            self._forget(slot, local)
        return outcome

    async def stored(self) -> None:
        """Wait until every outcome held in memory has been stored."""
        while self._storing:
            await asyncio.wait(set(self._storing))

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Wait a little for outcomes still being stored (shutdown); a claim left without its
        outcome is answered from the ledger after the restart."""
        if self._storing:
            _, pending = await asyncio.wait(set(self._storing), timeout=timeout_s)
            for task in pending:
                task.cancel()

    async def _follow(self, local: _Local, fingerprint: str) -> Outcome:
        """Another request with this key is here: 409 while it runs as the original, else its
        outcome (stored, or just replayed itself) replayed. Many replays at once all replay."""
        if local.fingerprint != fingerprint:
            raise _mismatch()
        try:
            original = await asyncio.shield(local.original)
            if original and not local.answer.done():
                raise _in_flight()
            outcome = await asyncio.shield(local.answer)
        except asyncio.CancelledError:
            if local.answer.cancelled():  # it was interrupted: what it came to is not known here
                raise _in_flight() from None
            raise
        if isinstance(outcome, Retryable | Reused):
            raise _in_flight()
        return replayed(outcome)

    async def _run(
        self,
        *,
        team: str,
        key: str,
        fingerprint: str,
        request_id: str,
        generate: Callable[[], Awaitable[Outcome]],
        local: _Local,
    ) -> Outcome:
        now = self._clock().timestamp()
        earlier = await self._db.claim_idempotency_key(
            team, key, fingerprint=fingerprint, request_id=request_id, now=now, keep_s=self._keep_s
        )
        if earlier is not None:
            if earlier.fingerprint != fingerprint:
                raise _mismatch()
            replay = await self._replay(earlier)
            if replay is not None:
                local.original.set_result(False)
                return replay
            await self._db.release_idempotency_key(team, key)
            earlier = await self._db.claim_idempotency_key(
                team,
                key,
                fingerprint=fingerprint,
                request_id=request_id,
                now=now,
                keep_s=self._keep_s,
            )
            if earlier is not None:
                raise _in_flight()
        local.original.set_result(True)
        outcome = await generate()
        if isinstance(outcome, Retryable | Reused):  # nothing stands: the key is free again
            await self._db.release_idempotency_key(team, key)
        return outcome

    async def _store(self, slot: Slot, outcome: Standing, local: _Local) -> None:
        """Store the outcome before it is answered (so it survives a crash right after); if the
        database cannot take it now, retry in the background and replay from memory meanwhile."""
        status, body, headers = _stored_form(outcome)
        team, key = slot

        def write() -> Awaitable[None]:
            return self._db.store_idempotent_outcome(team, key, status, body, headers)

        try:
            await write()
        except StorageUnavailable:
            pass
        else:
            self._forget(slot, local)
            return

        async def store() -> None:
            try:
                await self._durable.write(f"Idempotency-Key outcome of {outcome.request_id}", write)
            finally:
                self._forget(slot, local)

        task = asyncio.create_task(store(), name=f"idempotency {outcome.request_id}")
        self._storing.add(task)
        task.add_done_callback(self._storing.discard)

    def _forget(self, slot: Slot, local: _Local) -> None:
        if self._local.get(slot) is local:
            del self._local[slot]

    async def _replay(self, earlier: StoredOutcome) -> Replay | None:
        """The stored outcome; for a claim left by a stopped process, what its ledger says."""
        if earlier.status is not None and earlier.body is not None:
            return _replayed(
                earlier.request_id, earlier.status, json.loads(earlier.body), earlier.headers
            )
        if self._is_running(earlier.request_id):
            raise _in_flight()
        state = await self._db.hold_state(earlier.request_id)
        if earlier.live and (state is None or state[0] == "held"):
            raise _in_flight()  # another live instance is running it
        if state is None or state[0] == "released":
            return None  # nothing was spent: run the request afresh
        if state[0] == "captured" and state[1] is not None:
            return _replayed(earlier.request_id, 200, json.loads(state[1]), {})
        error = UpstreamFailure(
            "The first request with this Idempotency-Key was interrupted after it reached the "
            "upstream; its image may have been generated. Ask your admin with the request id.",
            code="outcome_unknown",
            uncertain=True,
        )
        return Replay(Failed(Trace(earlier.request_id), error))


def _in_flight() -> IdempotencyConflict:
    return IdempotencyConflict(
        f"A request with this {HEADER} is still in progress; retry after it finishes.",
        param=HEADER,
        headers={"Retry-After": "5"},
    )


def _mismatch() -> IdempotencyMismatch:
    return IdempotencyMismatch(
        f"This {HEADER} was used for a different request; use a new key.", param=HEADER
    )


def _stored_form(outcome: Standing) -> tuple[int, str, dict[str, str]]:
    """The status, body and headers an outcome is stored as, to be answered again."""
    match outcome:
        case Answer(payload=payload) | Task(payload=payload):
            return outcome.status, json.dumps(payload), {}
        case Failed(error=error):
            return error.status, json.dumps(error.body()), error.response_headers()
        case Dedupe(of=of) | Replay(of=of):
            return _stored_form(of)
        case _:
            assert_never(outcome)


def _replayed(
    request_id: str, status: int, body: dict[str, Any], headers: dict[str, str]
) -> Replay:
    """An outcome stored as ``_stored_form`` made it, answered again."""
    trace = Trace(request_id)
    if status >= 400:
        return Replay(Failed(trace, StoredError(status, body, headers)))
    if status == Task.status:
        task = Task(trace, body, body["task_id"], upstream_id=body.get("id"))  # as stored
        return Replay(task)
    return Replay(Answer(trace, body, upstream_id=body.get("id"), task_id=body.get("task_id")))


class StoredError(GatewayError):
    """An error answered before, replayed exactly as it was."""

    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
        error = body.get("error") or {}
        super().__init__(
            str(error.get("message", "")), param=error.get("param"), code=error.get("code")
        )
        self.status = status
        self.type = str(error.get("type", "server_error"))
        self.headers = {k: v for k, v in headers.items() if k.lower() != "x-should-retry"}
        retry = headers.get("x-should-retry")
        self.should_retry = None if retry is None else retry == "true"
