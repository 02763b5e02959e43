"""Windowed KPIs through the real broker: the worker's metrics equal DuckDB over its events."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import msgspec
import pytest

from pipeline import schema
from pipeline.generate import TrafficConfig, generate
from sinks.catalog import connect
from tests.helpers import (
    consume_all,
    produce_raw,
    running_worker,
    scalar,
    unique_settings,
    wait_committed,
)
from tests.test_windows import assert_metrics_match_events

pytestmark = pytest.mark.timeout(300)

WINDOW_S = 60


def test_worker_metrics_equal_duckdb_over_landed_events(bootstrap: str, tmp_path: Path) -> None:
    # Small fetches and flushes, so lateness is judged batch by batch as in production.
    settings = unique_settings(
        bootstrap,
        tmp_path / "lake",
        allowed_lateness_s=10.0,
        fetch_max_records=250,
        flush_max_events=500,
    )
    # 20k events over ~400 s of event time, 2% of them 600 s late (beyond the lateness).
    events = list(generate(TrafficConfig(events=20_000, seed=5, late_fraction=0.02)))
    newest = max(ev.ts for ev in events)
    # A final on-time event well past the rest moves event time on, so every earlier window
    # closes without waiting for the wall clock.
    sentinel = msgspec.structs.replace(
        events[0], event_id="sentinel", ts=newest + timedelta(seconds=3 * WINDOW_S)
    )
    values = [schema.encode(ev) for ev in events]
    keys = [(ev.task_id or ev.agent_id).encode() for ev in events]
    produce_raw(settings, values, keys)
    produce_raw(settings, [schema.encode(sentinel)], [b"sentinel"])
    cutoff_us = int(sentinel.ts.timestamp()) // WINDOW_S * WINDOW_S * 1_000_000

    with running_worker(settings) as proc:
        wait_committed(settings, len(values) + 1, proc)
        # The window of the newest regular event closes in the flush that reads the sentinel.
        last_window = newest.replace(second=0, microsecond=0)
        deadline = time.monotonic() + 30
        query = "SELECT count(*) FROM metrics WHERE window_start = $1"
        while connect(settings.data_dir).execute(query, [last_window]).fetchall() == [(0,)]:
            assert time.monotonic() < deadline, "the last windows were never emitted"
            time.sleep(0.3)

    lake = settings.data_dir
    con = connect(lake)
    ev = con.sql("SELECT * EXCLUDE (date) FROM events").to_arrow_table()
    got = con.sql("SELECT * EXCLUDE (date) FROM metrics").to_arrow_table()
    n_late = scalar(lake, "SELECT count(*) FROM events WHERE late")
    # Partitions are read one after another, and an unread partition holds event time back,
    # so only the last partitions read see late events: a few dozen of the 400 delayed ones.
    assert n_late >= 30, "the traffic must contain late events for this test to mean anything"
    assert scalar(lake, "SELECT sum(late_events) FROM metrics WHERE level = 'key'") == n_late
    assert scalar(lake, "SELECT count(*) - count(DISTINCT metric_id) FROM metrics") == 0
    assert_metrics_match_events(ev, got, WINDOW_S, before_us=cutoff_us)

    # Subscribers get the same rows on the metrics topic, as JSON with the same ids.
    n_rows = got.num_rows
    records = consume_all(settings, settings.metrics_topic, n_rows)
    assert len(records) == n_rows
    topic_ids = sorted(r.key.decode() for r in records)
    assert topic_ids == sorted(got.column("metric_id").to_pylist())
    first = msgspec.json.decode(records[0].value)
    assert set(first) == set(got.schema.names)
