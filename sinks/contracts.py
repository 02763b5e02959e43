"""The lake's contract: every table agentstream lands, its columns and its partitioning.

Processors (``streams/``) produce rows of these schemas; the catalog (``sinks.catalog``)
creates the tables from them and the read path defines its views over them. Every table is
partitioned by the UTC date of its time column (a ``date`` column added at landing).
"""

from __future__ import annotations

from typing import Final

import pyarrow as pa

from pipeline.schema import ACTIVITY_TYPES
from sinks.lake import LakeTable
from sinks.tables import DEAD_LETTERS_SCHEMA, EVENTS_SCHEMA

_TS: Final = pa.timestamp("us", tz="UTC")

# The dimensions of a metrics key, and the rollups of the metrics table (level -> dimensions).
DIMENSIONS: tuple[str, ...] = ("agent_id", "agent_version", "prompt_version", "model", "tenant_id")
ROLLUPS: dict[str, tuple[str, ...]] = {
    "key": DIMENSIONS,
    "agent": ("agent_id",),
    "tenant": ("tenant_id",),
}
# Event types with a latency, and the prefix of their quantile columns.
STEP_TYPES: Final[dict[str, str]] = {
    "llm_call": "llm",
    "tool_call": "tool",
    "retrieval": "retrieval",
}
QUANTILES: Final[dict[str, float]] = {"p50": 0.50, "p95": 0.95, "p99": 0.99}
TASK_OUTCOMES: Final = ("started", "completed", "failed", "abandoned")
# Evaluators with columns of their own (``eval_<name>_*``): the usual dimensions of
# continuous evaluation. Other evaluator names count in the totals (``evaluations``, ...) and
# stay queryable in the ``evaluations`` view; a fixed list keeps the metrics schema fixed.
EVALUATORS: Final = (
    "hallucination",
    "helpfulness",
    "accuracy",
    "compliance",
    "tone",
    "prompt_adherence",
)
# Feedback ratings are 1-5 stars; 1 and 2 are negative.
NEGATIVE_RATING: Final = 2.0
# The summable evaluation and feedback measures of a metrics row: counts, then float sums.
QUALITY_COUNTS: Final = (
    "evaluations",
    "evaluations_judged",
    "evaluations_passed",
    "evaluations_scored",
    *(f"eval_{e}_{c}" for e in EVALUATORS for c in ("evaluations", "judged", "passed", "scored")),
    "feedback_ratings",
    "feedback_negative",
    "feedback_corrections",
)
QUALITY_SUMS: Final = (
    "evaluation_score_sum",
    *(f"eval_{e}_score_sum" for e in EVALUATORS),
    "feedback_rating_sum",
)

_TOOL_STRUCT: Final = pa.struct(
    [("tool_name", pa.string()), ("calls", pa.int64()), ("errors", pa.int64())]
)
_ACTION_STRUCT: Final = pa.struct([("action", pa.string()), ("count", pa.int64())])


def _quantile_columns() -> list[str]:
    names = []
    for prefix in ["", *(f"{p}_" for p in STEP_TYPES.values())]:
        names += [f"{prefix}latency_{q}_ms" for q in QUANTILES]
    return names


_QUANTILE_COLUMNS: Final = _quantile_columns()

METRICS_SCHEMA: Final = pa.schema(
    [
        pa.field("metric_id", pa.string(), nullable=False),
        pa.field("level", pa.string(), nullable=False),
        pa.field("window_start", _TS, nullable=False),
        pa.field("window_end", _TS, nullable=False),
        *(pa.field(d, pa.string()) for d in DIMENSIONS),
        pa.field("events", pa.int64()),
        *(pa.field(f"events_{t}", pa.int64()) for t in ACTIVITY_TYPES),
        pa.field("llm_calls", pa.int64()),
        pa.field("input_tokens", pa.int64()),
        pa.field("output_tokens", pa.int64()),
        pa.field("cached_input_tokens", pa.int64()),
        pa.field("tokens_per_call", pa.float64()),
        pa.field("cost_usd", pa.float64()),
        pa.field("cost_estimated_usd", pa.float64()),
        *(pa.field(f"tasks_{o}", pa.int64()) for o in TASK_OUTCOMES),
        pa.field("task_success_rate", pa.float64()),
        pa.field("cost_per_task", pa.float64()),
        pa.field("cost_per_completed_task", pa.float64()),
        pa.field("escalations", pa.int64()),
        pa.field("escalation_rate", pa.float64()),
        pa.field("retrievals", pa.int64()),
        pa.field("retrieval_misses", pa.int64()),
        pa.field("retrieval_miss_rate", pa.float64()),
        pa.field("tool_calls", pa.int64()),
        pa.field("tool_errors", pa.int64()),
        pa.field("tool_error_rate", pa.float64()),
        pa.field("tool_errors_by_tool", pa.list_(_TOOL_STRUCT)),
        pa.field("guardrail_incidents", pa.int64()),
        pa.field("guardrail_by_action", pa.list_(_ACTION_STRUCT)),
        *(pa.field(c, pa.float64()) for c in _QUANTILE_COLUMNS),
        pa.field("late_events", pa.int64()),
        pa.field("evaluations", pa.int64()),
        pa.field("evaluations_judged", pa.int64()),
        pa.field("evaluations_passed", pa.int64()),
        pa.field("eval_pass_rate", pa.float64()),
        pa.field("evaluations_scored", pa.int64()),
        pa.field("evaluation_score_sum", pa.float64()),
        pa.field("eval_score_mean", pa.float64()),
        pa.field("hallucination_rate", pa.float64()),
        *(
            pa.field(f"eval_{e}_{c}", dtype)
            for e in EVALUATORS
            for c, dtype in (
                ("evaluations", pa.int64()),
                ("judged", pa.int64()),
                ("passed", pa.int64()),
                ("pass_rate", pa.float64()),
                ("scored", pa.int64()),
                ("score_sum", pa.float64()),
                ("score_mean", pa.float64()),
            )
        ),
        pa.field("feedback_ratings", pa.int64()),
        pa.field("feedback_rating_sum", pa.float64()),
        pa.field("feedback_rating_mean", pa.float64()),
        pa.field("feedback_negative", pa.int64()),
        pa.field("feedback_negative_share", pa.float64()),
        pa.field("feedback_corrections", pa.int64()),
    ]
)
"""One row per (level, window, key). Notes on the columns:

``metric_id`` is a stable id (blake2b of level, window start and end, and the dimensions) to
de-duplicate on. ``level`` is 'key' (all ``DIMENSIONS``), 'agent' or 'tenant'; dimensions a
level does not group by are null. Counts and sums are 0 when nothing happened; ratios are
null when their denominator is 0: ``task_success_rate = completed / (completed + failed +
abandoned)``, ``cost_per_task = cost_usd / tasks_started``, ``cost_per_completed_task =
cost_usd / tasks_completed``, ``escalation_rate = escalations / tasks_started``,
``retrieval_miss_rate``, ``tool_error_rate``, ``tokens_per_call = (input + output) /
llm_calls``. ``cost_usd`` sums known and estimated costs; ``cost_estimated_usd`` is the
estimated part. ``tool_errors_by_tool`` is a list of {tool_name, calls, errors} sorted by
tool name and ``guardrail_by_action`` of {action, count} (every action, 'allow' included),
both empty lists when there were none; ``guardrail_incidents`` counts actions other than
'allow'. Latency quantiles (``latency_*`` over llm, tool and retrieval steps together, the
others per step type) are null without samples and within 1 % of DuckDB's
``quantile_disc`` (see ``streams.sketch``). ``late_events``: see the module docstring.
"""

CONTRIBUTOR: Final = pa.struct(
    [
        pa.field("dimension", pa.string()),
        pa.field("value", pa.string()),
        pa.field("share", pa.float64()),
    ]
)
"""One entry of ``contributors``: a dimension (``model``, ``tenant_id``, ``tool_name``, ...),
its value, and its share of the change (1.0 = all of it)."""

ANOMALIES_SCHEMA: Final = pa.schema(
    [
        pa.field("anomaly_id", pa.string(), nullable=False),
        pa.field("condition_id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("detected_at", _TS, nullable=False),
        pa.field("window_start", _TS, nullable=False),
        pa.field("window_end", _TS, nullable=False),
        pa.field("level", pa.string(), nullable=False),
        *(pa.field(d, pa.string()) for d in DIMENSIONS),
        pa.field("measure", pa.string(), nullable=False),
        pa.field("detector", pa.string(), nullable=False),
        pa.field("baseline", pa.float64(), nullable=False),
        pa.field("observed", pa.float64(), nullable=False),
        pa.field("direction", pa.string(), nullable=False),
        pa.field("severity", pa.string(), nullable=False),
        pa.field("score", pa.float64(), nullable=False),
        pa.field("example_event_ids", pa.list_(pa.string()), nullable=False),
        pa.field("message", pa.string(), nullable=False),
        pa.field("rule", pa.string()),
        pa.field("contributors", pa.list_(CONTRIBUTOR)),
        pa.field("explanation", pa.string()),
    ]
)
"""One row per alert. Notes on the columns:

``anomaly_id`` is blake2b of (condition_id, kind, window_start): replaying the same windows
gives the same ids, so consumers de-duplicate on it. ``condition_id`` is blake2b of (level,
dimensions, measure, first window_start) of the ongoing condition; its drift, outlier and
recovery rows share it. ``kind`` is one of ``Kind`` (``release_regression``: see
``streams.releases``). ``detected_at`` is the wall-clock time passed to ``observe``;
``window_start``/``window_end`` the window the row is about (for the recovery of an evicted
key: its last window). ``level`` and the dimensions
identify the key as in ``METRICS_SCHEMA`` (null where the level does not group by them).
``measure`` is a ``METRICS_SCHEMA`` column (for a ``half_space_trees`` row: the measure that
deviated most). ``detector``: 'ewma_zscore', 'page_hinkley' or 'half_space_trees'
(for a recovery: the detector that opened the condition). ``baseline`` is the measure's level
before the change (the frozen baseline: geometric mean on log scales, mean for rates),
``observed`` this window's value. ``direction`` 'up'|'down', ``severity`` see the module
docstring. ``score``: ``|z|`` of the window (outlier, recovery) or of the recent level (drift),
the HalfSpaceTrees score in [0, 1] for 'half_space_trees'. ``example_event_ids`` is empty
here (the worker may fill it). ``message`` is one readable sentence. ``rule`` is the rule's
name on ``kind = 'rule'`` rows and their recoveries (``streams.rules``), null otherwise.
``contributors`` (the dimension values that contribute most to the change, with their share
of it) and ``explanation`` (the same as a sentence) are filled by ``streams.explain``; null
where there is nothing to break down (releases, budgets).
"""

VERDICTS_SCHEMA: Final = pa.schema(
    [
        pa.field("verdict_id", pa.string(), nullable=False),
        pa.field("release_id", pa.string(), nullable=False),
        pa.field("agent_id", pa.string(), nullable=False),
        pa.field("tenant_id", pa.string()),
        pa.field("dimension", pa.string(), nullable=False),
        pa.field("candidate_version", pa.string(), nullable=False),
        pa.field("baseline_version", pa.string(), nullable=False),
        pa.field("traffic_share", pa.float64(), nullable=False),
        pa.field("measure", pa.string(), nullable=False),
        pa.field("verdict", pa.string(), nullable=False),
        pa.field("effect", pa.float64()),
        pa.field("effect_low", pa.float64()),
        pa.field("effect_high", pa.float64()),
        pa.field("effect_scale", pa.string(), nullable=False),
        pa.field("confidence", pa.float64(), nullable=False),
        pa.field("p_value", pa.float64(), nullable=False),
        pa.field("alpha", pa.float64(), nullable=False),
        pa.field("candidate_value", pa.float64()),
        pa.field("baseline_value", pa.float64()),
        pa.field("candidate_samples", pa.int64(), nullable=False),
        pa.field("baseline_samples", pa.int64(), nullable=False),
        pa.field("windows", pa.int64(), nullable=False),
        pa.field("started_at", _TS, nullable=False),
        pa.field("window_start", _TS, nullable=False),
        pa.field("window_end", _TS, nullable=False),
        pa.field("decided_at", _TS, nullable=False),
    ]
)
"""One row per (release, measure, closed window) while running, and one at the decision.

``verdict_id`` is blake2b of (release_id, measure, window_start): de-duplicate on it.
``verdict`` is one of ``VERDICTS``. ``effect`` is candidate minus baseline: a difference of
rates (``effect_scale = 'difference'``, 0.03 = 3 points) or a relative change
(``'relative'``, 0.25 = 25 % more) for cost and latency; ``effect_low``/``effect_high`` the
always-valid confidence interval at level ``1 - alpha``. ``confidence`` is ``1 - p_value``,
``p_value`` the always-valid p-value (running minimum over the looks since the minimum
sample was reached; 1 before), ``alpha`` the per-measure level. ``candidate_value`` and
``baseline_value`` are the measure on each side over all windows so far, ``*_samples`` the
samples behind them (tasks, retrievals, tool calls, ended or completed tasks, steps),
``windows`` the windows with data on both sides. ``window_start``/``window_end`` is the
window this verdict was made at; ``decided_at`` the wall-clock time it was made (for
``running`` rows too: the time of that look).
"""

BUDGETS_SCHEMA: Final = pa.schema(
    [
        pa.field("budget", pa.string(), nullable=False),
        pa.field("scope", pa.string(), nullable=False),
        pa.field("scope_id", pa.string(), nullable=False),
        pa.field("period", pa.string(), nullable=False),
        pa.field("period_start", _TS, nullable=False),
        pa.field("period_end", _TS, nullable=False),
        pa.field("amount_usd", pa.float64(), nullable=False),
        pa.field("spent_usd", pa.float64(), nullable=False),
        pa.field("burn_rate_usd_per_h", pa.float64()),
        pa.field("burn_rate_low_usd_per_h", pa.float64()),
        pa.field("projected_usd", pa.float64()),
        pa.field("projected_exhausted_at", _TS),
        pa.field("alerted_at", _TS),
        pa.field("exhausted_at", _TS),
        pa.field("as_of", _TS, nullable=False),
    ]
)
"""One row per budget and period the tracker holds, as of the last ``check``.

``budget`` is the inline spec (``tenant:acme=50/day``); ``spent_usd`` the cost of the
scope's events in ``[period_start, period_end)``; ``burn_rate_usd_per_h`` the trailing-window
rate and ``burn_rate_low_usd_per_h`` its lower bound, ``projected_usd`` spent + low rate x
time left, and ``projected_exhausted_at`` when that forecast reaches the amount (within the
period) -- all null until the budget has the minimum evidence (module docstring) and once
the period is over.
``alerted_at`` / ``exhausted_at`` are the event times of the forecast alert and of the check
that found the budget spent; ``as_of`` the event time of the check.
"""


EVENTS: Final = LakeTable("events", EVENTS_SCHEMA, "ts")
DEAD_LETTERS: Final = LakeTable("dead_letters", DEAD_LETTERS_SCHEMA, "received_at")
METRICS: Final = LakeTable("metrics", METRICS_SCHEMA, "window_start")
ANOMALIES: Final = LakeTable("anomalies", ANOMALIES_SCHEMA, "window_start")
# Budget status: one row per budget and period, replaced while the period is current.
BUDGETS: Final = LakeTable("budgets", BUDGETS_SCHEMA, "period_start", ("budget", "period_start"))
RELEASE_VERDICTS: Final = LakeTable("release_verdicts", VERDICTS_SCHEMA, "window_start")
HOP_OUTBOX_SCHEMA: Final = pa.schema(
    [
        pa.field("writer", pa.string(), nullable=False),
        pa.field("ranges", pa.string(), nullable=False),
        pa.field("payloads", pa.list_(pa.binary()), nullable=False),
        pa.field("created_at", _TS, nullable=False),
    ]
)
"""The repartition hop's outbox (internal, like ``kafka_offsets``): per ingest process
(``writer``), the messages of its last landed flush (``payloads``: every chunk for every
repartition partition, in order) and the events offsets they cover (``ranges``, JSON
``{partition: [first, next]}``). Landed in the flush's own transaction, replacing the
writer's previous row, then sent: whoever takes a partition over sends again the row that
ends at the partition's stored position (``streams.hop``)."""
HOP_OUTBOX: Final = LakeTable("hop_outbox", HOP_OUTBOX_SCHEMA, "created_at", ("writer",))
TABLES: list[LakeTable] = [
    EVENTS,
    DEAD_LETTERS,
    METRICS,
    ANOMALIES,
    BUDGETS,
    RELEASE_VERDICTS,
    HOP_OUTBOX,
]
