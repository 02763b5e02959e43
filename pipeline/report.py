"""One self-contained HTML report over a data directory: ``agentstream report``.

``render_report(data_dir, out)`` draws the figures of ``sinks.analysis`` (PNG, embedded as
base64 ``data:`` URIs) and renders its views as HTML tables into a single file with inline
CSS and no script, no font and no request to anything: it opens from a mail attachment, an
artifact store or a file share the same way. Sections: headline numbers, cost, quality by
version (escalations, retrieval misses, task outcomes), latency by model, tool errors, and
anomalies (timeline, the metrics around the worst conditions, the table). An empty lake gives
a report of empty sections, not an error.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import duckdb

from sinks import analysis
from sinks.analysis import Table, fetch, fmt

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["render_report"]

DPI: Final = 110
TABLE_ROWS: Final = 60

_CSS: Final = """
body { font: 14px/1.45 -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: #1d2430; background: #f4f6f9; margin: 0; }
main { max-width: 1240px; margin: 0 auto; padding: 24px 28px 48px; }
header h1 { margin: 0 0 4px; font-size: 26px; }
header p { margin: 0; color: #5b6778; }
nav { margin: 14px 0 6px; }
nav a { color: #2b5fb4; margin-right: 14px; text-decoration: none; }
section { background: #fff; border: 1px solid #dde3ea; border-radius: 8px;
          padding: 16px 20px 20px; margin: 18px 0; }
section h2 { margin: 0 0 4px; font-size: 20px; }
section > p.note { margin: 0 0 10px; color: #5b6778; }
.cards { display: grid; grid-template-columns: repeat(5, 1fr); gap: 12px; margin: 18px 0 6px; }
.card { background: #fff; border: 1px solid #dde3ea; border-radius: 8px; padding: 12px 16px; }
.card .value { font-size: 26px; font-weight: 600; }
.card .label { color: #5b6778; }
.facts { color: #5b6778; margin: 6px 0 0; }
figure { margin: 12px 0; }
figure img { width: 100%; height: auto; display: block; }
figcaption { color: #5b6778; font-size: 13px; }
table.agentstream { border-collapse: collapse; width: 100%; font-size: 13px; margin-top: 8px; }
table.agentstream th { text-align: left; background: #eef2f7; padding: 5px 8px;
                       border-bottom: 1px solid #cfd7e2; white-space: nowrap; }
table.agentstream td { padding: 4px 8px; border-bottom: 1px solid #edf0f4; vertical-align: top;
                       white-space: nowrap; }
table.agentstream td.wrap { white-space: normal; min-width: 22em; }
.scroll { overflow-x: auto; }
table.agentstream td.num { text-align: right; font-variant-numeric: tabular-nums;
                           white-space: nowrap; }
table.agentstream td.empty { color: #8a94a3; text-align: center; }
p.more { color: #8a94a3; font-size: 12px; }
footer { color: #8a94a3; font-size: 12px; margin-top: 24px; }
"""


@dataclass(frozen=True)
class _Card:
    key: str
    label: str
    value: str


def _figure(fig_id: str, fig: Figure, caption: str) -> str:
    uri = analysis.png_data_uri(fig, dpi=DPI)
    alt = html.escape(caption)
    return (
        f'<figure id="fig-{fig_id}"><img alt="{alt}" src="{uri}">'
        f"<figcaption>{alt}</figcaption></figure>"
    )


def _table(table_id: str, table: Table, max_rows: int = TABLE_ROWS) -> str:
    return f'<div class="scroll">{table.to_html(table_id=table_id, max_rows=max_rows)}</div>'


def _section(section_id: str, title: str, note: str, *parts: str) -> str:
    return (
        f'<section id="{section_id}"><h2>{html.escape(title)}</h2>'
        f'<p class="note">{html.escape(note)}</p>{"".join(parts)}</section>'
    )


def _cards(summary: dict[str, Any]) -> list[_Card]:
    return [
        _Card("events", "events", fmt("events", summary["events"])),
        _Card("cost", "cost", fmt("cost_usd", summary["cost_usd"])),
        _Card("tasks", "tasks started", fmt("tasks_started", summary["tasks_started"])),
        _Card(
            "success", "task success rate", fmt("task_success_rate", summary["task_success_rate"])
        ),
        _Card("escalation", "escalation rate", fmt("escalation_rate", summary["escalation_rate"])),
    ]


def _headline(summary: dict[str, Any]) -> str:
    cards = "".join(
        f'<div class="card" id="kpi-{c.key}"><div class="value">{html.escape(c.value)}</div>'
        f'<div class="label">{html.escape(c.label)}</div></div>'
        for c in _cards(summary)
    )
    facts = [
        f"{fmt('first_event', summary['first_event'])} to "
        f"{fmt('last_event', summary['last_event'])} UTC",
        f"{summary['agents']:,} agents, {summary['models']:,} models, "
        f"{summary['tenants']:,} tenants",
        f"{fmt('tasks_completed', summary['tasks_completed'])} tasks completed, "
        f"{fmt('cost_per_completed_task', summary['cost_per_completed_task'])} per "
        "completed task",
        f"{fmt('retrieval_miss_rate', summary['retrieval_miss_rate'])} retrieval misses, "
        f"{fmt('tool_error_rate', summary['tool_error_rate'])} tool errors",
        f"{summary['late_events']:,} late events, {summary['dead_letters']:,} dead letters",
        f"{summary['anomalies']:,} anomalies in {summary['conditions']:,} conditions",
    ]
    return (
        f'<div class="cards">{cards}</div>'
        f'<p class="facts" id="facts">{html.escape(" · ".join(facts))}</p>'
    )


def _sections(con: duckdb.DuckDBPyConnection) -> list[tuple[str, str, Callable[[], str]]]:
    """``(id, title, render)`` of every section; render runs the queries and draws."""

    def cost() -> str:
        return _section(
            "cost",
            "Cost",
            "Cost of model calls (priced when the event had none) from the closed-window "
            "metrics; per task = cost / tasks started, per completed task = cost / tasks "
            "completed, both ratios of sums.",
            _figure(
                "cost-over-time",
                analysis.plot_cost_over_time(con),
                "Cost over time, stacked by agent",
            ),
            _figure(
                "cost-breakdown",
                analysis.plot_cost_breakdown(con),
                "Cost by agent and by model, tokens by model",
            ),
            _table(
                "cost-by-version-day",
                fetch(
                    con,
                    "SELECT day, agent_id, agent_version, tasks_started, tasks_completed, "
                    "llm_calls, cost_usd, cost_per_task, cost_per_completed_task "
                    "FROM cost_by_version_day ORDER BY day DESC, cost_usd DESC",
                ),
            ),
        )

    def quality() -> str:
        return _section(
            "quality",
            "Quality by version",
            "Escalations per task started and empty retrievals per retrieval, per agent "
            "version (largest versions; the rest pooled as 'other'; buckets under 10 "
            "samples left out), and what became of the tasks each version started.",
            _figure(
                "quality-over-time",
                analysis.plot_quality_over_time(con),
                "Escalation and retrieval-miss rate over time by agent version",
            ),
            _figure(
                "task-funnel", analysis.plot_task_funnel(con), "Task outcomes by agent version"
            ),
            _table(
                "task-funnel",
                fetch(
                    con,
                    "SELECT agent_id, agent_version, tasks_started, tasks_completed, "
                    "tasks_failed, tasks_abandoned, tasks_open, task_success_rate, "
                    "escalations, escalation_rate FROM task_funnel "
                    "ORDER BY agent_id, agent_version",
                ),
            ),
        )

    def evaluations() -> str:
        return _section(
            "evaluations",
            "Evaluations and feedback",
            "Pass rates of the evaluators (LLM judges, heuristics, humans, benchmarks) per "
            "agent, and what users say: the share of 1-2 star ratings. The table lists each "
            "agent, prompt version and evaluator, worst pass rate first.",
            _figure(
                "evaluation-quality",
                analysis.plot_quality_over_time(
                    con,
                    (
                        "eval_hallucination_pass_rate",
                        "eval_tone_pass_rate",
                        "feedback_negative_share",
                    ),
                    "agent",
                ),
                "Hallucination and tone pass rates, negative ratings, over time by agent",
            ),
            _table(
                "evaluation-quality",
                fetch(
                    con,
                    "SELECT agent_id, prompt_version, evaluator, evaluator_kind, evaluations, "
                    "failed, pass_rate, mean_score FROM evaluation_quality",
                ),
            ),
        )

    def fix_next() -> str:
        return _section(
            "fix-next",
            "What to fix next",
            "The feedback loop: per agent and prompt version, the escalation reasons, "
            "corrections, failing tools, data sources that miss, blocking guardrails, "
            "abandoned tasks and failing evaluators, most frequent first, with their rate "
            "per 100 tasks and its change against the agent's previous prompt version.",
            _table(
                "feedback-loop",
                fetch(
                    con,
                    "SELECT agent_id, prompt_version, category, item, count, per_100_tasks, "
                    "previous_version, change_per_100_tasks FROM feedback_loop "
                    "ORDER BY count DESC, change_per_100_tasks DESC, agent_id, prompt_version, "
                    "category, item",
                ),
                max_rows=25,
            ),
        )

    def latency() -> str:
        return _section(
            "latency",
            "Latency by model",
            "Percentiles (interpolated, quantile_cont) over every event with a latency; only "
            "model calls name a model, tool calls and retrievals are shown per step type.",
            _figure(
                "latency-by-model",
                analysis.plot_latency_by_model(con),
                "Latency p50, p95 and p99 by model and step type",
            ),
            _table(
                "latency-by-model",
                fetch(
                    con,
                    "SELECT step, model, calls, latency_p50_ms, latency_p95_ms, "
                    "latency_p99_ms, latency_mean_ms FROM latency_by_model",
                ),
            ),
        )

    def tools() -> str:
        return _section(
            "tool-errors",
            "Top tool errors",
            "Tool calls by tool, highest error rate first.",
            _figure("tool-errors", analysis.plot_tool_errors(con), "Top tools by error rate"),
            _table(
                "tool-errors",
                fetch(
                    con,
                    "SELECT tool_name, calls, errors, error_rate, top_error_type, agent_ids, "
                    "latency_p95_ms, last_error_at FROM tool_errors",
                ),
                max_rows=20,
            ),
        )

    def anomalies() -> str:
        return _section(
            "anomalies",
            "Anomalies",
            "Alerts of the drift and outlier detectors and of alert rules, grouped in "
            "conditions from the first alert to the recovery, and the metrics of the same key "
            "around the worst ones; each alert with the dimension values its change comes from.",
            _figure(
                "anomaly-timeline",
                analysis.plot_anomaly_timeline(con),
                "Anomaly conditions on a timeline",
            ),
            _figure(
                "anomaly-context",
                analysis.plot_anomaly_context(con),
                "The measure around the most severe conditions",
            ),
            _table(
                "anomaly-conditions",
                fetch(
                    con,
                    "SELECT subject, measure, severity, direction, opened_at, recovered_at, "
                    "alerts, baseline, peak, detectors FROM anomaly_conditions "
                    "ORDER BY opened_at DESC",
                    measure_of={"baseline": "measure", "peak": "measure"},
                ),
            ),
            _table(
                "anomalies",
                fetch(
                    con,
                    f"SELECT window_start, kind, severity, {analysis.subject_sql()} AS subject, "
                    "measure, coalesce('rule ' || rule, detector) AS detector, baseline, "
                    "observed, score, message, explanation FROM anomalies "
                    "ORDER BY window_start DESC, anomaly_id",
                    measure_of={"baseline": "measure", "observed": "measure"},
                ),
            ),
        )

    def releases() -> str:
        return _section(
            "releases",
            "Releases",
            "Each release's candidate against the version it replaces, per measure: the "
            "latest always-valid verdict (running, no_difference, better, regressed), the "
            "two versions' values over the same windows, and the effect with its interval "
            "(rates in points, cost and latency relative).",
            _table(
                "release-summary",
                fetch(
                    con,
                    "SELECT agent_id, dimension, candidate_version, baseline_version, "
                    "traffic_share, measure, verdict, candidate_value, baseline_value, "
                    "effect, effect_low, effect_high, confidence, windows, "
                    "decided_window_end FROM release_summary ORDER BY started_at DESC, "
                    "release_id, measure",
                    measure_of={"candidate_value": "measure", "baseline_value": "measure"},
                ),
            ),
        )

    return [
        ("cost", "Cost", cost),
        ("quality", "Quality", quality),
        ("evaluations", "Evaluations", evaluations),
        ("fix-next", "What to fix next", fix_next),
        ("latency", "Latency", latency),
        ("tool-errors", "Tool errors", tools),
        ("anomalies", "Anomalies", anomalies),
        ("releases", "Releases", releases),
    ]


def render_html(con: duckdb.DuckDBPyConnection, title: str) -> str:
    """The report as one HTML document, from a connection with the analysis views."""
    summary = analysis.headline(con)
    sections = _sections(con)
    nav = "".join(f'<a href="#{sid}">{html.escape(name)}</a>' for sid, name, _ in sections)
    body = "".join(render() for _, _, render in sections)
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body><main>"
        f"<header><h1>{html.escape(title)}</h1>"
        f"<p>Generated {now} by agentstream. Times are event time in UTC.</p></header>"
        f"<nav>{nav}</nav>{_headline(summary)}{body}"
        "<footer>agentstream report: every number comes from the DuckDB views of "
        "sinks/analysis.py over the lake (agentstream sql gives the same).</footer>"
        "</main></body></html>\n"
    )


def render_report(data_dir: Path, out: Path) -> Path:
    """Write the report over ``data_dir`` to ``out`` (parent folders made); return ``out``.

    Raises ``sinks.catalog.QueryError`` if ``data_dir`` is missing or unreadable.
    """
    data_dir, out = Path(data_dir), Path(out)
    con = analysis.connect(data_dir)
    try:
        document = render_html(con, f"agentstream report: {data_dir.absolute().name}")
    finally:
        con.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(document, encoding="utf-8")
    tmp.replace(out)
    return out
