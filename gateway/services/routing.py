"""Several upstreams: where a generation goes, where it fails over to, and what each upstream's
answers say about its health.

A request fails over to the next upstream only when it provably did not start there: the
connection was refused or failed (TLS included), it was reset before the request was fully
written, or the upstream answered 401, 402, 429 or a 5xx API error (an upstream's failed
requests are not charged). Anything after the request may have started (a timeout or a lost
connection after sending, a 5xx that is not the API's, a truncated answer) stays uncertain, as
with one upstream, and is never sent anywhere else. Each upstream is tried at most once per
request; a request that can reach only one upstream keeps that upstream's own retries
(``max_attempts``) of what never started, as before.

Before anything is reserved, ``plan`` names the upstreams the request may reach and the price
it is held at (the highest of theirs); ``submit`` then routes it among those (smooth weighted
round-robin within a priority, ``gateway.core.balance``) and skips any whose price went above
the hold, so whichever serves it costs no more than was held. Health (``gateway.core.health``)
is learned per instance from generations only; polls and downloads go to their upstream
whatever its state.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from gateway.core.balance import Candidate, route
from gateway.core.config import DEFAULT_UPSTREAM, Settings, UpstreamConfig
from gateway.core.errors import UpstreamFailure, UpstreamRejected, UpstreamUnavailable
from gateway.core.health import (
    OK,
    Health,
    Policy,
    Verdict,
    abandoned,
    available,
    observe,
    reloaded,
    retry_after,
    take,
)
from gateway.core.wire import UpstreamBody
from gateway.ops.metrics import Metrics
from gateway.upstream.base import Reply, SendState, Upstream, error_label
from gateway.upstream.pool import UpstreamPool

log = logging.getLogger("gateway.routing")

FAILOVER_STATUSES = (401, 402, 429)
Outcome = Literal["ok", "rejected", "unavailable", "uncertain"]
_Send = Callable[[Upstream, bool], Awaitable[Reply]]  # (its client, alone) -> its answer


@dataclass(frozen=True, slots=True)
class Plan:
    """The upstreams a request may reach, decided before its hold: it is held at ``price``."""

    quality: str
    candidates: tuple[Candidate, ...]
    price: int


@dataclass(frozen=True, slots=True)
class Routed:
    """Where a request went and what came of it: the last upstream's reply or error."""

    result: Reply | UpstreamFailure | UpstreamRejected | UpstreamUnavailable
    upstream: str | None = None  # the upstream that answered (or was last tried)
    price: int | None = None  # its price per image for the request's quality
    failovers: tuple[str, ...] = ()  # the upstreams tried before it
    attempts: int = 0  # sends, over every upstream tried


@dataclass(frozen=True, slots=True)
class UpstreamStatus:
    name: str
    state: str
    until: float | None
    last_error: str | None
    priority: int
    weight: int


@dataclass(slots=True)
class _Routes:
    """What ``Routing`` keeps between requests: the settings it last saw, each upstream's
    health, and the round-robin scores."""

    settings: Settings | None = None
    configs: tuple[UpstreamConfig, ...] = ()
    health: dict[str, Health] = field(default_factory=dict)
    scores: dict[str, int] = field(default_factory=dict)


class Routing:
    def __init__(
        self,
        *,
        pool: UpstreamPool,
        settings: Callable[[], Settings],
        metrics: Metrics,
        clock: Callable[[], datetime],
    ) -> None:
        self._pool = pool
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._routes = _Routes()
        self._refresh()

    # -- before the hold -----------------------------------------------------------------------

    def plan(self, quality: str) -> Plan:
        """The upstreams available now and the price to hold; UpstreamUnavailable if none is
        (nothing must be reserved then)."""
        configs = self._refresh()
        now = self._now()
        reachable = [c for c in configs if available(self._routes.health[c.name], now)]
        if not reachable:
            wait = retry_after(
                [self._routes.health[c.name] for c in configs],
                now,
                min(c.cooldown_s for c in configs),
            )
            raise UpstreamUnavailable(
                "No upstream can take requests right now (each is cooling down after failures "
                "or disabled); nothing was reserved or charged. Retry after the time given.",
                wait,
            )
        return Plan(
            quality,
            tuple(Candidate(c.name, c.priority, c.weight) for c in reachable),
            max(c.prices[quality] for c in reachable),
        )

    # -- sending -------------------------------------------------------------------------------

    async def submit(
        self,
        plan: Plan,
        path: str,
        body: UpstreamBody,
        query: dict[str, str],
        state: SendState,
    ) -> Routed:
        """Send to the plan's upstreams in route order until one answers or the request may
        have started; the last upstream's error only when every one was tried."""
        configs = {c.name: c for c in self._refresh()}
        now = self._now()
        live = [
            c
            for c in plan.candidates
            if c.name in configs
            and configs[c.name].prices[plan.quality] <= plan.price
            and available(self._routes.health[c.name], now)
        ]
        order, self._routes.scores = route(live, self._routes.scores)
        tried: list[str] = []
        attempts = 0
        last: Routed | None = None
        for name in order:
            health = self._routes.health.get(name)
            if health is None or not available(health, self._now()):
                continue  # cooled meanwhile, or another request is probing it
            if last is not None and last.upstream is not None:
                assert isinstance(last.result, UpstreamFailure | UpstreamRejected)
                reason = error_label(last.result)
                self._metrics.failovers.labels(last.upstream, name, reason).inc()
                log.info("failing over from upstream %s (%s) to %s", last.upstream, reason, name)
                tried.append(last.upstream)
            state.upstream = name
            result, sends = await self._attempt(
                name,
                configs[name],
                lambda client, alone: client.submit(path, body, query, state, retry=alone),
                alone=len(order) == 1,
            )
            attempts += sends
            price = configs[name].prices[plan.quality]
            last = Routed(result, name, price, tuple(tried), attempts)
            if not _may_fail_over(result):
                return last
        if last is not None:
            return last
        error = UpstreamUnavailable(
            "No upstream could take this request (each cooled down or was disabled while it "
            "waited); nothing was sent or charged.",
            retry_after(list(self._routes.health.values()), self._now(), 1.0),
        )
        return Routed(error)

    async def _attempt(
        self, name: str, config: UpstreamConfig, send: _Send, *, alone: bool
    ) -> tuple[Reply | UpstreamFailure | UpstreamRejected, int]:
        """One upstream's try (its own retries only when it is the request's only upstream),
        what came of it and how many sends it took; its health learns from it."""
        client = self._pool.client(name)
        assert client is not None  # every configured upstream has one
        self._routes.health[name], probe = take(self._routes.health[name], self._now())
        if probe:
            log.info("probing upstream %s", name)
        try:
            reply = await send(client, alone)
        except (UpstreamFailure, UpstreamRejected) as exc:
            self._metrics.upstream_errors.labels(error_label(exc)).inc()
            self._metrics.upstream_requests.labels(name, _outcome(exc)).inc()
            self._learn(name, config, _verdict(exc), probe)
            return exc, exc.attempts
        except BaseException:
            if probe and name in self._routes.health:
                self._routes.health[name] = abandoned(self._routes.health[name])
            raise
        self._metrics.upstream_requests.labels(name, "ok").inc()
        self._learn(name, config, OK, probe)
        return reply, reply.attempts

    def _learn(self, name: str, config: UpstreamConfig, verdict: Verdict, probe: bool) -> None:
        before = self._routes.health.get(name)
        if before is None:  # removed by a reload while this request ran
            return
        policy = Policy(config.cooldown_s, config.max_fails, config.quota_retry_s)
        now = self._now()
        after = observe(before, verdict, now, policy, probe=probe)
        self._routes.health[name] = after
        if after.state == before.state and after.until == before.until:
            return
        if after.state == "healthy":
            log.info("upstream %s is healthy again", name)
        elif verdict.kind == "auth":
            log.error(
                "upstream %s refused its central key (HTTP 401): disabled until a reload; fix "
                "its api_key_env or api_key_file and reload. Nothing was charged.",
                name,
            )
        elif verdict.kind == "quota":
            log.error(
                "upstream %s has no balance or quota left (HTTP 402): disabled until %s or a "
                "reload; top the account up. Nothing was charged.",
                name,
                _rfc3339(after.until),
            )
        elif after.state == "cooling":
            log.warning(
                "upstream %s is cooling down until %s after %s; requests go to the others",
                name,
                _rfc3339(after.until),
                verdict.error,
            )

    # -- tasks and results ---------------------------------------------------------------------

    async def get_task(self, upstream: str | None, task_id: str) -> Reply:
        """Ask the upstream that created the task, configured or retired (None: a task from
        before several upstreams, asked at the ``default`` upstream or else the first)."""
        name = self.owner(upstream)
        client = self._pool.client(name)
        if client is None:
            raise UpstreamFailure(
                f"This task was created at upstream {name!r}, which is no longer configured, "
                "so it cannot be asked; an administrator must add it back to the config.",
                code="upstream_not_configured",
                uncertain=False,
            )
        return await client.get_task(task_id)

    def owner(self, upstream: str | None) -> str:
        """The upstream a task (or result) of ``upstream`` belongs to."""
        if upstream is not None:
            return upstream
        names = [c.name for c in self._refresh()]
        return DEFAULT_UPSTREAM if DEFAULT_UPSTREAM in names else names[0]

    def retired(self, upstream: str | None) -> bool:
        """Removed by a reload: kept for polling its tasks and fetching its results only."""
        return self._pool.retired(self.owner(upstream))

    def known(self, upstream: str | None) -> bool:
        return self._pool.client(self.owner(upstream)) is not None

    def known_configs(self) -> Iterable[UpstreamConfig]:
        """The configured upstreams, then the retired ones (whose results may still be asked
        for)."""
        self._refresh()
        return self._pool.known()

    def config(self, upstream: str | None) -> UpstreamConfig | None:
        """The config of a configured or retired upstream."""
        client = self._pool.client(self.owner(upstream))
        return client.config if client is not None else None

    # -- reporting -----------------------------------------------------------------------------

    def status(self) -> list[UpstreamStatus]:
        """Each configured upstream's health, in the config's order."""
        configs = self._refresh()
        found = []
        for c in configs:
            h = self._routes.health[c.name]
            found.append(UpstreamStatus(c.name, h.state, h.until, h.last_error, c.priority,
                                        c.weight))  # fmt: skip
        return found

    # -- plumbing ------------------------------------------------------------------------------

    def _now(self) -> float:
        return self._clock().timestamp()

    def _refresh(self) -> tuple[UpstreamConfig, ...]:
        """Follow a reload (every reload makes new settings): new upstreams start healthy,
        disabled ones are tried again, removed ones retire, and changed weights restart the
        round-robin."""
        settings = self._settings()
        routes = self._routes
        if settings is routes.settings:
            return routes.configs
        configs = settings.upstreams
        added, retired = self._pool.sync(configs)
        if routes.configs:
            weights = {(c.name, c.priority, c.weight) for c in configs}
            if weights != {(c.name, c.priority, c.weight) for c in routes.configs}:
                routes.scores = {}
        routes.health = {
            c.name: reloaded(routes.health[c.name]) if c.name in routes.health else Health()
            for c in configs
        }
        if routes.configs and (added or retired):
            log.info(
                "upstreams reloaded: %s added, %s removed (kept for polling their tasks only)",
                ", ".join(added) or "none",
                ", ".join(retired) or "none",
            )
        routes.settings, routes.configs = settings, configs
        return configs


def _may_fail_over(result: object) -> bool:
    """Whether the request provably did not start there: safe to send to another upstream."""
    if isinstance(result, UpstreamFailure):
        return not result.uncertain
    if isinstance(result, UpstreamRejected):
        status = result.upstream_status or 0
        return status in FAILOVER_STATUSES or status >= 500
    return False


def _outcome(exc: UpstreamFailure | UpstreamRejected) -> Outcome:
    """The ``outcome`` label of ``gateway_upstream_requests_total``."""
    if _may_fail_over(exc):
        return "unavailable"
    return "uncertain" if isinstance(exc, UpstreamFailure) else "rejected"


def _verdict(exc: UpstreamFailure | UpstreamRejected) -> Verdict:
    """What a failed attempt says about the upstream itself."""
    status = exc.upstream_status
    label = f"HTTP {status}" if status is not None and status >= 400 else error_label(exc)
    if isinstance(exc, UpstreamRejected):
        if status == 401:
            return Verdict("auth", label)
        if status == 402:
            return Verdict("quota", label)
        if status in (429, 503) and exc.retry_after is not None:
            wait = exc.retry_after
            return Verdict("rate_limited", f"{label}, Retry-After {wait:g} s", retry_after=wait)
        if status is not None and status < 500 and status != 429:
            return Verdict("ok")  # the request's own fault: the upstream works
    return Verdict("failure", label)


def _rfc3339(ts: float | None) -> str:
    if ts is None:
        return "a reload"
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
