"""The same answers from one worker or three (issue 14).

One stream, published live (a chunk at a time, the workers keeping up): a regressing rollout
(one agent) and a budget burn side by side, at a late hour of the day so the budget's
forecast has little day left. It runs once through one worker and once through three workers
started together; the landed metrics (every row's id and counts), anomalies (ids), release
verdicts (ids and verdicts) and budget alerts must be the same, and not trivially so: the
rollout is judged ``regressed`` and the budget alerts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pytest

from pipeline import schema
from pipeline.broker import free_port
from pipeline.generate import TrafficConfig
from sinks.catalog import connect
from tests.faults.support import (
    committed,
    produce_to_partitions,
    sentinels_ahead,
    wait_until,
    wait_window_emitted,
    worker_pool,
)
from tests.helpers import produce_raw, side_by_side, unique_settings
from tests.test_budgets import LATE_START, replay_table

pytestmark = pytest.mark.timeout(600)

CHUNK = 6_000


def _stream() -> tuple[list[Any], str]:
    burn = TrafficConfig(events=30_000, seed=2, scenario="budget-burn", start=LATE_START)
    stream = side_by_side(
        {
            "rollout": TrafficConfig(
                events=36_000, seed=2, scenario="regressing-rollout", agents=1, start=LATE_START
            ),
            "burn": burn,
        }
    )
    # The burning tenant's spend (priced as the worker prices it): a budget of 60 % of it is
    # spent before the day ends, so a forecast alert and then the exhaustion alert come.
    table = replay_table(burn)
    mine = pc.equal(table["tenant_id"], "tenant-03")
    spend = pc.sum(table.filter(mine)["cost_usd"]).as_py()
    return stream, f"tenant:tenant-03={0.6 * spend:.2f}/day"


def _run(bootstrap: str, tmp_path: Path, workers: int, stream: list[Any], spec: str) -> Path:
    settings = unique_settings(
        bootstrap,
        tmp_path / f"lake-{workers}",
        partitions=6,
        budgets=spec,
        # Generous: a chunk's wait for three workers on a busy machine must not make the next
        # chunk's events late by the wall clock in one run and not in the other.
        allowed_lateness_s=240.0,
        flush_max_events=4_000,
        fetch_max_records=2_000,
    )
    values = [schema.encode(ev) for ev in stream]
    keys = [(ev.task_id or ev.agent_id).encode() for ev in stream]
    with worker_pool(settings, tmp_path) as make:
        procs = [make(f"w{workers}-{i}", web_port=free_port()) for i in range(workers)]
        for p in procs:
            p.start()
        for p in procs:
            wait_until(
                "consuming",
                lambda p=p: f"consuming {settings.events_topic}" in p.log_text(),
                120,
                alive=procs,
            )
        for lo in range(0, len(values), CHUNK):
            produce_raw(settings, values[lo : lo + CHUNK], keys[lo : lo + CHUNK])
            n = min(lo + CHUNK, len(values))
            wait_until(f"{n} committed", lambda n=n: committed(settings) >= n, 120, alive=procs)
        # Far ahead on every partition: every window of the stream closes (with several
        # workers a partition that stays quiet holds windows back until the wall clock passes).
        ahead = sentinels_ahead(stream, settings.partitions, 600)
        produce_to_partitions(settings, {p: schema.encode(ev) for p, ev in ahead.items()})
        last = stream[-2].ts.replace(second=0, microsecond=0)
        wait_window_emitted(settings.data_dir, last, 90, procs)
        for p in procs:
            assert p.terminate() == 0
    return settings.data_dir


def _landed(lake: Path) -> dict[str, list[tuple[Any, ...]]]:
    con = connect(lake)
    last = con.sql("SELECT max(window_start) FROM metrics").fetchone()
    assert last is not None
    return {
        # The last window closed by the sentinel is complete in both runs; later ones are not
        # closed in either.
        "metrics": con.execute(
            "SELECT metric_id, events, late_events, llm_calls, tasks_started FROM metrics "
            "WHERE window_start <= $1 ORDER BY metric_id",
            [last[0]],
        ).fetchall(),
        "anomalies": con.sql(
            "SELECT anomaly_id, kind, detector FROM anomalies ORDER BY anomaly_id"
        ).fetchall(),
        "verdicts": con.sql(
            "SELECT verdict_id, measure, verdict FROM release_verdicts ORDER BY verdict_id"
        ).fetchall(),
    }


@pytest.mark.xfail(
    strict=False,
    reason=(
        "issue 14: in 1 of 3 fresh-clone CI runs the metrics rows of one and three workers differed (5,895 rows with one worker; cause not yet found); anomalies and verdicts agreed"
    ),
)
def test_one_and_three_workers_land_the_same_answers(bootstrap: str, tmp_path: Path) -> None:
    stream, spec = _stream()
    one = _landed(_run(bootstrap, tmp_path, 1, stream, spec))
    three = _landed(_run(bootstrap, tmp_path, 3, stream, spec))
    kinds = {kind for _, kind, _ in one["anomalies"]}
    print({k: len(v) for k, v in one.items()}, sorted(kinds))
    assert "budget_burn" in kinds, one["anomalies"]
    assert any(v == "regressed" for *_, v in one["verdicts"]), one["verdicts"]
    for table in ("metrics", "anomalies", "verdicts"):
        # On a difference, the rows of each side only (the xfail's cause is still unknown).
        only_one = sorted(set(one[table]) - set(three[table]))[:20]
        only_three = sorted(set(three[table]) - set(one[table]))[:20]
        assert one[table] == three[table], (
            table,
            len(one[table]),
            len(three[table]),
            only_one,
            only_three,
        )
