"""The lake (sinks/lake.py): DuckLake tables, one transaction a flush, positions, maintenance,
import, and its read path (sinks/catalog.py). Real DuckDB and DuckLake, a real SQLite catalog
(PostgreSQL: tests/test_lake_postgres.py)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import schema
from pipeline.config import ConfigError, Settings
from pipeline.schema import (
    Escalation,
    Feedback,
    Guardrail,
    LlmCall,
    Retrieval,
    Task,
    ToolCall,
)
from sinks.catalog import DEAD_LETTERS, EVENTS, QueryError, connect, prepare
from sinks.lake import (
    CATALOG_FILE,
    INLINE_ROWS,
    Fenced,
    Flush,
    LakeError,
    LakeTable,
    LakeWriter,
    catalog_label,
    is_conflict,
)
from sinks.maintenance import maintain, status
from sinks.migrate import import_lake
from sinks.query import read_only_query
from sinks.tables import DEAD_LETTERS_SCHEMA, events_to_table
from tests.helpers import REPO, run_cli

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


def tools(partition: int, first: int, last: int, ts: datetime = T0) -> pa.Table:
    """One tool call per offset ``first..last``."""
    offsets = range(first, last + 1)
    return table_of([tool(f"p{partition}-{o}", ts) for o in offsets], partition, list(offsets))


def rows(data_dir: Path, sql: str) -> list[tuple[Any, ...]]:
    return connect(data_dir).sql(sql).fetchall()


# --- landing ---------------------------------------------------------------------------------


def test_a_flush_lands_rows_positions_and_checkpoint_together(tmp_path: Path) -> None:
    lake = prepare(tmp_path)
    lake.claim("t", {0: 0, 1: 0}, "g")
    lake.commit(
        Flush(
            rows={EVENTS.name: pa.concat_tables([tools(0, 0, 9), tools(1, 0, 4)])},
            positions={("t", 0): (0, 10), ("t", 1): (0, 5)},
            checkpoints={"lin": 1},
            group_id="g",
        )
    )
    assert lake.positions("t") == {0: 10, 1: 5}
    assert lake.checkpoints() == {"lin": 1}
    assert rows(tmp_path, "SELECT count(*), count(DISTINCT event_id) FROM events") == [(15, 15)]
    # The partition column is the UTC date of the time column.
    late_evening = datetime(2026, 1, 5, 23, 30, tzinfo=UTC).astimezone(
        __import__("zoneinfo").ZoneInfo("America/New_York")
    )
    lake.commit(Flush(rows={EVENTS.name: tools(2, 0, 0, late_evening)}))
    assert rows(tmp_path, "SELECT DISTINCT date FROM events ORDER BY 1") == [(T0.date(),)]


def test_a_failed_flush_lands_nothing(tmp_path: Path) -> None:
    lake = prepare(tmp_path)
    lake.claim("t", {0: 0}, "g")
    with pytest.raises(KeyError):
        # events are inserted, then the unknown table fails the transaction
        lake.commit(
            Flush(
                rows={EVENTS.name: tools(0, 0, 9), "no_such_table": tools(0, 0, 0)},
                positions={("t", 0): (0, 10)},
            )
        )
    assert lake.positions("t") == {0: 0}
    assert rows(tmp_path, "SELECT count(*) FROM events") == [(0,)]


def test_a_second_writer_of_a_partition_is_fenced(tmp_path: Path) -> None:
    """Two writers start from the same position: the second one's flush lands nothing."""
    a = prepare(tmp_path)
    b = LakeWriter(tmp_path, [EVENTS, DEAD_LETTERS])
    a.claim("t", {0: 0}, "g")
    a.commit(Flush(rows={EVENTS.name: tools(0, 0, 9)}, positions={("t", 0): (0, 10)}))
    with pytest.raises(Fenced, match="no longer at offset 0"):
        b.commit(Flush(rows={EVENTS.name: tools(0, 0, 9)}, positions={("t", 0): (0, 10)}))
    assert rows(tmp_path, "SELECT count(*), count(DISTINCT event_id) FROM events") == [(10, 10)]
    assert b.positions("t") == {0: 10}


def test_one_stale_partition_of_many_fences_the_whole_flush(tmp_path: Path) -> None:
    """Positions move in one statement: one partition not where the flush expects it refuses
    the flush, and the other partitions stay where they were."""
    lake = prepare(tmp_path)
    lake.claim("t", dict.fromkeys(range(24), 0), "g")
    lake.commit(Flush(positions={("t", p): (0, 5 + p) for p in range(24)}, group_id="g"))
    assert lake.positions("t") == {p: 5 + p for p in range(24)}
    moves = {("t", p): (5 + p, 50) for p in range(24)}
    moves[("t", 17)] = (0, 50)  # a writer that missed another's flush of partition 17
    with pytest.raises(Fenced, match="partition t/17 is no longer at offset 0"):
        lake.commit(Flush(rows={EVENTS.name: tools(17, 0, 9)}, positions=moves))
    assert lake.positions("t") == {p: 5 + p for p in range(24)}
    assert rows(tmp_path, "SELECT count(*) FROM events") == [(0,)]


def test_a_partition_claimed_twice_moves_both_rows(tmp_path: Path) -> None:
    """Two workers starting together may both claim a partition: its rows move together."""
    lake = prepare(tmp_path)
    lake.con.execute("INSERT INTO lake.kafka_offsets VALUES ('t', 0, 0, 'a', now())")
    lake.con.execute("INSERT INTO lake.kafka_offsets VALUES ('t', 0, 0, 'b', now())")
    lake.commit(Flush(positions={("t", 0): (0, 10)}, group_id="g"))
    moved = lake.con.execute("SELECT next_offset, group_id FROM lake.kafka_offsets").fetchall()
    assert moved == [(10, "g"), (10, "g")]


def test_concurrent_writers_of_one_partition_never_both_land(tmp_path: Path) -> None:
    """Both transactions open before either commits (two processes' view of the catalog):
    the catalog lets one of them through."""
    prepare(tmp_path).claim("t", {0: 0}, "g")
    cons = []
    for _ in range(2):
        con = duckdb.connect()
        from sinks.lake import attach

        attach(con, tmp_path, read_only=False)
        con.execute("BEGIN")
        con.execute(
            "UPDATE lake.kafka_offsets SET next_offset = 10 WHERE partition = 0 AND next_offset = 0"
        )
        con.register("r", tools(0, 0, 9))
        con.execute("INSERT INTO lake.events BY NAME SELECT *, ts::DATE AS date FROM r")
        cons.append(con)
    cons[0].execute("COMMIT")
    with pytest.raises(duckdb.Error) as err:
        cons[1].execute("COMMIT")
    assert rows(tmp_path, "SELECT count(*) FROM events") == [(10,)]
    # With the SQLite catalog the loser finds the write lock taken: a conflict (retried at
    # once by the worker), recognised by its class and SQLite's text (pinned here).
    assert isinstance(err.value, duckdb.TransactionException), repr(err.value)
    assert is_conflict(err.value), repr(err.value)
    assert not is_conflict(duckdb.IOException("database is locked"))


def test_a_commit_refused_by_another_writer_lands_on_retry_with_its_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another writer commits while this writer's transaction is open (both move positions,
    other partitions): the COMMIT is refused, the same transaction is tried again with the
    Parquet files already written, and it lands once."""
    from sinks.lake import attach, lake_connection

    lake = prepare(tmp_path)
    lake.claim("t", {0: 0, 1: 0}, "g")
    other = lake_connection()
    attach(other, tmp_path, read_only=False)
    move = lake._move_positions
    refused: list[int] = []

    def move_while_another_commits(flush: Flush) -> None:
        move(flush)
        if not refused:  # the first attempt only: the other writer lands in between
            other.execute("BEGIN")
            other.execute(
                "UPDATE lake.kafka_offsets SET next_offset = 5 "
                "WHERE partition = 1 AND next_offset = 0"
            )
            other.execute("COMMIT")

    monkeypatch.setattr(lake, "_move_positions", move_while_another_commits)
    lake.commit(
        Flush(rows={EVENTS.name: tools(0, 0, 99)}, positions={("t", 0): (0, 100)}),
        on_conflict=lambda: refused.append(1),
    )
    assert refused == [1]
    assert rows(tmp_path, "SELECT count(*), count(DISTINCT event_id) FROM events") == [(100, 100)]
    assert lake.positions("t") == {0: 100, 1: 5}
    # The files written once are the ones registered: the retry wrote none of its own.
    on_disk = sorted(str(f) for f in (tmp_path / "lake" / "main" / "events").rglob("*.parquet"))
    listed = lake.con.execute("SELECT data_file FROM ducklake_list_files('lake', 'events')")
    assert sorted(str(r[0]) for r in listed.fetchall()) == on_disk and on_disk


def test_replaced_rows_keep_one_per_key(tmp_path: Path) -> None:
    from sinks.catalog import BUDGETS

    lake = prepare(tmp_path)
    row = {f.name: None for f in BUDGETS.schema}
    row.update(
        budget="tenant:a=1/day",
        scope="tenant",
        scope_id="a",
        period="day",
        period_start=T0,
        period_end=T0 + timedelta(days=1),
        amount_usd=1.0,
        spent_usd=0.5,
        as_of=T0,
    )
    for spent in (0.5, 0.7, 0.9):
        lake.append(
            BUDGETS.name, pa.Table.from_pylist([{**row, "spent_usd": spent}], BUDGETS.schema)
        )
    assert rows(tmp_path, "SELECT spent_usd FROM budgets") == [(0.9,)]


def test_readers_see_whole_flushes_while_the_writer_lands(tmp_path: Path) -> None:
    lake = prepare(tmp_path)
    lake.claim("t", {0: 0}, "g")
    seen: list[int] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            seen.append(connect(tmp_path).sql("SELECT count(*) FROM events").fetchall()[0][0])

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(20):
            lake.commit(
                Flush(
                    rows={EVENTS.name: tools(0, i * 50, i * 50 + 49)},
                    positions={("t", 0): (i * 50, i * 50 + 50)},
                )
            )
    finally:
        done.set()
        reader.join()
    assert seen and all(n % 50 == 0 for n in seen), seen
    assert rows(tmp_path, "SELECT count(*) FROM events") == [(1000,)]


# --- maintenance and status ----------------------------------------------------------------


def test_maintenance_merges_small_files_and_keeps_every_row(tmp_path: Path) -> None:
    lake = prepare(tmp_path)
    lake.claim("t", {0: 0}, "g")
    for i in range(30):
        lake.commit(
            Flush(
                rows={EVENTS.name: tools(0, i * 100, i * 100 + 99)},
                positions={("t", 0): (i * 100, i * 100 + 100)},
            )
        )
    before = rows(
        tmp_path, "SELECT count(*), count(DISTINCT event_id), sum(kafka_offset) FROM events"
    )
    done = maintain(tmp_path, retention=timedelta(0), query_grace=timedelta(0))
    assert done.files_before >= 30
    files = dict(
        connect(tmp_path)
        .execute("SELECT table_name, file_count FROM ducklake_table_info('lake')")
        .fetchall()
    )
    assert files["events"] == 1  # one table, one date
    # Positions stay one file per writer's rows (sinks.lake): only the current one is left.
    assert done.files_after == files["events"] + files["kafka_offsets"] == 2
    assert done.snapshots_expired > 0 and done.files_deleted >= 30
    assert (
        rows(tmp_path, "SELECT count(*), count(DISTINCT event_id), sum(kafka_offset) FROM events")
        == before
    )
    on_disk = list((tmp_path / "lake" / "main" / "events").rglob("*.parquet"))
    assert len(on_disk) == 1, on_disk
    text = status(tmp_path)
    assert "events" in text and "3,000" in text and "t/0 @ 3,000" in text


def test_maintenance_with_a_day_of_time_travel_keeps_old_snapshots(tmp_path: Path) -> None:
    lake = prepare(tmp_path)
    for i in range(5):
        lake.append(EVENTS.name, tools(0, i * 10, i * 10 + 9))
    done = maintain(tmp_path)
    assert done.files_after == 1 and done.snapshots_expired == 0 and done.files_deleted == 0
    assert rows(tmp_path, "SELECT count(*) FROM events") == [(50,)]


def test_raw_event_retention_drops_old_days_only(tmp_path: Path) -> None:
    lake = prepare(tmp_path)
    now = datetime.now(UTC)
    lake.append(EVENTS.name, tools(0, 0, 9, now - timedelta(days=10)))
    lake.append(EVENTS.name, tools(0, 10, 14, now))
    done = maintain(tmp_path, events_retention_days=3)
    assert done.rows_expired == 10
    assert rows(tmp_path, "SELECT count(*) FROM events") == [(5,)]


# --- the read path ---------------------------------------------------------------------------

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
    lake.append(EVENTS.name, table_of(events, 0, range(len(events))))
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


def test_the_duckdb_one_liner_opens_the_lake(tmp_path: Path) -> None:
    """What the README shows: plain duckdb, ATTACH, USE: tables and per-type views."""
    lake = prepare(tmp_path / "lake")
    events = all_types()
    lake.append(EVENTS.name, table_of(events, 0, range(len(events))))
    code = (
        "import duckdb, sys; con = duckdb.connect(); "
        "con.execute(f\"ATTACH 'ducklake:sqlite:{sys.argv[1]}/lake.sqlite' AS lake (READ_ONLY)\"); "
        "con.execute('USE lake'); "
        "print(con.sql('SELECT count(*) FROM events').fetchall()[0][0], "
        "con.sql('SELECT count(*) FROM tasks').fetchall()[0][0])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "lake")],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    assert out.stdout.split() == [str(len(events)), "4"]


def test_a_moved_lake_still_reads(tmp_path: Path) -> None:
    import shutil

    lake = prepare(tmp_path / "a")
    lake.append(EVENTS.name, tools(0, 0, 9))
    lake.close()
    shutil.move(tmp_path / "a", tmp_path / "b")
    assert rows(tmp_path / "b", "SELECT count(*) FROM events") == [(10,)]


@pytest.mark.parametrize("name", ["lake [1]", "lake*?", "it's"])
def test_the_lake_reads_when_the_data_dir_has_odd_characters(tmp_path: Path, name: str) -> None:
    data_dir = tmp_path / name
    # 5 rows are inlined in the catalog, 50 go to a file that the transaction registers.
    prepare(data_dir).append(EVENTS.name, tools(0, 0, 4))
    prepare(data_dir).append(EVENTS.name, tools(0, 5, 54))
    assert rows(data_dir, "SELECT count(*) FROM events") == [(55,)]
    got = read_only_query(data_dir, "SELECT count(*) FROM events")
    assert got is not None and got.fetchall() == [(55,)]


# --- mistakes --------------------------------------------------------------------------------


def test_connect_refuses_a_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(QueryError, match="does not exist"):
        connect(tmp_path / "nowhere")


def test_a_folder_that_is_not_a_lake_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(QueryError, match=f"is not an agentstream lake \\(no {CATALOG_FILE}\\)"):
        connect(tmp_path)
    (tmp_path / "events").mkdir()
    with pytest.raises(QueryError, match="agentstream lake import"):
        connect(tmp_path)


def test_a_lake_of_a_newer_layout_is_refused(tmp_path: Path) -> None:
    lake = prepare(tmp_path)
    lake.con.execute("INSERT INTO lake.agentstream_lake VALUES (99, now())")
    with pytest.raises(QueryError, match="layout version 99, newer"):
        connect(tmp_path)


def test_a_snapshot_replaced_a_moment_ago_is_not_expired_however_old(tmp_path: Path) -> None:
    """A query reads the snapshot that was the latest when it began: expiring it the instant
    a commit replaces it (DuckLake's ``older_than`` counts from its creation, an hour ago
    here) would take its files from under the query. Even with a retention of 0s, only
    snapshots replaced at least ``QUERY_GRACE`` ago go."""
    lake = prepare(tmp_path)
    for i in range(4):
        lake.commit(Flush(rows={EVENTS.name: tools(0, i * 50, i * 50 + 49)}))
    # Time passes (an hour, one second a snapshot), then the next commit replaces the latest.
    catalog = sqlite3.connect(tmp_path / CATALOG_FILE)
    ids = [r[0] for r in catalog.execute("SELECT snapshot_id FROM ducklake_snapshot ORDER BY 1")]
    hour_ago = datetime.now(UTC) - timedelta(hours=1)
    with catalog:
        for i, sid in enumerate(ids):
            when = (hour_ago + timedelta(seconds=i)).strftime("%Y-%m-%d %H:%M:%S.%f+00")
            catalog.execute(
                "UPDATE ducklake_snapshot SET snapshot_time = ? WHERE snapshot_id = ?", [when, sid]
            )
    catalog.close()
    replaced = ids[-1]
    lake.commit(Flush(rows={EVENTS.name: tools(0, 200, 249)}))
    lake.close()

    done = maintain(tmp_path, retention=timedelta(0))
    kept = [r[0] for r in rows(tmp_path, "SELECT snapshot_id FROM ducklake_snapshots('lake')")]
    assert done.snapshots_expired == len(ids) - 1
    # Kept: the one replaced a moment ago, and the newer ones (the commit, the pass's merge).
    assert kept[0] == replaced and all(k > replaced for k in kept[1:]), kept
    at = rows(tmp_path, f"SELECT count(*) FROM lake.events AT (VERSION => {replaced})")
    assert at == [(200,)]
    # Without the grace (nothing reads): everything but the latest goes.
    again = maintain(tmp_path, retention=timedelta(0), query_grace=timedelta(0))
    assert again.snapshots_expired == len(kept) - 1


def test_lake_maintain_command_merges_with_the_settings_it_is_given(tmp_path: Path) -> None:
    """``agentstream lake maintain``: its --retention and AGENTSTREAM_LAKE_QUERY_GRACE reach
    the pass (a grace of 0s frees the merged-away files at once: one left on disk)."""
    lake = prepare(tmp_path)
    for i in range(5):
        lake.commit(Flush(rows={EVENTS.name: tools(0, i * 20, i * 20 + 19)}))
    lake.close()
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(REPO),
        "HOME": str(tmp_path),  # DuckDB installs its extensions under it
        "AGENTSTREAM_LAKE_QUERY_GRACE": "0s",
    }
    done = run_cli("lake", "maintain", "--data-dir", str(tmp_path), "--retention", "0s", env=env)
    assert done.returncode == 0, done.stderr
    assert f"maintained {tmp_path}: data files 5 -> 1" in done.stdout, done.stdout
    on_disk = list((tmp_path / "lake" / "main" / "events").rglob("*.parquet"))
    assert len(on_disk) == 1, on_disk
    assert rows(tmp_path, "SELECT count(*), count(DISTINCT event_id) FROM events") == [(100, 100)]
    bad = run_cli("lake", "maintain", "--data-dir", str(tmp_path), "--retention", "soon", env=env)
    assert bad.returncode != 0 and "lake_retention" in bad.stderr and "Traceback" not in bad.stderr


def test_a_catalog_is_named_for_people_without_its_password() -> None:
    spec = "postgres:host=db.internal port=5433 password=hunter2 dbname=lake user=ops"
    label = catalog_label(spec)
    assert label == "PostgreSQL catalog host=db.internal port=5433 dbname=lake user=ops"
    assert catalog_label("sqlite:/data/lake.sqlite") == "SQLite catalog /data/lake.sqlite"


def test_a_catalog_from_a_newer_ducklake_is_refused(tmp_path: Path) -> None:
    prepare(tmp_path).close()
    import sqlite3

    with sqlite3.connect(tmp_path / CATALOG_FILE) as db:
        db.execute("UPDATE ducklake_metadata SET value = '9.0' WHERE key = 'version'")
    db.close()
    with pytest.raises(QueryError) as err:
        connect(tmp_path)
    assert "9.0" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"AGENTSTREAM_LAKE_RETENTION": "forever"}, "bad lake_retention 'forever'"),
        ({"AGENTSTREAM_LAKE_RETENTION": "-1d"}, "bad lake_retention"),
        ({"AGENTSTREAM_LAKE_QUERY_GRACE": "soon"}, "bad lake_query_grace 'soon'"),
        ({"AGENTSTREAM_EVENTS_RETENTION_DAYS": "-2"}, "must be >= 0"),
        ({"AGENTSTREAM_CATALOG": "mysql:db"}, "bad catalog 'mysql:db'"),
    ],
)
def test_bad_lake_settings_are_one_line(env: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("(", "\\(")):
        Settings.load(env)


# --- import of a lake of Parquet folders -----------------------------------------------------


def old_lake(root: Path) -> None:
    """The layout agentstream wrote before DuckLake: hive folders, files named by offsets."""
    for part, (first, last) in {0: (0, 9), 1: (0, 4)}.items():
        folder = root / "events" / "date=2026-01-05" / "type=tool_call"
        folder.mkdir(parents=True, exist_ok=True)
        t = tools(part, first, last).drop_columns(["type"])
        pq.write_table(t, folder / f"ev~{part}~{first:019d}~{last:019d}.parquet")
    folder = root / "dead_letters" / "date=2026-01-05"
    folder.mkdir(parents=True)
    dead = pa.Table.from_pylist(
        [
            {
                "reason": "bad",
                "topic": "ev",
                "partition": 0,
                "offset": 10,
                "raw": b"x",
                "received_at": T0,
            }
        ],
        DEAD_LETTERS_SCHEMA,
    )
    pq.write_table(dead, folder / f"ev~0~{10:019d}~{10:019d}.parquet")
    pq.write_table(EVENTS.schema.empty_table(), root / "events" / "_schema.parquet")


def test_import_brings_an_old_lake_in_exactly_once(tmp_path: Path) -> None:
    old_lake(tmp_path / "old")
    lake = prepare(tmp_path / "new")
    first = import_lake(lake, tmp_path / "old", [EVENTS, DEAD_LETTERS])
    assert (first.files, first.rows, first.skipped) == (3, 16, 0)
    again = import_lake(lake, tmp_path / "old", [EVENTS, DEAD_LETTERS])
    assert (again.files, again.rows, again.skipped) == (0, 0, 3)
    assert rows(tmp_path / "new", "SELECT type, count(*) FROM events GROUP BY 1") == [
        ("tool_call", 15)
    ]
    assert rows(tmp_path / "new", "SELECT count(*) FROM dead_letters") == [(1,)]
    # A worker reads on after the imported offsets.
    assert lake.positions("ev") == {0: 11, 1: 5}


def test_import_of_a_folder_that_is_no_lake_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LakeError, match="is not a lake of Parquet folders"):
        import_lake(prepare(tmp_path / "new"), tmp_path, [EVENTS])


# --- landing through Parquet files (sinks.datafiles) ---------------------------------------


def sample_rows(table: LakeTable, n: int) -> pa.Table:
    """``n`` rows of ``table`` with a value of its type in every column, over two dates."""

    def value(typ: pa.DataType, i: int) -> Any:
        if pa.types.is_timestamp(typ):
            return T0 + timedelta(hours=20 * (i % 2), seconds=i)
        if pa.types.is_boolean(typ):
            return i % 2 == 0
        if pa.types.is_integer(typ):
            return i
        if pa.types.is_floating(typ):
            return i / 4
        if pa.types.is_binary(typ):
            return f"b{i}".encode()
        if pa.types.is_list(typ):
            return [value(typ.value_type, i), value(typ.value_type, i + 1)]
        if pa.types.is_struct(typ):
            return {f.name: value(f.type, i) for f in typ}
        return f"{typ}-{i}"

    return pa.Table.from_pylist(
        [{f.name: value(f.type, i) for f in table.schema} for i in range(n)], table.schema
    )


def test_every_table_lands_through_files_as_through_duckdb(tmp_path: Path) -> None:
    """A flush of more than INLINE_ROWS rows a table is written by pyarrow and registered;
    every column of every table reads back exactly as DuckDB's own INSERT lands it."""
    from sinks.catalog import TABLES

    lake = prepare(tmp_path / "files")
    plain = prepare(tmp_path / "insert")
    flush = Flush(rows={t.name: sample_rows(t, INLINE_ROWS + 5) for t in TABLES})
    lake.commit(flush)
    for t in TABLES:
        plain.insert(t, flush.rows[t.name])
        got = connect(tmp_path / "files").sql(f"SELECT * FROM {t.name} ORDER BY ALL").fetchall()
        want = connect(tmp_path / "insert").sql(f"SELECT * FROM {t.name} ORDER BY ALL").fetchall()
        assert len(got) == INLINE_ROWS + 5 and got == want, t.name
    # Two dates, one file each, partitioned like DuckLake's own files (pruned by date).
    con = connect(tmp_path / "files")
    files = con.sql("SELECT data_file FROM ducklake_list_files('lake', 'events')").fetchall()
    assert sorted(Path(f).parent.name for (f,) in files) == ["date=2026-01-05", "date=2026-01-06"]
    plan = con.sql("EXPLAIN ANALYZE SELECT count(*) FROM events WHERE date = '2026-01-06'")
    assert "Total Files Read: 1" in str(plan.fetchall())


def test_files_of_a_flush_that_did_not_land_are_removed(tmp_path: Path) -> None:
    """Fenced (or failing) before the commit: the files written for it go at once."""
    lake = prepare(tmp_path)
    lake.claim("t", {0: 0}, "g")
    lake.commit(Flush(rows={EVENTS.name: tools(0, 0, 99)}, positions={("t", 0): (0, 100)}))
    on_disk = set((tmp_path / "lake").rglob("*.parquet"))
    with pytest.raises(Fenced):
        lake.commit(Flush(rows={EVENTS.name: tools(0, 0, 99)}, positions={("t", 0): (0, 100)}))
    assert set((tmp_path / "lake").rglob("*.parquet")) == on_disk
    assert rows(tmp_path, "SELECT count(*), count(DISTINCT event_id) FROM events") == [(100, 100)]


def test_files_of_a_writer_killed_before_its_commit_are_never_seen_and_cleaned(
    tmp_path: Path,
) -> None:
    """A writer process killed between writing a flush's files and its commit: no reader sees
    them, the replay lands the rows once, and maintenance deletes the orphans."""
    lake = prepare(tmp_path)
    lake.claim("t", {0: 0}, "g")
    lake.close()
    script = f"""
import os
from pathlib import Path
from tests.test_lake import tools
from sinks.catalog import EVENTS, prepare
from sinks.lake import Flush
lake = prepare(Path({str(tmp_path)!r}))
flush = Flush(rows={{EVENTS.name: tools(0, 0, 99)}}, positions={{("t", 0): (0, 100)}})
lake._write(flush, [EVENTS.name])
os._exit(9)  # killed between the files and the commit
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, timeout=120)
    assert done.returncode == 9
    orphans = list((tmp_path / "lake" / "main" / "events").rglob("*.parquet"))
    assert len(orphans) == 1
    assert rows(tmp_path, "SELECT count(*) FROM events") == [(0,)]
    lake = prepare(tmp_path)
    assert lake.positions("t") == {0: 0}
    lake.commit(Flush(rows={EVENTS.name: tools(0, 0, 99)}, positions={("t", 0): (0, 100)}))
    assert rows(tmp_path, "SELECT count(*), count(DISTINCT event_id) FROM events") == [(100, 100)]
    # Younger than the grace period (a live writer's files look the same): kept.
    maintain(tmp_path, retention=timedelta(0))
    assert all(p.exists() for p in orphans)
    old = time.time() - 11 * 60
    for p in orphans:
        os.utime(p, (old, old))
    done_ = maintain(tmp_path, retention=timedelta(0))
    assert done_.orphans_deleted == 1 and not any(p.exists() for p in orphans)
    assert rows(tmp_path, "SELECT count(*), count(DISTINCT event_id) FROM events") == [(100, 100)]
