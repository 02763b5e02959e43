"""Three workers started together on one fresh lake, as ``docker compose up --scale worker=3``.

Live traffic while they run; in one run the worker that owns the aggregate shard of the
busiest agent is SIGKILLed mid-stream and never restarted. Either way every event lands exactly
once, and ``metrics`` holds exactly one row per window, key and level whose measures equal
DuckDB's recomputation from the landed events (a worker's share is not a row of its own any
more: issue 14), and the events marked late are exactly those late on their partition's stream
time, kill or not.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from pipeline import schema
from pipeline.broker import free_port
from pipeline.generate import TrafficConfig, generate
from sinks.catalog import connect
from streams.hop import partition_of
from streams.windows import DIMENSIONS
from tests.faults.support import (
    Feeder,
    Figures,
    aggregate_owner,
    audit_lake,
    audit_offsets,
    committed,
    landed_tables,
    metrics_identity,
    misjudged_lateness,
    produce_to_partitions,
    report,
    sentinels_ahead,
    wait_until,
    wait_window_emitted,
    worker_pool,
)
from tests.helpers import unique_settings
from tests.test_windows import assert_metrics_match_events

pytestmark = pytest.mark.timeout(300)

WINDOW_S = 60
EVENTS = 12_000


@pytest.mark.parametrize(
    "kill", [False, True], ids=["no-fault", "sigkill-busiest-agents-shard-owner"]
)
def test_three_workers_started_together_count_every_event_once(
    bootstrap: str, tmp_path: Path, kill: bool
) -> None:
    t0 = time.monotonic()
    settings = unique_settings(
        bootstrap,
        tmp_path / "lake",
        partitions=6,
        allowed_lateness_s=10.0,
        fetch_max_records=1000,
        flush_max_events=3000,
    )
    events = list(generate(TrafficConfig(events=EVENTS, seed=97, late_fraction=0.01)))
    records = [((ev.task_id or ev.agent_id).encode(), schema.encode(ev)) for ev in events]
    newest = max(ev.ts for ev in events)
    sentinels = sentinels_ahead(events, settings.partitions, 3 * WINDOW_S)
    total = len(records) + len(sentinels)
    cutoff_us = int(sentinels[0].ts.timestamp()) // WINDOW_S * WINDOW_S * 1_000_000

    killed: str | None = None
    with worker_pool(settings, tmp_path) as make:
        workers = [make(f"worker-{i}", web_port=free_port()) for i in range(3)]
        for w in workers:  # together: they race to create the lake and join the groups
            w.start()
        for w in workers:
            wait_until(
                f"{w.name} consuming",
                lambda w=w: f"consuming {settings.events_topic}" in w.log_text(),
                120,
                alive=workers,
            )
        feeder = Feeder(settings, records, rate=len(records) / 12)
        feeder.start()
        alive = list(workers)
        if kill:
            wait_until("a third sent", lambda: feeder.sent >= len(records) // 3, 60, alive=alive)
            # The shard of the busiest agent: the state that matters most.
            busiest = Counter(ev.agent_id for ev in events).most_common(1)[0][0]
            shard = partition_of(busiest, settings.aggregate_partitions)
            owner = aggregate_owner(workers, settings.repartition_topic, shard)
            assert owner is not None, f"no worker took the aggregate shard {shard}"
            wait_until(
                "the owner aggregating",
                lambda: (h := owner.health()) is not None and h[1].get("metrics_emitted", 0) > 0,
                60,
                alive=alive,
            )
            owner.kill()  # never restarted: the others take its partitions and its state
            killed = owner.name
            alive.remove(owner)
        feeder.finish(120)
        wait_until(
            "the stream committed", lambda: committed(settings) >= len(records), 120, alive=alive
        )
        produce_to_partitions(settings, {p: schema.encode(s) for p, s in sentinels.items()})
        wait_until("everything committed", lambda: committed(settings) >= total, 90, alive=alive)
        wait_window_emitted(settings, newest.replace(second=0, microsecond=0), 90, alive)
        for w in alive:
            assert w.terminate() == 0

    ids = [ev.event_id for ev in events] + [s.event_id for s in sentinels.values()]
    offsets = audit_offsets(settings)
    lake = audit_lake(settings.data_dir, ids)
    key_events, key_late, landed = metrics_identity(settings.data_dir, cutoff_us)
    late, wrongly_late, missed_late = misjudged_lateness(
        settings.data_dir, WINDOW_S, settings.allowed_lateness_s
    )
    dims = ", ".join(DIMENSIONS)
    row = (
        connect(settings.data_dir)
        .execute(
            f"SELECT count(*), count(DISTINCT (window_start, level, {dims})) FROM metrics "
            f"WHERE epoch_us(window_start) < {cutoff_us}"
        )
        .fetchone()
    )
    assert row is not None
    rows, distinct_rows = row
    print("offsets:", offsets.summary())
    print("lake:", lake.summary())
    report(
        Figures(
            "three workers at once" + (", aggregate owner SIGKILLed" if kill else ""),
            messages=total,
            faults=1 if kill else 0,
            fault_kind=f"SIGKILL of {killed}, never restarted" if kill else "none",
            lost=max(offsets.missing, lake.lost),
            duplicates=max(offsets.twice, lake.duplicate_rows) + rows - distinct_rows,
            seconds=time.monotonic() - t0,
            extra={
                "key-level events + late in metrics": key_events + key_late,
                "landed": landed,
                "metrics rows": rows,
                "late (on time marked late, late not marked)": (late, wrongly_late, missed_late),
            },
        )
    )
    assert (offsets.missing, offsets.twice) == (0, 0), offsets.summary()
    assert offsets.in_events == total and offsets.in_dead == 0
    assert lake.lost == lake.unexpected == lake.duplicate_rows == 0, lake.summary()
    assert lake.metric_duplicates == 0
    assert rows == distinct_rows, f"{rows - distinct_rows} extra rows for a window/key/level"
    assert key_events + key_late == landed, (key_events, key_late, landed)
    # Lateness follows each partition's own records, whoever reads them: before issue 14's
    # per-partition stream time, the workers that took the killed one's partitions over
    # judged them on their own clocks, and ~2,300 of 12,000 on-time events came out late.
    assert (wrongly_late, missed_late) == (0, 0), (late, wrongly_late, missed_late)
    assert late > 0  # the generator's late events (1 %) were seen as late
    ev, got = landed_tables(settings.data_dir)
    assert_metrics_match_events(ev, got, WINDOW_S, before_us=cutoff_us)
