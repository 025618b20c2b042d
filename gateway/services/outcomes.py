"""What a generation request came to: one immutable value per case.

A request that ran a generation of its own ends as an ``Answer`` (its images), a ``Task`` (an
async task the upstream took), a ``Failed`` (an error that stands: stored for its
Idempotency-Key and given to its retries, never tried again) or a ``Retryable`` (an error that
cost nothing: the same request may simply be sent again). Each carries its ``Trace``. A request
answered from another one's outcome is a ``Dedupe`` (an SDK retry attached to the attempt it
repeats) or a ``Replay`` (an Idempotency-Key's earlier outcome); neither holds, costs or sends
anything itself; nor does a ``Reused``, an identical earlier request's stored answer (the opt-in
cache), which like a ``Retryable`` is not kept for an Idempotency-Key. The HTTP edge
(``gateway.http.answers``) and the Idempotency-Key store match on these cases exhaustively.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

from gateway.core.errors import Conflict, GatewayError, UpstreamFailure
from gateway.core.ledger import Usage
from gateway.store.base import Attempt


@dataclass(frozen=True, slots=True)
class Trace:
    """What a request's own generation records in its log line: its ledger id, what it reserved
    and the team's usage once its hold was placed (or refused), and the upstreams it reached."""

    request_id: str
    reserved: int = 0
    usage: Usage | None = None
    upstream: str | None = None  # the upstream that answered (or was last tried)
    failovers: tuple[str, ...] = ()  # the upstreams tried before it
    upstream_status: int | None = None
    upstream_ms: float | None = None
    attempts: int = 0


@dataclass(frozen=True, slots=True)
class _Own:
    trace: Trace

    @property
    def request_id(self) -> str:
        return self.trace.request_id


@dataclass(frozen=True, slots=True)
class Answer(_Own):
    """Images (200): a sync request's, or an async request's task that was complete at once."""

    payload: dict[str, Any]
    raw: bytes | None = None  # the upstream's body as received, when it can be passed on as is
    upstream_id: str | None = None
    task_id: str | None = None
    status: ClassVar[int] = 200


@dataclass(frozen=True, slots=True)
class Task(_Own):
    """An async task the upstream took (202); its owner polls it."""

    payload: dict[str, Any]
    task_id: str
    raw: bytes | None = None
    upstream_id: str | None = None  # only a replay names one: a stored body's ``id``, if any
    status: ClassVar[int] = 202


@dataclass(frozen=True, slots=True)
class Failed(_Own):
    """An error that stands: the upstream took the request and said no for good, or what came
    of it is not known (``error`` says which and what to do)."""

    error: GatewayError
    task_id: str | None = None  # the task a sync request became, if it did

    @property
    def status(self) -> int:
        return self.error.status


@dataclass(frozen=True, slots=True)
class Retryable(_Own):
    """An error after which the same request may be sent again: nothing was generated and
    nothing is owed (refused before it was sent, or failed upstream without a charge)."""

    error: GatewayError

    @property
    def status(self) -> int:
        return self.error.status


@dataclass(frozen=True, slots=True)
class Dedupe:
    """An SDK retry answered with the outcome of the attempt it repeats."""

    of: Answer | Task | Failed

    @property
    def request_id(self) -> str:
        return self.of.request_id

    @property
    def status(self) -> int:
        return self.of.status


@dataclass(frozen=True, slots=True)
class Replay:
    """An Idempotency-Key's earlier outcome, answered again."""

    of: Answer | Task | Failed | Dedupe

    @property
    def request_id(self) -> str:
        return self.of.request_id

    @property
    def status(self) -> int:
        return self.of.status


@dataclass(frozen=True, slots=True)
class Reused:
    """An identical earlier request's answer from the result store (the opt-in cache)."""

    of: Answer

    @property
    def request_id(self) -> str:
        return self.of.request_id

    @property
    def status(self) -> int:
        return self.of.status


Fresh = Answer | Task | Failed | Retryable  # what a generation of its own comes to
Outcome = Fresh | Dedupe | Replay | Reused
Standing = Answer | Task | Failed | Dedupe | Replay  # an outcome kept and answered again


def replayed(outcome: Standing) -> Replay:
    """``outcome`` answered again for a later request with its key (once a replay, it stays one)."""
    return outcome if isinstance(outcome, Replay) else Replay(outcome)


def from_attempt(attempt: Attempt | None) -> Dedupe | None:
    """A retry's answer from the ledger's record of the request it repeats (None: there is no
    such request, or it failed for sure and cost nothing, so the retry may run)."""
    if attempt is None or attempt.state == "released":
        return None
    trace = Trace(attempt.request_id)
    if attempt.task_id is not None:  # an async submit: its task, whatever came of it
        payload = {"status": "pending", "task_id": attempt.task_id}
        return Dedupe(Task(trace, payload, task_id=attempt.task_id))
    if attempt.state == "captured" and attempt.result is not None:
        payload = json.loads(attempt.result)
        return Dedupe(Answer(trace, payload, upstream_id=payload.get("id")))
    error = UpstreamFailure(
        "The request this retry repeats reached the upstream and its outcome is not known; "
        "it may have been generated. Ask your admin about ledger id " + attempt.request_id + ".",
        code="outcome_unknown",
        uncertain=True,
    )
    return Dedupe(Failed(trace, error))


def still_running(request_id: str) -> Failed:
    """For a retry whose original is still running on another instance past the wait."""
    error = Conflict(
        "The request this retry repeats is still running on another gateway instance; retry "
        "after it finishes.",
        code="original_in_progress",
        headers={"Retry-After": "5"},
    )
    return Failed(Trace(request_id), error)
