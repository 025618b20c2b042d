"""What an engine is: a runner of scripts of named statements, each operation written once.

An operation of several statements (settle a task's hold or resolve it, claim an
Idempotency-Key, recover in-flight holds) is a generator: it yields a ``Step`` (a statement's
name, its parameters, and what it wants back) and receives the result::

    row = yield one("entry", request_id=request_id)
    if (yield count("settle", **params)) == 0:
        ...

It decides everything between the statements in Python, once. An engine only executes steps:
the SQLite writer thread inside its group-commit batch, PostgreSQL on one pooled connection
(inside a transaction when the operation is atomic), the in-memory engine in Python. The
schema refusing a statement (a trigger or a constraint) reaches the script as ``Refused``,
which it may catch, like any exception, at the ``yield``.

``Engine`` is all that each engine implements; ``manager.Store`` holds the operations.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Generator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

from gateway.store.base import Refused

T = TypeVar("T")
Want = Literal["one", "all", "count"]


@dataclass(frozen=True, slots=True)
class Step:
    """Run the statement named ``query``; ``want`` is the result the script receives: the first
    row or None, every row, or how many rows it changed. Rows are read by column name."""

    query: str
    want: Want
    params: dict[str, Any] = field(default_factory=dict)


Script = Generator[Step, Any, T]
Execute = Callable[[Step], Awaitable[Any]]


class Engine(Protocol):
    """One database, as the store uses it.

    ``shared``: a fleet of gateway instances uses it at once (PostgreSQL); else one process
    owns it (SQLite's file lock, the in-memory engine), so the limits, the task poll cache and
    in-flight recovery live in that process. ``created``: opening made a new, empty ledger.
    """

    shared: bool
    instance_id: str
    lease_s: float
    created: bool
    closed: bool
    failures: int  # times it could not be used: a fleet member's view of the others restarts

    async def read(self, script: Script[T]) -> T:
        """Run a script of reads (SQLite: on its read connection, beside the writer)."""

    async def write(self, script: Script[T], *, atomic: bool = False, defer: bool = False) -> T:
        """Run a script and commit; ``atomic``: all of its statements or none of them (a
        script of one write need not say so: a failing statement undoes itself). ``defer``:
        nobody is held up until it commits (a settlement after the answer), so an engine that
        commits in batches may hold it briefly for the next batch."""

    async def check_ready(self) -> None:
        """Prove the database is the configured one and writable; StorageUnavailable if not."""

    async def close(self) -> None:
        """Commit what is queued and close; closing twice is harmless."""


def only(step: Step) -> Script[Any]:
    """A script of one statement."""
    return (yield step)


def one(query: str, **params: Any) -> Step:
    return Step(query, "one", params)


def every(query: str, **params: Any) -> Step:
    return Step(query, "all", params)


def count(query: str, **params: Any) -> Step:
    return Step(query, "count", params)


async def drive(script: Script[T], execute: Execute) -> T:
    """Run ``script`` to its end: each step through ``execute``, its result (or the refusal it
    raised) sent back in."""
    result: Any = None
    refused: Refused | None = None
    while True:
        try:
            step = script.send(result) if refused is None else script.throw(refused)
        except StopIteration as done:
            value: T = done.value
            return value
        refused = None
        try:
            result = await execute(step)
        except Refused as exc:
            refused = exc


def run_now(operation: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends to its end, here and now, outside any event loop.

    The SQLite writer thread drives scripts with the same ``drive`` as the event loop, its
    ``execute`` an ``async def`` that calls sqlite3 directly and awaits nothing.
    """
    try:
        operation.send(None)
    except StopIteration as done:
        value: T = done.value
        return value
    operation.close()
    raise RuntimeError("a synchronous step suspended")
