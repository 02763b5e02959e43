"""The Parquet lake (sinks/parquet.py) and its DuckDB views (sinks/catalog.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import schema
from pipeline.schema import (
    Escalation,
    Feedback,
    Guardrail,
    LlmCall,
    Retrieval,
    Task,
    ToolCall,
)
from sinks.catalog import (
    DB_FILE,
    DEAD_LETTERS,
    EVENTS,
    connect,
    prepare,
    read_only_query,
    write_database,
)
from sinks.parquet import ParquetLake
from sinks.tables import DEAD_LETTERS_SCHEMA, events_to_table
from tests.helpers import REPO

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def env_(event_id: str, ts: datetime = T0, **extra: Any) -> dict[str, Any]:
    return {"event_id": event_id, "schema_version": 1, "ts": ts, "agent_id": "a", **extra}


def tool(event_id: str, ts: datetime = T0) -> ToolCall:
    return ToolCall(**env_(event_id, ts), tool_name="search", status="ok")


def table_of(
    events: Sequence[schema.AgentEvent], partition: int, offsets: Sequence[int]
) -> pa.Table:
    n = len(events)
    return events_to_table(
        events,
        {
            "cost_estimated": [False] * n,
            "late": [False] * n,
            "kafka_partition": [partition] * n,
            "kafka_offset": list(offsets),
        },
    )


def land_range(
    lake: ParquetLake, topic: str, partition: int, first: int, last: int, ts: datetime = T0
) -> list[Path]:
    """Land one tool call per offset ``first..last``, all on one date."""
    offsets = range(first, last + 1)
    events = [tool(f"{topic}-{partition}-{o}", ts) for o in offsets]
    landed = lake.land(
        EVENTS,
        table_of(events, partition, offsets),
        topic=topic,
        partition=partition,
        first=first,
        last=last,
    )
    return [f.path for f in landed]


def rows(data_dir: Path, sql: str) -> list[tuple[Any, ...]]:
    return connect(data_dir).sql(sql).fetchall()


def names(lake: ParquetLake) -> list[str]:
    return sorted(str(p.relative_to(lake.root)) for p in lake.files(EVENTS))


def name(topic: str, p: int, first: int, last: int) -> str:
    return f"{topic}~{p}~{first:019d}~{last:019d}.parquet"


# --- landing -------------------------------------------------------------------------------


def test_land_writes_the_hive_layout(tmp_path: Path) -> None:
    lake = prepare(tmp_path / "lake")
    events: list[schema.AgentEvent] = [
        tool("e0", T0),
        Task(**env_("e1", T0 + timedelta(minutes=5)), outcome="started"),
        tool("e2", T0 + timedelta(days=1)),
        tool("e3", T0 + timedelta(days=1, hours=1)),
        Task(**env_("e4", datetime(2026, 1, 6, 23, 59, 59, tzinfo=UTC)), outcome="completed"),
    ]
    landed = lake.land(
        EVENTS, table_of(events, 3, range(40, 45)), topic="ev.x-1", partition=3, first=40, last=44
    )
    file = name("ev.x-1", 3, 40, 44)
    expected = {
        f"events/date=2026-01-05/type=tool_call/{file}": 1,
        f"events/date=2026-01-05/type=task/{file}": 1,
        f"events/date=2026-01-06/type=tool_call/{file}": 2,
        f"events/date=2026-01-06/type=task/{file}": 1,
    }
    assert {str(f.path.relative_to(lake.root)): f.rows for f in landed} == expected
    assert names(lake) == sorted(expected)
    # Hive columns live in the path, not in the file; no temporaries are left.
    some = pq.read_table(landed[0].path)
    assert "date" not in some.column_names
    assert "type" not in some.column_names
    assert list(Path(lake.root).rglob("*.tmp")) == []
    assert rows(
        lake.root,
        "SELECT event_id, type, date::VARCHAR, kafka_partition, kafka_offset FROM events "
        "ORDER BY kafka_offset",
    ) == [
        ("e0", "tool_call", "2026-01-05", 3, 40),
        ("e1", "task", "2026-01-05", 3, 41),
        ("e2", "tool_call", "2026-01-06", 3, 42),
        ("e3", "tool_call", "2026-01-06", 3, 43),
        ("e4", "task", "2026-01-06", 3, 44),
    ]


def test_land_uses_the_utc_date_of_offset_timestamps(tmp_path: Path) -> None:
    lake = prepare(tmp_path / "lake")
    # 23:30 at -05:00 is 04:30 UTC the next day.
    ev = tool("late-evening", datetime.fromisoformat("2026-01-05T23:30:00-05:00"))
    (landed,) = lake.land(EVENTS, table_of([ev], 0, [7]), topic="t", partition=0, first=7, last=7)
    assert landed.path.parent.parent.name == "date=2026-01-06"


def test_land_nothing_writes_nothing(tmp_path: Path) -> None:
    lake = prepare(tmp_path / "lake")
    assert lake.land(EVENTS, table_of([], 0, []), topic="t", partition=0, first=0, last=0) == []
    assert names(lake) == []


def test_landing_the_same_range_twice_leaves_one_file(tmp_path: Path) -> None:
    lake = prepare(tmp_path / "lake")
    first = land_range(lake, "t", 0, 0, 99)
    before = rows(lake.root, "SELECT * EXCLUDE (date) FROM events ORDER BY kafka_offset")
    second = land_range(lake, "t", 0, 0, 99)
    assert first == second
    assert names(lake) == [f"events/date=2026-01-05/type=tool_call/{name('t', 0, 0, 99)}"]
    after = rows(lake.root, "SELECT * EXCLUDE (date) FROM events ORDER BY kafka_offset")
    assert after == before
    assert len(after) == 100
    assert rows(
        lake.root,
        "SELECT count(DISTINCT event_id), min(kafka_offset), max(kafka_offset) FROM events",
    ) == [(100, 0, 99)]


# --- discard_uncommitted -------------------------------------------------------------------


@pytest.fixture
def three_batches(tmp_path: Path) -> ParquetLake:
    """Topic t partition 0 in batches 0-9, 10-19, 20-29; partition 1 and topic u alongside."""
    lake = prepare(tmp_path / "lake")
    for first in (0, 10, 20):
        land_range(lake, "t", 0, first, first + 9)
    land_range(lake, "t", 1, 0, 29)
    land_range(lake, "u", 0, 0, 29)
    land_range(lake, "t", 10, 0, 29)  # partition 10 must not be taken for partition 1 or 0
    return lake


def offsets_by_source(lake: ParquetLake) -> dict[tuple[str, int], list[int]]:
    got: dict[tuple[str, int], list[int]] = {}
    for (event_id,) in rows(lake.root, "SELECT event_id FROM events ORDER BY event_id"):
        topic, part, offset = event_id.split("-")
        got.setdefault((topic, int(part)), []).append(int(offset))
    return {k: sorted(v) for k, v in got.items()}


def test_discard_removes_later_files_and_trims_the_straddling_one(
    three_batches: ParquetLake,
) -> None:
    lake = three_batches
    stale_tmp = (
        lake.table_dir(EVENTS) / "date=2026-01-05/type=tool_call" / f".{name('t', 0, 30, 39)}.tmp"
    )
    other_tmp = (
        lake.table_dir(EVENTS) / "date=2026-01-05/type=tool_call" / f".{name('t', 1, 30, 39)}.tmp"
    )
    stale_tmp.write_bytes(b"half a file")
    other_tmp.write_bytes(b"someone else's")

    assert lake.discard_uncommitted(EVENTS, "t", 0, 15) == 2

    folder = "events/date=2026-01-05/type=tool_call"
    assert names(lake) == sorted(
        [
            f"{folder}/{name('t', 0, 0, 9)}",
            f"{folder}/{name('t', 0, 10, 14)}",
            f"{folder}/{name('t', 1, 0, 29)}",
            f"{folder}/{name('t', 10, 0, 29)}",
            f"{folder}/{name('u', 0, 0, 29)}",
        ]
    )
    trimmed = pq.read_table(lake.root / folder / name("t", 0, 10, 14))
    assert trimmed.column("kafka_offset").to_pylist() == [10, 11, 12, 13, 14]
    assert trimmed.column("event_id").to_pylist() == [f"t-0-{o}" for o in range(10, 15)]
    assert offsets_by_source(lake) == {
        ("t", 0): list(range(15)),
        ("t", 1): list(range(30)),
        ("t", 10): list(range(30)),
        ("u", 0): list(range(30)),
    }
    assert not stale_tmp.exists()
    assert other_tmp.exists()


def test_discard_at_a_file_boundary_removes_whole_files_only(three_batches: ParquetLake) -> None:
    lake = three_batches
    assert lake.discard_uncommitted(EVENTS, "t", 0, 20) == 1
    assert offsets_by_source(lake)[("t", 0)] == list(range(20))
    assert lake.discard_uncommitted(EVENTS, "t", 0, 20) == 0  # idempotent
    assert lake.discard_uncommitted(EVENTS, "t", 0, 30) == 0  # nothing at/after 30
    assert lake.discard_uncommitted(EVENTS, "t", 0, 0) == 2
    assert ("t", 0) not in offsets_by_source(lake)
    assert offsets_by_source(lake)[("t", 1)] == list(range(30))


def test_discard_then_replay_lands_each_row_once(three_batches: ParquetLake) -> None:
    lake = three_batches
    lake.discard_uncommitted(EVENTS, "t", 0, 15)
    # The replay comes with different batch boundaries.
    land_range(lake, "t", 0, 15, 22)
    land_range(lake, "t", 0, 23, 29)
    assert offsets_by_source(lake)[("t", 0)] == list(range(30))
    assert rows(lake.root, "SELECT count(*), count(DISTINCT event_id) FROM events") == [(120, 120)]


def test_discard_dead_letters(tmp_path: Path) -> None:
    lake = prepare(tmp_path / "lake")

    def dead(offsets: range) -> pa.Table:
        n = len(offsets)
        return pa.Table.from_pydict(
            {
                "reason": ["malformed JSON"] * n,
                "field": [None] * n,
                "topic": ["t"] * n,
                "partition": [2] * n,
                "offset": list(offsets),
                "key": [b"k"] * n,
                "raw": [b"{"] * n,
                "raw_text": ["{"] * n,
                "kafka_timestamp": [T0] * n,
                "received_at": [T0 + timedelta(seconds=o) for o in offsets],
            },
            schema=DEAD_LETTERS_SCHEMA,
        )

    lake.land(DEAD_LETTERS, dead(range(0, 5)), topic="t", partition=2, first=0, last=5)
    lake.land(DEAD_LETTERS, dead(range(6, 9)), topic="t", partition=2, first=6, last=8)
    assert lake.discard_uncommitted(DEAD_LETTERS, "t", 2, 3) == 2
    assert rows(lake.root, 'SELECT "offset" FROM dead_letters ORDER BY 1') == [(0,), (1,), (2,)]
    assert sorted(p.name for p in lake.files(DEAD_LETTERS)) == [name("t", 2, 0, 2)]


# --- views ---------------------------------------------------------------------------------

EXPECTED_EVENT_COLUMNS = {
    "event_id": "VARCHAR",
    "schema_version": "BIGINT",
    "type": "VARCHAR",
    "ts": "TIMESTAMP WITH TIME ZONE",
    "agent_id": "VARCHAR",
    "agent_version": "VARCHAR",
    "prompt_version": "VARCHAR",
    "model": "VARCHAR",
    "provider": "VARCHAR",
    "tenant_id": "VARCHAR",
    "session_id": "VARCHAR",
    "task_id": "VARCHAR",
    "input_tokens": "BIGINT",
    "output_tokens": "BIGINT",
    "cost_usd": "DOUBLE",
    "latency_ms": "DOUBLE",
    "tool_name": "VARCHAR",
    "status": "VARCHAR",
    "hits": "BIGINT",
    "top_score": "DOUBLE",
    "miss": "BOOLEAN",
    "reason": "VARCHAR",
    "outcome": "VARCHAR",
    "cost_estimated": "BOOLEAN",
    "date": "DATE",
}


def test_views_bind_on_an_empty_lake(tmp_path: Path) -> None:
    data_dir = tmp_path / "lake"
    prepare(data_dir)
    con = connect(data_dir)
    described = {name: kind for name, kind, *_ in con.sql("DESCRIBE events").fetchall()}
    for column, kind in EXPECTED_EVENT_COLUMNS.items():
        assert described.get(column) == kind, column
    assert con.sql("SELECT count(*) FROM events").fetchall() == [(0,)]
    dead = {name: kind for name, kind, *_ in con.sql("DESCRIBE dead_letters").fetchall()}
    assert {
        c: dead.get(c) for c in ("reason", "topic", "partition", "offset", "raw", "received_at")
    } == {
        "reason": "VARCHAR",
        "topic": "VARCHAR",
        "partition": "INTEGER",
        "offset": "BIGINT",
        "raw": "BLOB",
        "received_at": "TIMESTAMP WITH TIME ZONE",
    }
    assert con.sql("SELECT count(*) FROM dead_letters").fetchall() == [(0,)]
    for view in (
        "llm_calls",
        "tool_calls",
        "retrievals",
        "escalations",
        "tasks",
        "feedback",
        "guardrails",
    ):
        assert con.sql(f"SELECT count(*) FROM {view}").fetchall() == [(0,)], view


def test_connect_refuses_a_missing_dir(tmp_path: Path) -> None:
    from sinks.catalog import QueryError

    with pytest.raises(QueryError, match="does not exist"):
        connect(tmp_path / "nowhere")


def all_types() -> list[schema.AgentEvent]:
    out: list[schema.AgentEvent] = []
    for i in range(2):
        out.append(
            LlmCall(**env_(f"llm{i}"), input_tokens=10 * (i + 1), output_tokens=1, cost_usd=0.5)
        )
    out.append(ToolCall(**env_("tool0"), tool_name="x", status="error", error_type="timeout"))
    for i in range(3):
        out.append(Retrieval(**env_(f"ret{i}"), hits=i))
    out.append(Escalation(**env_("esc0"), reason="asked"))
    for i in range(4):
        out.append(Task(**env_(f"task{i}"), outcome="started"))
    out.append(Feedback(**env_("fb0"), rating=1.0))
    for i in range(2):
        out.append(Guardrail(**env_(f"gr{i}"), policy_id="pii", action="block", reason="ssn"))
    out.append(
        schema.Release(
            **env_("rel0"),
            release_id="r-1",
            dimension="model",
            candidate="gpt-4o",
            baseline="gpt-4o-mini",
            traffic_share=0.25,
        )
    )
    return out


PER_TYPE = {
    "llm_calls": ("llm_call", ["llm0", "llm1"]),
    "tool_calls": ("tool_call", ["tool0"]),
    "retrievals": ("retrieval", ["ret0", "ret1", "ret2"]),
    "escalations": ("escalation", ["esc0"]),
    "tasks": ("task", ["task0", "task1", "task2", "task3"]),
    "feedback": ("feedback", ["fb0"]),
    "guardrails": ("guardrail", ["gr0", "gr1"]),
    "releases": ("release", ["rel0"]),
}


def test_per_type_views_return_only_their_type(tmp_path: Path) -> None:
    lake = prepare(tmp_path / "lake")
    events = all_types()
    lake.land(
        EVENTS,
        table_of(events, 0, range(len(events))),
        topic="t",
        partition=0,
        first=0,
        last=len(events) - 1,
    )
    con = connect(lake.root)
    assert con.sql("SELECT count(*) FROM events").fetchall() == [(len(events),)]
    for view, (type_, ids) in PER_TYPE.items():
        got = con.sql(f"SELECT type, event_id FROM {view} ORDER BY event_id").fetchall()
        assert got == [(type_, i) for i in ids], view
    llm_cols = con.sql("SELECT * FROM llm_calls").columns
    assert "cost_estimated" in llm_cols
    assert "input_tokens" in llm_cols
    assert "tool_name" not in llm_cols
    assert "cost_estimated" not in con.sql("SELECT * FROM tool_calls").columns
    assert con.sql("SELECT policy_id, action, reason FROM guardrails").fetchall() == [
        ("pii", "block", "ssn"),
        ("pii", "block", "ssn"),
    ]
    assert con.sql(
        "SELECT release_id, dimension, candidate, baseline, traffic_share, stage FROM releases"
    ).fetchall() == [("r-1", "model", "gpt-4o", "gpt-4o-mini", 0.25, "started")]
    assert "tool_name" not in con.sql("SELECT * FROM releases").columns
    assert con.sql("SELECT event_id, miss FROM retrievals ORDER BY 1").fetchall() == [
        ("ret0", True),
        ("ret1", False),
        ("ret2", False),
    ]


# --- the database file ---------------------------------------------------------------------

READER = """
import duckdb, sys
con = duckdb.connect(sys.argv[1], read_only=True)
print(con.sql("SELECT count(*) FROM events").fetchall()[0][0])
print(con.sql("SELECT count(*) FROM tasks").fetchall()[0][0])
print(con.sql("SELECT count(*) FROM dead_letters").fetchall()[0][0])
"""


def test_write_database_works_from_another_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    relative = Path("lake")
    path = write_database(relative)
    assert path == relative / DB_FILE
    assert (tmp_path / "lake" / DB_FILE).is_file()
    events = all_types()
    lake = ParquetLake(relative)
    lake.land(
        EVENTS,
        table_of(events, 0, range(len(events))),
        topic="t",
        partition=0,
        first=0,
        last=len(events) - 1,
    )

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    db = str(tmp_path / "lake" / DB_FILE)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # Our own read-only connection stays open while another process reads too.
    mine = duckdb.connect(db, read_only=True)
    try:
        assert mine.sql("SELECT count(*) FROM guardrails").fetchall() == [(2,)]
        proc = subprocess.run(
            [sys.executable, "-c", READER, db],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == [str(len(events)), "4", "0"]
    finally:
        mine.close()


def test_write_database_gives_way_to_another_writer(tmp_path: Path) -> None:
    data_dir = tmp_path / "lake"
    path = write_database(data_dir)
    assert path is not None
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys; c = duckdb.connect(sys.argv[1]); print('ready', flush=True); "
            "sys.stdin.read()",
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        assert write_database(data_dir) is None
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    assert write_database(data_dir) == path


@pytest.mark.parametrize(("name", "lookalike"), [("lake [1]", "lake 1"), ("lake*?", "lake-x")])
def test_views_bind_when_the_data_dir_has_glob_characters(
    tmp_path: Path, name: str, lookalike: str
) -> None:
    data_dir = tmp_path / name
    lake = prepare(data_dir)
    land_range(lake, "t", 0, 0, 4)
    # A folder the name would match as a wildcard pattern must not be read.
    land_range(prepare(tmp_path / lookalike), "t", 0, 0, 2)
    assert rows(data_dir, "SELECT count(*) FROM events") == [(5,)]
    assert rows(data_dir, "SELECT count(*) FROM metrics") == [(0,)]
    # `agentstream sql` reads only under the data dir: its escaped globs included.
    got = read_only_query(data_dir, "SELECT count(*) FROM events")
    assert got is not None and got.fetchall() == [(5,)]
