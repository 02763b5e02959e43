"""Prometheus metrics of one worker, on a registry of its own (tests run several workers).

Besides the worker's own health, per-agent KPI counters (``agentstream_agent_*_total``,
labels ``agent``, ``version``, ``model``, ``tenant``) for teams that watch agents in
Grafana: counters, so PromQL rates and ratios of rates give cost per task, escalation rate
and the like over any range. Labels are bounded: after ``MAX_KPI_SERIES`` label sets, new
ones are counted under ``other``; session, task and trace ids are never labels.
"""

from __future__ import annotations

from typing import Final

import polars as pl
import pyarrow as pa
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

KPI_LABELS: Final = ("agent", "version", "model", "tenant")
_KEY_COLUMNS: Final = ("agent_id", "agent_version", "model", "tenant_id")
MAX_KPI_SERIES: Final = 2_000
OTHER: Final = "other"


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
        # The repartition hop's cost: window partials per flush and shard, never per event.
        self.hop_messages = Counter(
            "agentstream_hop_messages",
            "Messages handed on to the repartition topic (sent again from the outbox included)",
            registry=r,
        )
        self.hop_bytes = Counter(
            "agentstream_hop_bytes",
            "Bytes of the messages handed on to the repartition topic",
            registry=r,
        )
        self.consumer_lag = Gauge(
            "agentstream_consumer_lag", "Messages behind the end of the events topic", registry=r
        )
        # What backpressure bounds (memory in use): the operator's view of a slow or failing sink.
        self.records_held = Gauge(
            "agentstream_records_held",
            "Records read from the events topic and not yet landed (pending, landing or retried)",
            registry=r,
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

        def kpi(name: str, doc: str, *extra: str) -> Counter:
            return Counter(name, doc, [*KPI_LABELS, *extra], registry=r)

        self.agent_cost = kpi("agentstream_agent_cost_usd", "Cost of model calls, in US dollars")
        self.agent_tokens = kpi(
            "agentstream_agent_tokens", "Tokens of model calls, by direction", "direction"
        )
        self.agent_llm_calls = kpi("agentstream_agent_llm_calls", "Model calls")
        self.agent_tasks = kpi("agentstream_agent_tasks", "Task events, by outcome", "outcome")
        self.agent_escalations = kpi("agentstream_agent_escalations", "Escalations to a human")
        self.agent_tool_calls = kpi("agentstream_agent_tool_calls", "Tool calls")
        self.agent_errors = kpi(
            "agentstream_agent_errors", "Failed steps, by kind (tool: tool calls in error)", "kind"
        )
        self._kpi_keys: set[tuple[str, ...]] = set()

    def observe_events(self, events: pa.Table) -> None:
        """Add a landed batch to the per-agent KPI counters: one group-by over its columns,
        then one increment per label set (never a loop over events)."""
        if events.num_rows == 0:
            return
        frame = pl.from_arrow(
            events.select(
                [
                    *_KEY_COLUMNS,
                    "type",
                    "cost_usd",
                    "input_tokens",
                    "output_tokens",
                    "outcome",
                    "status",
                ]
            )
        )
        assert isinstance(frame, pl.DataFrame)
        llm = pl.col("type") == "llm_call"
        tool = pl.col("type") == "tool_call"
        task = pl.col("type") == "task"
        sums = (
            frame.with_columns(pl.col(c).fill_null("") for c in _KEY_COLUMNS)
            .group_by(*_KEY_COLUMNS)
            .agg(
                pl.col("cost_usd").filter(llm).sum().alias("cost"),
                pl.col("input_tokens").filter(llm).sum().alias("input"),
                pl.col("output_tokens").filter(llm).sum().alias("output"),
                llm.sum().alias("llm_calls"),
                (pl.col("type") == "escalation").sum().alias("escalations"),
                tool.sum().alias("tool_calls"),
                (tool & (pl.col("status") == "error")).sum().alias("tool_errors"),
                *(
                    (task & (pl.col("outcome") == o)).sum().alias(f"task_{o}")
                    for o in ("started", "completed", "failed", "abandoned")
                ),
            )
        )
        for row in sums.iter_rows(named=True):
            key = self._bounded(tuple(row[c] for c in _KEY_COLUMNS))
            labels = dict(zip(KPI_LABELS, key, strict=True))
            for counter, value, extra in (
                (self.agent_cost, row["cost"], {}),
                (self.agent_tokens, row["input"], {"direction": "input"}),
                (self.agent_tokens, row["output"], {"direction": "output"}),
                (self.agent_llm_calls, row["llm_calls"], {}),
                (self.agent_escalations, row["escalations"], {}),
                (self.agent_tool_calls, row["tool_calls"], {}),
                (self.agent_errors, row["tool_errors"], {"kind": "tool"}),
                *(
                    (self.agent_tasks, row[f"task_{o}"], {"outcome": o})
                    for o in ("started", "completed", "failed", "abandoned")
                ),
            ):
                if value:
                    counter.labels(**labels, **extra).inc(value)

    def _bounded(self, key: tuple[str, ...]) -> tuple[str, ...]:
        if key in self._kpi_keys:
            return key
        if len(self._kpi_keys) >= MAX_KPI_SERIES:
            return (OTHER,) * len(key)
        self._kpi_keys.add(key)
        return key

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
