"""The live page's query building, without a browser: hostile URL parameters either become
bound parameters or a ``BadRequest`` naming them, never SQL text; and analysis views run over a
filtered source give the view's own numbers."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import ConfigError
from pipeline.generate import TrafficConfig, generate
from pipeline.ui import queries
from pipeline.ui.queries import FILTERS, BadRequest, Filters, parse_filters
from pipeline.ui.server import LakeReader, check_binding, merge_updates
from sinks.analysis import connect, install_views
from sinks.catalog import prepare
from sinks.contracts import EVENTS
from sinks.lake import LakeWriter
from sinks.tables import events_to_table

PARAMS = [*FILTERS, "range", "from", "to"]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(PARAMS), st.text(max_size=300)))
def test_any_url_parameters_parse_or_name_the_bad_one(params: dict[str, str]) -> None:
    try:
        f = parse_filters(params)
    except BadRequest as exc:
        assert str(exc).startswith(("bad ", "range custom")), exc
        return
    # Whatever was given, the SQL is the same as for any other values: only parameter names.
    plain = Filters(f.range, f.start, f.end, tuple((k, "v") for k, _ in f.dims))
    for build in (queries.metric_source, queries.event_where):
        assert build(f) == build(plain)
    for key, _ in f.dims:
        assert f"${key}" in queries.event_where(f)


def test_ranges_and_custom_times() -> None:
    assert parse_filters({}).range == queries.DEFAULT_RANGE
    f = parse_filters({"range": "custom", "from": "2026-01-05T09:00:00Z", "to": "2026-01-05T10:00"})
    assert f.start == datetime(2026, 1, 5, 9, tzinfo=UTC)
    assert f.end == datetime(2026, 1, 5, 10, tzinfo=UTC)  # no offset: UTC
    for bad in (
        {"range": "2h"},
        {"range": "custom", "from": "2026-01-05T09:00:00Z"},
        {"range": "custom", "from": "yesterday", "to": "2026-01-05T10:00:00Z"},
        {"range": "custom", "from": "2026-01-05T10:00:00Z", "to": "2026-01-05T09:00:00Z"},
        {"agent": "x" * 201},
    ):
        with pytest.raises(BadRequest):
            parse_filters(bad)


def test_views_over_a_filtered_source_equal_the_view(tmp_path: Path) -> None:
    """``over`` shadows a view's source with a CTE: over the whole source it is the view."""
    prepare(tmp_path)
    con = connect(tmp_path)
    install_views(con)
    for view, source in (
        ("tool_errors", "tool_calls"),
        ("latency_by_model", "events"),
        ("task_funnel", "metric_windows"),
        ("release_summary", "release_verdicts"),
        ("anomaly_conditions", "anomalies"),
    ):
        sql = queries.over(source, f"SELECT * FROM main.{source}", view)
        assert con.execute(sql).fetchall() == con.execute(f"SELECT * FROM {view}").fetchall()
        con.execute(f"SELECT * FROM ({sql}) LIMIT 0")


def test_snapshot_and_bounds_of_an_empty_lake(tmp_path: Path) -> None:
    prepare(tmp_path)
    con = connect(tmp_path)
    queries.snapshot(con)
    assert queries.bounds(con) == (None, None, 60.0)
    out = queries.overview(con, Filters())
    assert set(out["tiles"].values()) == {None}
    assert out["attention"]["rows"] == []


def test_binding_rules() -> None:
    check_binding("127.0.0.1", None)
    check_binding("::1", None)
    check_binding("localhost", None)
    with pytest.raises(ConfigError, match="AGENTSTREAM_UI_TOKEN"):
        check_binding("0.0.0.0", None)
    with pytest.raises(ConfigError, match="too short"):
        check_binding("0.0.0.0", "short")
    check_binding("0.0.0.0", "x" * 16)


def test_updates_are_merged_per_topic() -> None:
    merged = merge_updates(
        [
            {"event": "update", "topic": "metrics", "records": 3},
            {"event": "update", "topic": "anomalies", "records": 1, "alerts": [{"kind": "a"}]},
            {"event": "update", "topic": "metrics", "records": 2},
        ]
    )
    assert {m["topic"]: m["records"] for m in merged} == {"metrics": 5, "anomalies": 1}


def test_duckdb_cursor_interrupt_stops_a_query() -> None:
    """What the server's time bound relies on: interrupting a cursor ends its query."""
    import threading

    con = duckdb.connect()
    cur = con.cursor()
    timer = threading.Timer(0.2, cur.interrupt)
    timer.start()
    with pytest.raises(duckdb.InterruptException):
        cur.execute("SELECT count(*) FROM range(100000000000) a, range(10) b").fetchall()


def _land(writer: LakeWriter, n: int, seed: int) -> None:
    events = list(generate(TrafficConfig(events=n, seed=seed)))
    extras = {
        "cost_estimated": [False] * n,
        "late": [False] * n,
        "kafka_partition": [0] * n,
        "kafka_offset": list(range(n)),
    }
    writer.append(EVENTS.name, events_to_table(events, extras))


def test_answers_are_cached_per_data_version(tmp_path: Path) -> None:
    """A view asked again is answered from the cache until the worker's next commit; a
    refresh without a new commit copies nothing; after one, the answer counts the new events."""
    writer = prepare(tmp_path)
    _land(writer, 300, 1)
    reader = LakeReader(tmp_path)
    everything = Filters(range="all")

    async def overview() -> dict[str, Any]:
        return await reader.run_cached(queries.overview, everything)

    try:
        first = asyncio.run(overview())
        assert first["tiles"]["events"] == 300
        assert asyncio.run(overview()) is first  # from the cache
        version = reader.version
        assert version is not None
        assert reader.refresh() is False and reader.version == version
        assert asyncio.run(overview()) is first

        _land(writer, 200, 2)  # the worker's next commit
        assert reader.refresh() is True and reader.version != version
        again = asyncio.run(overview())
        assert again is not first and again["tiles"]["events"] == 500
        fresh = asyncio.run(reader.run(queries.overview, everything))
        assert fresh == again and fresh is not again
    finally:
        reader.close()
