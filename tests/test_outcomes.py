"""The outcome cases (``gateway/services/outcomes.py``): what a retry attaches to from the ledger's
record, and every outcome kept for an Idempotency-Key answered again the same."""

from __future__ import annotations

import json

import pytest

from gateway.core.errors import Conflict, UpstreamFailure, UpstreamRejected
from gateway.services.idempotency import _replayed, _stored_form
from gateway.services.outcomes import (
    Answer,
    Dedupe,
    Failed,
    Replay,
    Standing,
    Task,
    Trace,
    from_attempt,
    replayed,
    still_running,
)
from gateway.store.base import Attempt

TRACE = Trace("req-1", reserved=200, attempts=1, upstream="default", upstream_status=200)
IMAGES = {"created": 1, "data": [{"url": "https://files.example/a.png"}], "id": "up-1"}
PENDING = {"status": "pending", "task_id": "task-1"}
REJECTED = UpstreamRejected(400, "invalid_request_error", "refused", code="moderation_blocked")
UNKNOWN = UpstreamFailure("lost", status=504, code="upstream_timeout", uncertain=True)

KEPT: dict[str, Standing] = {
    "answer": Answer(TRACE, IMAGES, b"{}", upstream_id="up-1"),
    "sync task answer": Answer(TRACE, {**IMAGES, "task_id": "task-1"}, task_id="task-1"),
    "task": Task(TRACE, PENDING, "task-1", b"{}"),
    "rejected": Failed(TRACE, REJECTED),
    "unknown, after a task": Failed(TRACE, UNKNOWN, task_id="task-1"),
    "dedupe of an answer": Dedupe(Answer(TRACE, IMAGES, upstream_id="up-1")),
    "dedupe of a task": Dedupe(Task(TRACE, PENDING, "task-1")),
    "still running": still_running("req-1"),
    "replay": Replay(Dedupe(Failed(TRACE, UNKNOWN))),
}


@pytest.mark.parametrize("case", sorted(KEPT))
def test_a_kept_outcome_is_answered_again_with_the_same_status_body_and_headers(case: str) -> None:
    outcome = KEPT[case]
    status, body, headers = _stored_form(outcome)
    assert status == outcome.status
    again = _replayed("req-1", status, json.loads(body), headers)
    assert isinstance(again, Replay) and again.status == status
    assert _stored_form(again) == (status, body, headers)
    assert replayed(again) is again  # a replay answered again stays one replay
    assert replayed(outcome) == (outcome if isinstance(outcome, Replay) else Replay(outcome))


def test_a_replayed_task_is_a_task_and_an_answer_an_answer() -> None:
    task = _replayed("req-1", 202, PENDING, {}).of
    assert isinstance(task, Task) and task.task_id == "task-1" and task.upstream_id is None
    answer = _replayed("req-1", 200, IMAGES, {}).of
    assert isinstance(answer, Answer) and (answer.upstream_id, answer.task_id) == ("up-1", None)
    failed = _replayed("req-1", 409, Conflict("x").body(), {"Retry-After": "5"}).of
    assert isinstance(failed, Failed) and failed.error.response_headers() == {"Retry-After": "5"}


def test_a_retry_attaches_to_what_the_ledger_recorded_of_its_original() -> None:
    def attempt(state: str, result: str | None = None, task_id: str | None = None) -> Attempt:
        return Attempt("req-0", state, result, task_id, live=False)

    assert from_attempt(None) is None
    assert from_attempt(attempt("released")) is None  # failed for sure: the retry runs
    task = from_attempt(attempt("uncertain", task_id="task-1"))
    assert task == Dedupe(Task(Trace("req-0"), PENDING, "task-1"))
    captured = from_attempt(attempt("captured", json.dumps(IMAGES)))
    assert captured == Dedupe(Answer(Trace("req-0"), IMAGES, upstream_id="up-1"))
    for state in ("held", "uncertain", "captured"):  # a capture without its stored result too
        unknown = from_attempt(attempt(state))
        assert unknown is not None and isinstance(unknown.of, Failed)
        assert unknown.status == 502 and unknown.of.error.code == "outcome_unknown"
        assert "req-0" in unknown.of.error.message
