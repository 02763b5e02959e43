"""Which dimension values an alert's change comes from: ``contributors`` and ``explanation``.

Contribution analysis, as dimension drill-down tools do it, over the alert window's
``level = 'key'`` metrics rows under the alert's key. A ratio measure is a sum over a sum,
``R = N / D`` (cost per task: cost / tasks started; escalation rate: escalations / tasks
started; ...). Against the alert's baseline ``B``, the window holds an *excess* ``N - B D``
(what was spent or escalated beyond what the baseline rate predicts for this window's
volume). It splits exactly over any partition of the rows: a segment ``s`` contributes
``N_s - B D_s``, and its share is that over the total. So "82 % of the cost increase is
gpt-4o calls of tenant-03" reads: those rows hold 82 % of the window's excess cost.

Segments are each value of every dimension the alert's key leaves open (an agent's alert:
its versions, prompt versions, models, tenants; a tenant's: its agents ...), the finest
rows themselves (one combination of all of them), and for ``tool_error_rate`` each tool
(``tool_errors_by_tool``). Latency quantiles are not sums: their rows are weighted by their
calls (``p95 x calls``), an approximation. Counts and sums (``cost_usd``, ``escalations``)
have no rate to compare with, so their shares are of the window's total. Retrieval data
sources are not in the metrics rows and are not broken down. A key-level alert leaves no
dimension open: its explanation says so (but tools, for tool errors).
"""

from __future__ import annotations

from typing import Any, Final

import polars as pl
import pyarrow as pa

from streams.detect import ANOMALIES_SCHEMA, CONTRIBUTOR
from streams.rules import samples_of
from streams.windows import DIMENSIONS

__all__ = ["explain", "ratio_parts"]

TOP: Final = 3
MIN_SHARE: Final = 0.1
_EXPLAINED: Final = ("drift", "outlier", "rule")
_RATIOS: Final[dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "cost_per_task": (("cost_usd",), ("tasks_started",)),
    "cost_per_completed_task": (("cost_usd",), ("tasks_completed",)),
    "tokens_per_call": (("input_tokens", "output_tokens"), ("llm_calls",)),
    "escalation_rate": (("escalations",), ("tasks_started",)),
    "retrieval_miss_rate": (("retrieval_misses",), ("retrievals",)),
    "tool_error_rate": (("tool_errors",), ("tool_calls",)),
    "task_success_rate": (
        ("tasks_completed",),
        ("tasks_completed", "tasks_failed", "tasks_abandoned"),
    ),
}


def ratio_parts(measure: str) -> tuple[pl.Expr, pl.Expr | None]:
    """``(N, D)`` expressions over metrics rows with ``measure = sum N / sum D``; ``D`` None
    for a count or sum (see the module docstring)."""
    if measure in _RATIOS:
        num, den = _RATIOS[measure]
        return _sum(num), _sum(den)
    if measure.endswith("_ms"):
        calls = _sum(samples_of(measure))
        return pl.col(measure).fill_null(0.0) * calls, calls
    return pl.col(measure).cast(pl.Float64).fill_null(0.0), None


def _sum(cols: tuple[str, ...]) -> pl.Expr:
    return pl.sum_horizontal(pl.col(c).fill_null(0) for c in cols).cast(pl.Float64)


def explain(anomalies: pa.Table, metrics: pa.Table) -> pa.Table:
    """``anomalies`` with ``contributors`` and ``explanation`` filled from ``metrics``.

    ``metrics`` holds the closed windows the alerts are about (the same flush's rows); rows
    of other kinds (recovery, release, budget), or whose window has no key-level rows here,
    keep nulls.
    """
    if anomalies.num_rows == 0:
        return anomalies
    frame = pl.from_arrow(metrics)
    assert isinstance(frame, pl.DataFrame)
    keys = frame.filter(pl.col("level") == "key") if frame.height else frame
    contributors: list[list[dict[str, Any]] | None] = []
    sentences: list[str | None] = []
    for row in anomalies.to_pylist():
        got = _one(row, keys) if row["kind"] in _EXPLAINED and keys.height else None
        contributors.append(None if got is None else got[0])
        sentences.append(None if got is None else got[1])
    out = anomalies
    for name, values, kind in (
        ("contributors", contributors, pa.list_(CONTRIBUTOR)),
        ("explanation", sentences, pa.string()),
    ):
        i = out.schema.get_field_index(name)
        out = out.set_column(i, out.schema.field(i), pa.array(values, kind))
    return out.cast(ANOMALIES_SCHEMA)


def _one(row: dict[str, Any], keys: pl.DataFrame) -> tuple[list[dict[str, Any]], str] | None:
    measure = row["measure"]
    if measure not in keys.columns:
        return None
    rows = keys.filter(pl.col("window_start") == row["window_start"])
    fixed = [d for d in DIMENSIONS if row[d] is not None]
    for d in fixed:
        rows = rows.filter(pl.col(d) == row[d])
    if rows.height == 0:
        return None
    num, den = ratio_parts(measure)
    base = row["baseline"]
    excess = num - base * den if den is not None else num
    rows = rows.with_columns(excess.alias("_x"))
    total = float(rows["_x"].sum())
    change = "increase" if row["direction"] == "up" else "decrease"
    if den is None:
        change = "total"
    elif total == 0 or (total > 0) != (row["direction"] == "up"):
        return [], f"the window's {measure} does not move against the baseline under this key."
    open_dims = [d for d in DIMENSIONS if d not in fixed]
    found: list[dict[str, Any]] = []
    for d in open_dims:
        per = rows.group_by(d).agg(pl.col("_x").sum())
        if per.height < 2:
            continue
        for value, x in per.iter_rows():
            found.append({"dimension": d, "value": value, "share": x / total})
    if measure == "tool_error_rate":
        tools = (
            rows.select(pl.col("tool_errors_by_tool").explode().struct.unnest())
            .drop_nulls("tool_name")
            .group_by("tool_name")
            .agg(pl.col("errors").sum().cast(pl.Float64), pl.col("calls").sum())
        )
        for name, errors, calls in tools.iter_rows():
            found.append(
                {"dimension": "tool_name", "value": name, "share": (errors - base * calls) / total}
            )
    found = [c for c in found if c["value"] is not None and c["share"] >= MIN_SHARE]
    found.sort(key=lambda c: (-c["share"], c["dimension"], c["value"]))
    top = found[:TOP]
    what = f"{measure} {change}"
    if not open_dims and not top:
        return [], f"all of the {what} is this one key (no dimension left to break down)."
    best = rows.sort(["_x", *open_dims], descending=[True] * (1 + len(open_dims))).row(
        0, named=True
    )
    combo = ", ".join(f"{d.removesuffix('_id')} {best[d]}" for d in open_dims)
    parts = []
    if open_dims and rows.height > 1:
        parts.append(f"{best['_x'] / total:.0%} of the {what} is {combo}")
    if top:
        listed = ", ".join(f"{c['dimension']} {c['value']} {c['share']:.0%}" for c in top)
        parts.append(f"by dimension: {listed}")
    if not parts:
        return top, f"all of the {what} is {combo}."
    return top, "; ".join(parts) + "."
