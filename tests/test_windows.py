"""Tumbling windows (streams/windows.py) against an independent DuckDB recomputation.

A generated stream (many agents, versions, prompts, models and tenants; out-of-order tasks;
2 % of events delayed 600 s) is fed in batches of varying size, in stream order, closing
windows as it goes with ``now`` = the batch's newest event time (so the wall-clock rule and
the event-time rule agree). Every emitted row, every window, every key, every level, is then
recomputed by DuckDB SQL over the same events minus the late-masked ones.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline import schema
from pipeline.generate import TrafficConfig, generate
from sinks.tables import events_to_table
from streams import sketch, windows
from streams.enrich import CostEstimator
from streams.windows import (
    DIMENSIONS,
    EVALUATORS,
    METRICS_SCHEMA,
    QUANTILES,
    ROLLUPS,
    STEP_TYPES,
    WindowAggregator,
)

LATENESS_S = 60.0
BATCH_SIZES = (1, 700, 2_500, 4_000, 333, 6_000, 1_500, 90)
QUANTILE_SLACK = sketch.RELATIVE_ACCURACY * (1 + 1e-9)


# --------------------------------------------------------------------------------------
# the stream
# --------------------------------------------------------------------------------------


def _tables(events: Sequence[schema.AgentEvent], first_offset: int) -> pa.Table:
    n = len(events)
    estimated = CostEstimator().fill(events)
    extras: dict[str, Sequence[Any]] = {
        "cost_estimated": estimated,
        "late": [False] * n,
        "kafka_partition": [0] * n,
        "kafka_offset": list(range(first_offset, first_offset + n)),
    }
    return events_to_table(events, extras)


@pytest.fixture(scope="module")
def batches() -> list[pa.Table]:
    """30k events in stream order, cut into batches of varying size."""
    config = TrafficConfig(
        events=30_000, seed=11, rate_per_s=3.0, late_fraction=0.02, late_delay_s=600.0
    )
    events = list(generate(config))
    out, at, i = [], 0, 0
    while at < len(events):
        size = BATCH_SIZES[i % len(BATCH_SIZES)]
        out.append(_tables(events[at : at + size], at))
        at += size
        i += 1
    return out


def _max_ts(table: pa.Table) -> datetime:
    value = pc.max(table["ts"]).as_py()
    assert isinstance(value, datetime)
    return value


@dataclass
class Run:
    metrics: pa.Table
    late: list[pa.Array]


def _run(batches: Sequence[pa.Table], window_s: int, *, restore_every: int | None = None) -> Run:
    agg = WindowAggregator(window_s, LATENESS_S)
    emitted, masks = [], []
    for i, batch in enumerate(batches):
        now = _max_ts(batch)
        masks.append(agg.update(batch, now=now))
        emitted.append(agg.close_due(now=now))
        if restore_every and i % restore_every == restore_every - 1:
            agg = WindowAggregator.restore(agg.snapshot())
    emitted.append(agg.flush_all())
    assert agg.open_windows() == 0
    return Run(pa.concat_tables(emitted), masks)


# --------------------------------------------------------------------------------------
# the independent model: lateness and where late events are counted
# --------------------------------------------------------------------------------------


def _us(col: pa.ChunkedArray) -> np.ndarray[Any, np.dtype[np.int64]]:
    return np.asarray(pc.cast(col, pa.timestamp("us", tz="UTC")).cast(pa.int64()), dtype=np.int64)


def _expected_late(
    batches: Sequence[pa.Table], window_s: int
) -> Iterator[tuple[np.ndarray[Any, np.dtype[np.bool_]], int | None]]:
    """Per batch: the late mask the documented rule gives, and the window late events go to.

    With ``now`` = the batch's newest event time, the horizon at the start of batch k is
    max(event time of batches < k) - lateness; an event is late when its window ends at or
    before it, and is counted in the window that contains the horizon.
    """
    w = window_s * 1_000_000
    lateness = round(LATENESS_S * 1_000_000)
    newest: int | None = None
    for batch in batches:
        ts = _us(batch["ts"])
        if newest is None:
            yield np.zeros(len(ts), dtype=bool), None
        else:
            horizon = newest - lateness
            yield (ts // w) * w + w <= horizon, (horizon // w) * w
        newest = int(ts.max()) if newest is None else max(newest, int(ts.max()))


# --------------------------------------------------------------------------------------
# DuckDB's version of every measure
# --------------------------------------------------------------------------------------

_COUNT_SQL = {
    "events": "count(*)",
    **{f"events_{t}": f"count(*) FILTER (type = '{t}')" for t in schema.ACTIVITY_TYPES},
    "llm_calls": "count(*) FILTER (type = 'llm_call')",
    "input_tokens": "coalesce(sum(input_tokens), 0)",
    "output_tokens": "coalesce(sum(output_tokens), 0)",
    "cached_input_tokens": "coalesce(sum(cached_input_tokens), 0)",
    **{
        f"tasks_{o}": f"count(*) FILTER (outcome = '{o}')"
        for o in ("started", "completed", "failed", "abandoned")
    },
    "escalations": "count(*) FILTER (type = 'escalation')",
    "retrievals": "count(*) FILTER (type = 'retrieval')",
    "retrieval_misses": "count(*) FILTER (type = 'retrieval' AND miss)",
    "tool_calls": "count(*) FILTER (type = 'tool_call')",
    "tool_errors": "count(*) FILTER (type = 'tool_call' AND status = 'error')",
    "guardrail_incidents": "count(*) FILTER (type = 'guardrail' AND action <> 'allow')",
    "evaluations": "count(*) FILTER (type = 'evaluation')",
    "evaluations_judged": "count(passed) FILTER (type = 'evaluation')",
    "evaluations_passed": "count(*) FILTER (type = 'evaluation' AND passed)",
    "evaluations_scored": "count(score) FILTER (type = 'evaluation')",
    **{
        f"eval_{e}_{name}": f"count({arg}) FILTER (type = 'evaluation' AND evaluator = '{e}'{cond})"
        for e in EVALUATORS
        for name, arg, cond in (
            ("evaluations", "*", ""),
            ("judged", "passed", ""),
            ("passed", "*", " AND passed"),
            ("scored", "score", ""),
        )
    },
    "feedback_ratings": "count(rating) FILTER (type = 'feedback')",
    "feedback_negative": "count(*) FILTER (type = 'feedback' AND rating <= 2)",
    "feedback_corrections": "count(correction) FILTER (type = 'feedback')",
}
_SUM_SQL = {
    "cost_usd": "coalesce(sum(cost_usd), 0.0)",
    "cost_estimated_usd": "coalesce(sum(cost_usd) FILTER (cost_estimated), 0.0)",
    "evaluation_score_sum": "coalesce(sum(score) FILTER (type = 'evaluation'), 0.0)",
    **{
        f"eval_{e}_score_sum": (
            f"coalesce(sum(score) FILTER (type = 'evaluation' AND evaluator = '{e}'), 0.0)"
        )
        for e in EVALUATORS
    },
    "feedback_rating_sum": "coalesce(sum(rating) FILTER (type = 'feedback'), 0.0)",
}
_STEP_FILTER = {
    "": "type IN (" + ", ".join(f"'{t}'" for t in STEP_TYPES) + ")",
    **{f"{p}_": f"type = '{t}'" for t, p in STEP_TYPES.items()},
}
_QUANTILE_SQL = {
    f"{prefix}latency_{name}_ms": f"quantile_disc(latency_ms, {q}) FILTER ({cond})"
    for prefix, cond in _STEP_FILTER.items()
    for name, q in QUANTILES.items()
}
# exact ratios of exact counts; cost ratios carry the float-sum tolerance
_RATE_SQL = {
    "tokens_per_call": "(input_tokens + output_tokens) / nullif(llm_calls, 0)",
    "task_success_rate": (
        "tasks_completed / nullif(tasks_completed + tasks_failed + tasks_abandoned, 0)"
    ),
    "escalation_rate": "escalations / nullif(tasks_started, 0)",
    "retrieval_miss_rate": "retrieval_misses / nullif(retrievals, 0)",
    "tool_error_rate": "tool_errors / nullif(tool_calls, 0)",
    "eval_pass_rate": "evaluations_passed / nullif(evaluations_judged, 0)",
    "hallucination_rate": (
        "(eval_hallucination_judged - eval_hallucination_passed)"
        " / nullif(eval_hallucination_judged, 0)"
    ),
    **{f"eval_{e}_pass_rate": f"eval_{e}_passed / nullif(eval_{e}_judged, 0)" for e in EVALUATORS},
    "feedback_negative_share": "feedback_negative / nullif(feedback_ratings, 0)",
}
_COST_RATE_SQL = {
    "cost_per_task": "cost_usd / nullif(tasks_started, 0)",
    "cost_per_completed_task": "cost_usd / nullif(tasks_completed, 0)",
    "eval_score_mean": "evaluation_score_sum / nullif(evaluations_scored, 0)",
    **{
        f"eval_{e}_score_mean": f"eval_{e}_score_sum / nullif(eval_{e}_scored, 0)"
        for e in EVALUATORS
    },
    "feedback_rating_mean": "feedback_rating_sum / nullif(feedback_ratings, 0)",
}


def _grouping_sets(*extra: str) -> str:
    """GROUP BY clause for every rollup of ROLLUPS, each also grouped by ``extra``."""
    sets = ", ".join("(" + ", ".join(["ws", *dims, *extra]) + ")" for dims in ROLLUPS.values())
    return f"GROUPING SETS ({sets})"


def _grouping(w_us: int) -> tuple[str, str, str]:
    """Window start, GROUP BY clause and level CASE for every rollup, from ROLLUPS."""
    bits = {  # grouping(d1..dn) has bit i set when dimension i is rolled away
        level: sum(
            1 << (len(DIMENSIONS) - 1 - i) for i, d in enumerate(DIMENSIONS) if d not in dims
        )
        for level, dims in ROLLUPS.items()
    }
    case = (
        "CASE grouping("
        + ", ".join(DIMENSIONS)
        + ") "
        + " ".join(f"WHEN {b} THEN '{level}'" for level, b in bits.items())
        + " END"
    )
    return f"(epoch_us(ts) // {w_us}) * {w_us}", _grouping_sets(), case


def _expected_sql(w_us: int, before_us: int | None = None) -> str:
    ws, group_by, level = _grouping(w_us)
    measures = ",\n".join(
        f"{sql} AS {name}" for name, sql in {**_COUNT_SQL, **_SUM_SQL, **_QUANTILE_SQL}.items()
    )
    rates = ",\n".join(f"{sql} AS {name}" for name, sql in {**_RATE_SQL, **_COST_RATE_SQL}.items())
    dims = ", ".join(DIMENSIONS)
    by_tool, by_action = _grouping_sets("tool_name"), _grouping_sets("action")
    return f"""
    WITH e AS (SELECT *, {ws} AS ws FROM ev WHERE NOT late {f"AND {ws} < {before_us}" if before_us is not None else ""}),
    agg AS (SELECT {level} AS level, ws, {dims}, {measures} FROM e GROUP BY {group_by}),
    tools AS (
        SELECT level, ws, {dims},
               list(struct_pack(tool_name := tool_name, calls := calls, errors := errors)
                    ORDER BY tool_name) AS tool_errors_by_tool
        FROM (SELECT {level} AS level, ws, {dims}, tool_name, count(*) AS calls,
                     count(*) FILTER (status = 'error') AS errors
              FROM e WHERE type = 'tool_call' GROUP BY {by_tool})
        GROUP BY ALL),
    guards AS (
        SELECT level, ws, {dims},
               list(struct_pack(action := action, count := n) ORDER BY action)
                   AS guardrail_by_action
        FROM (SELECT {level} AS level, ws, {dims}, action, count(*) AS n
              FROM e WHERE type = 'guardrail' GROUP BY {by_action})
        GROUP BY ALL)
    SELECT agg.*, {rates},
           coalesce(tools.tool_errors_by_tool, []) AS tool_errors_by_tool,
           coalesce(guards.guardrail_by_action, []) AS guardrail_by_action
    FROM agg
    LEFT JOIN tools ON {_same("agg", "tools")}
    LEFT JOIN guards ON {_same("agg", "guards")}
    """


def _same(a: str, b: str) -> str:
    """Join condition on level, window and dimensions, where null matches null."""
    return " AND ".join(
        f"{a}.{c} IS NOT DISTINCT FROM {b}.{c}" for c in ["level", "ws", *DIMENSIONS]
    )


def _check_against_duckdb(run: Run, batches: Sequence[pa.Table], window_s: int) -> None:
    masks = [np.asarray(m, dtype=bool) for m in run.late]
    ev = pa.concat_tables(
        b.set_column(b.schema.get_field_index("late"), "late", pa.array(m))
        for b, m in zip(batches, masks, strict=True)
    )
    assert_metrics_match_events(ev, run.metrics, window_s)


def assert_metrics_match_events(
    ev: pa.Table, got: pa.Table, window_s: int, before_us: int | None = None
) -> None:
    """Every measure of every emitted row equals DuckDB's recomputation from the events.

    ``ev`` are events with their ``late`` flags; only windows starting before ``before_us``
    (all, if None) are expected to have been emitted.
    """
    w_us = window_s * 1_000_000
    con = duckdb.connect()
    con.register("ev", ev)
    con.register("got_raw", got)
    con.execute(f"CREATE TABLE exp AS {_expected_sql(w_us, before_us)}")
    con.execute(
        "CREATE TABLE got AS SELECT *, epoch_us(window_start) AS ws FROM got_raw"
        + (f" WHERE epoch_us(window_start) < {before_us}" if before_us is not None else "")
    )
    on = _same("g", "x")

    # every window, key and level DuckDB has is emitted exactly once, with the right end
    assert con.execute("SELECT count(*) - count(DISTINCT metric_id) FROM got").fetchone() == (0,)
    assert con.execute(
        f"SELECT count(*) FROM got WHERE epoch_us(window_end) <> ws + {w_us}"
    ).fetchone() == (0,)
    missing = con.execute(f"SELECT count(*) FROM exp x ANTI JOIN got g ON {on}").fetchone()
    assert missing == (0,), "windows/keys DuckDB has that were never emitted"
    # rows DuckDB lacks can only be rows that carry late events and nothing else
    extra = con.execute(
        f"SELECT count(*), count(*) FILTER (events <> 0 OR late_events = 0 "
        f"OR latency_p95_ms IS NOT NULL OR len(tool_errors_by_tool) > 0) "
        f"FROM got g ANTI JOIN exp x ON {on}"
    ).fetchone()
    assert extra is not None and extra[1] == 0

    checks: dict[str, str] = {}
    for name in [*_COUNT_SQL, *_RATE_SQL, "tool_errors_by_tool", "guardrail_by_action"]:
        checks[name] = f"g.{name} IS DISTINCT FROM x.{name}"
    for name in [*_SUM_SQL, *_COST_RATE_SQL]:
        checks[name] = (
            f"(g.{name} IS NULL) <> (x.{name} IS NULL) "
            f"OR abs(g.{name} - x.{name}) > 1e-9 * abs(x.{name})"
        )
    for name in _QUANTILE_SQL:
        checks[name] = (
            f"(g.{name} IS NULL) <> (x.{name} IS NULL) OR abs(g.{name} - x.{name}) > "
            f"{QUANTILE_SLACK} * x.{name} + CASE WHEN x.{name} < {sketch.MIN_VALUE} "
            f"THEN {sketch.MIN_VALUE} ELSE 0 END"
        )
    counts = ", ".join(f"count(*) FILTER ({cond}) AS {name}" for name, cond in checks.items())
    row = con.execute(f"SELECT count(*) AS n, {counts} FROM got g JOIN exp x ON {on}").fetchone()
    assert row is not None
    compared, *bad = row
    n_exp = con.execute("SELECT count(*) FROM exp").fetchone()
    assert (compared,) == n_exp
    wrong = {name: n for name, n in zip(checks, bad, strict=True) if n}
    if wrong:
        name = next(iter(wrong))
        sample = con.execute(
            f"SELECT g.level, g.window_start, {', '.join('g.' + d for d in DIMENSIONS)}, "
            f"g.{name} AS got, x.{name} AS expected FROM got g JOIN exp x ON {on} "
            f"WHERE {checks[name]} LIMIT 3"
        ).fetchall()
        pytest.fail(f"mismatching measures (rows): {wrong}; e.g. {name}: {sample}")

    # the quantile check above must have compared real quantiles, not just nulls
    with_p99 = con.execute("SELECT count(*) FROM exp WHERE llm_latency_p99_ms IS NOT NULL")
    assert (with_p99.fetchone() or (0,))[0] > 100


# --------------------------------------------------------------------------------------
# the stream tests
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("window_s", [60, 300, 3600])
def test_stream_matches_duckdb(batches: list[pa.Table], window_s: int) -> None:
    run = _run(batches, window_s)
    assert run.metrics.schema == METRICS_SCHEMA
    # rows come sorted by window_start, level, dimensions (nulls last)
    frame = pl.from_arrow(run.metrics)
    assert isinstance(frame, pl.DataFrame)
    order = frame.select("window_start", "level", *DIMENSIONS)
    assert order.equals(order.sort(order.columns, nulls_last=True, maintain_order=True))
    _check_against_duckdb(run, batches, window_s)


@pytest.mark.parametrize("window_s", [60, 300, 3600])
def test_late_events(batches: list[pa.Table], window_s: int) -> None:
    run = _run(batches, window_s)
    expected = list(_expected_late(batches, window_s))
    n_late = 0
    for mask, (want_mask, _) in zip(run.late, expected, strict=True):
        got_mask = np.asarray(mask, dtype=bool)
        assert got_mask.tolist() == want_mask.tolist()
        n_late += int(got_mask.sum())
    assert n_late >= 5, "the stream must exercise late events"

    frame = pl.from_arrow(run.metrics)
    assert isinstance(frame, pl.DataFrame)
    # counted exactly once at every level
    per_level = frame.group_by("level").agg(pl.col("late_events").sum())
    assert dict(per_level.iter_rows()) == dict.fromkeys(ROLLUPS, n_late)

    # ... for the same key, in the oldest window open when the event arrived
    late_rows = []
    for batch, mask, (_, home) in zip(batches, run.late, expected, strict=True):
        m = np.asarray(mask, dtype=bool)
        if m.any():
            rows = batch.filter(pa.array(m)).select(list(DIMENSIONS))
            late_rows.append(
                rows.append_column("window_us", pa.array([home] * rows.num_rows, pa.int64()))
            )
    late = pl.from_arrow(pa.concat_tables(late_rows))
    assert isinstance(late, pl.DataFrame)
    want = late.group_by("window_us", *DIMENSIONS).agg(pl.len().cast(pl.Int64).alias("n"))
    got = frame.filter((pl.col("level") == "key") & (pl.col("late_events") > 0)).select(
        pl.col("window_start").dt.epoch("us").alias("window_us"),
        *DIMENSIONS,
        pl.col("late_events").alias("n"),
    )
    keys = ["window_us", *DIMENSIONS]
    assert got.sort(keys, nulls_last=True).equals(
        want.sort(keys, nulls_last=True).select(got.columns)
    )


def test_snapshot_restore_matches_uninterrupted(batches: list[pa.Table]) -> None:
    whole = _run(batches, 300)
    for every in (1, 4):
        resumed = _run(batches, 300, restore_every=every)
        assert resumed.metrics.equals(whole.metrics)
        assert all(a.equals(b) for a, b in zip(resumed.late, whole.late, strict=True))


def test_compaction_schedule_does_not_change_results(
    batches: list[pa.Table], monkeypatch: pytest.MonkeyPatch
) -> None:
    default = _run(batches, 300)
    monkeypatch.setattr(windows, "_MIN_COMPACTION_ROWS", 0)  # compact far more often
    assert _run(batches, 300).metrics.equals(default.metrics)


def test_snapshot_round_trip_state(batches: list[pa.Table]) -> None:
    agg = WindowAggregator(300, LATENESS_S)
    for batch in batches[:5]:
        agg.update(batch, now=_max_ts(batch))
    data = agg.snapshot()
    back = WindowAggregator.restore(data)
    assert back.snapshot() == data
    assert back.open_windows() == agg.open_windows() > 0
    assert back.watermark == agg.watermark and back.closed_until == agg.closed_until
    assert back.window_s == 300 and back.allowed_lateness_s == LATENESS_S
    assert back.flush_all().equals(agg.flush_all())
    assert len(data) < 200_000


# --------------------------------------------------------------------------------------
# rules on small hand-made batches
# --------------------------------------------------------------------------------------

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def _llm(
    ts: datetime, agent: str = "a", latency: float = 100.0, tenant: str = "t1"
) -> schema.LlmCall:
    return schema.LlmCall(
        event_id=f"e-{ts.timestamp()}-{agent}",
        schema_version=1,
        ts=ts,
        agent_id=agent,
        agent_version="v1",
        model="gpt-4o",
        tenant_id=tenant,
        input_tokens=10,
        output_tokens=5,
        cost_usd=0.001,
        latency_ms=latency,
    )


def _batch(*events: schema.AgentEvent) -> pa.Table:
    return _tables(list(events), 0)


def test_window_closes_on_event_time_and_late_event_goes_to_next_close() -> None:
    agg = WindowAggregator(60, 10.0)
    assert agg.watermark is None and agg.open_windows() == 0
    late = agg.update(
        _batch(_llm(T0 + timedelta(seconds=5)), _llm(T0 + timedelta(seconds=30))), now=T0
    )
    assert late.to_pylist() == [False, False]
    assert agg.close_due(now=T0).num_rows == 0
    # event time reaches window_end + lateness: the first window is due
    agg.update(_batch(_llm(T0 + timedelta(seconds=70))), now=T0)
    assert agg.watermark == T0 + timedelta(seconds=60)
    first = agg.close_due(now=T0)
    assert first.num_rows == 3 and set(first["level"].to_pylist()) == set(ROLLUPS)
    assert first["events"].to_pylist() == [2, 2, 2]
    assert first["window_end"].to_pylist()[0] == T0 + timedelta(seconds=60)
    # an event for the emitted window is late: masked, not added, counted in the next window
    late = agg.update(
        _batch(_llm(T0 + timedelta(seconds=59)), _llm(T0 + timedelta(seconds=80))), now=T0
    )
    assert sorted(late.to_pylist()) == [False, True]
    assert agg.close_due(now=T0).num_rows == 0
    rest = agg.flush_all()
    assert rest["window_start"].to_pylist() == [T0 + timedelta(seconds=60)] * 3
    assert rest["events"].to_pylist() == [2, 2, 2]
    assert rest["late_events"].to_pylist() == [1, 1, 1]
    # after flush_all every emitted window is closed for good
    assert agg.update(_batch(_llm(T0 + timedelta(seconds=90))), now=T0).to_pylist() == [True]
    assert agg.flush_all()["late_events"].to_pylist() == [1, 1, 1]


def test_quiet_stream_closes_on_wall_clock() -> None:
    agg = WindowAggregator(60, 30.0)
    agg.update(_batch(_llm(T0 + timedelta(seconds=1))), now=T0 + timedelta(seconds=1))
    assert agg.close_due(now=T0 + timedelta(seconds=89, microseconds=999_999)).num_rows == 0
    out = agg.close_due(now=T0 + timedelta(seconds=90))
    assert out.num_rows == 3 and agg.open_windows() == 0
    assert agg.closed_until == T0 + timedelta(seconds=60)
    # the wall clock also makes events late, and a key's late events may be its only row
    late = agg.update(
        _batch(_llm(T0 + timedelta(seconds=125)), _llm(T0 + timedelta(seconds=170))),
        now=T0 + timedelta(seconds=180),
    )
    assert late.to_pylist() == [False, False]
    assert agg.closed_until == T0 + timedelta(seconds=150)
    out = agg.close_due(now=T0 + timedelta(seconds=210))
    assert out["window_start"].to_pylist() == [T0 + timedelta(seconds=120)] * 3
    assert out["events"].to_pylist() == [2, 2, 2]
    late = agg.update(_batch(_llm(T0 + timedelta(seconds=130))), now=T0 + timedelta(seconds=211))
    assert late.to_pylist() == [True]
    assert agg.close_due(now=T0 + timedelta(seconds=269)).num_rows == 0
    out = agg.close_due(now=T0 + timedelta(seconds=270))
    assert out["window_start"].to_pylist() == [T0 + timedelta(seconds=180)] * 3
    assert out["events"].to_pylist() == [0, 0, 0]
    assert out["late_events"].to_pylist() == [1, 1, 1]
    assert out["llm_latency_p50_ms"].to_pylist() == [None] * 3


def test_rollups_and_derived_columns() -> None:
    events: list[schema.AgentEvent] = [
        _llm(T0, "a", 10.0, "t1"),
        _llm(T0, "a", 20.0, "t2"),
        _llm(T0, "b", 30.0, "t1"),
        schema.ToolCall(
            event_id="x1",
            schema_version=1,
            ts=T0,
            agent_id="a",
            tenant_id="t1",
            agent_version="v1",
            model="gpt-4o",
            tool_name="search",
            status="error",
            latency_ms=0.0,
        ),
        schema.Guardrail(
            event_id="x2",
            schema_version=1,
            ts=T0,
            agent_id="a",
            tenant_id="t1",
            agent_version="v1",
            model="gpt-4o",
            policy_id="pii",
            action="block",
        ),
        schema.Task(
            event_id="x3", schema_version=1, ts=T0, agent_id="b", tenant_id="t1", outcome="started"
        ),
    ]
    agg = WindowAggregator(60, 0.0)
    agg.update(_batch(*events), now=T0)
    out = pl.from_arrow(agg.flush_all())
    assert isinstance(out, pl.DataFrame)
    by = {
        (r["level"], r["agent_id"], r["tenant_id"], r["model"]): r
        for r in out.iter_rows(named=True)
    }
    assert set(by) == {
        ("key", "a", "t1", "gpt-4o"),
        ("key", "a", "t2", "gpt-4o"),
        ("key", "b", "t1", "gpt-4o"),
        ("key", "b", "t1", None),
        ("agent", "a", None, None),
        ("agent", "b", None, None),
        ("tenant", None, "t1", None),
        ("tenant", None, "t2", None),
    }
    a = by[("agent", "a", None, None)]
    assert a["events"] == 4 and a["llm_calls"] == 2 and a["tokens_per_call"] == 15.0
    assert a["tool_errors_by_tool"] == [{"tool_name": "search", "calls": 1, "errors": 1}]
    assert a["guardrail_incidents"] == 1
    assert a["guardrail_by_action"] == [{"action": "block", "count": 1}]
    assert a["tool_latency_p50_ms"] == 0.0  # the zero bucket
    assert a["task_success_rate"] is None and a["cost_per_task"] is None
    b = by[("agent", "b", None, None)]
    assert b["tasks_started"] == 1 and b["cost_per_task"] == pytest.approx(0.001)
    assert b["tool_errors_by_tool"] == [] and b["escalation_rate"] == 0.0
    t1 = by[("tenant", None, "t1", None)]
    assert t1["events"] == 5 and t1["llm_latency_p50_ms"] == pytest.approx(10.0, rel=0.01)
    assert t1["llm_latency_p99_ms"] == pytest.approx(30.0, rel=0.01)
    # ids are stable and distinct
    assert out["metric_id"].n_unique() == out.height
    again = WindowAggregator(60, 0.0)
    again.update(_batch(*events), now=T0)
    assert again.flush_all()["metric_id"].to_pylist() == out["metric_id"].to_list()


def test_empty_batch_and_naive_time() -> None:
    agg = WindowAggregator()
    empty = _batch()
    assert empty.num_rows == 0
    assert len(agg.update(empty, now=T0)) == 0
    assert agg.close_due(now=T0).schema == METRICS_SCHEMA
    assert agg.flush_all().num_rows == 0
    with pytest.raises(ValueError, match="timezone-aware"):
        agg.close_due(now=datetime(2026, 1, 1))  # noqa: DTZ001
    with pytest.raises(ValueError):
        WindowAggregator(0)


def test_metrics_schema_has_the_documented_columns() -> None:
    required = [
        "metric_id",
        "level",
        "window_start",
        "window_end",
        *DIMENSIONS,
        "events",
        "llm_calls",
        *(f"events_{t}" for t in schema.ACTIVITY_TYPES),
        "input_tokens",
        "output_tokens",
        "cached_input_tokens",
        "cost_usd",
        "cost_estimated_usd",
        "tasks_started",
        "tasks_completed",
        "tasks_failed",
        "tasks_abandoned",
        "task_success_rate",
        "cost_per_task",
        "cost_per_completed_task",
        "escalations",
        "escalation_rate",
        "retrievals",
        "retrieval_misses",
        "retrieval_miss_rate",
        "tool_calls",
        "tool_errors",
        "tool_error_rate",
        "tool_errors_by_tool",
        "guardrail_incidents",
        "guardrail_by_action",
        "latency_p50_ms",
        "latency_p95_ms",
        "latency_p99_ms",
        *(
            f"{s}_latency_{q}_ms"
            for s in ("llm", "tool", "retrieval")
            for q in ("p50", "p95", "p99")
        ),
        "late_events",
        "tokens_per_call",
    ]
    assert [n for n in required if n not in METRICS_SCHEMA.names] == []
    assert METRICS_SCHEMA.field("window_start").type == pa.timestamp("us", tz="UTC")


# --------------------------------------------------------------------------------------
# the sketch on its own
# --------------------------------------------------------------------------------------


def test_sketch_quantiles_within_one_percent_of_quantile_disc() -> None:
    rng = np.random.default_rng(3)
    groups = {
        0: rng.lognormal(4.0, 1.5, 5_000),
        1: np.concatenate([np.zeros(40), rng.uniform(0, 2e-3, 40), rng.lognormal(0, 3, 200)]),
        2: np.array([42.0]),
        3: rng.uniform(1, 1e6, 777),
        4: np.round(rng.lognormal(5, 0.3, 3_000), 1),  # many ties, like real latencies
    }
    qs = {"q0": 0.0, "q01": 0.01, "q25": 0.25, "q50": 0.5, "q95": 0.95, "q99": 0.99, "q1": 1.0}
    values = np.concatenate(list(groups.values()))
    gid = np.concatenate([np.full(len(v), g) for g, v in groups.items()])
    counts = (
        pl.DataFrame({"g": gid, "bucket": sketch.bucket_index(values)})
        .group_by("g", "bucket")
        .agg(pl.len().cast(pl.Int64).alias("count"))
    )
    # polars and numpy bucket the same
    assert (
        pl.Series(values)
        .to_frame("v")
        .select(sketch.bucket_expr(pl.col("v")))
        .to_series()
        .to_numpy()
        .tolist()
        == sketch.bucket_index(values).tolist()
    )
    got = {row["g"]: row for row in sketch.quantiles(counts, "g", qs).iter_rows(named=True)}
    con = duckdb.connect()
    for g, v in groups.items():
        assert math.ceil(0.95 * len(v)) >= 1
        exact = con.execute(
            "SELECT "
            + ", ".join(f"quantile_disc(v, {q})" for q in qs.values())
            + " FROM (SELECT unnest(?) AS v)",
            [v.tolist()],
        ).fetchone()
        assert exact is not None
        for (name, _), want in zip(qs.items(), exact, strict=True):
            have = got[g][name]
            bound = QUANTILE_SLACK * want + (sketch.MIN_VALUE if want < sketch.MIN_VALUE else 0.0)
            assert abs(have - want) <= bound, (g, name, have, want)


def test_sketch_rank_is_quantile_disc_rank() -> None:
    """quantile_disc(q) is the value of rank ceil(q * n): checked on distinct, spread values."""
    con = duckdb.connect()
    for n in (1, 2, 3, 7, 10, 20, 100, 101):
        values = [1.1 ** (3 * i) for i in range(n)]  # each in its own bucket
        for q in (0.0, 0.1, 0.25, 0.5, 0.9, 0.95, 0.99, 1.0):
            exact = con.execute(
                f"SELECT quantile_disc(v, {q}) FROM (SELECT unnest(?) AS v)", [values]
            ).fetchone()
            assert exact is not None
            assert exact[0] == values[max(1, math.ceil(q * n)) - 1]
            frame = pl.DataFrame(
                {"g": [0] * n, "bucket": sketch.bucket_index(values), "count": [1] * n}
            )
            have = sketch.quantiles(frame, "g", {"x": q})["x"][0]
            assert have == pytest.approx(exact[0], rel=sketch.RELATIVE_ACCURACY)


def _release(at: datetime) -> schema.Release:
    return schema.Release(
        event_id=f"rel-{at.timestamp()}",
        schema_version=1,
        ts=at,
        agent_id="a1",
        release_id="r1",
        dimension="prompt_version",
        candidate="p2",
        baseline="p1",
        traffic_share=0.5,
    )


def test_release_events_count_in_no_kpi_and_are_never_late() -> None:
    """A release is a control record: the same windows with or without it, never late."""
    with_release, without = WindowAggregator(60, 10.0), WindowAggregator(60, 10.0)
    calls = [_llm(T0 + timedelta(seconds=5)), _llm(T0 + timedelta(seconds=30))]
    late = with_release.update(
        _batch(calls[0], _release(T0 + timedelta(seconds=6)), calls[1]), now=T0
    )
    without.update(_batch(*calls), now=T0)
    assert late.to_pylist() == [False, False, False]
    # a release for a window already closed is still not late (and still not counted)
    for agg in (with_release, without):
        agg.update(_batch(_llm(T0 + timedelta(seconds=200))), now=T0)
    late = with_release.update(_batch(_release(T0), _llm(T0 + timedelta(seconds=1))), now=T0)
    without.update(_batch(_llm(T0 + timedelta(seconds=1))), now=T0)
    assert late.to_pylist() == [False, True]
    got, want = with_release.flush_all(), without.flush_all()
    assert got.equals(want)
    assert "events_release" not in got.column_names
    assert sum(got.filter(pc.equal(got["level"], "key"))["events"].to_pylist()) == 3


def test_metric_records_carry_every_column_of_their_row(batches: list[pa.Table]) -> None:
    """The topic's JSON (written by polars) parses to the row's own values, DuckDB's reading
    of the same table: times as instants, lists of tool and guardrail counts, nulls."""
    metrics = _run(batches, 60).metrics
    records = windows.metric_records(metrics)
    assert len(records) == metrics.num_rows > 1_000
    rows = duckdb.sql("SELECT * FROM metrics").fetchall()
    names = metrics.schema.names
    times = {f.name for f in METRICS_SCHEMA if pa.types.is_timestamp(f.type)}
    assert any(r[names.index("tool_errors_by_tool")] for r in rows)  # nested, exercised
    for (key, value), row in zip(records, rows, strict=True):
        got = json.loads(value)
        assert list(got) == names
        assert key == got["metric_id"].encode()
        for name, want in zip(names, row, strict=True):
            have = got[name]
            if name in times and have is not None:
                assert have.endswith("Z"), have
                have = datetime.fromisoformat(have)
            if isinstance(want, float) and math.isnan(want):
                want = None
            assert have == want, (name, have, want)
    assert windows.metric_records(METRICS_SCHEMA.empty_table()) == []
