"""`agentstream sql` opens the lake read-only: queries only, files under the lake only."""

from __future__ import annotations

from pathlib import Path

import pytest

from sinks.catalog import QueryError, prepare
from sinks.query import read_only_query


@pytest.mark.parametrize(
    ("sql", "words"),
    [
        ("COPY (SELECT 1) TO 'out.csv'", "not COPY"),
        ("CREATE TABLE t AS SELECT 1", "not CREATE"),
        ("DROP VIEW events", "not DROP"),
        ("ATTACH 'other.duckdb'", "not ATTACH"),
        ("INSTALL httpfs", "not LOAD"),
        ("SET threads = 1", "not SET"),
        ("SELECT 1; DELETE FROM events", "not DELETE"),
        ("SELECT * FROM read_csv('/etc/passwd')", "disabled by configuration"),
    ],
)
def test_anything_but_reading_the_lake_is_refused(tmp_path: Path, sql: str, words: str) -> None:
    prepare(tmp_path)
    with pytest.raises(QueryError) as err:
        rel = read_only_query(tmp_path, sql)
        assert rel is not None
        rel.fetchall()
    assert words in str(err.value)
    assert not (tmp_path / "out.csv").exists()


def test_queries_work(tmp_path: Path) -> None:
    prepare(tmp_path)
    rel = read_only_query(tmp_path, "WITH x AS (SELECT count(*) AS n FROM events) SELECT n FROM x")
    assert rel is not None and rel.fetchall() == [(0,)]
    rel = read_only_query(tmp_path, "DESCRIBE metrics")
    assert rel is not None and len(rel.fetchall()) > 40
