"""Warm start: detectors and budgets primed from the lake, new keys borrowing a baseline."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.evaluate import land_history, replay
from pipeline.generate import TrafficConfig, generate
from pipeline.scenarios import NEW_VERSION, ground_truth
from sinks.catalog import EVENTS, connect, prepare
from sinks.lake import Flush
from sinks.tables import events_to_table
from streams.budgets import BudgetTracker, load_budgets
from streams.detect import DetectorConfig, DriftDetector
from streams.enrich import CostEstimator
from streams.warmstart import metrics_history, spend_history


def _primed(config: TrafficConfig, lake: Path, **changes: object) -> DriftDetector:
    detector = DriftDetector(DetectorConfig(**changes))  # type: ignore[arg-type]
    detector.observe(metrics_history(lake, 60), detected_at=config.start)
    return detector


def test_a_new_version_is_judged_against_its_predecessor_from_its_first_windows(
    tmp_path: Path,
) -> None:
    # One tenant, two agents: research-agent's keys get ~30 tasks a window, enough for
    # min_samples (at the generator's default mix its keys are too thin to be judged alone,
    # and only its agent-level rollup alerts).
    config = TrafficConfig(
        events=43_200,
        seed=2,
        scenario="new-version-regresses",
        rate_per_s=60,
        agents=2,
        tenants=1,
    )
    (incident,) = ground_truth(config)
    land_history(config, tmp_path, minutes=35)
    history = metrics_history(tmp_path, 60)
    # The last 60 windows of each key at most, one row per window and key, in emit order.
    assert history.num_rows > 0
    assert history["window_end"][-1].as_py() <= config.start

    def v8_alerts(found: pa.Table) -> list[dict[str, object]]:
        return [
            r
            for r in found.to_pylist()
            if r["level"] == "key"
            and r["agent_version"] == NEW_VERSION
            and r["kind"] in ("outlier", "drift")
            and r["measure"] in ("cost_per_task", "tokens_per_call")
        ]

    borrowed = v8_alerts(replay(config, detector=_primed(config, tmp_path)))
    assert borrowed, "the new version's keys were not flagged"
    first = min(r["window_start"] for r in borrowed)  # type: ignore[type-var]
    assert incident.starts_at <= first <= incident.starts_at + timedelta(minutes=3)
    assert all("baseline borrowed from v7/" in str(r["message"]) for r in borrowed)
    # Without borrowing, the new keys are blind for their warm-up (30 windows > this run).
    cold = v8_alerts(replay(config, detector=_primed(config, tmp_path, borrow_baselines=False)))
    assert cold == []


def test_budget_spend_is_primed_from_events_below_the_committed_offsets(tmp_path: Path) -> None:
    start = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
    events = list(generate(TrafficConfig(events=6_000, seed=4, start=start)))
    estimated = CostEstimator().fill(events)
    n = len(events)
    table = events_to_table(
        events,
        {
            "cost_estimated": estimated,
            "late": [False] * n,
            "kafka_partition": [0] * n,
            "kafka_offset": list(range(n)),
        },
    )
    lake = prepare(tmp_path)
    lake.claim("ev", {0: 0}, "g")
    lake.commit(Flush(rows={EVENTS.name: table}, positions={("ev", 0): (0, n)}, group_id="g"))
    committed = n // 2
    tracker = BudgetTracker(load_budgets("tenant:tenant-01=1000/day,agent:support-bot=5000/month"))
    newest = max(e.ts for e in events)
    since = tracker.history_start(newest)
    assert since == datetime(2026, 1, 1, tzinfo=UTC)  # the month budget reaches furthest
    tracker.update(spend_history(tmp_path, since, {0: committed}))
    tracker.check(newest, newest)
    spent = {r["budget"]: r["spent_usd"] for r in tracker.status().to_pylist()}
    con = connect(tmp_path)
    for budget, where in (
        ("tenant:tenant-01=1000/day", "tenant_id = 'tenant-01'"),
        ("agent:support-bot=5000/month", "agent_id = 'support-bot'"),
    ):
        ((expected,),) = con.execute(
            f"SELECT sum(cost_usd) FROM events WHERE {where} AND kafka_offset < {committed}"
        ).fetchall()
        assert spent[budget] == pytest.approx(expected, rel=1e-9)
    # Without committed offsets (a new group re-reads the topic) nothing is primed.
    assert spend_history(tmp_path, since, {}).num_rows == 0


def test_a_worker_without_usable_detector_state_primes_from_the_lake(tmp_path: Path) -> None:
    import msgspec

    from pipeline.config import Settings
    from streams.aggregate import Shard, ShardState

    config = TrafficConfig(events=1_000)
    land_history(config, tmp_path, minutes=5)
    keys = (
        metrics_history(tmp_path, 60)
        .select(["level", "agent_id", "agent_version", "prompt_version", "model", "tenant_id"])
        .to_pylist()
    )
    watched = {tuple(k.values()) for k in keys if k["level"] in ("key", "agent")}
    settings = Settings.load(env={}, data_dir=tmp_path)
    # No snapshot for the aggregate state (a new group, a lost .state): a warm start.
    shard = Shard(settings)
    shard.prime(rules=True)
    assert shard.detector.tracked_keys() == len(watched)
    # A snapshot of an older version (an upgrade): not a crash, fresh detectors primed again.
    old = b"agentstream.detect\x00" + b"1:0.1.0:0.22\x00..."
    state = msgspec.msgpack.decode(shard.snapshot(), type=ShardState)
    restored = Shard.restore(
        settings, msgspec.msgpack.encode(msgspec.structs.replace(state, detector=old))
    )
    assert restored.detector.tracked_keys() == len(watched)


def test_a_lake_without_metrics_rows_or_table_primes_nothing(tmp_path: Path) -> None:
    from sinks.contracts import METRICS
    from sinks.lake import ALIAS
    from streams.windows import METRICS_SCHEMA

    config = TrafficConfig(events=1_000)
    land_history(config, tmp_path / "full", minutes=5)
    full = metrics_history(tmp_path / "full", 60)
    assert full.num_rows > 0
    lake = prepare(tmp_path / "empty")  # every table, no rows (a first start)
    empty = metrics_history(tmp_path / "empty", 60)
    assert empty.num_rows == 0 and empty.schema == full.schema == METRICS_SCHEMA
    # A lake of a version before the metrics table: read as empty too, not an error.
    lake.con.execute(f"DROP TABLE {ALIAS}.{METRICS.name}")
    lake.close()
    assert metrics_history(tmp_path / "empty", 60).num_rows == 0
