"""Which dimension values an alert's change comes from: ``contributors`` and ``explanation``.

Contribution analysis, as dimension drill-down tools do it, over the alert window's
``level = 'key'`` metrics rows under the alert's key. A ratio measure is a sum over a sum,
``R = N / D`` (cost per task: cost / tasks started; escalation rate: escalations / tasks
started; ...). Against the alert's baseline ``B``, the window holds an *excess* ``N - B D``
(what was spent or escalated beyond what the baseline rate predicts for this window's
volume). Each key row ``s`` (the finest segment) is measured against its *own* baseline
``B_s``, the ratio of its sums over the ``HISTORY_WINDOWS`` (30) windows before (a key
without history, a version or prompt that just appeared, against the alert's baseline):
it contributes ``N_s - B_s D_s``. Their sum is the change's *rate effect* (a shift in the
mix, a dearer model taking more of the traffic, is left out, also within a value), and a
dimension value's share is the part of that sum in its rows. So "82 % of the cost increase is gpt-4o calls of tenant-03"
reads: those rows hold 82 % of the window's cost beyond what each would normally have
cost. Counts and sums compare with their mean per window in the history.

Segments are each value of every dimension the alert's key leaves open (an agent's alert:
its versions, prompt versions, models, tenants; a tenant's: its agents ...), the finest
rows themselves (one combination of all of them), and for ``tool_error_rate`` each tool
(``tool_errors_by_tool``). Latency quantiles are not sums: their rows are weighted by their
calls (``p95 x calls``), an approximation. Retrieval data
sources are not in the metrics rows and are not broken down. A key-level alert leaves no
dimension open: its explanation says so (but tools, for tool errors).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import polars as pl
import pyarrow as pa

from streams.detect import ANOMALIES_SCHEMA, CONTRIBUTOR
from streams.rules import samples_of
from streams.windows import DIMENSIONS

__all__ = ["explain", "ratio_parts"]

TOP: Final = 3
HISTORY_WINDOWS: Final = 30
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


History = Callable[[dict[str, Any]], pl.DataFrame]
"""An alert row -> the ``level = 'key'`` metrics rows under its key in the
``HISTORY_WINDOWS`` windows before its window (``streams.warmstart.history_lookup``)."""


def explain(anomalies: pa.Table, metrics: pa.Table, history: History | None = None) -> pa.Table:
    """``anomalies`` with ``contributors`` and ``explanation`` filled from ``metrics``.

    ``metrics`` holds the closed windows the alerts are about (the same flush's rows);
    ``history`` the windows before, for each segment's own baseline (without it, every
    segment is compared with the alert's baseline). Rows of other kinds (recovery, release,
    budget), or whose window has no key-level rows here, keep nulls.
    """
    if anomalies.num_rows == 0:
        return anomalies
    frame = pl.from_arrow(metrics)
    assert isinstance(frame, pl.DataFrame)
    keys = frame.filter(pl.col("level") == "key") if frame.height else frame
    contributors: list[list[dict[str, Any]] | None] = []
    sentences: list[str | None] = []
    for row in anomalies.to_pylist():
        got = None
        if row["kind"] in _EXPLAINED and keys.height and row["measure"] in keys.columns:
            before = history(row) if history is not None else keys.clear()
            got = _one(row, keys, before)
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


def _scoped(rows: pl.DataFrame, row: dict[str, Any]) -> pl.DataFrame:
    for d in DIMENSIONS:
        if row[d] is not None:
            rows = rows.filter(pl.col(d) == row[d])
    return rows


def _excess(
    now: pl.DataFrame, before: pl.DataFrame, by: list[str], measure: str, base: float
) -> pl.DataFrame:
    """``by`` values of ``now`` with ``_x``, their excess over their own baseline."""
    num, den = ratio_parts(measure)
    windows = max(before["window_start"].n_unique(), 1) if before.height else 1
    cur = now.group_by(by).agg(
        num.sum().alias("_n"), (den if den is not None else num).sum().alias("_d")
    )
    past = before.group_by(by).agg(
        num.sum().alias("_hn"), (den if den is not None else num).sum().alias("_hd")
    )
    both = cur.join(past, on=by, how="left", nulls_equal=True)
    if den is None:
        return both.with_columns(
            (pl.col("_n") - pl.col("_hn").fill_null(0.0) / windows).alias("_x")
        )
    own = pl.when(pl.col("_hd") > 0).then(pl.col("_hn") / pl.col("_hd")).otherwise(base)
    return both.with_columns((pl.col("_n") - own * pl.col("_d")).alias("_x"))


def _one(
    row: dict[str, Any], keys: pl.DataFrame, history: pl.DataFrame
) -> tuple[list[dict[str, Any]], str] | None:
    measure = row["measure"]
    rows = _scoped(keys.filter(pl.col("window_start") == row["window_start"]), row)
    if rows.height == 0:
        return None
    before = _scoped(history, row).filter(pl.col("window_start") < row["window_start"])
    up = row["direction"] == "up"
    what = f"{measure} {'increase' if up else 'decrease'}"
    base = row["baseline"]
    open_dims = [d for d in DIMENSIONS if row[d] is None]
    found: list[dict[str, Any]] = []

    def shares(per: pl.DataFrame, name: str, column: str) -> None:
        total = float(per["_x"].sum())
        if per.height < 2 or total == 0 or (total > 0) != up:
            return
        for value, x in per.select(column, "_x").iter_rows():
            found.append({"dimension": name, "value": value, "share": x / total})

    # Excess is taken per key row (each against its own history) and then summed per
    # value: pooled per value, a shift of the mix inside the value would count as a cause.
    finest = _excess(rows, before, list(DIMENSIONS), measure, base)
    for d in open_dims:
        shares(finest.group_by(d).agg(pl.col("_x").sum()), d, d)
    if measure == "tool_error_rate":

        def tools(frame: pl.DataFrame) -> pl.DataFrame:
            return (
                frame.select(pl.col("window_start"), pl.col("tool_errors_by_tool").explode())
                .unnest("tool_errors_by_tool")
                .drop_nulls("tool_name")
                .rename({"errors": "tool_errors", "calls": "tool_calls"})
            )

        shares(
            _excess(tools(rows), tools(before), ["tool_name"], measure, base),
            "tool_name",
            "tool_name",
        )
    found = [c for c in found if c["value"] is not None and c["share"] >= MIN_SHARE]
    found.sort(key=lambda c: (-c["share"], c["dimension"], c["value"]))
    top = found[:TOP]
    parts = []
    if len(open_dims) > 1 and rows.height > 1:
        total = float(finest["_x"].sum())
        if total != 0 and (total > 0) == up:
            best = finest.sort(["_x", *open_dims], descending=True).row(0, named=True)
            varied = [d for d in open_dims if rows[d].n_unique() > 1]
            combo = ", ".join(f"{d.removesuffix('_id')} {best[d]}" for d in varied)
            parts.append(f"{best['_x'] / total:.0%} of the {what} is {combo}")
    if top:
        listed = ", ".join(f"{c['dimension']} {c['value']} {c['share']:.0%}" for c in top)
        parts.append(f"by dimension: {listed}")
    if not parts:
        if not open_dims:
            return [], f"all of the {what} is this one key (no dimension left to break down)."
        return [], f"no dimension value stands out in the {what}."
    return top, "; ".join(parts) + "."
