"""Every scenario through the real broker and one worker: incidents found, control silent.

The six scenarios run side by side in one topic: each scenario's agents are renamed
``<scenario>/<agent>`` so their keys never meet, which tests all of them in one worker run.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from pathlib import Path

import msgspec
import pytest

from pipeline import schema
from pipeline.config import Settings
from pipeline.evaluate import score
from pipeline.generate import TrafficConfig, generate
from pipeline.publisher import Publisher
from pipeline.scenarios import DRIFT_SCENARIOS, QUALITY_SCENARIOS, ground_truth
from sinks.catalog import connect
from tests.helpers import produce_raw, running_worker, unique_settings, wait_committed

pytestmark = pytest.mark.timeout(900)

EVENTS = 200_000
SEED = 3
# Detection delay bound, in 1-minute windows (a slow ramp takes longest: see the README).
MAX_DELAY = 30
# Evaluation and feedback scenarios run in test_evaluation_pipeline.py, on one agent's traffic.
SCENARIOS = tuple(n for n in DRIFT_SCENARIOS if n not in QUALITY_SCENARIOS)


async def _publish(settings: Settings, records: list[tuple[bytes, bytes]]) -> None:
    async with Publisher(settings) as pub:
        for i in range(0, len(records), 50_000):
            await pub.publish_raw(records[i : i + 50_000])


def test_every_scenario_on_kafka(bootstrap: str, tmp_path: Path) -> None:
    settings = unique_settings(bootstrap, tmp_path / "lake")
    stream: list[tuple[object, bytes, bytes]] = []
    truth = {}
    newest = None
    for name in SCENARIOS:
        config = TrafficConfig(events=EVENTS, seed=SEED, scenario=name)
        truth[name] = [
            msgspec.structs.replace(i, agent_id=f"{name}/{i.agent_id}")
            for i in ground_truth(config)
        ]
        for ev in generate(config):
            ev = msgspec.structs.replace(
                ev, agent_id=f"{name}/{ev.agent_id}", event_id=f"{name}/{ev.event_id}"
            )
            stream.append((ev.ts, (ev.task_id or ev.agent_id).encode(), schema.encode(ev)))
            newest = ev.ts if newest is None else max(newest, ev.ts)
    assert newest is not None
    # Every scenario's stream covers the same event time, so interleaving them by time keeps
    # each one in order; the publisher's keys keep each task in one partition.
    stream.sort(key=lambda item: item[0])  # stable: each scenario's own order is kept
    asyncio.run(_publish(settings, [(k, v) for _, k, v in stream]))
    sentinel = {
        "type": "task",
        "event_id": "sentinel",
        "schema_version": 1,
        "agent_id": "sentinel",
        "ts": (newest + timedelta(minutes=5)).isoformat(),
        "outcome": "started",
    }
    produce_raw(settings, [msgspec.json.encode(sentinel)], [b"sentinel"])

    last_window = newest.replace(second=0, microsecond=0)
    with running_worker(settings) as proc:
        wait_committed(settings, len(stream) + 1, proc, timeout=600)
        deadline = time.monotonic() + 120
        query = "SELECT count(*) FROM metrics WHERE window_start = $1"
        while connect(settings.data_dir).execute(query, [last_window]).fetchall() == [(0,)]:
            assert time.monotonic() < deadline, "the last windows were never emitted"
            time.sleep(0.5)

    con = connect(settings.data_dir)
    found = {}
    for name in SCENARIOS:
        rows = con.sql(
            f"SELECT * EXCLUDE (date) FROM anomalies WHERE starts_with(agent_id, '{name}/')"
        ).to_arrow_table()
        found[name] = score(name, SEED, truth[name], rows)
    summary = {
        n: (r.detected, r.incidents, r.delays_windows, r.false_alerts) for n, r in found.items()
    }
    print(summary)

    assert found["steady"].alerts == 0, summary
    for name in SCENARIOS:
        r = found[name]
        assert r.false_alerts == [], summary
        assert all(d <= MAX_DELAY for d in r.delays_windows), summary
        if name == "latency-regression":
            # One incident per agent on the slowed model; the smallest sits at the sample floor.
            assert r.detected >= r.incidents - 1, summary
        else:
            assert r.detected == r.incidents, summary
