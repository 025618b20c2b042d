"""Prometheus metrics, in a registry owned by the app (never the process-global default)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gateway.ledger import Settlement
from gateway.money import units_to_cny

UPSTREAM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 240, 300)
RESERVE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "gateway_requests", "Requests answered", ["team", "endpoint", "status"], registry=r
        )
        self.images = Counter(
            "gateway_images", "Images generated and paid for", ["team", "quality"], registry=r
        )
        self.spent = Counter("gateway_spent_cny", "CNY captured", ["team"], registry=r)
        self.budget_remaining = Gauge(
            "gateway_budget_remaining_cny",
            "Budget left in the current period",
            ["team"],
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "gateway_upstream_seconds",
            "Time the upstream took to answer",
            ["endpoint", "mode"],
            buckets=UPSTREAM_BUCKETS,
            registry=r,
        )
        self.reserve_seconds = Histogram(
            "gateway_reserve_seconds",
            "Time to reserve a budget hold (durable SQLite write)",
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

    def settled(self, team: str, quality: str, settlement: Settlement) -> None:
        if settlement.state == "captured":
            self.spent.labels(team).inc(units_to_cny(settlement.amount))
            self.images.labels(team, quality).inc(settlement.images)

    def render(self) -> bytes:
        return generate_latest(self.registry)
