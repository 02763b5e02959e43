"""Prometheus metrics of one worker, on a registry of its own (tests run several workers)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class WorkerTelemetry:
    """Counters the worker updates once per batch, and the text the ``/metrics`` page serves."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events_in = Counter(
            "agentstream_events_in", "Messages read from the events topic", registry=r
        )
        self.events_landed = Counter(
            "agentstream_events_landed", "Valid events landed as Parquet", registry=r
        )
        self.dead_letters = Counter(
            "agentstream_dead_letters", "Messages routed to the dead-letter topic", registry=r
        )
        self.duplicates = Counter(
            "agentstream_duplicates",
            "Events dead-lettered as repeats of a landed event_id",
            registry=r,
        )
        self.anomalies = Counter(
            "agentstream_anomalies", "Anomaly records (drift, outlier, recovery)", registry=r
        )
        self.late_events = Counter(
            "agentstream_late_events", "Events that arrived after their window closed", registry=r
        )
        self.metrics_emitted = Counter(
            "agentstream_metrics_emitted", "Metrics rows of closed windows", registry=r
        )
        self.landing_errors = Counter(
            "agentstream_landing_errors", "Flushes that failed to land or publish", registry=r
        )
        self.lake_conflicts = Counter(
            "agentstream_lake_conflicts",
            "Flushes retried because another writer committed to the lake first",
            registry=r,
        )
        self.consumer_lag = Gauge(
            "agentstream_consumer_lag", "Messages behind the end of the events topic", registry=r
        )
        self.batch_seconds = Histogram(
            "agentstream_batch_seconds",
            "Time to validate, aggregate, land and commit one flush",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=r,
        )
        self.batch_events = Histogram(
            "agentstream_batch_events",
            "Messages per flush",
            buckets=(1, 10, 100, 1_000, 10_000, 50_000, 100_000, 250_000),
            registry=r,
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
