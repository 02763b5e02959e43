"""Analysis over the lake: DuckDB views and macros for the common questions, and the tables
and plots that the notebooks (``notebooks/*.ipynb``) and the HTML report
(``pipeline.report``) share.

SQL first: every number a plot or a report table shows comes from one of the views below, so
what a notebook draws is what ``agentstream sql`` returns. ``ANALYSIS_VIEWS`` lists them as
``(name, SQL, one-line doc)``; ``install_views`` creates them on a connection that already has
the base views of ``sinks.catalog`` (``events``, ``metrics``, ``tool_calls``, ...).

Sources. KPIs come from the ``metrics`` view at ``level = 'key'`` (the finest level, so no
double counting), de-duplicated on ``metric_id`` (``metric_windows``): counts and sums are
summed over windows and keys first, and ratios are computed from those sums (``safe_div``),
never averaged. Per-event questions (tool errors, latency percentiles) read ``events`` and
its per-type views. Two things follow from the metrics being windows of event time: an event
that arrived late (``events.late``) counts only in ``late_events``, not in the window sums;
and the key includes ``model``, which only model calls carry, so task, escalation and
retrieval counts sit under ``model IS NULL`` (summing over model, as every view here does, is
right; asking "tasks by model" is not).

Views and macros, with their columns (``readme_table()`` renders the README's table):

``safe_div(num, den)``
    ``num / den`` as DOUBLE, NULL when ``den`` is 0 or NULL.
``metric_windows``
    ``metrics`` with exactly one row per ``metric_id`` (every level; filter ``level``).
``kpis_every(step, dim)``
    Table macro: KPIs per time bucket of ``step`` (an INTERVAL, UTC-aligned) and series of
    ``dim`` ('agent', 'version', 'prompt', 'model', 'tenant' or 'all'): ``bucket``,
    ``series``, every summed count and amount, ``tokens``, ``tasks_ended`` and every ratio.
``cost_by_version_day``
    ``day`` (UTC), ``agent_id``, ``agent_version``, ``tasks_started``, ``tasks_completed``,
    ``llm_calls``, ``input_tokens``, ``output_tokens``, ``cost_usd``, ``cost_estimated_usd``,
    ``cost_per_task``, ``cost_per_completed_task``, ``tokens_per_call``.
``quality_by_version``
    Per window: ``window_start``, ``window_end``, ``agent_id``, ``agent_version``, the task
    counts, ``escalations``, ``retrievals``, ``retrieval_misses``, ``tool_calls``,
    ``tool_errors``, ``task_success_rate``, ``escalation_rate``, ``retrieval_miss_rate``,
    ``tool_error_rate``. Counts are there so coarser buckets re-aggregate correctly.
``task_funnel``
    ``agent_id``, ``agent_version``, ``tasks_started``, ``tasks_completed``,
    ``tasks_failed``, ``tasks_abandoned``, ``tasks_ended``, ``tasks_open`` (started minus
    ended: tasks still running or whose end never arrived; negative when tasks started
    before the first window), ``escalations``, ``task_success_rate`` (completed / ended),
    ``completion_rate``, ``failure_rate``, ``abandon_rate`` (each / started),
    ``escalation_rate``, ``first_window``, ``last_window``.
``tool_errors``
    From ``tool_calls``: ``tool_name``, ``calls``, ``errors``, ``error_rate``,
    ``top_error_type`` (most frequent ``error_type``, ties by name), ``agents`` (how many),
    ``agent_ids``, ``latency_p95_ms``, ``last_error_at``; highest error rate first.
``latency_by_model``
    From ``events``: ``step`` (llm_call, tool_call, retrieval), ``model`` (only model calls
    carry one: NULL for tool calls and retrievals), ``calls``, ``latency_p50_ms``,
    ``latency_p95_ms``, ``latency_p99_ms`` (``quantile_cont``), ``latency_mean_ms``,
    ``latency_max_ms``.
``anomaly_context_within(n)`` / ``anomaly_context``
    Every anomaly with the ``metric_windows`` rows of the same level and key from ``n``
    windows before to ``n`` after it (``anomaly_context``: n = 10): the anomaly's columns
    (its window as ``anomaly_window_start``/``anomaly_window_end``), ``window_offset``
    (windows from the anomaly's, 0 = its own), ``window_start``, ``window_end``, ``value``
    (the anomaly's measure in that window) and ``events``, ``tasks_started``, ``llm_calls``,
    ``cost_usd``, ``cost_per_task``, ``tokens_per_call``, ``task_success_rate``,
    ``escalation_rate``, ``retrieval_miss_rate``, ``tool_error_rate``,
    ``llm_latency_p95_ms``. A window in which the key had no event has no row.
``anomaly_conditions``
    One row per ``condition_id``: key (``level``, dimensions, ``subject``: a readable
    label), ``measure``, ``severity`` (worst), ``direction``, ``opened_at`` (start of the
    first alert window), ``recovered_at`` (end of the recovery window, NULL while open),
    ``alerts``, ``detectors``, ``baseline``, ``peak`` (observed value furthest from the
    baseline), ``message`` (of the first alert).
``release_summary``
    From ``release_verdicts`` (de-duplicated on ``verdict_id``): one row per ``release_id``
    and ``measure`` with the release's agent, tenant, dimension, candidate and baseline
    versions, the latest look's ``verdict``, ``candidate_value``, ``baseline_value``,
    ``effect``, ``effect_low``, ``effect_high``, ``effect_scale``, ``confidence``,
    ``candidate_samples``, ``baseline_samples``, ``windows`` and ``traffic_share``, plus
    ``started_at``, ``last_window_end``, ``decided_window_end`` (NULL while running) and
    ``looks``. A decided measure gets no later looks, so its row is the decision.
``lake_summary``
    One row: ``events``, ``late_events``, ``dead_letters``, ``first_event``, ``last_event``,
    ``agents``, ``models``, ``tenants`` (from ``events``), the KPI totals from the metrics
    (``cost_usd``, ``tasks_*``, ``escalations``, rates), ``anomalies`` (alerts, recoveries
    excluded) and ``conditions``.

The ``anomalies`` view comes with the lake's tables. ``install_views`` tolerates its absence
(base views made some other way): it then defines ``anomalies`` as an empty view with the
expected columns.

Plots use matplotlib only, through the object API (``matplotlib.figure.Figure``, never
``pyplot``): static PNGs that need no JavaScript, work headless in CI, embed in one HTML file
as base64, and the object API keeps no global state, so the report can draw many figures
without leaks. Every ``plot_*`` function returns a ``Figure`` and draws a "no data" note
instead of failing on an empty lake.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import duckdb

from sinks import catalog
from sinks.contracts import DIMENSIONS, EVALUATORS, METRICS_SCHEMA, QUALITY_COUNTS, QUALITY_SUMS

if TYPE_CHECKING:  # matplotlib is imported by the plotting functions only: the views are
    # installed on every `agentstream sql` and at worker start-up, which draw nothing.
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.ticker import Formatter

__all__ = [
    "ANALYSIS_VIEWS",
    "DIMS",
    "Series",
    "Table",
    "connect",
    "fetch",
    "fmt",
    "headline",
    "install_views",
    "kpi_select",
    "kpi_series",
    "nice_step",
    "pick_step",
    "plot_all",
    "plot_anomaly_context",
    "plot_anomaly_timeline",
    "plot_cost_breakdown",
    "plot_cost_over_time",
    "plot_latency_by_model",
    "plot_over_time",
    "plot_quality_over_time",
    "plot_task_funnel",
    "plot_tokens_over_time",
    "plot_tool_errors",
    "plot_volume_over_time",
    "png_bytes",
    "png_data_uri",
    "readme_table",
    "subject_sql",
    "summary_table",
    "uses_analysis",
    "view_select",
]

# --------------------------------------------------------------------------------------
# measures: what is summed, and what is derived from the sums
# --------------------------------------------------------------------------------------

COUNTS: Final = (
    "events",
    "llm_calls",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "tasks_started",
    "tasks_completed",
    "tasks_failed",
    "tasks_abandoned",
    "escalations",
    "retrievals",
    "retrieval_misses",
    "tool_calls",
    "tool_errors",
    "guardrail_incidents",
    "late_events",
    *QUALITY_COUNTS,
)
"""Metrics columns that are counts: summed as BIGINT."""
AMOUNTS: Final = ("cost_usd", "cost_estimated_usd", *QUALITY_SUMS)
"""Metrics columns that are amounts: summed as DOUBLE."""


@dataclass(frozen=True)
class _Derived:
    """A measure computed from sums: ``cols`` added up, divided by ``den`` added up if set."""

    cols: tuple[str, ...]
    den: tuple[str, ...] = ()

    @property
    def is_ratio(self) -> bool:
        return bool(self.den)

    @property
    def needs(self) -> tuple[str, ...]:
        return (*self.cols, *self.den)

    def sql(self) -> str:
        num = " + ".join(self.cols)
        return f"safe_div({num}, {' + '.join(self.den)})" if self.den else num

    def weight(self) -> str:
        """What a series' size is measured in: the denominator of a ratio, else the sum."""
        return " + ".join(self.den or self.cols)


_ENDED: Final = ("tasks_completed", "tasks_failed", "tasks_abandoned")
DERIVED: Final[dict[str, _Derived]] = {
    "tokens": _Derived(("input_tokens", "output_tokens")),
    "tasks_ended": _Derived(_ENDED),
    # The ratios, exactly as streams.windows defines them per window (a test keeps them equal).
    "task_success_rate": _Derived(("tasks_completed",), _ENDED),
    "cost_per_task": _Derived(("cost_usd",), ("tasks_started",)),
    "cost_per_completed_task": _Derived(("cost_usd",), ("tasks_completed",)),
    "escalation_rate": _Derived(("escalations",), ("tasks_started",)),
    "retrieval_miss_rate": _Derived(("retrieval_misses",), ("retrievals",)),
    "tool_error_rate": _Derived(("tool_errors",), ("tool_calls",)),
    "tokens_per_call": _Derived(("input_tokens", "output_tokens"), ("llm_calls",)),
    "eval_pass_rate": _Derived(("evaluations_passed",), ("evaluations_judged",)),
    "eval_score_mean": _Derived(("evaluation_score_sum",), ("evaluations_scored",)),
    **{
        f"eval_{e}_{name}": _Derived((f"eval_{e}_{num}",), (f"eval_{e}_{den}",))
        for e in EVALUATORS
        for name, num, den in (
            ("pass_rate", "passed", "judged"),
            ("score_mean", "score_sum", "scored"),
        )
    },
    "feedback_rating_mean": _Derived(("feedback_rating_sum",), ("feedback_ratings",)),
    "feedback_negative_share": _Derived(("feedback_negative",), ("feedback_ratings",)),
}
RATIOS: Final = tuple(n for n, d in DERIVED.items() if d.is_ratio)


def _measure(name: str) -> _Derived:
    if name in DERIVED:
        return DERIVED[name]
    if name in COUNTS or name in AMOUNTS:
        return _Derived((name,))
    raise ValueError(
        f"unknown measure {name!r}: expected one of {', '.join([*COUNTS, *AMOUNTS, *DERIVED])}"
    )


DIMS: Final[dict[str, str]] = {
    "agent": "agent_id",
    "version": "agent_id || ' ' || coalesce(agent_version, '(no version)')",
    "prompt": "agent_id || ' ' || coalesce(prompt_version, '(no prompt)')",
    "model": "coalesce(model, '(no model)')",
    "tenant": "coalesce(tenant_id, '(no tenant)')",
    "all": "'all'",
}
"""How each ``dim`` of ``kpis_every`` names a series (versions and prompts with their agent)."""


def _dim_sql(dim: str) -> str:
    try:
        return DIMS[dim]
    except KeyError:
        raise ValueError(f"unknown dim {dim!r}: expected one of {', '.join(DIMS)}") from None


def _kpi_sql(
    source: str,
    keys: Sequence[tuple[str, str]],
    measures: Sequence[str],
    *,
    where: str | None = "level = 'key'",
    order: Sequence[str] = (),
    extra: Sequence[tuple[str, str]] = (),
) -> str:
    """``SELECT keys, measures, extra`` over ``source``: sums grouped by ``keys`` (``(name,
    expr)``), then the derived measures computed from the sums; ``extra`` are more
    ``(name, aggregate)`` columns passed through."""
    needed: list[str] = []
    for m in measures:
        for col in _measure(m).needs:
            if col not in needed:
                needed.append(col)
    sums = [
        f"coalesce(CAST(sum({c}) AS BIGINT), 0) AS {c}"
        if c in COUNTS
        else f"coalesce(sum({c}), 0.0) AS {c}"
        for c in needed
    ]
    aggs = [*sums, *(f"{e} AS {n}" for n, e in extra)]
    inner = f"SELECT {', '.join([*(f'{e} AS {n}' for n, e in keys), *aggs])} FROM {source}"
    if where:
        inner += f" WHERE {where}"
    if keys:
        inner += " GROUP BY " + ", ".join(str(i + 1) for i in range(len(keys)))
    outer = [
        *(n for n, _ in keys),
        *(m if m in needed else f"{_measure(m).sql()} AS {m}" for m in measures),
        *(n for n, _ in extra),
    ]
    sql = f"SELECT {', '.join(outer)} FROM ({inner})"
    if order:
        sql += " ORDER BY " + ", ".join(order)
    return sql


kpi_select = _kpi_sql
"""The SQL the KPI views are made of, for other readers (the live page): sums of measures'
columns over a source grouped by keys, ratios computed from the sums."""


def view_select(name: str) -> str:
    """The SELECT behind analysis view ``name``: prefixed with a CTE named like one of its
    sources (``WITH tool_calls AS (SELECT ... FROM main.tool_calls WHERE ...)``), it gives
    the view's numbers over a filtered source."""
    for view, sql, _doc in ANALYSIS_VIEWS:
        prefix = f"CREATE OR REPLACE VIEW {view} AS "
        if view == name and sql.startswith(prefix):
            return sql[len(prefix) :]
    raise ValueError(f"no analysis view {name!r}")


_ALL_MEASURES: Final = (*COUNTS, *AMOUNTS, *DERIVED)
_NUMERIC_METRICS: Final = tuple(
    f.name
    for f in METRICS_SCHEMA
    if str(f.type) in ("int64", "double") and f.name not in ("metric_id",)
)
_CONTEXT_COLUMNS: Final = (
    "events",
    "tasks_started",
    "llm_calls",
    "cost_usd",
    "cost_per_task",
    "tokens_per_call",
    "task_success_rate",
    "escalation_rate",
    "retrieval_miss_rate",
    "tool_error_rate",
    "llm_latency_p95_ms",
)
_SEVERITY_RANK: Final = "CASE severity WHEN 'critical' THEN 2 WHEN 'warning' THEN 1 ELSE 0 END"

ANOMALY_COLUMNS: Final[tuple[tuple[str, str], ...]] = (
    ("anomaly_id", "VARCHAR"),
    ("condition_id", "VARCHAR"),
    ("kind", "VARCHAR"),
    ("detected_at", "TIMESTAMPTZ"),
    ("window_start", "TIMESTAMPTZ"),
    ("window_end", "TIMESTAMPTZ"),
    ("level", "VARCHAR"),
    *((d, "VARCHAR") for d in DIMENSIONS),
    ("measure", "VARCHAR"),
    ("detector", "VARCHAR"),
    ("baseline", "DOUBLE"),
    ("observed", "DOUBLE"),
    ("direction", "VARCHAR"),
    ("severity", "VARCHAR"),
    ("score", "DOUBLE"),
    ("message", "VARCHAR"),
)
"""The columns of ``anomalies`` this module relies on (the stand-in view has exactly these)."""


# The problems the feedback loop collects, one (category, item) per event that shows one.
_PROBLEMS: Final = (
    ("escalation", "coalesce(reason, '(no reason)')", "type = 'escalation'"),
    ("correction", "correction", "type = 'feedback' AND correction IS NOT NULL"),
    (
        "failing_tool",
        "tool_name || coalesce(': ' || error_type, '')",
        "type = 'tool_call' AND status = 'error'",
    ),
    ("retrieval_miss", "coalesce(data_source, '(no source)')", "type = 'retrieval' AND miss"),
    ("guardrail_block", "policy_id", "type = 'guardrail' AND action = 'block'"),
    ("abandoned_task", "'abandoned'", "type = 'task' AND outcome = 'abandoned'"),
    ("failing_evaluator", "evaluator", "type = 'evaluation' AND NOT passed"),
)
# A version's previous one is the agent's prompt version first seen before it.
_FEEDBACK_LOOP_SQL: Final = (
    "WITH items AS ("
    + " UNION ALL ".join(
        f"SELECT agent_id, prompt_version, '{category}' AS category, {item} AS item "
        f"FROM events WHERE {cond}"
        for category, item, cond in _PROBLEMS
    )
    + "), counts AS (SELECT agent_id, prompt_version, category, item, count(*) AS count "
    "FROM items GROUP BY ALL), "
    "versions AS (SELECT agent_id, prompt_version, "
    "count(*) FILTER (WHERE type = 'task' AND outcome = 'started') AS tasks, "
    "min(ts) AS first_seen FROM events WHERE type <> 'release' GROUP BY ALL), "
    "ordered AS (SELECT *, lag(prompt_version) OVER (PARTITION BY agent_id "
    "ORDER BY first_seen, prompt_version) AS previous_version FROM versions), "
    "rated AS (SELECT c.*, o.tasks, o.previous_version, "
    "100 * safe_div(c.count, o.tasks) AS per_100_tasks FROM counts c JOIN ordered o "
    "ON c.agent_id = o.agent_id AND c.prompt_version IS NOT DISTINCT FROM o.prompt_version) "
    "SELECT r.agent_id, r.prompt_version, r.category, r.item, r.count, r.tasks, "
    "r.per_100_tasks, r.previous_version, "
    "coalesce(p.per_100_tasks, 0.0) AS previous_per_100_tasks, "
    "r.per_100_tasks - coalesce(p.per_100_tasks, 0.0) AS change_per_100_tasks, "
    "row_number() OVER (PARTITION BY r.agent_id, r.prompt_version "
    "ORDER BY r.count DESC, r.category, r.item) AS rank "
    "FROM rated r LEFT JOIN rated p ON p.agent_id = r.agent_id "
    "AND p.prompt_version = r.previous_version AND p.category = r.category "
    "AND p.item = r.item "
    "ORDER BY r.agent_id, r.prompt_version, rank"
)


def _view(name: str, select: str) -> str:
    return f"CREATE OR REPLACE VIEW {name} AS {select}"


def subject_sql(prefix: str = "") -> str:
    """A readable label of a metrics key: its dimensions, and the level unless 'key'."""
    p = prefix
    dims = ", ".join(f"{p}{d}" for d in DIMENSIONS)
    return (
        f"concat_ws(' ', {dims}) || CASE WHEN {p}level = 'key' THEN '' "
        f"ELSE ' (' || {p}level || ')' END"
    )


def _anomaly_context_macro() -> str:
    value = " ".join(f"WHEN '{c}' THEN CAST(m.{c} AS DOUBLE)" for c in _NUMERIC_METRICS)
    key_join = " AND ".join(f"m.{d} IS NOT DISTINCT FROM a.{d}" for d in DIMENSIONS)
    width = "(a.window_end - a.window_start)"
    cols = ", ".join(
        f"a.{c}" for c, _ in ANOMALY_COLUMNS if c not in ("window_start", "window_end")
    )
    context = ", ".join(f"m.{c}" for c in _CONTEXT_COLUMNS)
    return (
        "CREATE OR REPLACE MACRO anomaly_context_within(n) AS TABLE "
        f"SELECT {cols}, a.window_start AS anomaly_window_start, "
        "a.window_end AS anomaly_window_end, "
        f"CAST(round(epoch(m.window_start - a.window_start) / epoch{width}) AS INTEGER) "
        "AS window_offset, m.window_start, m.window_end, "
        f"CASE a.measure {value} END AS value, {context} "
        "FROM anomalies AS a JOIN metric_windows AS m "
        f"ON m.level = a.level AND {key_join} "
        f"AND m.window_start >= a.window_start - n * {width} "
        f"AND m.window_start <= a.window_start + n * {width} "
        "ORDER BY a.window_start, a.anomaly_id, m.window_start"
    )


_LAKE_KPIS: Final = (
    "cost_usd",
    "cost_estimated_usd",
    "llm_calls",
    "input_tokens",
    "output_tokens",
    "tasks_started",
    "tasks_completed",
    "tasks_failed",
    "tasks_abandoned",
    "escalations",
    "task_success_rate",
    "escalation_rate",
    "retrieval_miss_rate",
    "tool_error_rate",
    "cost_per_completed_task",
)

ANALYSIS_VIEWS: Final[list[tuple[str, str, str]]] = [
    (
        "safe_div",
        "CREATE OR REPLACE MACRO safe_div(num, den) AS "
        "CASE WHEN den > 0 THEN CAST(num AS DOUBLE) / den END",
        "num / den as DOUBLE, NULL when den is 0 or NULL (ratios of sums)",
    ),
    (
        "metric_windows",
        _view(
            "metric_windows",
            "SELECT * FROM metrics QUALIFY row_number() OVER (PARTITION BY metric_id) = 1",
        ),
        "metrics with exactly one row per metric_id (all levels: filter on level)",
    ),
    (
        "kpis_every",
        "CREATE OR REPLACE MACRO kpis_every(step, dim) AS TABLE "
        + _kpi_sql(
            "metric_windows",
            [
                ("bucket", "time_bucket(step, window_start, 'UTC')"),
                (
                    "series",
                    "CASE dim "
                    + " ".join(f"WHEN '{d}' THEN {e}" for d, e in DIMS.items())
                    + " ELSE error('kpis_every: dim must be one of "
                    + ", ".join(DIMS)
                    + "; got ' || dim) END",
                ),
            ],
            _ALL_MEASURES,
            order=("bucket", "series"),
        ),
        "table macro kpis_every(INTERVAL, dim): every KPI per UTC time bucket and series "
        "of dim (agent, version, prompt, model, tenant, all)",
    ),
    (
        "cost_by_version_day",
        _view(
            "cost_by_version_day",
            _kpi_sql(
                "metric_windows",
                [
                    ("day", "CAST(window_start AT TIME ZONE 'UTC' AS DATE)"),
                    ("agent_id", "agent_id"),
                    ("agent_version", "agent_version"),
                ],
                (
                    "tasks_started",
                    "tasks_completed",
                    "llm_calls",
                    "input_tokens",
                    "output_tokens",
                    "cost_usd",
                    "cost_estimated_usd",
                    "cost_per_task",
                    "cost_per_completed_task",
                    "tokens_per_call",
                ),
                order=("day", "agent_id", "agent_version"),
            ),
        ),
        "cost, tasks and cost per (completed) task per UTC day, agent and version",
    ),
    (
        "quality_by_version",
        _view(
            "quality_by_version",
            _kpi_sql(
                "metric_windows",
                [
                    ("window_start", "window_start"),
                    ("window_end", "window_end"),
                    ("agent_id", "agent_id"),
                    ("agent_version", "agent_version"),
                ],
                (
                    "tasks_started",
                    "tasks_completed",
                    "tasks_failed",
                    "tasks_abandoned",
                    "escalations",
                    "retrievals",
                    "retrieval_misses",
                    "tool_calls",
                    "tool_errors",
                    "task_success_rate",
                    "escalation_rate",
                    "retrieval_miss_rate",
                    "tool_error_rate",
                ),
                order=("window_start", "agent_id", "agent_version"),
            ),
        ),
        "per window, agent and version: task, escalation, retrieval-miss and tool-error "
        "counts and rates",
    ),
    (
        "task_funnel",
        _view(
            "task_funnel",
            "SELECT agent_id, agent_version, tasks_started, tasks_completed, tasks_failed, "
            "tasks_abandoned, tasks_ended, tasks_started - tasks_ended AS tasks_open, "
            "escalations, task_success_rate, "
            "safe_div(tasks_completed, tasks_started) AS completion_rate, "
            "safe_div(tasks_failed, tasks_started) AS failure_rate, "
            "safe_div(tasks_abandoned, tasks_started) AS abandon_rate, escalation_rate, "
            "first_window, last_window FROM ("
            + _kpi_sql(
                "metric_windows",
                [("agent_id", "agent_id"), ("agent_version", "agent_version")],
                (
                    "tasks_started",
                    "tasks_completed",
                    "tasks_failed",
                    "tasks_abandoned",
                    "tasks_ended",
                    "escalations",
                    "task_success_rate",
                    "escalation_rate",
                ),
                extra=(
                    ("first_window", "min(window_start)"),
                    ("last_window", "max(window_end)"),
                ),
            )
            + ") ORDER BY agent_id, agent_version",
        ),
        "tasks started, completed, failed, abandoned (and shares) per agent and version",
    ),
    (
        "tool_errors",
        _view(
            "tool_errors",
            "WITH types AS (SELECT tool_name, error_type, count(*) AS n FROM tool_calls "
            "WHERE status = 'error' AND error_type IS NOT NULL GROUP BY ALL), "
            "top AS (SELECT tool_name, first(error_type ORDER BY n DESC, error_type) "
            "AS top_error_type FROM types GROUP BY tool_name) "
            "SELECT t.tool_name, count(*) AS calls, "
            "count(*) FILTER (WHERE status = 'error') AS errors, "
            "safe_div(count(*) FILTER (WHERE status = 'error'), count(*)) AS error_rate, "
            "any_value(top.top_error_type) AS top_error_type, "
            "count(DISTINCT agent_id) AS agents, "
            "string_agg(DISTINCT agent_id, ', ' ORDER BY agent_id) AS agent_ids, "
            "quantile_cont(latency_ms, 0.95) AS latency_p95_ms, "
            "max(ts) FILTER (WHERE status = 'error') AS last_error_at "
            "FROM tool_calls AS t LEFT JOIN top USING (tool_name) GROUP BY t.tool_name "
            "ORDER BY error_rate DESC NULLS LAST, errors DESC, t.tool_name",
        ),
        "per tool (from tool_calls): calls, errors, error rate, most frequent error type; "
        "worst first",
    ),
    (
        "latency_by_model",
        _view(
            "latency_by_model",
            "SELECT type AS step, model, count(*) AS calls, "
            "quantile_cont(latency_ms, 0.5) AS latency_p50_ms, "
            "quantile_cont(latency_ms, 0.95) AS latency_p95_ms, "
            "quantile_cont(latency_ms, 0.99) AS latency_p99_ms, "
            "avg(latency_ms) AS latency_mean_ms, max(latency_ms) AS latency_max_ms "
            "FROM events WHERE type IN ('llm_call', 'tool_call', 'retrieval') "
            "AND latency_ms IS NOT NULL GROUP BY ALL "
            "ORDER BY step, latency_p95_ms DESC, model",
        ),
        "latency p50/p95/p99 (quantile_cont over events) per step type and model",
    ),
    (
        "anomaly_context_within",
        _anomaly_context_macro(),
        "table macro anomaly_context_within(n): each anomaly with its key's metrics from n "
        "windows before to n after",
    ),
    (
        "anomaly_context",
        _view("anomaly_context", "SELECT * FROM anomaly_context_within(10)"),
        "each anomaly with the metrics of the same level and key, 10 windows either side",
    ),
    (
        "anomaly_conditions",
        _view(
            "anomaly_conditions",
            "SELECT condition_id, any_value(level) AS level, "
            + ", ".join(f"any_value({d}) AS {d}" for d in DIMENSIONS)
            + f", any_value({subject_sql()}) AS subject, any_value(measure) AS measure, "
            f"CASE max({_SEVERITY_RANK}) WHEN 2 THEN 'critical' WHEN 1 THEN 'warning' "
            "ELSE 'info' END AS severity, "
            "coalesce(first(direction ORDER BY window_start) FILTER (WHERE kind <> 'recovery'), "
            "first(direction ORDER BY window_start)) AS direction, "
            "coalesce(min(window_start) FILTER (WHERE kind <> 'recovery'), min(window_start)) "
            "AS opened_at, max(window_end) FILTER (WHERE kind = 'recovery') AS recovered_at, "
            "count(*) FILTER (WHERE kind <> 'recovery') AS alerts, "
            "string_agg(DISTINCT detector, ', ' ORDER BY detector) AS detectors, "
            "first(baseline ORDER BY window_start) AS baseline, "
            "first(observed ORDER BY abs(observed - baseline) DESC) "
            "FILTER (WHERE kind <> 'recovery') AS peak, "
            "coalesce(first(message ORDER BY window_start) FILTER (WHERE kind <> 'recovery'), "
            "first(message ORDER BY window_start)) AS message "
            "FROM anomalies GROUP BY condition_id ORDER BY opened_at, condition_id",
        ),
        "one row per anomaly condition: key, measure, worst severity, opened/recovered, "
        "alerts, baseline, peak",
    ),
    (
        "evaluation_quality",
        _view(
            "evaluation_quality",
            "SELECT agent_id, prompt_version, evaluator, evaluator_kind, "
            "count(*) AS evaluations, count(passed) AS judged, "
            "count(*) FILTER (WHERE passed) AS passed, "
            "count(*) FILTER (WHERE NOT passed) AS failed, "
            "safe_div(count(*) FILTER (WHERE passed), count(passed)) AS pass_rate, "
            "avg(score) AS mean_score, min(ts) AS first_at, max(ts) AS last_at "
            "FROM evaluations GROUP BY ALL "
            "ORDER BY pass_rate NULLS LAST, failed DESC, agent_id, prompt_version, evaluator",
        ),
        "per agent, prompt version, evaluator (any name) and kind of evaluator: evaluations, "
        "passed, failed, pass rate, mean score; worst pass rate first",
    ),
    (
        "feedback_loop",
        _view("feedback_loop", _FEEDBACK_LOOP_SQL),
        "what to fix next: per agent and prompt version, each escalation reason, correction, "
        "failing tool, missing data source, blocking guardrail, abandoned tasks and failing "
        "evaluator with its count, rate per 100 tasks and change against the previous "
        "prompt version; ranked by count within the version",
    ),
    (
        "release_summary",
        _view(
            "release_summary",
            "WITH v AS (SELECT DISTINCT ON (verdict_id) * FROM release_verdicts "
            "ORDER BY verdict_id, decided_at) "
            "SELECT release_id, any_value(agent_id) AS agent_id, "
            "any_value(tenant_id) AS tenant_id, any_value(dimension) AS dimension, "
            "any_value(candidate_version) AS candidate_version, "
            "any_value(baseline_version) AS baseline_version, measure, "
            + ", ".join(
                f"last({c} ORDER BY window_end) AS {c}"
                for c in (
                    "verdict",
                    "candidate_value",
                    "baseline_value",
                    "effect",
                    "effect_low",
                    "effect_high",
                    "effect_scale",
                    "confidence",
                    "candidate_samples",
                    "baseline_samples",
                    "windows",
                    "traffic_share",
                )
            )
            + ", min(started_at) AS started_at, max(window_end) AS last_window_end, "
            "min(window_end) FILTER (WHERE verdict <> 'running') AS decided_window_end, "
            "count(*) AS looks FROM v GROUP BY release_id, measure ORDER BY release_id, measure",
        ),
        "one row per release and measure: the latest verdict (decisions are final), candidate "
        "and baseline values, effect with its always-valid interval, confidence, samples",
    ),
    (
        "lake_summary",
        _view(
            "lake_summary",
            "WITH e AS (SELECT count(*) AS events, count(*) FILTER (WHERE late) AS late_events, "
            "min(ts) AS first_event, max(ts) AS last_event, "
            "count(DISTINCT agent_id) AS agents, count(DISTINCT model) AS models, "
            "count(DISTINCT tenant_id) AS tenants FROM events), "
            "d AS (SELECT count(*) AS dead_letters FROM dead_letters), "
            f"k AS ({_kpi_sql('metric_windows', [], _LAKE_KPIS)}), "
            "a AS (SELECT count(*) FILTER (WHERE kind <> 'recovery') AS anomalies, "
            "count(DISTINCT condition_id) AS conditions FROM anomalies) "
            "SELECT * FROM e, d, k, a",
        ),
        "one row: events, late events, dead letters, time span, KPI totals, anomaly counts",
    ),
]
"""``(name, SQL, one-line doc)`` of every view and macro, in creation order."""


def readme_table() -> str:
    """The markdown table of ``ANALYSIS_VIEWS`` for the README."""
    lines = ["| view / macro | what it answers |", "| --- | --- |"]
    for name, sql, doc in ANALYSIS_VIEWS:
        shown = name
        if "MACRO" in sql.split(" AS ", 1)[0]:
            params = sql.split("(", 1)[1].split(")", 1)[0]
            shown = f"{name}({params})"
        lines.append(f"| `{shown}` | {doc} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# installing the views
# --------------------------------------------------------------------------------------


def _has_relation(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    try:
        con.execute(f"SELECT * FROM {name} LIMIT 0")
    except duckdb.CatalogException:
        return False
    return True


def sql_string(text: str) -> str:
    """``text`` as a SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def anomalies_stand_in() -> str:
    """``CREATE VIEW anomalies``, empty with ``ANOMALY_COLUMNS``: for a connection whose base
    views come from elsewhere than ``sinks.catalog.connect`` and lack it."""
    nulls = ", ".join(f"CAST(NULL AS {t}) AS {c}" for c, t in ANOMALY_COLUMNS)
    return _view("anomalies", f"SELECT {nulls} WHERE false")


_NAMES: Final = re.compile(
    r"\b(" + "|".join(re.escape(n) for n, _, _ in ANALYSIS_VIEWS) + r")\b", re.IGNORECASE
)


def uses_analysis(sql: str) -> bool:
    """Whether ``sql`` names one of the views or macros of ``ANALYSIS_VIEWS``."""
    return _NAMES.search(sql) is not None


def install_views(con: duckdb.DuckDBPyConnection, *, only_for: str | None = None) -> bool:
    """Create every view and macro of ``ANALYSIS_VIEWS`` on ``con`` (which must have the base
    views), with its doc as the view's comment; return whether it did.

    Creating a view binds it, which reads the footers of the Parquet files it covers (about
    30 ms a view on the demo lake, more with more files). With ``only_for`` (the SQL about
    to run), nothing is done unless that SQL names an analysis view or macro: a plain
    ``agentstream sql`` query then pays nothing.

    Without an ``anomalies`` view (the detector stage not registered yet), one is made first:
    see ``anomalies_stand_in``.
    """
    if only_for is not None and not uses_analysis(only_for):
        return False
    if not _has_relation(con, "anomalies"):
        con.execute(anomalies_stand_in())
    for name, sql, doc in ANALYSIS_VIEWS:
        con.execute(sql)
        if sql.startswith("CREATE OR REPLACE VIEW"):
            con.execute(f"COMMENT ON VIEW {name} IS {sql_string(doc)}")
    return True


def connect(data_dir: Path | str, *, only_for: str | None = None) -> duckdb.DuckDBPyConnection:
    """``sinks.catalog.connect`` plus the analysis views: what notebooks and the report use.

    ``only_for`` (SQL about to run) adds them only if it names one: binding them costs time.
    """
    return catalog.connect(Path(data_dir), then=lambda con: install_views(con, only_for=only_for))


# --------------------------------------------------------------------------------------
# tables and formatting
# --------------------------------------------------------------------------------------


def fmt(column: str, value: Any) -> str:
    """``value`` of ``column`` for people: rates as percent, costs in dollars, ms, thousands.

    The column name decides (``*_rate``/``*_share`` percent, ``cost*``/``*_usd`` dollars,
    ``*_ms`` milliseconds); ``fmt`` of a measure name formats that measure's values.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime):
        when: datetime = value.astimezone(UTC) if value.tzinfo is not None else value
        return when.strftime("%Y-%m-%d %H:%M")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, int | float):
        name = column.lower()
        if name.endswith(("_rate", "_share")):
            return f"{value:.1%}"
        if name.startswith("cost") or name.endswith("_usd"):
            return f"${value:,.2f}" if abs(value) >= 0.1 else f"${value:.3g}"
        if name.endswith("_ms"):
            return f"{value:,.0f} ms"
        if isinstance(value, int):
            return f"{value:,}"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3g}"
    return str(value)


@dataclass(frozen=True)
class Table:
    """Rows of a query with their column names; renders as an HTML table (notebooks show it).

    ``measure_of`` maps a value column to the column naming its measure (``baseline`` ->
    ``measure`` in anomalies), so such values are formatted as that measure.
    """

    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    measure_of: Mapping[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    def column(self, name: str) -> list[Any]:
        i = self.columns.index(name)
        return [r[i] for r in self.rows]

    def records(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, r, strict=True)) for r in self.rows]

    def cell(self, row: Sequence[Any], name: str) -> str:
        """The formatted value of column ``name`` in ``row``."""
        i = self.columns.index(name)
        unit = name
        if name in self.measure_of:
            unit = str(row[self.columns.index(self.measure_of[name])])
        return fmt(unit, row[i])

    def to_html(self, *, table_id: str | None = None, max_rows: int | None = 50) -> str:
        """A plain ``<table>``: escaped, numbers right-aligned, at most ``max_rows`` rows."""
        attr = f' id="{html.escape(table_id)}"' if table_id else ""
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        shown = self.rows if max_rows is None else self.rows[:max_rows]
        body = []
        for row in shown:
            cells = []
            for c, v in zip(self.columns, row, strict=True):
                num = isinstance(v, int | float) and not isinstance(v, bool)
                text = self.cell(row, c)
                cls = ' class="num"' if num else ' class="wrap"' if len(text) > 40 else ""
                cells.append(f"<td{cls}>{html.escape(text)}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        if not self.rows:
            body.append(f'<tr><td colspan="{len(self.columns)}" class="empty">no rows</td></tr>')
        more = ""
        if max_rows is not None and len(self.rows) > max_rows:
            more = f'<p class="more">{len(self.rows) - max_rows:,} more rows not shown</p>'
        return (
            f'<table class="agentstream"{attr}><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>{more}"
        )

    def _repr_html_(self) -> str:
        return self.to_html()


def fetch(
    con: duckdb.DuckDBPyConnection, sql: str, measure_of: Mapping[str, str] | None = None
) -> Table:
    """Run ``sql`` and return its rows as a ``Table``."""
    cur = con.execute(sql)
    names = tuple(d[0] for d in cur.description or ())
    return Table(names, tuple(tuple(r) for r in cur.fetchall()), dict(measure_of or {}))


def headline(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    """The one row of ``lake_summary`` as a dict."""
    (row,) = fetch(con, "SELECT * FROM lake_summary").records()
    return row


def summary_table(con: duckdb.DuckDBPyConnection) -> Table:
    """``lake_summary`` turned on its side: one ``(measure, value)`` row per column, the value
    formatted for people."""
    return Table(("measure", "value"), tuple((k, fmt(k, v)) for k, v in headline(con).items()))


# --------------------------------------------------------------------------------------
# time series
# --------------------------------------------------------------------------------------

_NICE_STEPS_S: Final = (
    60,
    120,
    300,
    600,
    900,
    1800,
    3600,
    7200,
    10800,
    21600,
    43200,
    86400,
    604800,
)


def pick_step(con: duckdb.DuckDBPyConnection, points: int = 60) -> int:
    """A bucket length in seconds giving about ``points`` buckets over the lake's metrics:
    a round length, a multiple of the window length, never shorter than a window."""
    span: float | None
    window: float | None
    span, window = con.execute(
        "SELECT epoch(max(window_end) - min(window_start)), "
        "min(epoch(window_end - window_start)) FROM metric_windows WHERE level = 'key'"
    ).fetchone() or (None, None)
    return nice_step(span, window, points)


def nice_step(span: float | None, window: float | None, points: int = 60) -> int:
    """``pick_step`` for a given ``span`` and window length (seconds, None if unknown)."""
    window_s = max(1, round(window)) if window else 60
    raw: float
    if not span:
        return window_s
    raw = span / max(points, 1)
    for step in _NICE_STEPS_S:
        if step >= raw and step >= window_s and step % window_s == 0:
            return step
    return max(window_s, math.ceil(raw / 604800) * 604800)


@dataclass(frozen=True)
class Series:
    """One measure per time bucket and series: ``values[name][i]`` belongs to
    ``buckets[i]`` (None where the series has no row). Series are ordered by size."""

    measure: str
    dim: str
    step_s: int
    buckets: tuple[datetime, ...]
    values: dict[str, list[float | None]]
    weights: dict[str, list[float]]
    """Samples behind each value: the denominator of a ratio, else the value itself."""


def kpi_series(
    con: duckdb.DuckDBPyConnection,
    measure: str,
    dim: str = "agent",
    *,
    step_s: int | None = None,
    top: int = 8,
    points: int = 60,
) -> Series:
    """``measure`` per bucket for the ``top`` largest series of ``dim``; the rest pooled as
    'other' (sums re-added, ratios recomputed from the pooled sums)."""
    d = _measure(measure)
    _dim_sql(dim)
    step = step_s or pick_step(con, points)
    pooled = _kpi_sql(
        "t",
        [("bucket", "bucket"), ("series", "grp")],
        list(dict.fromkeys([*d.needs, measure])),
        where=None,
    )
    sql = (
        f"WITH b AS (SELECT * FROM kpis_every(INTERVAL '{int(step)} seconds', '{dim}')), "
        f"w AS (SELECT series, sum({d.weight()}) AS size, "
        f"row_number() OVER (ORDER BY sum({d.weight()}) DESC, series) AS r "
        "FROM b GROUP BY series), "
        f"t AS (SELECT b.*, CASE WHEN w.r <= {int(top)} THEN b.series ELSE 'other' END "
        "AS grp FROM b JOIN w USING (series)), "
        f"s AS (SELECT CASE WHEN r <= {int(top)} THEN series ELSE 'other' END AS grp, "
        "sum(size) AS size FROM w GROUP BY 1) "
        f"SELECT p.bucket, p.series, p.{measure}, s.size, {d.weight()} AS weight "
        f"FROM ({pooled}) AS p JOIN s ON s.grp = p.series ORDER BY p.bucket, p.series"
    )
    rows = con.execute(sql).fetchall()
    buckets = sorted({r[0] for r in rows})
    index = {b: i for i, b in enumerate(buckets)}
    sizes: dict[str, float] = {}
    values: dict[str, list[float | None]] = {}
    weights: dict[str, list[float]] = {}
    for bucket, name, value, size, weight in rows:
        series = values.setdefault(name, [None] * len(buckets))
        series[index[bucket]] = None if value is None else float(value)
        weights.setdefault(name, [0.0] * len(buckets))[index[bucket]] = float(weight or 0)
        sizes[name] = float(size or 0)
    order = sorted(values, key=lambda n: (n == "other", -sizes[n], n))
    return Series(
        measure,
        dim,
        step,
        tuple(buckets),
        {n: values[n] for n in order},
        {n: weights[n] for n in order},
    )


# --------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------

WIDTH: Final = 11.0
SEVERITY_COLORS: Final = {"critical": "#d62728", "warning": "#ff7f0e", "info": "#1f77b4"}
_OUTCOME_COLORS: Final = {
    "completed": "#2ca02c",
    "failed": "#d62728",
    "abandoned": "#ff7f0e",
    "open": "#c7c7c7",
}
_TITLES: Final = {
    "cost_usd": "Cost",
    "tokens": "Tokens (input + output)",
    "events": "Events",
    "escalation_rate": "Escalation rate (escalations / tasks started)",
    "retrieval_miss_rate": "Retrieval-miss rate (empty retrievals / retrievals)",
    "task_success_rate": "Task success rate (completed / ended)",
    "tool_error_rate": "Tool error rate",
    "cost_per_task": "Cost per task started",
    "cost_per_completed_task": "Cost per completed task",
    "eval_hallucination_pass_rate": "Hallucination check pass rate",
    "eval_tone_pass_rate": "Tone check pass rate",
    "feedback_negative_share": "Negative ratings (1-2 stars / ratings)",
}
_DIM_NAMES: Final = {
    "agent": "agent",
    "version": "agent version",
    "prompt": "prompt version",
    "model": "model",
    "tenant": "tenant",
    "all": "all",
}


def _eng(places: int | None = None) -> Formatter:
    """Engineering notation: ``places=1`` for labels (63.5M), None for ticks (100M)."""
    from matplotlib import ticker

    return ticker.EngFormatter(places=places, sep="")


def _plain(text: str) -> str:
    """``text`` for a matplotlib label: a pair of ``$`` would start mathtext."""
    return text.replace("$", r"\$")


def _figure(rows: int = 1, height: float = 3.6, cols: int = 1, **kw: Any) -> tuple[Figure, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, **kw)
    return fig, axes


def _no_data(ax: Axes, what: str) -> None:
    ax.text(
        0.5,
        0.5,
        f"no {what} in this lake yet",
        ha="center",
        va="center",
        transform=ax.transAxes,
        color="#777777",
        fontsize=12,
    )
    ax.set_xticks([])
    ax.set_yticks([])


def _step_label(step_s: int) -> str:
    if step_s % 86400 == 0:
        return f"{step_s // 86400} d"
    if step_s % 3600 == 0:
        return f"{step_s // 3600} h"
    if step_s % 60 == 0:
        return f"{step_s // 60} min"
    return f"{step_s} s"


def _money(x: float, _pos: int | None = None) -> str:
    if x == 0:
        return "$0"
    if abs(x) >= 10 or float(x).is_integer():
        return f"${x:,.0f}"
    return f"${x:,.2f}" if abs(x) >= 0.1 else f"${x:.3g}"


def _y_format(ax: Axes, measure: str) -> None:
    from matplotlib import ticker

    if (
        measure in RATIOS
        and not measure.endswith("_mean")
        and measure not in ("cost_per_task", "cost_per_completed_task", "tokens_per_call")
    ):
        ax.yaxis.set_major_formatter(ticker.PercentFormatter(1.0, decimals=0))
    elif measure.startswith("cost"):
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(_money))
    elif measure.endswith("_ms"):
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _p: f"{x:,.0f} ms"))
    else:
        ax.yaxis.set_major_formatter(_eng())


def _time_axis(ax: Axes) -> None:
    from matplotlib import dates as mdates

    locator = mdates.AutoDateLocator()  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]
    ax.set_xlabel("event time (UTC)")
    ax.grid(True, alpha=0.3)


def _legend(ax: Axes, **kw: Any) -> None:
    handles, _labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(
            loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize="small", **kw
        )


def _draw_series(ax: Axes, s: Series, *, stacked: bool, min_samples: float = 0) -> None:
    """Stacked areas, or lines with a gap where a value rests on under ``min_samples``."""
    if not s.buckets:
        _no_data(ax, "metrics")
        return
    x: Any = list(s.buckets)  # datetimes: matplotlib's date converter takes them
    if stacked:
        ys = [[v or 0.0 for v in vals] for vals in s.values.values()]
        ax.stackplot(x, ys, labels=list(s.values), alpha=0.85)
    else:
        for name, vals in s.values.items():
            w = s.weights[name]
            shown = [math.nan if v is None or w[i] < min_samples else v for i, v in enumerate(vals)]
            ax.plot(x, shown, label=name, marker="o", markersize=2.5, linewidth=1.4)
    _time_axis(ax)
    _y_format(ax, s.measure)
    ax.set_ylim(bottom=0)
    _legend(ax, title=_DIM_NAMES.get(s.dim, s.dim))


def plot_over_time(
    con: duckdb.DuckDBPyConnection,
    measure: str,
    dim: str = "agent",
    *,
    top: int = 8,
    stacked: bool | None = None,
    points: int | None = None,
    min_samples: int = 10,
    title: str | None = None,
) -> Figure:
    """``measure`` over time, one series per ``dim`` (top ``top``, the rest as 'other').

    Sums are stacked areas, ratios lines (ratios of each bucket's sums, left out where the
    denominator is under ``min_samples``). Buckets are picked by ``pick_step`` (about 60 for
    sums, 30 for ratios, which need more samples a bucket).
    """
    ratio = _measure(measure).is_ratio
    s = kpi_series(con, measure, dim, top=top, points=points or (30 if ratio else 60))
    fig, axes = _figure()
    ax = axes[0][0]
    _draw_series(
        ax,
        s,
        stacked=(not ratio) if stacked is None else stacked,
        min_samples=min_samples if ratio else 0,
    )
    name = title or _TITLES.get(measure, measure)
    ax.set_title(f"{name} by {_DIM_NAMES[dim]}, per {_step_label(s.step_s)}", loc="left")
    return fig


def plot_cost_over_time(con: duckdb.DuckDBPyConnection, dim: str = "agent") -> Figure:
    """Cost per bucket, stacked by agent (or another ``dim``)."""
    return plot_over_time(con, "cost_usd", dim)


def plot_tokens_over_time(con: duckdb.DuckDBPyConnection, dim: str = "model") -> Figure:
    """Input + output tokens per bucket, stacked by model."""
    return plot_over_time(con, "tokens", dim)


def plot_volume_over_time(con: duckdb.DuckDBPyConnection, dim: str = "agent") -> Figure:
    """Events per bucket (on time, late ones excluded), stacked by agent."""
    return plot_over_time(con, "events", dim)


def plot_quality_over_time(
    con: duckdb.DuckDBPyConnection,
    measures: Sequence[str] = ("escalation_rate", "retrieval_miss_rate"),
    dim: str = "version",
    *,
    top: int = 6,
    min_samples: int = 10,
) -> Figure:
    """One panel per rate (escalation and retrieval-miss by default), a line per version
    (the ``top`` largest, the rest pooled), left out where under ``min_samples`` samples."""
    fig, axes = _figure(rows=len(measures), height=3.2, sharex=True)
    for k, (ax_row, measure) in enumerate(zip(axes, measures, strict=True)):
        ax = ax_row[0]
        s = kpi_series(con, measure, dim, top=top, points=30)
        _draw_series(ax, s, stacked=False, min_samples=min_samples)
        if k < len(measures) - 1:
            ax.set_xlabel("")
        ax.set_title(
            f"{_TITLES.get(measure, measure)} by {_DIM_NAMES[dim]}, per {_step_label(s.step_s)}",
            loc="left",
        )
    return fig


def _totals(con: duckdb.DuckDBPyConnection, measure: str, dim: str) -> list[tuple[str, float]]:
    sql = _kpi_sql(
        "metric_windows",
        [("series", _dim_sql(dim))],
        [measure],
        order=(f"{measure} DESC", "series"),
    )
    return [(str(n), float(v or 0.0)) for n, v in con.execute(sql).fetchall()]


def _hbars(
    ax: Axes, items: Sequence[tuple[str, float]], measure: str, title: str, top: int = 12
) -> None:
    from matplotlib import ticker

    items = [i for i in items if i[1] > 0][:top]
    if not items:
        _no_data(ax, measure.replace("_", " "))
        ax.set_title(title, loc="left")
        return
    labels = [n for n, _ in reversed(items)]
    values = [v for _, v in reversed(items)]
    bars = ax.barh(labels, values, color="#4c72b0")
    ax.bar_label(
        bars,
        labels=[_plain(fmt(measure, v)) if measure != "tokens" else _eng(1)(v) for v in values],
        padding=3,
        fontsize="small",
    )
    ax.set_title(title, loc="left")
    ax.margins(x=0.3)
    ax.tick_params(axis="y", labelsize="small")
    if measure.startswith("cost"):
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(_money))
    else:
        ax.xaxis.set_major_formatter(_eng())
    ax.grid(True, axis="x", alpha=0.3)


def plot_cost_breakdown(con: duckdb.DuckDBPyConnection) -> Figure:
    """Totals over the lake: cost by agent, cost by model, tokens by model."""
    fig, axes = _figure(cols=3, height=4.0)
    _hbars(axes[0][0], _totals(con, "cost_usd", "agent"), "cost_usd", "Cost by agent")
    _hbars(axes[0][1], _totals(con, "cost_usd", "model"), "cost_usd", "Cost by model")
    _hbars(axes[0][2], _totals(con, "tokens", "model"), "tokens", "Tokens by model")
    return fig


def plot_task_funnel(con: duckdb.DuckDBPyConnection, *, top: int = 20) -> Figure:
    """Per agent version (most tasks first): shares of started tasks that completed, failed,
    were abandoned or are still open; the label gives the success rate (completed / ended)."""
    from matplotlib import ticker

    t = fetch(
        con,
        "SELECT agent_id || ' ' || coalesce(agent_version, '(no version)') AS version, "
        "tasks_started, tasks_completed, tasks_failed, tasks_abandoned, task_success_rate "
        f"FROM task_funnel WHERE tasks_started > 0 ORDER BY tasks_started DESC LIMIT {int(top)}",
    )
    fig, axes = _figure(height=max(2.5, 0.32 * len(t) + 1.2))
    ax = axes[0][0]
    ax.set_title("Task outcomes by agent version (share of tasks started)", loc="left")
    if not len(t):
        _no_data(ax, "tasks")
        return fig
    rows = list(reversed(t.records()))
    labels = [r["version"] for r in rows]
    left = [0.0] * len(rows)
    for outcome, color in _OUTCOME_COLORS.items():
        shares = []
        for r in rows:
            total = max(
                r["tasks_started"], r["tasks_completed"] + r["tasks_failed"] + r["tasks_abandoned"]
            )
            ended = r["tasks_completed"] + r["tasks_failed"] + r["tasks_abandoned"]
            n = total - ended if outcome == "open" else r[f"tasks_{outcome}"]
            shares.append(n / total if total else 0.0)
        ax.barh(labels, shares, left=left, color=color, label=outcome)
        left = [a + b for a, b in zip(left, shares, strict=True)]
    for i, r in enumerate(rows):
        ax.text(
            1.01,
            i,
            f"{fmt('task_success_rate', r['task_success_rate'])} success of {r['tasks_started']:,}",
            va="center",
            fontsize="small",
            transform=ax.get_yaxis_transform(),
        )
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(ticker.PercentFormatter(1.0, decimals=0))
    ax.tick_params(axis="y", labelsize="small")
    fig.legend(loc="outside lower center", ncols=4, frameon=False, fontsize="small")
    ax.set_xlabel("share of tasks started")
    return fig


def plot_tool_errors(
    con: duckdb.DuckDBPyConnection, *, top: int = 12, min_calls: int = 20
) -> Figure:
    """Tools with the highest error rate among those with at least ``min_calls`` calls (all
    tools if none has that many), labelled with errors / calls and the top error type."""
    from matplotlib import ticker

    t = fetch(
        con,
        "SELECT tool_name, calls, errors, error_rate, top_error_type FROM tool_errors "
        f"WHERE calls >= (SELECT least({int(min_calls)}, coalesce(max(calls), 0)) "
        "FROM tool_errors) AND errors > 0 "
        f"ORDER BY error_rate DESC, errors DESC, tool_name LIMIT {int(top)}",
    )
    fig, axes = _figure(height=max(2.5, 0.3 * len(t) + 1.2))
    ax = axes[0][0]
    ax.set_title(f"Top tools by error rate (tools with ≥ {min_calls} calls)", loc="left")
    if not len(t):
        _no_data(ax, "tool errors")
        return fig
    rows = list(reversed(t.records()))
    bars = ax.barh(
        [r["tool_name"] for r in rows], [r["error_rate"] for r in rows], color="#d62728", alpha=0.8
    )
    ax.bar_label(
        bars,
        labels=[
            f"{fmt('error_rate', r['error_rate'])}  ({r['errors']:,} / {r['calls']:,}, "
            f"mostly {r['top_error_type'] or '?'})"
            for r in rows
        ],
        padding=3,
        fontsize="small",
    )
    ax.margins(x=0.45)
    ax.xaxis.set_major_formatter(ticker.PercentFormatter(1.0, decimals=0))
    ax.tick_params(axis="y", labelsize="small")
    ax.grid(True, axis="x", alpha=0.3)
    return fig


def plot_latency_by_model(con: duckdb.DuckDBPyConnection, *, top: int = 14) -> Figure:
    """p50 / p95 / p99 latency per model (model calls) and per step type for tool calls and
    retrievals, slowest p95 first, on a log scale."""
    from matplotlib import ticker

    t = fetch(
        con,
        "SELECT CASE WHEN step = 'llm_call' THEN coalesce(model, '(no model)') "
        "ELSE step || ' (all)' END AS label, calls, latency_p50_ms, latency_p95_ms, "
        f"latency_p99_ms FROM latency_by_model ORDER BY latency_p95_ms DESC LIMIT {int(top)}",
    )
    fig, axes = _figure(height=max(2.5, 0.42 * len(t) + 1.2))
    ax = axes[0][0]
    ax.set_title("Latency by model (model calls) and step type", loc="left")
    if not len(t):
        _no_data(ax, "latencies")
        return fig
    rows = list(reversed(t.records()))
    h = 0.27
    colors = {"latency_p50_ms": "#9ecae1", "latency_p95_ms": "#3182bd", "latency_p99_ms": "#08519c"}
    for k, (col, color) in enumerate(colors.items()):
        ys = [i + (1 - k) * h for i in range(len(rows))]  # p50 on top, as in the legend
        ax.barh(
            ys,
            [r[col] for r in rows],
            height=h,
            color=color,
            label=col.removeprefix("latency_").removesuffix("_ms"),
        )
    ax.set_yticks(
        range(len(rows)), [f"{r['label']}  ({r['calls']:,})" for r in rows], fontsize="small"
    )
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(
        ticker.FuncFormatter(lambda x, _p: f"{x / 1000:g} s" if x >= 1000 else f"{x:g} ms")
    )
    ax.grid(True, axis="x", which="both", alpha=0.3)
    ax.set_xlabel("latency (log scale); calls in parentheses")
    _legend(ax)
    return fig


def _num(when: datetime) -> float:
    """A datetime as matplotlib's date number (for widths of date spans)."""
    from matplotlib import dates as mdates

    return float(mdates.date2num(when))  # type: ignore[no-untyped-call]


def _kind_marker(kind: str, direction: str | None) -> str:
    """Drifts point the way they went, outliers are diamonds, recoveries open circles."""
    if kind == "recovery":
        return "o"
    if kind == "outlier":
        return "D"
    return "v" if direction == "down" else "^"


def _kind_legend(ax: Axes) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: list[Any] = [
        Line2D([], [], marker="^", linestyle="", color="#444444", label="drift up"),
        Line2D([], [], marker="v", linestyle="", color="#444444", label="drift down"),
        Line2D([], [], marker="D", linestyle="", color="#444444", label="outlier"),
        Line2D(
            [],
            [],
            marker="o",
            linestyle="",
            markerfacecolor="white",
            markeredgecolor="#2ca02c",
            label="recovery",
        ),
        *(Patch(color=c, alpha=0.6, label=s) for s, c in SEVERITY_COLORS.items()),
    ]
    ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        frameon=False,
        fontsize="small",
    )


def _span(con: duckdb.DuckDBPyConnection) -> tuple[datetime | None, datetime | None]:
    row = con.execute(
        "SELECT min(window_start), max(window_end) FROM metric_windows WHERE level = 'key'"
    ).fetchone()
    return (row[0], row[1]) if row else (None, None)


def plot_anomaly_timeline(con: duckdb.DuckDBPyConnection, *, top: int = 25) -> Figure:
    """Anomaly conditions on a timeline, one row per key and measure: a bar from the first
    alert to the recovery (to the end of the data while open) in the worst severity's colour,
    a marker per alert (^ up, v down) and per recovery (o)."""
    conds = fetch(
        con,
        "SELECT condition_id, subject || ' · ' || measure AS label, severity, opened_at, "
        "recovered_at FROM anomaly_conditions "
        f"ORDER BY {_SEVERITY_RANK} DESC, alerts DESC, opened_at LIMIT {int(top)}",
    )
    labels = sorted({r["label"] for r in conds.records()})
    fig, axes = _figure(height=max(2.4, 0.38 * len(labels) + 1.4))
    ax = axes[0][0]
    ax.set_title("Anomalies: conditions from first alert to recovery", loc="left")
    if not len(conds):
        _no_data(ax, "anomalies")
        return fig
    first, last = _span(con)
    y = {label: i for i, label in enumerate(labels)}
    ids = ", ".join(sql_string(str(c)) for c in conds.column("condition_id"))
    for r in conds.records():
        end = r["recovered_at"] or last or r["opened_at"]
        ax.barh(
            y[r["label"]],
            _num(end) - _num(r["opened_at"]),
            left=_num(r["opened_at"]),
            height=0.5,
            alpha=0.25,
            color=SEVERITY_COLORS.get(r["severity"], "#777777"),
        )
    points = fetch(
        con,
        "SELECT a.window_start + (a.window_end - a.window_start) / 2 AS t, a.kind, "
        "a.severity, a.direction, c.subject || ' · ' || c.measure AS label "
        "FROM anomalies AS a JOIN anomaly_conditions AS c USING (condition_id) "
        f"WHERE condition_id IN ({ids}) ORDER BY t",
    )
    for r in points.records():
        recovery = r["kind"] == "recovery"
        color = SEVERITY_COLORS.get(r["severity"], "#777777")
        ax.plot(
            [r["t"]],
            [y[r["label"]]],
            linestyle="",
            marker=_kind_marker(r["kind"], r["direction"]),
            markersize=8,
            markerfacecolor="white" if recovery else color,
            markeredgecolor="#2ca02c" if recovery else color,
        )
    ax.set_yticks(range(len(labels)), labels, fontsize="small")
    ax.set_ylim(-0.7, len(labels) - 0.3)
    if first is not None and last is not None:
        ax.set_xlim(_num(first), _num(last))
    _time_axis(ax)
    ax.xaxis_date()
    _kind_legend(ax)
    return fig


def plot_anomaly_context(
    con: duckdb.DuckDBPyConnection, *, limit: int = 4, radius: int = 15
) -> Figure:
    """For the ``limit`` most severe conditions, their measure over the windows around each
    of their anomalies (``anomaly_context_within(radius)``): the value per window, the
    baseline (dashed), the condition shaded, alerts and recovery marked."""
    conds = fetch(
        con,
        "SELECT condition_id, subject, measure, severity, baseline, peak, opened_at, "
        "recovered_at, detectors FROM anomaly_conditions "
        f"ORDER BY {_SEVERITY_RANK} DESC, alerts DESC, opened_at LIMIT {int(limit)}",
    )
    fig, axes = _figure(rows=max(1, len(conds)), height=2.7)
    if not len(conds):
        ax = axes[0][0]
        ax.set_title("Metrics around anomalies", loc="left")
        _no_data(ax, "anomalies")
        return fig
    _, last = _span(con)
    for ax_row, c in zip(axes, conds.records(), strict=True):
        ax = ax_row[0]
        cid = sql_string(str(c["condition_id"]))
        ctx = fetch(
            con,
            "SELECT DISTINCT window_start, window_end, value "
            f"FROM anomaly_context_within({int(radius)}) WHERE condition_id = {cid} "
            "ORDER BY window_start",
        )
        xs: list[datetime] = []
        vs: list[float] = []
        prev_end = None
        for start, end, value in ctx.rows:
            if prev_end is not None and start > prev_end:
                xs.append(prev_end)  # a gap: windows without events for this key
                vs.append(math.nan)
            xs.append(start + (end - start) / 2)
            vs.append(math.nan if value is None else float(value))
            prev_end = end
        color = SEVERITY_COLORS.get(c["severity"], "#777777")
        ax.plot(
            xs, vs, color="#333333", linewidth=1.3, marker="o", markersize=2.5, label=c["measure"]
        )
        if c["baseline"] is not None:
            ax.axhline(
                c["baseline"], color="#2ca02c", linestyle="--", linewidth=1.2, label="baseline"
            )
        ax.axvspan(
            c["opened_at"],
            c["recovered_at"] or last or c["opened_at"],
            color=color,
            alpha=0.12,
            label=f"condition ({c['severity']})",
        )
        alerts = fetch(
            con,
            "SELECT window_start + (window_end - window_start) / 2 AS t, kind, direction, "
            f"observed FROM anomalies WHERE condition_id = {cid} ORDER BY t",
        )
        labelled: set[str] = set()
        for t, kind, direction, observed in alerts.rows:
            recovery = kind == "recovery"
            ax.plot(
                [t],
                [observed],
                linestyle="",
                marker=_kind_marker(kind, direction),
                markersize=8,
                markerfacecolor="white" if recovery else color,
                markeredgecolor="#2ca02c" if recovery else color,
                zorder=5,
                label=None if kind in labelled else kind,
            )
            labelled.add(kind)
        measure = str(c["measure"])
        ax.set_title(
            _plain(
                f"{c['subject']} · {measure}: {c['severity']}, baseline "
                f"{fmt(measure, c['baseline'])} → {fmt(measure, c['peak'])} ({c['detectors']})"
            ),
            loc="left",
            fontsize="medium",
        )
        _time_axis(ax)
        _y_format(ax, measure)
        _legend(ax)
    return fig


# --------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------


def png_bytes(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return buf.getvalue()


def png_data_uri(fig: Figure, dpi: int = 100) -> str:
    """The figure as a ``data:image/png;base64,...`` URI for an ``<img src>``."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(fig, dpi)).decode("ascii")


def plot_all(con: duckdb.DuckDBPyConnection) -> Iterable[tuple[str, Figure]]:
    """Every standard figure with a short name (a smoke test draws them all)."""
    yield "cost_over_time", plot_cost_over_time(con)
    yield "tokens_over_time", plot_tokens_over_time(con)
    yield "volume_over_time", plot_volume_over_time(con)
    yield "cost_breakdown", plot_cost_breakdown(con)
    yield "quality_over_time", plot_quality_over_time(con)
    yield "task_funnel", plot_task_funnel(con)
    yield "tool_errors", plot_tool_errors(con)
    yield "latency_by_model", plot_latency_by_model(con)
    yield "anomaly_timeline", plot_anomaly_timeline(con)
    yield "anomaly_context", plot_anomaly_context(con)
