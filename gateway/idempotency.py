"""``Idempotency-Key`` (draft-ietf-httpapi-idempotency-key-header), scoped per team.

The first request with a key runs; its outcome is stored once the upstream has taken the request
and replayed to every later request with the same key and the same payload. A request with the
same key while the first is running gets 409; with a different payload, 422. A request refused
before anything was spent (validation, budget, an unreachable upstream) stores nothing.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from gateway.db import Database, StoredOutcome
from gateway.errors import (
    GatewayError,
    IdempotencyConflict,
    IdempotencyMismatch,
    InvalidRequest,
    UpstreamFailure,
)
from gateway.generation import Outcome

MAX_KEY_LENGTH = 255
HEADER = "Idempotency-Key"


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
        db: Database,
        is_running: Callable[[str], bool],
        clock: Callable[[], datetime],
        keep_hours: float,
    ) -> None:
        self._db = db
        self._is_running = is_running
        self._clock = clock
        self._keep_s = keep_hours * 3600
        self._active: set[tuple[str, str]] = set()

    async def run(
        self,
        team: str,
        key: str,
        fingerprint: str,
        request_id: str,
        generate: Callable[[], Awaitable[Outcome]],
    ) -> Outcome:
        if (team, key) in self._active:
            raise _in_flight()
        self._active.add((team, key))
        try:
            return await self._run(team, key, fingerprint, request_id, generate)
        finally:
            self._active.discard((team, key))

    async def _run(
        self,
        team: str,
        key: str,
        fingerprint: str,
        request_id: str,
        generate: Callable[[], Awaitable[Outcome]],
    ) -> Outcome:
        now = self._clock().timestamp()
        earlier = await self._db.claim_idempotency_key(
            team, key, fingerprint=fingerprint, request_id=request_id, now=now, keep_s=self._keep_s
        )
        if earlier is not None:
            if earlier.fingerprint != fingerprint:
                raise IdempotencyMismatch(
                    f"This {HEADER} was used for a different request; use a new key.", param=HEADER
                )
            replay = await self._replay(earlier)
            if replay is not None:
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
        outcome = await generate()
        if outcome.final:
            status, body, headers = _stored_form(outcome)
            await self._db.store_idempotent_outcome(team, key, status, body, headers)
        else:
            await self._db.release_idempotency_key(team, key)
        return outcome

    async def _replay(self, earlier: StoredOutcome) -> Outcome | None:
        """The stored outcome; for a claim left by a stopped process, what its ledger says."""
        if earlier.status is not None and earlier.body is not None:
            return _replayed(
                earlier.request_id, earlier.status, json.loads(earlier.body), earlier.headers
            )
        if self._is_running(earlier.request_id):
            raise _in_flight()
        state = await self._db.hold_state(earlier.request_id)
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
        return Outcome(error.status, earlier.request_id, error=error, final=True)


def _in_flight() -> IdempotencyConflict:
    return IdempotencyConflict(
        f"A request with this {HEADER} is still in progress; retry after it finishes.",
        param=HEADER,
        headers={"Retry-After": "5"},
    )


def _stored_form(outcome: Outcome) -> tuple[int, str, dict[str, str]]:
    if outcome.error is not None:
        return (
            outcome.status,
            json.dumps(outcome.error.body()),
            outcome.error.response_headers(),
        )
    return outcome.status, json.dumps(outcome.payload), {}


def _replayed(
    request_id: str, status: int, body: dict[str, Any], headers: dict[str, str]
) -> Outcome:
    outcome = Outcome(status, request_id, final=True, extra={"Idempotent-Replayed": "true"})
    if status >= 400:
        outcome.error = StoredError(status, body, headers)
    else:
        outcome.payload = body
        outcome.upstream_id = body.get("id")
        outcome.task_id = body.get("task_id")
    return outcome


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
