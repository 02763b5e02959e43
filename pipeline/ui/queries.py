"""What the live page asks the lake: one function per view, over ``sinks.analysis.connect``.

Every number comes from the lake's views, through the same SQL: KPIs from
``sinks.analysis.kpi_select`` over ``metric_windows`` (as ``lake_summary`` and
``kpis_every``), tables from the analysis views themselves run over a filtered source
(``view_select``: a CTE named like the view's source shadows it). Filters are bound
parameters (``$agent``, ``$start``, ...), never text spliced into SQL; column and
expression names come from fixed tables in this module only. Every table is capped at
``MAX_ROWS`` rows.

Time. The range is in event time, anchored at the lake's newest data (``anchor``), so
"last hour" of a replayed or demo lake is its last hour, and a live lake's is the wall
clock's. Windows belong to a range by ``window_start``, events by ``ts``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import duckdb

from sinks.analysis import DIMS, kpi_select, nice_step, view_select
from sinks.lake import ALIAS

MAX_ROWS: Final = 200
MAX_FILTER_LEN: Final = 200
CHART_POINTS: Final = 60
TOP_SERIES: Final = 6

RANGES: Final[dict[str, timedelta | None]] = {
    "15m": timedelta(minutes=15),
    "1h": timedelta(hours=1),
    "6h": timedelta(hours=6),
    "24h": timedelta(hours=24),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
    "all": None,
}
DEFAULT_RANGE: Final = "24h"

FILTERS: Final[dict[str, str]] = {
    "agent": "agent_id",
    "version": "agent_version",
    "prompt": "prompt_version",
    "model": "model",
    "tenant": "tenant_id",
}
"""URL parameter -> column, for every view that has the key's dimensions."""

BREAKDOWNS: Final = ("agent", "version", "model", "tenant")
"""What cost can be broken down by (``DIMS`` of ``sinks.analysis``)."""

TILES: Final = (
    "events",
    "cost_usd",
    "cost_per_completed_task",
    "task_success_rate",
    "escalation_rate",
    "retrieval_miss_rate",
    "tool_error_rate",
    "latency_p95_ms",
)
_TILE_KPIS: Final = (
    "cost_usd",
    "tasks_started",
    "tasks_completed",
    "cost_per_completed_task",
    "task_success_rate",
    "escalation_rate",
    "retrieval_miss_rate",
    "tool_error_rate",
)
_STEPS_SQL: Final = "type IN ('llm_call', 'tool_call', 'retrieval') AND latency_ms IS NOT NULL"
_OPEN_FIRST: Final = (
    "recovered_at IS NOT NULL, CASE severity WHEN 'critical' THEN 0 WHEN 'warning' THEN 1 "
    "ELSE 2 END, opened_at DESC, condition_id"
)


SNAPSHOT: Final[dict[str, str]] = {
    "ui_metric_windows": "SELECT * FROM metric_windows",
    "ui_anomalies": "SELECT * FROM anomalies",
    "ui_release_verdicts": "SELECT * FROM release_verdicts",
    "ui_budgets": "SELECT * FROM budgets",
    "ui_bounds": (
        "SELECT (SELECT max(window_end) FROM metrics) AS last_window_end, "
        "(SELECT min(window_start) FROM metrics) AS first_window_start, "
        "(SELECT min(epoch(window_end - window_start)) FROM metrics) AS window_s, "
        "max(ts) AS last_ts, min(ts) AS first_ts FROM events"
    ),
}
"""In-memory copies of the small derived tables (and the lake's time bounds), made through
the views at each refresh (``pipeline.ui.server.LakeReader``): the lake keeps a file per
flush, and reading hundreds of small files per query would cost more than the whole view.
The large ``events`` table is always read live."""


class BadRequest(ValueError):
    """A URL parameter the page cannot use; the message names it."""


@dataclass(frozen=True)
class Filters:
    """The page's state that queries depend on: a time range and the key's dimensions."""

    range: str = DEFAULT_RANGE
    start: datetime | None = None
    end: datetime | None = None
    dims: tuple[tuple[str, str], ...] = ()
    """``(url parameter, value)`` of every filter set, in ``FILTERS`` order."""

    def dim(self, name: str) -> str | None:
        return dict(self.dims).get(name)


def _time(name: str, text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(
            f"bad {name} {text[:40]!r}: expected a time such as 2026-01-05T09:00:00Z"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def parse_filters(params: Mapping[str, str]) -> Filters:
    """The filters of a URL's query parameters; ``BadRequest`` names a bad one."""
    name = params.get("range") or DEFAULT_RANGE
    if name not in RANGES and name != "custom":
        raise BadRequest(f"bad range {name[:40]!r}: expected one of {', '.join(RANGES)}, custom")
    start = end = None
    if name == "custom":
        if not params.get("from") or not params.get("to"):
            raise BadRequest("range custom needs both from and to")
        start, end = _time("from", params["from"]), _time("to", params["to"])
        if end <= start:
            raise BadRequest("bad range: to must be after from")
    dims = []
    for key in FILTERS:
        value = params.get(key, "")
        if len(value) > MAX_FILTER_LEN:
            raise BadRequest(f"bad {key}: longer than {MAX_FILTER_LEN} characters")
        if value:
            dims.append((key, value))
    return Filters(name, start, end, tuple(dims))


# --------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------


def _rows(cur: duckdb.DuckDBPyConnection, sql: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """``{"columns": [...], "rows": [[...], ...]}`` of at most ``MAX_ROWS`` rows."""
    cur.execute(sql, _used(sql, params))
    columns = [d[0] for d in cur.description or ()]
    rows = cur.fetchmany(MAX_ROWS)
    return {"columns": columns, "rows": [list(r) for r in rows]}


def _records(
    cur: duckdb.DuckDBPyConnection, sql: str, params: Mapping[str, Any]
) -> list[dict[str, Any]]:
    t = _rows(cur, sql, params)
    return [dict(zip(t["columns"], r, strict=True)) for r in t["rows"]]


def _used(sql: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters ``sql`` names (DuckDB refuses unused named parameters)."""
    return {k: v for k, v in params.items() if re.search(rf"\${k}\b", sql)}


def _dims_where(f: Filters, only: Sequence[str] = tuple(FILTERS)) -> list[str]:
    return [f"{FILTERS[k]} = ${k}" for k, _ in f.dims if k in only]


def _params(f: Filters, start: datetime | None, end: datetime | None) -> dict[str, Any]:
    return {**dict(f.dims), "start": start, "end": end}


def _and(clauses: Sequence[str]) -> str:
    return " AND ".join(clauses) if clauses else "true"


def snapshot(cur: duckdb.DuckDBPyConnection) -> None:
    """(Re)make the ``SNAPSHOT`` tables on ``cur``'s database, in one transaction."""
    cur.execute("BEGIN TRANSACTION")
    try:
        for name, select in SNAPSHOT.items():
            cur.execute(f"CREATE OR REPLACE TABLE {name} AS {select}")
        cur.execute("COMMIT")
    except BaseException:
        cur.execute("ROLLBACK")
        raise


def data_version(cur: duckdb.DuckDBPyConnection) -> int | None:
    """The lake's current snapshot id: it changes with every commit of the worker."""
    try:
        row = cur.execute(f"SELECT id FROM {ALIAS}.current_snapshot()").fetchone()
    except duckdb.Error:
        return None
    return None if row is None else int(row[0])


def bounds(cur: duckdb.DuckDBPyConnection) -> tuple[datetime | None, datetime | None, float]:
    """The lake's oldest and newest event time (windows and events), and the window length."""
    ((last_window, first_window, window_s, last_ts, first_ts),) = cur.execute(
        "SELECT * FROM ui_bounds"
    ).fetchall()
    lasts = [t for t in (last_window, last_ts) if t is not None]
    firsts = [t for t in (first_window, first_ts) if t is not None]
    return (min(firsts) if firsts else None, max(lasts) if lasts else None, float(window_s or 60))


@dataclass(frozen=True)
class Span:
    """A resolved range ``[start, end)`` and the one before it, of the same length."""

    start: datetime | None
    end: datetime | None
    previous_start: datetime | None
    window_s: float
    step_s: int


def resolve(cur: duckdb.DuckDBPyConnection, f: Filters) -> Span:
    """Turn the range of ``f`` into times, with a bucket length for charts."""
    first, last, window_s = bounds(cur)
    if f.range == "custom":
        start, end = f.start, f.end
    else:
        if first is None or last is None:
            return Span(None, None, None, window_s, int(window_s))
        # The end of the window holding the newest data, so the last window counts whole.
        end = _ceil(last, window_s)
        length = RANGES[f.range]
        start = first if length is None else end - length
    assert start is not None and end is not None
    previous = None if f.range == "all" else start - (end - start)
    step = nice_step((end - start).total_seconds(), window_s, CHART_POINTS)
    return Span(start, end, previous, window_s, step)


def _ceil(when: datetime, step_s: float) -> datetime:
    epoch = when.timestamp()
    return datetime.fromtimestamp(math.ceil(epoch / step_s) * step_s, UTC)


def over(source: str, select: str, view: str) -> str:
    """Analysis view ``view`` computed over ``select`` in place of its source ``source``."""
    body = view_select(view)
    head = f"WITH {source} AS ({select})"
    return f"{head}, {body[5:]}" if body.startswith("WITH ") else f"{head} {body}"


def metric_source(f: Filters, start: str = "$start", end: str = "$end") -> str:
    """``WITH metric_windows AS (...)``: key-level windows of the range and filters."""
    where = ["level = 'key'", f"window_start >= {start}", f"window_start < {end}"]
    return (
        "WITH metric_windows AS (SELECT * FROM ui_metric_windows "
        f"WHERE {_and([*where, *_dims_where(f)])}) "
    )


def event_where(f: Filters, start: str = "$start", end: str = "$end") -> str:
    return _and([f"ts >= {start}", f"ts < {end}", *_dims_where(f)])


# --------------------------------------------------------------------------------------
# views
# --------------------------------------------------------------------------------------


def tiles(
    cur: duckdb.DuckDBPyConnection, f: Filters, span: Span
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The overview's KPIs over the range and over the period before it: events and
    latency p95 from ``events`` (as ``lake_summary`` and ``latency_by_model`` count them,
    one scan for both periods), the rest from the metrics (as ``lake_summary``)."""
    now: dict[str, Any] = dict.fromkeys(TILES)
    before: dict[str, Any] = dict.fromkeys(TILES)
    if span.start is None or span.end is None:
        return now, before
    kpis = kpi_select("metric_windows", [], _TILE_KPIS)
    now.update(_records(cur, metric_source(f) + kpis, _params(f, span.start, span.end))[0])
    lo = span.start
    if span.previous_start is not None:
        lo = span.previous_start
        before.update(
            _records(cur, metric_source(f) + kpis, _params(f, span.previous_start, span.start))[0]
        )
    steps = f"({_STEPS_SQL})"
    (ev,) = _records(
        cur,
        "SELECT count(*) FILTER (WHERE ts >= $start) AS events, "
        f"quantile_cont(latency_ms, 0.95) FILTER (WHERE ts >= $start AND {steps}) AS p95, "
        "count(*) FILTER (WHERE ts < $start) AS prev_events, "
        f"quantile_cont(latency_ms, 0.95) FILTER (WHERE ts < $start AND {steps}) AS prev_p95 "
        f"FROM events WHERE {event_where(f, start='$lo')} ",
        {**_params(f, span.start, span.end), "lo": lo},
    )
    now.update(events=ev["events"], latency_p95_ms=ev["p95"])
    if span.previous_start is not None:
        before.update(events=ev["prev_events"], latency_p95_ms=ev["prev_p95"])
    return now, before


def _series(
    cur: duckdb.DuckDBPyConnection,
    f: Filters,
    span: Span,
    measures: Sequence[str],
    dim: str = "all",
) -> dict[str, Any]:
    """``measures`` per time bucket of ``span.step_s`` (and series of ``dim``)."""
    keys = [
        ("bucket", "time_bucket(to_seconds(CAST($step AS BIGINT)), window_start, 'UTC')"),
        ("series", DIMS[dim]),
    ]
    sql = metric_source(f) + kpi_select("metric_windows", keys, measures, order=("bucket",))
    cur.execute(sql, _used(sql, {**_params(f, span.start, span.end), "step": span.step_s}))
    rows = cur.fetchall()
    buckets = sorted({r[0] for r in rows})
    index = {b: i for i, b in enumerate(buckets)}
    values: dict[str, dict[str, list[float | None]]] = {}
    for bucket, series, *vals in rows:
        for m, v in zip(measures, vals, strict=True):
            line = values.setdefault(m, {}).setdefault(series, [None] * len(buckets))
            line[index[bucket]] = None if v is None else float(v)
    return {
        "x": [b.timestamp() for b in buckets],
        "step_s": span.step_s,
        "series": values,
    }


def _top(
    lines: dict[str, list[float | None]], top: int = TOP_SERIES
) -> dict[str, list[float | None]]:
    """The ``top`` largest lines of an additive measure, the rest summed as 'other'."""
    order = sorted(lines, key=lambda n: -sum(v or 0.0 for v in lines[n]))
    kept = {n: lines[n] for n in order[:top]}
    rest = order[top:]
    if rest:
        width = len(next(iter(lines.values())))
        kept["other"] = [sum(lines[n][i] or 0.0 for n in rest) for i in range(width)]
    return kept


def overview(cur: duckdb.DuckDBPyConnection, f: Filters) -> dict[str, Any]:
    span = resolve(cur, f)
    now, before = tiles(cur, f, span)
    chart = _series(cur, f, span, ("events", "cost_usd", "task_success_rate", "escalation_rate"))
    attention = attention_rows(cur, f, span, limit=5)
    return {
        "span": _span_json(span),
        "tiles": now,
        "previous": before,
        "chart": chart,
        "attention": attention,
    }


def _span_json(span: Span) -> dict[str, Any]:
    return {
        "start": span.start,
        "end": span.end,
        "previous_start": span.previous_start,
        "step_s": span.step_s,
        "window_s": span.window_s,
    }


def cost(cur: duckdb.DuckDBPyConnection, f: Filters, by: str) -> dict[str, Any]:
    if by not in BREAKDOWNS:
        raise BadRequest(f"bad by {by[:40]!r}: expected one of {', '.join(BREAKDOWNS)}")
    span = resolve(cur, f)
    p = _params(f, span.start, span.end)
    chart = _series(cur, f, span, ("cost_usd",), dim=by)
    chart["series"] = {"cost_usd": _top(chart["series"].get("cost_usd", {}))}
    table = _rows(
        cur,
        metric_source(f)
        + kpi_select(
            "metric_windows",
            [(by, DIMS[by])],
            (
                "cost_usd",
                "cost_estimated_usd",
                "tasks_started",
                "tasks_completed",
                "cost_per_task",
                "cost_per_completed_task",
                "llm_calls",
                "tokens",
            ),
            order=("cost_usd DESC", by),
        ),
        p,
    )
    # Both lists from one scan of the model calls (the only events with a cost).
    sql = (
        "SELECT grouping(task_id) AS by_session, coalesce(task_id, session_id) AS id, "
        "any_value(agent_id) AS agent_id, any_value(tenant_id) AS tenant_id, "
        "count(*) AS llm_calls, sum(input_tokens + output_tokens) AS tokens, "
        "sum(cost_usd) AS cost_usd, min(ts) AS first_ts, max(ts) AS last_ts "
        f"FROM llm_calls WHERE {event_where(f)} "
        "GROUP BY GROUPING SETS ((task_id), (session_id)) "
        "HAVING coalesce(task_id, session_id) IS NOT NULL "
        "QUALIFY row_number() OVER (PARTITION BY grouping(task_id) "
        "ORDER BY sum(cost_usd) DESC NULLS LAST, id) <= 20 "
        "ORDER BY by_session, cost_usd DESC NULLS LAST, id"
    )
    cur.execute(sql, _used(sql, p))
    columns = [d[0] for d in cur.description or ()][1:]
    rows = cur.fetchall()
    expensive = {
        key: {
            "columns": [key, *columns[1:]],
            "rows": [list(r[1:]) for r in rows if r[0] == flag],
        }
        for key, flag in (("task_id", 0), ("session_id", 1))
    }
    return {
        "span": _span_json(span),
        "by": by,
        "chart": chart,
        "table": table,
        "tasks": expensive["task_id"],
        "sessions": expensive["session_id"],
    }


def attention_rows(
    cur: duckdb.DuckDBPyConnection, f: Filters, span: Span, limit: int = MAX_ROWS
) -> dict[str, Any]:
    """Anomaly conditions (drift, outliers, release regressions, budget burn) active in the
    range: open ones first, then by severity, newest first."""
    where = _and(_dims_where(f))
    sql = (
        f"WITH anomalies AS (SELECT * FROM ui_anomalies WHERE {where}) "
        f"SELECT CASE WHEN recovered_at IS NULL THEN 'open' ELSE 'recovered' END AS status, "
        "severity, subject, measure, direction, baseline, peak, opened_at, recovered_at, "
        "alerts, detectors, message, condition_id "
        f"FROM ({view_select('anomaly_conditions')}) "
        "WHERE ($start IS NULL OR recovered_at IS NULL OR recovered_at > $start) "
        "AND ($end IS NULL OR opened_at < $end) "
        f"ORDER BY {_OPEN_FIRST} LIMIT {int(limit)}"
    )
    return _rows(cur, sql, _params(f, span.start, span.end))


def attention(cur: duckdb.DuckDBPyConnection, f: Filters) -> dict[str, Any]:
    span = resolve(cur, f)
    return {"span": _span_json(span), "conditions": attention_rows(cur, f, span)}


WINDOW_EVENTS: Final = 50
_EVENT_COLUMNS: Final = (
    "ts, type, event_id, agent_id, agent_version, prompt_version, model, tenant_id, "
    "session_id, task_id, trace_id, input_tokens, output_tokens, cost_usd, latency_ms, "
    "tool_name, status, error_type, hits, miss, query, reason, outcome, policy_id, action, "
    "finish_reason, late"
)


def condition(cur: duckdb.DuckDBPyConnection, condition_id: str) -> dict[str, Any]:
    """One condition: its alerts, its measure around the first alert (baseline vs
    observed), the metrics of the alert's window, its example events and the window's
    events, and their sessions."""
    p = {"id": condition_id}
    summary = _records(
        cur,
        over(
            "anomalies",
            "SELECT * FROM ui_anomalies WHERE condition_id = $id",
            "anomaly_conditions",
        ),
        p,
    )
    if not summary:
        raise BadRequest(f"no anomaly condition {condition_id[:80]!r} in this lake")
    alerts = _rows(
        cur,
        "SELECT kind, detected_at, window_start, window_end, level, measure, detector, "
        "baseline, observed, direction, severity, score, message, anomaly_id, "
        "example_event_ids FROM ui_anomalies WHERE condition_id = $id "
        "ORDER BY window_start, kind = 'recovery', anomaly_id",
        p,
    )
    first = next(
        (
            dict(zip(alerts["columns"], r, strict=True))
            for r in alerts["rows"]
            if r[0] != "recovery"
        ),
        dict(zip(alerts["columns"], alerts["rows"][0], strict=True)),
    )
    context = _rows(
        cur,
        "WITH anomalies AS (SELECT * FROM ui_anomalies WHERE anomaly_id = $aid), "
        "metric_windows AS (SELECT * FROM ui_metric_windows) "
        "SELECT window_offset, window_start, window_end, value, events, tasks_started, "
        "llm_calls, cost_usd, cost_per_task, tokens_per_call, task_success_rate, "
        "escalation_rate, retrieval_miss_rate, tool_error_rate, llm_latency_p95_ms "
        "FROM anomaly_context_within(10) ORDER BY window_start",
        {"aid": first["anomaly_id"]},
    )
    ids = sorted({i for r in alerts["rows"] for i in (r[-1] or [])})
    # Example events belong to their alert's window: the time bounds spare a full scan.
    examples = _rows(
        cur,
        f"SELECT {_EVENT_COLUMNS} FROM events WHERE ts >= $lo AND ts < $hi "
        "AND list_contains($ids, event_id) ORDER BY ts",
        {
            "ids": ids,
            "lo": min(r[2] for r in alerts["rows"]),
            "hi": max(r[3] for r in alerts["rows"]),
        },
    )
    key = [d for d in FILTERS.values() if summary[0].get(d) is not None]
    kp = {d: summary[0][d] for d in key}
    where = _and(["ts >= $ws", "ts < $we", "type <> 'release'", *(f"{d} = ${d}" for d in key)])
    wp = {**kp, "ws": first["window_start"], "we": first["window_end"]}
    ((total,),) = cur.execute(f"SELECT count(*) FROM events WHERE {where}", wp).fetchall()
    window_events = _rows(
        cur,
        f"SELECT {_EVENT_COLUMNS} FROM events WHERE {where} ORDER BY ts, event_id "
        f"LIMIT {WINDOW_EVENTS}",
        wp,
    )
    sessions = sorted(
        {
            s
            for t in (examples, window_events)
            for s in (r[t["columns"].index("session_id")] for r in t["rows"])
            if s is not None
        }
    )
    return {
        "condition": summary[0],
        "alerts": alerts,
        "window": {"start": first["window_start"], "end": first["window_end"]},
        "context": context,
        "examples": examples,
        "window_events": window_events,
        "window_event_count": total,
        "sessions": sessions,
    }


def releases(cur: duckdb.DuckDBPyConnection, f: Filters) -> dict[str, Any]:
    where = _and(_dims_where(f, ("agent", "tenant")))
    summary = _rows(
        cur,
        over(
            "release_verdicts",
            f"SELECT * FROM ui_release_verdicts WHERE {where}",
            "release_summary",
        ),
        dict(f.dims),
    )
    looks = _rows(
        cur,
        "SELECT release_id, measure, window_end, verdict, effect, effect_low, effect_high, "
        "effect_scale, candidate_samples, baseline_samples FROM ui_release_verdicts "
        f"WHERE {where} QUALIFY row_number() OVER (PARTITION BY verdict_id) = 1 "
        "ORDER BY release_id, measure, window_end",
        dict(f.dims),
    )
    announced = _rows(
        cur,
        "SELECT ts, release_id, stage, agent_id, tenant_id, dimension, candidate, baseline, "
        f"traffic_share FROM releases WHERE {where} ORDER BY ts DESC",
        dict(f.dims),
    )
    return {"summary": summary, "looks": looks, "announced": announced}


def budgets(cur: duckdb.DuckDBPyConnection, f: Filters) -> dict[str, Any]:
    span = resolve(cur, f)
    scoped = [
        f"NOT (scope = '{scope}' AND scope_id <> ${key})"
        for key, scope in (("agent", "agent"), ("tenant", "tenant"))
        if f.dim(key) is not None
    ]
    sql = (
        "SELECT budget, scope, scope_id, period, period_start, period_end, amount_usd, "
        "spent_usd, safe_div(spent_usd, amount_usd) AS used_share, burn_rate_usd_per_h, "
        "burn_rate_low_usd_per_h, projected_usd, projected_exhausted_at, alerted_at, "
        f"exhausted_at, as_of FROM ui_budgets WHERE {_and(scoped)} "
        "AND ($start IS NULL OR period_end > $start) AND ($end IS NULL OR period_start < $end) "
        "QUALIFY row_number() OVER (PARTITION BY budget, period_start ORDER BY as_of DESC) = 1 "
        "ORDER BY period_start DESC, used_share DESC NULLS LAST, budget"
    )
    return {"span": _span_json(span), "budgets": _rows(cur, sql, _params(f, span.start, span.end))}


def quality(cur: duckdb.DuckDBPyConnection, f: Filters) -> dict[str, Any]:
    span = resolve(cur, f)
    p = _params(f, span.start, span.end)
    funnel = _rows(cur, metric_source(f) + view_select("task_funnel"), p)
    chart = _series(
        cur,
        f,
        span,
        ("task_success_rate", "escalation_rate", "retrieval_miss_rate", "tool_error_rate"),
    )
    tools = _rows(
        cur,
        over("tool_calls", f"SELECT * FROM main.tool_calls WHERE {event_where(f)}", "tool_errors"),
        p,
    )
    latency = _rows(
        cur,
        over("events", f"SELECT * FROM main.events WHERE {event_where(f)}", "latency_by_model"),
        p,
    )
    return {
        "span": _span_json(span),
        "funnel": funnel,
        "chart": chart,
        "tools": tools,
        "latency": latency,
    }


def _search_where(f: Filters, q: str) -> str:
    if q:
        # An id names one session, task or trace wherever it is in time.
        return _and(["(session_id = $q OR task_id = $q OR trace_id = $q)", *_dims_where(f)])
    return event_where(f)


def sessions(cur: duckdb.DuckDBPyConnection, f: Filters, q: str) -> dict[str, Any]:
    if len(q) > MAX_FILTER_LEN:
        raise BadRequest(f"bad q: longer than {MAX_FILTER_LEN} characters")
    span = resolve(cur, f)
    p = {**_params(f, span.start, span.end), "q": q}
    if not q:
        listing = _rows(
            cur,
            "SELECT session_id, any_value(agent_id) AS agent_id, "
            "any_value(tenant_id) AS tenant_id, count(DISTINCT task_id) AS tasks, "
            "count(*) AS events, count(*) FILTER (WHERE type = 'escalation') AS escalations, "
            "count(*) FILTER (WHERE status = 'error') AS tool_errors, "
            "sum(cost_usd) AS cost_usd, min(ts) AS first_ts, max(ts) AS last_ts "
            f"FROM events WHERE session_id IS NOT NULL AND {event_where(f)} "
            "GROUP BY session_id ORDER BY last_ts DESC, session_id LIMIT 50",
            p,
        )
        return {"span": _span_json(span), "q": q, "sessions": listing, "events": None}
    events = _rows(cur, events_sql(f, q), p)
    return {"span": _span_json(span), "q": q, "sessions": None, "events": events}


def events_sql(f: Filters, q: str, limit: int = MAX_ROWS) -> str:
    """The events of a search (an id) or of the range, oldest first."""
    return (
        f"SELECT {_EVENT_COLUMNS} FROM events WHERE {_search_where(f, q)} "
        f"ORDER BY ts, event_id LIMIT {int(limit)}"
    )


def events_csv(cur: duckdb.DuckDBPyConnection, f: Filters, q: str, limit: int) -> bytes:
    """The events of a search as CSV (``sessions`` shows the same rows)."""
    import io

    import pyarrow.csv as pacsv

    span = resolve(cur, f)
    p = {**_params(f, span.start, span.end), "q": q}
    sql = events_sql(f, q, limit)
    table = cur.execute(sql, _used(sql, p)).to_arrow_table()
    buf = io.BytesIO()
    pacsv.write_csv(table, buf)
    return buf.getvalue()


def dead_letters(cur: duckdb.DuckDBPyConnection, _f: Filters) -> dict[str, Any]:
    """Recent rejects and their reasons: not filtered by the key (a reject may have none)
    nor by event time (it may have none either); newest first by arrival."""
    # The total rides on the per-field query (a window over every group, before the
    # LIMIT): one scan of the table less.
    by_field = _rows(
        cur,
        "SELECT coalesce(field, '(message)') AS field, count(*) AS rejects, "
        "max(received_at) AS last_at, first(reason ORDER BY received_at DESC) AS last_reason, "
        "sum(count(*)) OVER () AS total "
        "FROM dead_letters GROUP BY ALL ORDER BY rejects DESC, field LIMIT 20",
        {},
    )
    total = int(by_field["rows"][0][-1]) if by_field["rows"] else 0
    by_field = {
        "columns": by_field["columns"][:-1],
        "rows": [r[:-1] for r in by_field["rows"]],
    }
    recent = _rows(
        cur,
        'SELECT received_at, reason, field, topic, "partition", "offset", '
        "left(raw_text, 300) AS raw_text FROM dead_letters "
        'ORDER BY received_at DESC, "offset" DESC LIMIT 100',
        {},
    )
    return {"total": total, "by_field": by_field, "recent": recent}


def options(cur: duckdb.DuckDBPyConnection, f: Filters) -> dict[str, list[str]]:
    """The values each filter can take (from the metrics keys), for the page's pickers."""
    out = {}
    for key, column in FILTERS.items():
        rows = cur.execute(
            f"SELECT DISTINCT {column} FROM ui_metric_windows "
            f"WHERE level = 'key' AND {column} IS NOT NULL "
            f"ORDER BY 1 LIMIT {MAX_ROWS}"
        ).fetchall()
        out[key] = [r[0] for r in rows]
    return out
