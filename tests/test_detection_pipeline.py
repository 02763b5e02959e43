"""Drift detection through the real broker: the injected incident is found, as in the
in-process replay that `agentstream evaluate` scores."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import msgspec
import pytest

from pipeline import schema
from pipeline.evaluate import replay, score
from pipeline.generate import TrafficConfig, generate
from pipeline.scenarios import ground_truth
from sinks.catalog import connect
from tests.helpers import consume_all, produce_raw, running_worker, unique_settings, wait_committed

pytestmark = pytest.mark.timeout(600)

EVENTS = 200_000


def test_cost_spike_is_detected_on_kafka_as_in_the_replay(bootstrap: str, tmp_path: Path) -> None:
    config = TrafficConfig(events=EVENTS, seed=1, scenario="cost-spike")
    events = list(generate(config))
    newest = max(ev.ts for ev in events)
    # A last event far ahead closes every window, as time passing would.
    sentinel = msgspec.structs.replace(
        events[0], event_id="sentinel", ts=newest + timedelta(minutes=5)
    )
    settings = unique_settings(bootstrap, tmp_path / "lake")
    produce_raw(
        settings,
        [schema.encode(ev) for ev in events],
        [(ev.task_id or ev.agent_id).encode() for ev in events],
    )
    produce_raw(settings, [schema.encode(sentinel)], [b"sentinel"])
    last_window = newest.replace(second=0, microsecond=0)
    with running_worker(settings) as proc:
        wait_committed(settings, EVENTS + 1, proc, timeout=300)
        deadline = time.monotonic() + 60
        query = "SELECT count(*) FROM metrics WHERE window_start = $1"
        while connect(settings.data_dir).execute(query, [last_window]).fetchall() == [(0,)]:
            assert time.monotonic() < deadline, "the last windows were never emitted"
            time.sleep(0.5)

    landed = (
        connect(settings.data_dir)
        .sql("SELECT * EXCLUDE (date) FROM anomalies ORDER BY window_start, anomaly_id")
        .to_arrow_table()
    )
    result = score("cost-spike", 1, ground_truth(config), landed)
    assert result.detected == result.incidents == 1, result
    assert result.delays_windows[0] <= 3
    assert result.false_alerts == []

    # The replay that `agentstream evaluate` scores finds the same: the incident, with the
    # same first detection. (Row for row they can differ: costs are float sums, and the
    # order of additions follows the batches, which differ between the two runs.)
    replayed = score("cost-spike", 1, ground_truth(config), replay(config))
    assert replayed.detected == result.detected
    assert replayed.delays_windows == result.delays_windows
    assert replayed.false_alerts == []

    # Subscribers see each anomaly on the topic, with its example events from the window.
    records = consume_all(settings, settings.anomalies_topic, landed.num_rows)
    assert sorted(r.key.decode() for r in records) == sorted(landed["anomaly_id"].to_pylist())
    alert = next(
        msgspec.json.decode(r.value)
        for r in records
        if msgspec.json.decode(r.value)["kind"] != "recovery"
    )
    assert 1 <= len(alert["example_event_ids"]) <= 5
