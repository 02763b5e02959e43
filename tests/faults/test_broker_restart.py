"""The Kafka broker restarts while agents publish and the worker consumes.

The test runs a broker of its own (``LocalBroker("kafka", data_dir=...)``), so it can stop it:
``restart()`` keeps topics, messages and committed offsets. During the outage the publisher's
sends fail; the feeder (an at-least-once agent runtime) sends the failed chunk again, so the
topic may hold some events twice. The worker must ride out the outage (its flush fails, it
keeps the batch, and commits once the broker is back), and the lake must end with every
published event exactly once in ``events``: repeats of an ``event_id`` go to ``dead_letters``
(de-duplication), and every message of the topic is in exactly one of the two.
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import msgspec
import pytest

from pipeline import schema
from pipeline.broker import LocalBroker
from pipeline.generate import TrafficConfig, generate
from tests.faults.support import (
    Feeder,
    Figures,
    audit_lake,
    audit_offsets,
    committed,
    end_offsets,
    lake_sql,
    landed_tables,
    metrics_identity,
    produce_to_partitions,
    report,
    wait_until,
    wait_window_emitted,
    worker_pool,
)
from tests.helpers import unique_settings
from tests.test_windows import assert_metrics_match_events

pytestmark = pytest.mark.timeout(300)

WINDOW_S = 60
EVENTS = 14_000


def test_broker_restart_while_publishing_and_consuming(tmp_path: Path) -> None:
    t0 = time.monotonic()
    broker = LocalBroker("kafka", data_dir=tmp_path / "broker")
    broker.start(timeout=120)
    try:
        settings = unique_settings(broker.bootstrap, tmp_path / "lake", allowed_lateness_s=10.0)
        events = list(generate(TrafficConfig(events=EVENTS, seed=81)))
        records = [((ev.task_id or ev.agent_id).encode(), schema.encode(ev)) for ev in events]
        newest = max(ev.ts for ev in events)
        sentinels = {
            p: msgspec.structs.replace(
                events[p], event_id=f"sentinel-{p}", ts=newest + timedelta(seconds=3 * WINDOW_S)
            )
            for p in range(settings.partitions)
        }
        cutoff_us = int(sentinels[0].ts.timestamp()) // WINDOW_S * WINDOW_S * 1_000_000

        with worker_pool(settings, tmp_path) as make:
            worker = make("worker").start()
            wait_until(
                "worker ready", lambda: "consuming" in worker.log_text(), 120, alive=[worker]
            )
            # An agent runtime that gives up on an unacknowledged chunk after 2 s and resends it.
            # Published over ~30 s, so the restart (after 3,000 committed) comes mid-stream
            # even when the worker's first flushes are slow.
            feeder = Feeder(settings, records, rate=EVENTS / 30, chunk_timeout=2)
            feeder.start()
            wait_until(
                "worker committing", lambda: committed(settings) >= 3000, 120, alive=[worker]
            )
            sent_before = feeder.sent
            down = time.monotonic()
            broker.restart(timeout=120)  # the outage: stop, then start on the same port
            outage_s = time.monotonic() - down
            sent_after = feeder.sent
            feeder.finish(180)
            assert sent_before < len(records), "the restart came after publishing finished"
            ends_total = sum(end_offsets(settings).values())
            wait_until(
                "everything committed",
                lambda: committed(settings) >= ends_total,
                180,
                alive=[worker],
            )
            produce_to_partitions(settings, {p: schema.encode(s) for p, s in sentinels.items()})
            wait_until(
                "sentinels committed",
                lambda: committed(settings) >= ends_total + len(sentinels),
                60,
                alive=[worker],
            )
            wait_window_emitted(settings, newest.replace(second=0, microsecond=0), 60, [worker])
            assert worker.terminate() == 0
            log = worker.log_text()

        offsets = audit_offsets(settings)
        ids = [ev.event_id for ev in events] + [s.event_id for s in sentinels.values()]
        lake = audit_lake(settings.data_dir, ids)
        reasons = lake_sql(
            settings.data_dir,
            "SELECT split_part(reason, ' ', 1) || ' ' || split_part(reason, ' ', 2), count(*) "
            "FROM dead_letters GROUP BY 1",
        )
        key_events, key_late, landed = metrics_identity(settings.data_dir, cutoff_us)
        ev, got = landed_tables(settings.data_dir)
        n_late = sum(ev.column("late").to_pylist())
    finally:
        broker.stop()

    repeats = offsets.messages - len(ids)  # messages the feeder's retries sent twice
    print("offsets:", offsets.summary())
    print("lake:", lake.summary())
    print(f"dead letter reasons: {reasons}; feeder retries: {feeder.retries} {feeder.errors[:3]}")
    report(
        Figures(
            "broker restart",
            messages=offsets.messages,
            faults=1,
            fault_kind=f"broker restarted ({outage_s:.0f} s down) while publishing/consuming",
            lost=max(offsets.missing, lake.lost),
            duplicates=max(offsets.twice, lake.duplicate_rows),
            seconds=time.monotonic() - t0,
            extra={
                "publisher chunks retried": feeder.retries,
                "repeats in the topic": repeats,
                "sent before/after restart": f"{sent_before}/{sent_after}",
                "failed flushes retried": log.count("flush failed, offsets not committed"),
            },
        )
    )
    assert (offsets.missing, offsets.twice) == (0, 0), offsets.summary()
    assert lake.lost == lake.unexpected == lake.duplicate_rows == 0, lake.summary()
    assert lake.event_rows == len(ids)
    # Repeats sent by the publisher's retries are dead letters of their own, nothing else is.
    assert offsets.in_dead == repeats
    assert all(reason.startswith("duplicate event_id") for reason, _ in reasons), reasons
    assert (key_events, key_late) == (landed - n_late, n_late)
    assert_metrics_match_events(ev, got, WINDOW_S, before_us=cutoff_us)
