"""What the gateway knows about its database without waiting on it.

One loop, owned by a cleanup context, checks the database every ``interval_s`` (and at once when
``/metrics`` asks): whether it answers (``gateway_storage_up``), the money gauges, the config in
force, and the oldest release the database still serves. ``/metrics`` renders what the last
check found, waiting for a fresh one only a fraction of a second, so a scrape answers 200 during
an outage and Prometheus sees a storage alert instead of a dead target.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import datetime

from gateway.core.config import Settings
from gateway.core.config_digest import config_sha256
from gateway.core.ledger import Usage
from gateway.core.live import LiveConfig
from gateway.core.money import units_to_cny
from gateway.core.periods import period_at
from gateway.core.pricing import remaining
from gateway.ops.metrics import Metrics
from gateway.store.manager import Store
from gateway.store.migrations import SchemaState, too_old

log = logging.getLogger("gateway")

CHECK_EVERY_S = 5.0
CHECK_TIMEOUT_S = 5.0  # a check that takes longer counts as the database being down


class StorageWatch:
    def __init__(
        self,
        db: Store,
        metrics: Metrics,
        config: LiveConfig,
        clock: Callable[[], datetime],
        version: str,
        *,
        interval_s: float = CHECK_EVERY_S,
    ) -> None:
        self._db = db
        self._metrics = metrics
        self._config = config
        self._clock = clock
        self.version = version
        self._interval_s = interval_s
        self._wake = asyncio.Event()
        self._waiter: asyncio.Future[None] | None = None
        self._hashed: tuple[Settings, str] | None = None
        self.up: bool | None = None  # None until the first check
        self.upgrade_required: str | None = None  # the oldest release served, when above ours

    async def run(self) -> None:
        """Check now and every ``interval_s``, or sooner when ``fresh`` asks; until cancelled."""
        while True:
            waiter, self._waiter = self._waiter, None
            self._wake.clear()
            await self.check()
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval_s)

    async def fresh(self, wait_s: float) -> None:
        """Ask for a check and wait for it at most ``wait_s``; the gauges keep their last values
        if it takes longer (the database is slow or down)."""
        if self._waiter is None:
            self._waiter = asyncio.get_running_loop().create_future()
        waiter = self._waiter
        self._wake.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(waiter), wait_s)

    async def check(self) -> None:
        self._set_config_info()
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                await self._db.check_ready()
                state = await self._db.schema_state()
                usages = await self._usages()
        except Exception as exc:  # any failure means the same: the ledger cannot be used now
            self._metrics.storage_up.set(0)
            if self.up is not False:
                log.error(
                    "the database does not answer (%s): requests that need it are refused "
                    "with 503; /metrics keeps the last known money figures",
                    type(exc).__name__ if isinstance(exc, TimeoutError) else exc,
                )
            self.up = False
            return
        if self.up is False:
            log.warning("the database answers again")
        self.up = True
        self._metrics.storage_up.set(1)
        self._metrics.storage_last_ok.set(time.time())
        self._set_money(usages)
        self.observe(state)

    async def _usages(self) -> list[tuple[str, Usage]]:
        settings = self._config.current.settings
        now = self._clock()
        found = []
        for team in settings.teams.values():
            period = period_at(team.period, now, settings.server.tz)
            found.append((team.name, await self._db.usage(team.name, period.key)))
        return found

    def _set_money(self, usages: list[tuple[str, Usage]]) -> None:
        """All gauges at once (no await in between): a scrape never sees half of them."""
        settings = self._config.current.settings
        metrics = self._metrics
        for gauge in (
            metrics.budget,
            metrics.budget_remaining,
            metrics.reserved,
            metrics.uncertain,
        ):
            gauge.clear()  # a team removed by a reload is no longer reported
        metrics.key_expiry.clear()
        for name, usage in usages:
            team = settings.teams.get(name)
            if team is None:  # removed by a reload during the check
                continue
            for key in team.all_keys():
                if key.expires is not None:
                    metrics.key_expiry.labels(key.identity).set(key.expires.timestamp())
            metrics.budget.labels(name).set(units_to_cny(team.budget))
            metrics.budget_remaining.labels(name).set(units_to_cny(remaining(team, usage)))
            metrics.reserved.labels(name).set(units_to_cny(usage.reserved))
            metrics.uncertain.labels(name).set(units_to_cny(usage.uncertain))

    def _set_config_info(self) -> None:
        settings = self._config.current.settings
        if self._hashed is None or self._hashed[0] is not settings:
            self._hashed = (settings, config_sha256(settings))
            self._metrics.config_info.clear()
            self._metrics.config_info.labels(self._hashed[1]).set(1)

    def observe(self, state: SchemaState) -> None:
        """Take the database's schema records in: the gate closes (one ERROR line) when it
        serves only newer releases than this one, and opens again if that changes."""
        floor = state.min_release if too_old(self.version, state) else None
        if floor == self.upgrade_required:
            return
        if floor is not None:
            log.error(
                "upgrade required: the database serves image-gateway %s and newer, this instance "
                "is %s; it takes no more requests (/readyz answers 503) until it is upgraded",
                floor,
                self.version,
            )
        else:
            log.warning("the database serves image-gateway %s again: taking requests", self.version)
        self.upgrade_required = floor
