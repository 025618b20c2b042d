"""Prometheus metrics, in a registry owned by the app (never the process-global default).

Money gauges (budget, remaining, reserved, uncertain) are read from the ledger by a background
loop, and once more (waiting a fraction of a second at most) when scraped, so they are right on
every instance however the money moved, and still answered, at their last values, while the
database is down. Counters count what this process did.
The ``key`` label is a key's identity (``team/name`` or ``team/sha256:…``), bounded by the config.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gateway.core.money import units_to_cny

UPSTREAM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 240, 300)
REQUEST_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 240, 300,
)  # fmt: skip
RESERVE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "gateway_requests",
            "Requests answered",
            ["team", "endpoint", "status", "key"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "gateway_request_seconds",
            "Whole request in the gateway, from its first byte to its answer",
            ["endpoint", "mode"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.images = Counter(
            "gateway_images", "Images generated and paid for", ["team", "quality"], registry=r
        )
        self.spent = Counter("gateway_spent_cny", "CNY captured", ["team", "key"], registry=r)
        self.overrun = Counter(
            "gateway_ledger_overrun_cny",
            "CNY the upstream billed above what was held (recorded as an explicit overrun)",
            ["team"],
            registry=r,
        )
        self.corrections = Counter(
            "gateway_ledger_corrections",
            "Corrections: images delivered for an entry already closed without them, counted late",
            ["team"],
            registry=r,
        )
        self.budget = Gauge(
            "gateway_budget_cny", "Budget of the current period", ["team"], registry=r
        )
        self.budget_remaining = Gauge(
            "gateway_budget_remaining_cny",
            "Budget left in the current period",
            ["team"],
            registry=r,
        )
        self.reserved = Gauge(
            "gateway_reserved_cny", "CNY held for requests in flight", ["team"], registry=r
        )
        self.uncertain = Gauge(
            "gateway_uncertain_cny",
            "CNY whose outcome is unknown until an admin resolves it",
            ["team"],
            registry=r,
        )
        self.key_expiry = Gauge(
            "gateway_key_expiry_timestamp_seconds",
            "When a team key expires (Unix time); keys without an expiry are not listed",
            ["key"],
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "gateway_upstream_seconds",
            "Time the upstream took to answer",
            ["endpoint", "mode"],
            buckets=UPSTREAM_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors",
            "Upstream failures by HTTP status, or timeout, connection_lost, unreachable, "
            "bad_response, too_large",
            ["status"],
            registry=r,
        )
        self.upstream_up = Gauge(
            "gateway_upstream_up",
            "1 while an upstream is healthy, 0 while it cools down or is disabled (this "
            "instance's view)",
            ["upstream"],
            registry=r,
        )
        self.upstream_requests = Counter(
            "gateway_upstream_requests",
            "Generations sent to each upstream, by outcome: ok, rejected (the request's fault), "
            "unavailable (it did not start: failed over), uncertain",
            ["upstream", "outcome"],
            registry=r,
        )
        self.failovers = Counter(
            "gateway_failovers",
            "Generations sent to another upstream because one did not start them",
            ["from", "to", "reason"],
            registry=r,
        )
        self.reserve_seconds = Histogram(
            "gateway_reserve_seconds",
            "Time to reserve a budget hold (durable write)",
            buckets=RESERVE_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("gateway_requests_in_flight", "Requests being handled", registry=r)
        self.pending_tasks = Gauge(
            "gateway_pending_tasks", "Async tasks not yet settled", registry=r
        )
        self.deduped = Counter(
            "gateway_deduplicated_requests",
            "Retries answered without a new generation",
            ["team"],
            registry=r,
        )
        self.write_retries = Counter(
            "gateway_ledger_write_retries",
            "Ledger writes after an answer (settlements, stored outcomes) retried after a failure",
            registry=r,
        )
        self.console_signin_failures = Counter(
            "gateway_console_signin_failures",
            "Console sign-ins refused (unknown or expired key, used or unknown sign-in link)",
            registry=r,
        )
        self.unsettled_results = Gauge(
            "gateway_unsettled_results",
            "Paid results held in memory because their settlement could not be stored yet",
            registry=r,
        )
        self.results_bytes = Gauge(
            "gateway_results_bytes",
            "Bytes of result images in the store (each file once), as of the last count",
            registry=r,
        )
        self.results_images = Gauge(
            "gateway_results_images", "Result images in the store, as of the last count", registry=r
        )
        self.results_fetch_failures = Counter(
            "gateway_results_fetch_failures",
            "Result images not kept: the upstream's file could not be fetched (after retries), "
            "was not an image, or the store's disk or index refused it",
            ["reason"],
            registry=r,
        )
        for reason in ("fetch", "not_image", "disk", "index"):
            self.results_fetch_failures.labels(reason)
        self.cache_saved = Counter(
            "gateway_cache_saved_cny",
            "CNY not spent: requests answered from the store (X-Gateway-Cache: reuse), at what "
            "the request they repeat cost",
            ["team"],
            registry=r,
        )

        self.storage_up = Gauge(
            "gateway_storage_up",
            "1 if the last check of the database succeeded, 0 if it failed (read at scrape time "
            "from a background check: /metrics never waits on the database)",
            registry=r,
        )
        self.storage_last_ok = Gauge(
            "gateway_storage_last_ok_timestamp_seconds",
            "When the database last answered a check (Unix time); the money gauges are as of then",
            registry=r,
        )
        self.build_info = Gauge(
            "gateway_build_info",
            "1, labelled with this process's release and the schema step its code knows",
            ["version", "schema"],
            registry=r,
        )
        self.config_info = Gauge(
            "gateway_config_info",
            "1, labelled with the first 12 hex digits of the SHA-256 of the config in force",
            ["sha256"],
            registry=r,
        )
        self.config_reloads = Counter(
            "gateway_config_reloads",
            "Config reloads (SIGHUP) by result: applied, or refused (the running config stays)",
            ["result"],
            registry=r,
        )
        for result in ("applied", "refused"):
            self.config_reloads.labels(result)

    def captured(self, team: str, key: str, quality: str, amount: int, images: int) -> None:
        """Count money and images that moved into ``spent``."""
        self.spent.labels(team, key).inc(units_to_cny(amount))
        self.images.labels(team, quality).inc(images)

    def render(self) -> bytes:
        return generate_latest(self.registry)
