"""The tests' one HTTP client: post a generation, poll a task, read a team's usage, and check
that an error has the OpenAI shape. (The real OpenAI SDK is ``Gateway.openai()``.)"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import aiohttp
from multidict import CIMultiDictProxy

from gateway.core.ledger import Usage
from gateway.core.periods import period_at

if TYPE_CHECKING:
    from tests.conftest import Gateway

GENERATIONS = "/v1/images/generations"
PROMPT = "a lighthouse"


class Answer(NamedTuple):
    """A response read whole."""

    status: int
    body: Any
    headers: CIMultiDictProxy[str]


def _base(to: Gateway | str) -> str:
    return to if isinstance(to, str) else to.url


def _auth(team: str, key: str | None) -> dict[str, str]:
    from tests.conftest import TEAM_KEYS

    return {"Authorization": f"Bearer {key if key is not None else TEAM_KEYS[team]}"}


async def post(
    to: Gateway | str,
    *,
    team: str = "design",
    key: str | None = None,
    path: str = GENERATIONS,
    suffix: str = "",
    headers: dict[str, str] | None = None,
    payload: object = None,
    **body: Any,
) -> Answer:
    """POST ``{"prompt": PROMPT, **body}`` (or exactly ``payload``) with ``team``'s key (or
    ``key``) to a gateway or a gateway's URL; ``suffix`` is ``?async=1`` for a task."""
    sent = payload if payload is not None else {"prompt": PROMPT, **body}
    async with aiohttp.ClientSession() as http:
        async with http.post(
            _base(to) + path + suffix, headers={**_auth(team, key), **(headers or {})}, json=sent
        ) as resp:
            return Answer(resp.status, await resp.json(), resp.headers)


async def get_task(to: Gateway | str, task_id: str, *, team: str = "design") -> Answer:
    """GET the task as its team sees it."""
    async with aiohttp.ClientSession() as http:
        async with http.get(
            f"{_base(to)}/v1/images/tasks/{task_id}", headers=_auth(team, None)
        ) as resp:
            return Answer(resp.status, await resp.json(), resp.headers)


async def usage(gateway: Gateway, team: str = "design") -> Usage:
    """The team's counters in its current period, from the gateway's ledger."""
    settings = gateway.settings
    period = period_at(settings.teams[team].period, gateway.clock(), settings.server.tz)
    return await gateway.db.usage(team, period.key)


def assert_openai_error(body: Any, *, param: str | None = None) -> dict[str, Any]:
    """``body`` is ``{"error": {"message", "type", "param", "code"}}`` with a message (and
    this ``param``); the error, for more checks."""
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    return error
