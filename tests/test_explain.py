"""Contribution analysis: which dimension values an alert's change comes from."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import pyarrow as pa
import pytest

from streams.detect import ANOMALIES_SCHEMA
from streams.explain import explain
from streams.warmstart import frame_lookup
from streams.windows import METRICS_SCHEMA

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
NORMAL = {("m1", "t1"): 0.1, ("m1", "t2"): 0.1, ("m2", "t1"): 1.0, ("m2", "t2"): 1.0}


def _rows(
    i: int, rates: dict[tuple[str, str], float], tasks: dict[tuple[str, str], int]
) -> list[dict[str, Any]]:
    out = []
    for (model, tenant), rate in rates.items():
        row: dict[str, Any] = dict.fromkeys(METRICS_SCHEMA.names)
        n = tasks.get((model, tenant), 10)
        row.update(
            metric_id=f"{i}{model}{tenant}",
            level="key",
            window_start=T0 + timedelta(minutes=i),
            window_end=T0 + timedelta(minutes=i + 1),
            agent_id="a",
            agent_version="v1",
            prompt_version="p1",
            model=model,
            tenant_id=tenant,
            tasks_started=n,
            cost_usd=rate * n,
            cost_per_task=rate,
            tool_errors_by_tool=[],
            guardrail_by_action=[],
        )
        out.append(row)
    return out


def _alert(observed: float) -> pa.Table:
    row: dict[str, Any] = dict.fromkeys(ANOMALIES_SCHEMA.names)
    row.update(
        anomaly_id="x",
        condition_id="c",
        kind="outlier",
        detected_at=T0,
        window_start=T0 + timedelta(minutes=5),
        window_end=T0 + timedelta(minutes=6),
        level="agent",
        agent_id="a",
        measure="cost_per_task",
        detector="ewma_zscore",
        baseline=0.55,
        observed=observed,
        direction="up",
        severity="critical",
        score=9.0,
        example_event_ids=[],
        message="m",
    )
    return pa.Table.from_pylist([row], schema=ANOMALIES_SCHEMA)


def _explain(
    rates: dict[tuple[str, str], float], tasks: dict[tuple[str, str], int]
) -> dict[str, Any]:
    history = [r for i in range(5) for r in _rows(i, NORMAL, {})]
    now = pa.Table.from_pylist(_rows(5, rates, tasks), schema=METRICS_SCHEMA)
    frame = pl.from_arrow(pa.Table.from_pylist(history, schema=METRICS_SCHEMA))
    assert isinstance(frame, pl.DataFrame)
    out = explain(_alert(1.0), now, frame_lookup(frame))
    assert out.schema == ANOMALIES_SCHEMA
    (row,) = out.to_pylist()
    return row


def test_shares_are_of_the_excess_over_each_segments_own_baseline() -> None:
    # gpt-like m2 of tenant t2 triples (excess 20), m2 of t1 goes 1.0 -> 1.5 (excess 5).
    row = _explain({**NORMAL, ("m2", "t2"): 3.0, ("m2", "t1"): 1.5}, {})
    got = [(c["dimension"], c["value"], c["share"]) for c in row["contributors"]]
    assert got == [
        ("model", "m2", pytest.approx(1.0)),
        ("tenant_id", "t2", pytest.approx(0.8)),
        ("tenant_id", "t1", pytest.approx(0.2)),
    ]
    assert row["explanation"] == (
        "80% of the cost_per_task increase is model m2, tenant t2; by dimension: "
        "model m2 100%, tenant_id t2 80%, tenant_id t1 20%."
    )


def test_a_shift_in_the_mix_is_not_a_cause() -> None:
    # Every key at its normal cost per task, but the dear model takes 5x the tasks: the
    # agent's cost per task rises, yet no segment costs more than it normally does.
    row = _explain(NORMAL, {("m2", "t1"): 50, ("m2", "t2"): 50})
    assert row["contributors"] == []
    assert row["explanation"] == "no dimension value stands out in the cost_per_task increase."


def test_a_new_segment_is_compared_with_the_alerts_baseline() -> None:
    # A key with no history (a new model) costs 3.0 a task; the alert's baseline is 0.55.
    row = _explain({**NORMAL, ("m3", "t1"): 3.0}, {})
    (top, *_) = row["contributors"]
    assert (top["dimension"], top["value"]) == ("model", "m3")
    assert top["share"] == pytest.approx(1.0)  # 30 - 0.55 * 10 of excess, all of it


def test_recoveries_and_other_kinds_stay_unexplained() -> None:
    alert = _alert(1.0)
    recovery = alert.set_column(2, "kind", pa.array(["recovery"])).cast(ANOMALIES_SCHEMA)
    now = pa.Table.from_pylist(_rows(5, NORMAL, {}), schema=METRICS_SCHEMA)
    (row,) = explain(recovery, now).to_pylist()
    assert row["contributors"] is None and row["explanation"] is None
