"""The analysis views and macros (sinks/analysis.py) on a lake built without Kafka.

``build_lake`` is also what ``test_notebooks.py`` and ``test_report.py`` use (through
``shared_lake``, built once per session): generated traffic with an incident scenario, costs
estimated as the worker does, window metrics from ``WindowAggregator``, anomalies from
``streams.detect.DriftDetector`` (hand-written rows in the same layout if the detector is
missing or finds nothing), landed through ``sinks.catalog.prepare``.

Every view is checked against an independent computation: straight from ``events`` (task
outcomes, costs, tool errors, latencies with numpy) or from the metrics rows themselves.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.generate import DEFAULT_START, TrafficConfig, generate
from pipeline.publisher import release_event
from sinks import analysis, catalog
from sinks.catalog import EVENTS, METRICS, prepare
from sinks.lake import attach
from sinks.tables import events_to_table
from streams.enrich import CostEstimator
from streams.releases import ReleaseJudge
from streams.windows import DIMENSIONS, WindowAggregator

SCENARIO = "cost-spike"  # support-bot v4: cost per task x3 from mid-stream
EVENTS_N = 30_000
RATE_PER_S = 10.0  # 30k events span 50 one-minute windows: enough for the detector to warm up
SEED = 3
DETECTED_AT_DELAY = timedelta(minutes=2)

# --------------------------------------------------------------------------------------
# building a lake without Kafka
# --------------------------------------------------------------------------------------


def _anomaly_schema() -> pa.Schema:
    types = {
        "VARCHAR": pa.string(),
        "DOUBLE": pa.float64(),
        "TIMESTAMPTZ": pa.timestamp("us", tz="UTC"),
    }
    return pa.schema([pa.field(c, types[t]) for c, t in analysis.ANOMALY_COLUMNS])


def detect(metrics: pa.Table) -> pa.Table | None:
    """Anomaly rows from ``streams.detect`` over ``metrics`` window by window, or None if
    the module is not there. Short warm-up and sample floor: the test lake is 50 windows."""
    try:
        from streams.detect import DetectorConfig, DriftDetector
        from streams.explain import explain
        from streams.warmstart import frame_lookup
    except ImportError:
        return None
    detector = DriftDetector(DetectorConfig(warmup_windows=10, min_samples=10))
    frame = pl.from_arrow(metrics)
    assert isinstance(frame, pl.DataFrame)
    lookup = frame_lookup(frame)
    out = []
    for start in sorted(pc.unique(metrics["window_start"]).to_pylist()):
        rows = metrics.filter(pc.equal(metrics["window_start"], start))
        out.append(explain(detector.observe(rows, start + DETECTED_AT_DELAY), rows, lookup))
    result: pa.Table = pa.concat_tables(out)
    return result


def hand_written_anomalies(metrics: pa.Table) -> pa.Table:
    """A drift, an outlier and a recovery of support-bot's (agent level) cost per task, in
    windows that exist, when no detector is available."""
    con = duckdb.connect()
    con.register("m", metrics)
    rows = con.execute(
        "SELECT window_start, window_end, cost_per_task FROM m WHERE level = 'agent' "
        "AND agent_id = 'support-bot' AND cost_per_task IS NOT NULL ORDER BY window_start"
    ).fetchall()
    baseline = float(np.median([r[2] for r in rows[: len(rows) // 2]]))
    picks = [
        ("drift", len(rows) // 2 + 3),
        ("outlier", len(rows) // 2 + 6),
        ("recovery", len(rows) - 2),
    ]
    out: list[dict[str, Any]] = []
    for kind, i in picks:
        start, end, value = rows[i]
        out.append(
            {
                "anomaly_id": f"hand-{kind}",
                "condition_id": "hand-condition",
                "kind": kind,
                "detected_at": end + DETECTED_AT_DELAY,
                "window_start": start,
                "window_end": end,
                "level": "agent",
                **{d: ("support-bot" if d == "agent_id" else None) for d in DIMENSIONS},
                "measure": "cost_per_task",
                "detector": "page_hinkley" if kind != "outlier" else "ewma_zscore",
                "baseline": baseline,
                "observed": float(value),
                "direction": "up",
                "severity": "info" if kind == "recovery" else "critical",
                "score": 7.0,
                "message": f"cost_per_task of agent support-bot: {kind}",
            }
        )
    return pa.Table.from_pylist(out, schema=_anomaly_schema())


def write_anomalies(root: Path, table: pa.Table) -> None:
    """Land anomaly rows in the lake."""
    prepare(root).append("anomalies", table)


def build_lake(
    root: Path,
    *,
    events: int = EVENTS_N,
    seed: int = SEED,
    scenario: str = SCENARIO,
    rate_per_s: float = RATE_PER_S,
    anomalies: bool = True,
) -> Path:
    """A data directory as the worker would leave it (events, metrics, anomalies), no Kafka."""
    config = TrafficConfig(events=events, seed=seed, rate_per_s=rate_per_s, scenario=scenario)
    metrics = land(root, list(generate(config)))
    if anomalies:
        found = detect(metrics)
        if found is None or pc.sum(pc.not_equal(found["kind"], "recovery")).as_py() in (None, 0):
            found = hand_written_anomalies(metrics)
        write_anomalies(root, found)
    write_verdicts(root, metrics)
    return root


RELEASE_AT = DEFAULT_START + timedelta(minutes=5)


def write_verdicts(root: Path, metrics: pa.Table) -> pa.Table:
    """Release verdicts as the worker would land them: support-bot prompt p13 judged against
    p12 (identical behaviour) from minute 5, one file per window. Returns the rows."""
    judge = ReleaseJudge()
    judge.register(
        events_to_table(
            [
                release_event(
                    agent_id="support-bot",
                    dimension="prompt_version",
                    candidate="p13",
                    baseline="p12",
                    traffic_share=0.4,
                    ts=RELEASE_AT,
                )
            ],
            {
                "cost_estimated": [False],
                "late": [False],
                "kafka_partition": [0],
                "kafka_offset": [0],
            },
        )
    )
    verdicts, _ = judge.observe(metrics, RELEASE_AT)
    prepare(root).append("release_verdicts", verdicts)
    return verdicts


def land(root: Path, evs: list[Any]) -> pa.Table:
    """Land ``evs`` (costs estimated, windows aggregated) in ``root``; return the metrics."""
    n = len(evs)
    estimated = CostEstimator().fill(evs)
    table = events_to_table(
        evs,
        {
            "cost_estimated": estimated,
            "late": [False] * n,
            "kafka_partition": [0] * n,
            "kafka_offset": list(range(n)),
        },
    )
    windows = WindowAggregator(60, 60.0)
    now = pc.max(table["ts"]).as_py()
    late = windows.update(table, now=now)
    table = table.set_column(table.schema.get_field_index("late"), "late", late)
    metrics = pa.concat_tables([windows.close_due(now=now), windows.flush_all()])
    lake = prepare(root)
    lake.append(EVENTS.name, table)
    lake.append(METRICS.name, metrics)
    return metrics


_SHARED: dict[str, Path] = {}


def shared_lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ``build_lake`` per test session, shared by the analysis, notebook and report tests."""
    if "lake" not in _SHARED:
        _SHARED["lake"] = build_lake(tmp_path_factory.mktemp("analysis") / "lake")
    return _SHARED["lake"]


# --------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_lake(tmp_path_factory)


@pytest.fixture()
def con(lake: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    c = analysis.connect(lake)
    try:
        yield c
    finally:
        c.close()


def rows(con: duckdb.DuckDBPyConnection, sql: str) -> list[dict[str, Any]]:
    return analysis.fetch(con, sql).records()


def close(a: float | None, b: float | None, rel: float = 1e-9) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


def raw_events(lake: Path) -> duckdb.DuckDBPyConnection:
    """A connection with ``ev``: the lake's events table itself, none of the views."""
    c = duckdb.connect()
    attach(c, lake, read_only=True)
    c.execute("CREATE VIEW ev AS SELECT * FROM lake.events")
    return c


# --------------------------------------------------------------------------------------
# the views
# --------------------------------------------------------------------------------------


def test_every_view_answers(con: duckdb.DuckDBPyConnection) -> None:
    for name, sql, _doc in analysis.ANALYSIS_VIEWS:
        if sql.startswith("CREATE OR REPLACE VIEW"):
            assert con.execute(f"SELECT count(*) FROM {name}").fetchone()[0] > 0, name  # type: ignore[index]
    comments = dict(
        con.execute("SELECT view_name, comment FROM duckdb_views() WHERE NOT internal").fetchall()
    )
    assert (
        comments["task_funnel"]
        == dict((n, d) for n, _, d in analysis.ANALYSIS_VIEWS)["task_funnel"]
    )


def test_release_summary_is_the_latest_look_of_each_measure(
    con: duckdb.DuckDBPyConnection, lake: Path
) -> None:
    """Recomputed in Python from the verdicts table, read without any view."""
    raw = (
        raw_events(lake).execute("SELECT * FROM lake.release_verdicts").to_arrow_table().to_pylist()
    )
    assert raw, "the shared lake has verdicts"
    expected: dict[tuple[str, str], dict[str, Any]] = {}
    looks: dict[tuple[str, str], int] = {}
    for r in sorted(raw, key=lambda r: r["window_end"]):
        key = (r["release_id"], r["measure"])
        expected[key] = r
        looks[key] = looks.get(key, 0) + 1
    got = rows(con, "SELECT * FROM release_summary")
    assert [(g["release_id"], g["measure"]) for g in got] == sorted(expected)
    for g in got:
        want = expected[(g["release_id"], g["measure"])]
        for column in ("verdict", "effect", "effect_low", "confidence", "candidate_value"):
            assert g[column] == want[column], column
        assert g["candidate_version"] == "p13" and g["baseline_version"] == "p12"
        assert g["last_window_end"] == want["window_end"]
        assert g["looks"] == looks[(g["release_id"], g["measure"])]
        assert (g["decided_window_end"] is None) == (want["verdict"] == "running")


def test_ratios_are_the_windows_ratios(con: duckdb.DuckDBPyConnection) -> None:
    """DERIVED recomputes each metrics row's own ratios from its counts (same definitions as
    streams.windows), for every level."""
    ratios = list(analysis.RATIOS)
    sql = analysis._kpi_sql("metric_windows", [("metric_id", "metric_id")], ratios, where=None)
    ours = {r[0]: r[1:] for r in con.execute(sql).fetchall()}
    theirs = con.execute(f"SELECT metric_id, {', '.join(ratios)} FROM metric_windows").fetchall()
    assert len(theirs) == len(ours) > 1000
    for metric_id, *values in theirs:
        for name, a, b in zip(ratios, ours[metric_id], values, strict=True):
            assert close(a, b), (name, metric_id, a, b)


def test_cost_by_version_day_matches_events(lake: Path, con: duckdb.DuckDBPyConnection) -> None:
    expected = (
        raw_events(lake)
        .execute(
            "SELECT CAST(ts AT TIME ZONE 'UTC' AS DATE), agent_id, agent_version, "
            "coalesce(sum(cost_usd), 0), count(*) FILTER (outcome = 'started'), "
            "count(*) FILTER (outcome = 'completed'), count(*) FILTER (type = 'llm_call') "
            "FROM ev WHERE NOT late GROUP BY ALL ORDER BY ALL"
        )
        .fetchall()
    )
    got = con.execute(
        "SELECT day, agent_id, agent_version, cost_usd, tasks_started, tasks_completed, "
        "llm_calls, cost_per_task, cost_per_completed_task FROM cost_by_version_day ORDER BY ALL"
    ).fetchall()
    assert len(got) == len(expected) >= 15
    for g, e in zip(got, expected, strict=True):
        assert g[:3] == e[:3] and g[4:7] == e[4:7]
        assert close(g[3], e[3])
        assert close(g[7], e[3] / e[4] if e[4] else None)
        assert close(g[8], e[3] / e[5] if e[5] else None)


def test_quality_by_version_matches_events(lake: Path, con: duckdb.DuckDBPyConnection) -> None:
    expected = (
        raw_events(lake)
        .execute(
            "SELECT time_bucket(INTERVAL 1 minute, ts, 'UTC') AS w, agent_id, agent_version, "
            "count(*) FILTER (outcome = 'started') AS started, "
            "count(*) FILTER (type = 'escalation') AS esc, "
            "count(*) FILTER (type = 'retrieval') AS ret, "
            "count(*) FILTER (type = 'retrieval' AND coalesce(miss, hits = 0)) AS miss, "
            "count(*) FILTER (type = 'tool_call') AS tools, "
            "count(*) FILTER (type = 'tool_call' AND status = 'error') AS errs "
            "FROM ev WHERE NOT late GROUP BY ALL ORDER BY ALL"
        )
        .fetchall()
    )
    got = con.execute(
        "SELECT window_start, agent_id, agent_version, tasks_started, escalations, retrievals, "
        "retrieval_misses, tool_calls, tool_errors, escalation_rate, retrieval_miss_rate, "
        "tool_error_rate FROM quality_by_version ORDER BY ALL"
    ).fetchall()
    assert [g[:9] for g in got] == expected
    for g in got:
        assert close(g[9], g[4] / g[3] if g[3] else None)
        assert close(g[10], g[6] / g[5] if g[5] else None)
        assert close(g[11], g[8] / g[7] if g[7] else None)


def test_task_funnel_matches_events_and_sums_before_dividing(
    lake: Path, con: duckdb.DuckDBPyConnection
) -> None:
    expected = {
        (a, v): (s, c, f, ab)
        for a, v, s, c, f, ab in raw_events(lake)
        .execute(
            "SELECT agent_id, agent_version, count(*) FILTER (outcome = 'started'), "
            "count(*) FILTER (outcome = 'completed'), count(*) FILTER (outcome = 'failed'), "
            "count(*) FILTER (outcome = 'abandoned') FROM ev WHERE type = 'task' GROUP BY ALL"
        )
        .fetchall()
    }
    funnel = rows(con, "SELECT * FROM task_funnel")
    assert {(r["agent_id"], r["agent_version"]) for r in funnel} == set(expected)
    for r in funnel:
        s, c, f, ab = expected[(r["agent_id"], r["agent_version"])]
        assert (r["tasks_started"], r["tasks_completed"], r["tasks_failed"]) == (s, c, f)
        assert r["tasks_abandoned"] == ab and r["tasks_open"] == s - c - f - ab
        assert close(r["task_success_rate"], c / (c + f + ab))
        assert close(r["completion_rate"], c / s)
    # The funnel's rate is a ratio of sums: for some version the mean of its per-window
    # rates is far from it (windows with few tasks weigh as much as busy ones).
    means = dict(
        ((a, v), m)
        for a, v, m in con.execute(
            "SELECT agent_id, agent_version, avg(escalation_rate) FROM quality_by_version "
            "GROUP BY ALL"
        ).fetchall()
    )
    gaps = [abs(means[(r["agent_id"], r["agent_version"])] - r["escalation_rate"]) for r in funnel]
    assert max(gaps) > 0.005


def test_tool_errors_match_events(lake: Path, con: duckdb.DuckDBPyConnection) -> None:
    expected = {
        t: (n, e, top)
        for t, n, e, top in raw_events(lake)
        .execute(
            "WITH c AS (SELECT tool_name, count(*) AS n, count(*) FILTER (status = 'error') AS e "
            "FROM ev WHERE type = 'tool_call' GROUP BY ALL), "
            "k AS (SELECT tool_name, error_type, count(*) AS k FROM ev WHERE type = 'tool_call' "
            "AND status = 'error' GROUP BY ALL), "
            "best AS (SELECT tool_name, error_type FROM k QUALIFY row_number() OVER "
            "(PARTITION BY tool_name ORDER BY k DESC, error_type) = 1) "
            "SELECT c.tool_name, n, e, best.error_type FROM c LEFT JOIN best USING (tool_name)"
        )
        .fetchall()
    }
    got = rows(con, "SELECT * FROM tool_errors")
    assert {r["tool_name"] for r in got} == set(expected)
    for r in got:
        n, e, top = expected[r["tool_name"]]
        assert (r["calls"], r["errors"], r["top_error_type"]) == (n, e, top)
        assert close(r["error_rate"], e / n)
    rates = [r["error_rate"] for r in got]
    assert rates == sorted(rates, reverse=True)  # worst first


def _raw_rows(lake: Path, where: str) -> list[dict[str, Any]]:
    rel = raw_events(lake).execute(f"SELECT * FROM ev WHERE {where}")
    names = [d[0] for d in rel.description or []]
    return [dict(zip(names, r, strict=True)) for r in rel.fetchall()]


def test_evaluation_quality_matches_events(lake: Path, con: duckdb.DuckDBPyConnection) -> None:
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for e in _raw_rows(lake, "type = 'evaluation'"):
        key = (e["agent_id"], e["prompt_version"], e["evaluator"], e["evaluator_kind"])
        groups.setdefault(key, []).append(e)
    got = rows(con, "SELECT * FROM evaluation_quality")
    assert len(got) == len(groups) >= 20  # 12 agents x prompts x (hallucination, helpfulness, tone)
    for r in got:
        evs = groups[(r["agent_id"], r["prompt_version"], r["evaluator"], r["evaluator_kind"])]
        passed = sum(e["passed"] is True for e in evs)
        judged = sum(e["passed"] is not None for e in evs)
        assert (r["evaluations"], r["judged"], r["passed"]) == (len(evs), judged, passed)
        assert r["failed"] == judged - passed
        assert close(r["pass_rate"], passed / judged)
        assert close(r["mean_score"], float(np.mean([e["score"] for e in evs])), rel=1e-9)
    rates = [r["pass_rate"] for r in got]
    assert rates == sorted(rates)  # worst first


def test_feedback_loop_counts_rates_and_changes(lake: Path, con: duckdb.DuckDBPyConnection) -> None:
    evs = _raw_rows(lake, "type <> 'release'")
    tasks: dict[tuple[str, str], int] = {}
    first: dict[tuple[str, str], datetime] = {}
    items: dict[tuple[str, str, str, str], int] = {}
    for e in evs:
        v = (e["agent_id"], e["prompt_version"])
        first[v] = min(first.get(v, e["ts"]), e["ts"])
        tasks[v] = tasks.get(v, 0) + (e["type"] == "task" and e["outcome"] == "started")
        found: tuple[str, str] | None = None
        if e["type"] == "escalation":
            found = ("escalation", e["reason"] or "(no reason)")
        elif e["type"] == "feedback" and e["correction"] is not None:
            found = ("correction", e["correction"])
        elif e["type"] == "tool_call" and e["status"] == "error":
            found = (
                "failing_tool",
                e["tool_name"] + (f": {e['error_type']}" if e["error_type"] else ""),
            )
        elif e["type"] == "retrieval" and e["miss"]:
            found = ("retrieval_miss", e["data_source"] or "(no source)")
        elif e["type"] == "guardrail" and e["action"] == "block":
            found = ("guardrail_block", e["policy_id"])
        elif e["type"] == "task" and e["outcome"] == "abandoned":
            found = ("abandoned_task", "abandoned")
        elif e["type"] == "evaluation" and e["passed"] is False:
            found = ("failing_evaluator", e["evaluator"])
        if found is not None:
            items[(*v, *found)] = items.get((*v, *found), 0) + 1
    previous: dict[tuple[str, str], str | None] = {}
    for agent in {a for a, _ in first}:
        ordered = sorted((t, p) for (a, p), t in first.items() if a == agent)
        for (_, p), before in zip(ordered, [None, *ordered[:-1]], strict=True):
            previous[(agent, p)] = before[1] if before else None

    def per_100(agent: str, prompt: str | None, category: str, item: str) -> float:
        n = items.get((agent, prompt, category, item), 0) if prompt else 0  # type: ignore[arg-type]
        return 100 * n / tasks[(agent, prompt)] if prompt else 0.0  # type: ignore[index]

    got = rows(con, "SELECT * FROM feedback_loop")
    assert len(got) == len(items) > 100
    categories = {r["category"] for r in got}
    assert categories == {
        "escalation",
        "correction",
        "failing_tool",
        "retrieval_miss",
        "guardrail_block",
        "abandoned_task",
        "failing_evaluator",
    }
    for r in got:
        key = (r["agent_id"], r["prompt_version"], r["category"], r["item"])
        v = (r["agent_id"], r["prompt_version"])
        assert r["count"] == items[key] and r["tasks"] == tasks[v]
        assert r["previous_version"] == previous[v]
        assert close(r["per_100_tasks"], per_100(*key))
        before = per_100(r["agent_id"], previous[v], r["category"], r["item"])
        assert abs(r["change_per_100_tasks"] - (per_100(*key) - before)) < 1e-9
    by_version: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in got:
        by_version.setdefault((r["agent_id"], r["prompt_version"]), []).append(r)
    for ranked in by_version.values():
        assert [r["rank"] for r in ranked] == list(range(1, len(ranked) + 1))
        counts = [r["count"] for r in ranked]
        assert counts == sorted(counts, reverse=True)


def test_latency_by_model_matches_numpy(lake: Path, con: duckdb.DuckDBPyConnection) -> None:
    samples: dict[tuple[str, str | None], list[float]] = {}
    for step, model, ms in (
        raw_events(lake)
        .execute(
            "SELECT type, model, latency_ms FROM ev WHERE latency_ms IS NOT NULL "
            "AND type IN ('llm_call', 'tool_call', 'retrieval')"
        )
        .fetchall()
    ):
        samples.setdefault((step, model), []).append(ms)
    got = rows(con, "SELECT * FROM latency_by_model")
    assert {(r["step"], r["model"]) for r in got} == set(samples)
    assert {r["model"] for r in got if r["step"] != "llm_call"} == {None}
    for r in got:
        values = np.array(samples[(r["step"], r["model"])])
        assert r["calls"] == len(values)
        for q in (50, 95, 99):
            assert close(r[f"latency_p{q}_ms"], float(np.percentile(values, q)), rel=1e-9)


def test_kpis_every_buckets_and_series(con: duckdb.DuckDBPyConnection) -> None:
    total = con.execute(
        "SELECT sum(cost_usd), sum(tasks_started) FROM metric_windows WHERE level = 'key'"
    ).fetchone()
    assert total is not None
    for dim in analysis.DIMS:
        got = con.execute(
            f"SELECT sum(cost_usd), sum(tasks_started), count(DISTINCT bucket) "
            f"FROM kpis_every(INTERVAL 5 minute, '{dim}')"
        ).fetchone()
        assert got is not None
        assert close(got[0], total[0]) and got[1] == total[1]
        assert got[2] == 11  # 09:00 .. 09:50, 5-minute buckets aligned in UTC
    versions = {
        r[0]
        for r in con.execute(
            "SELECT DISTINCT series FROM kpis_every(INTERVAL 1 hour, 'version')"
        ).fetchall()
    }
    assert (
        "support-bot v4" in versions
        and len(versions) == con.execute("SELECT count(*) FROM task_funnel").fetchone()[0]
    )  # type: ignore[index]
    with pytest.raises(duckdb.Error, match="dim must be one of"):
        con.execute("SELECT * FROM kpis_every(INTERVAL 1 hour, 'planet')").fetchall()


def test_kpi_series_pools_the_rest_as_other(con: duckdb.DuckDBPyConnection) -> None:
    everything = analysis.kpi_series(con, "escalation_rate", "version", step_s=600, top=100)
    top2 = analysis.kpi_series(con, "escalation_rate", "version", step_s=600, top=2)
    assert list(top2.values)[-1] == "other" and len(top2.values) == 3
    assert list(top2.values)[:2] == list(everything.values)[:2]  # the largest (most tasks)
    pooled = analysis.kpi_series(con, "escalation_rate", "all", step_s=600)
    # The pooled rate of every bucket is the tasks-weighted mix of the series' rates.
    for i in range(len(top2.buckets)):
        num = sum((s[i] or 0.0) * top2.weights[n][i] for n, s in top2.values.items())
        den = sum(w[i] for w in top2.weights.values())
        assert close(num / den, pooled.values["all"][i])
    assert analysis.pick_step(con, points=60) == 60 and analysis.pick_step(con, points=10) == 600
    with pytest.raises(ValueError, match="unknown measure"):
        analysis.kpi_series(con, "happiness")


def test_anomaly_context_is_the_same_key_around_each_anomaly(
    con: duckdb.DuckDBPyConnection,
) -> None:
    anomalies = rows(con, "SELECT * FROM anomalies")
    assert any(a["kind"] != "recovery" for a in anomalies)
    context = rows(con, "SELECT * FROM anomaly_context")
    for a in anomalies:
        mine = [c for c in context if c["anomaly_id"] == a["anomaly_id"]]
        assert 1 <= len(mine) <= 21
        assert all(abs(c["window_offset"]) <= 10 for c in mine)
        assert all(c[d] == a[d] for c in mine for d in DIMENSIONS)
        (own,) = [c for c in mine if c["window_offset"] == 0]
        assert own["window_start"] == a["window_start"]
        if a["detector"] != "half_space_trees":
            assert close(own["value"], a["observed"]), (own["value"], a["observed"])
        key = " AND ".join(
            f"{d} IS NOT DISTINCT FROM {'NULL' if a[d] is None else repr(a[d])}" for d in DIMENSIONS
        )
        around = con.execute(
            f"SELECT count(*) FROM metric_windows WHERE level = '{a['level']}' AND {key} AND "
            f"window_start BETWEEN TIMESTAMPTZ '{a['window_start']}' - INTERVAL 10 minute "
            f"AND TIMESTAMPTZ '{a['window_start']}' + INTERVAL 10 minute"
        ).fetchone()
        assert around is not None and around[0] == len(mine)
    conditions = rows(con, "SELECT * FROM anomaly_conditions")
    assert sorted(c["condition_id"] for c in conditions) == sorted(
        {a["condition_id"] for a in anomalies}
    )
    for c in conditions:
        alerts = [
            a
            for a in anomalies
            if a["condition_id"] == c["condition_id"] and a["kind"] != "recovery"
        ]
        assert c["alerts"] == len(alerts)
        assert c["opened_at"] == min(a["window_start"] for a in alerts)
        assert c["subject"].startswith(c["agent_id"] or c["tenant_id"])


def test_lake_summary(lake: Path, con: duckdb.DuckDBPyConnection) -> None:
    summary = analysis.headline(con)
    raw = (
        raw_events(lake)
        .execute(
            "SELECT count(*), sum(cost_usd), count(*) FILTER (outcome = 'started'), "
            "count(*) FILTER (type = 'escalation'), count(DISTINCT agent_id) FROM ev"
        )
        .fetchone()
    )
    assert raw is not None
    assert summary["events"] == raw[0] == EVENTS_N
    assert close(summary["cost_usd"], raw[1])
    assert summary["tasks_started"] == raw[2] and summary["escalations"] == raw[3]
    assert summary["agents"] == raw[4] and summary["late_events"] == 0
    assert close(summary["escalation_rate"], raw[3] / raw[2])
    assert summary["anomalies"] >= 1 and summary["conditions"] >= 1


def test_keys_without_a_version_or_model_are_kept(tmp_path: Path) -> None:
    """Optional dimensions are NULL in the metrics: grouped, never dropped by a join."""
    evs = list(generate(TrafficConfig(events=3000, seed=5)))
    for ev in evs:
        if ev.agent_id == "support-bot":
            ev.agent_version = None
    land(tmp_path / "lake", evs)
    con = analysis.connect(tmp_path / "lake")
    (unversioned,) = rows(con, "SELECT * FROM task_funnel WHERE agent_version IS NULL")
    assert unversioned["agent_id"] == "support-bot" and unversioned["tasks_started"] > 0
    assert unversioned["first_window"] is not None
    total = con.execute("SELECT sum(tasks_started) FROM task_funnel").fetchone()
    assert total == (sum(1 for e in evs if getattr(e, "outcome", None) == "started"),)
    series = analysis.kpi_series(con, "tasks_started", "version", top=100)
    assert "support-bot (no version)" in series.values


def test_metric_windows_count_a_replayed_file_once(lake: Path, tmp_path: Path) -> None:
    """The same window landed twice (another consumer group, a rerun) is counted once."""
    import shutil

    copy = tmp_path / "lake"
    shutil.copytree(lake, copy)
    again = raw_events(copy).execute("SELECT * EXCLUDE (date) FROM lake.metrics LIMIT 10")
    prepare(copy).append(METRICS.name, again.to_arrow_table())
    a, b = analysis.connect(lake), analysis.connect(copy)
    assert (
        b.execute("SELECT count(*) FROM metrics").fetchone()
        != a.execute("SELECT count(*) FROM metrics").fetchone()
    )
    for sql in ("SELECT count(*) FROM metric_windows", "SELECT * FROM task_funnel ORDER BY ALL"):
        assert a.execute(sql).fetchall() == b.execute(sql).fetchall()


# --------------------------------------------------------------------------------------
# tolerance: empty lakes, no anomalies view, a database file
# --------------------------------------------------------------------------------------


def test_empty_lake_binds_every_view_and_draws(tmp_path: Path) -> None:
    prepare(tmp_path / "empty")
    con = analysis.connect(tmp_path / "empty")
    for name, sql, _doc in analysis.ANALYSIS_VIEWS:
        if sql.startswith("CREATE OR REPLACE VIEW"):
            con.execute(f"SELECT * FROM {name}").fetchall()
    assert analysis.headline(con)["events"] == 0
    for name, fig in analysis.plot_all(con):
        assert analysis.png_bytes(fig).startswith(b"\x89PNG"), name


def test_without_anomalies_the_stand_in_is_empty(lake: Path, tmp_path: Path) -> None:
    con = catalog.connect(lake)
    con.execute("DROP VIEW anomalies")
    if not analysis._has_relation(con, "anomalies"):
        analysis.install_views(con)
        assert con.execute("SELECT count(*) FROM anomalies").fetchone() == (0,)
        assert con.execute("SELECT count(*) FROM anomaly_context").fetchone() == (0,)
        assert [c[0] for c in con.execute("DESCRIBE anomalies").fetchall()] == [
            c for c, _ in analysis.ANOMALY_COLUMNS
        ]
    # An anomalies view that exists is used as it is, never replaced.
    con = catalog.connect(lake)
    analysis.install_views(con)
    assert con.execute("SELECT count(*) FROM anomalies").fetchone()[0] > 0  # type: ignore[index]


def test_install_only_for_queries_that_use_the_views(lake: Path) -> None:
    assert analysis.uses_analysis("select * from Task_Funnel")
    assert analysis.uses_analysis("SELECT * FROM kpis_every(INTERVAL 1 hour, 'all')")
    assert not analysis.uses_analysis("SELECT type, count(*) FROM events GROUP BY ALL")
    # A column of the same name matches too: a false positive only costs the install.
    assert analysis.uses_analysis("SELECT sum(tool_errors) FROM metrics")
    con = catalog.connect(lake)
    assert not analysis.install_views(con, only_for="SELECT count(*) FROM events")
    assert not analysis._has_relation(con, "task_funnel")
    assert analysis.install_views(con, only_for="SELECT * FROM task_funnel")
    assert analysis._has_relation(con, "task_funnel")


def test_fmt() -> None:
    f = analysis.fmt
    assert f("escalation_rate", 0.0661) == "6.6%"
    assert f("cost_usd", 1234.567) == "$1,234.57"
    assert f("cost_per_task", 0.01234) == "$0.0123"
    assert f("cost_per_task", 0.5) == "$0.50"
    assert f("latency_p95_ms", 1234.4) == "1,234 ms"
    assert f("events", 30000) == "30,000"
    assert f("tokens_per_call", 6868.2) == "6,868"
    assert f("score", 7.25) == "7.25"
    assert f("anything", None) == "–" and f("x", math.nan) == "–"
    assert f("window_start", datetime(2026, 1, 5, 9, 7, tzinfo=UTC)) == "2026-01-05 09:07"


def test_table_html_escapes_and_formats() -> None:
    t = analysis.Table(
        ("name", "measure", "baseline", "calls"),
        (("<b>x</b>", "cost_per_task", 0.0107, 12345), ("y", "escalation_rate", 0.06, 3)),
        {"baseline": "measure"},
    )
    out = t.to_html(table_id="t1", max_rows=1)
    assert 'id="t1"' in out and "&lt;b&gt;x&lt;/b&gt;" in out and "<b>x" not in out
    assert '<td class="num">$0.0107</td>' in out and '<td class="num">12,345</td>' in out
    assert "1 more rows not shown" in out
    assert "6.0%" in t.to_html()
    assert t.records()[1]["calls"] == 3 and t.column("name") == ["<b>x</b>", "y"]


def test_readme_table_lists_every_view() -> None:
    table = analysis.readme_table()
    for name, _sql, _doc in analysis.ANALYSIS_VIEWS:
        assert f"`{name}" in table
    assert "`kpis_every(step, dim)`" in table
