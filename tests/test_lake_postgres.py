"""Several writers on one lake: the PostgreSQL catalog (a real server, tests/postgres.py).

Two worker processes of one consumer group land into the same lake at the same time; every
record lands exactly once, and each worker's commits carry the positions of its partitions.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from pipeline.broker import free_port
from sinks.catalog import EVENTS, connect, prepare
from sinks.lake import CATALOG_POINTER, Flush, attach, is_conflict, lake_connection
from tests.helpers import (
    generated_values,
    produce_raw,
    running_worker,
    unique_settings,
    wait_committed,
)
from tests.postgres import create_database, postgres_instance, postgres_server
from tests.test_lake import tools


@pytest.fixture(scope="module")
def catalog() -> Iterator[str]:
    with postgres_server() as dsn:
        yield dsn


def fresh(catalog: str, tmp_path: Path) -> str:
    """A database of its own on the server, so tests sharing it never meet."""
    name = "lake_" + re.sub(r"\W", "_", tmp_path.name)[-40:].lower()
    return create_database(catalog, name)


def test_concurrent_commits_one_lands_the_other_conflicts_and_lands_on_retry(
    catalog: str, tmp_path: Path
) -> None:
    """Two writers (other partitions) commit at the same time: DuckLake refuses the second
    (both update the positions table), which lands nothing; its retry lands."""
    dsn = fresh(catalog, tmp_path)
    prepare(tmp_path, dsn).claim("t", {0: 0, 1: 0}, "g")
    assert (tmp_path / CATALOG_POINTER).read_text().strip() == dsn
    cons = []
    for part in (0, 1):
        con = lake_connection()
        attach(con, tmp_path, dsn, read_only=False)
        con.execute("BEGIN")
        con.execute(
            "UPDATE lake.kafka_offsets SET next_offset = 10 WHERE partition = ? AND next_offset = 0",
            [part],
        )
        con.register("r", tools(part, 0, 9))
        con.execute("INSERT INTO lake.events BY NAME SELECT *, ts::DATE AS date FROM r")
        cons.append(con)
    cons[0].execute("COMMIT")
    with pytest.raises(duckdb.Error) as err:
        cons[1].execute("COMMIT")
    # DuckLake's own refusal, recognised by class and text (pinned here).
    assert isinstance(err.value, duckdb.TransactionException), repr(err.value)
    assert "Transaction conflict" in str(err.value) and is_conflict(err.value)
    # Readers need only the data dir: lake.catalog names the server.
    got = connect(tmp_path).sql("SELECT kafka_partition, count(*) FROM events GROUP BY 1")
    assert got.fetchall() == [(0, 10)]
    prepare(tmp_path, dsn).commit(
        Flush(rows={EVENTS.name: tools(1, 0, 9)}, positions={("t", 1): (0, 10)})
    )
    got = connect(tmp_path).sql(
        "SELECT kafka_partition, count(*) FROM events GROUP BY 1 ORDER BY 1"
    )
    assert got.fetchall() == [(0, 10), (1, 10)]


def test_two_workers_land_into_one_lake_concurrently(
    catalog: str, bootstrap: str, tmp_path: Path
) -> None:
    dsn = fresh(catalog, tmp_path)
    settings = unique_settings(bootstrap, tmp_path / "lake", catalog=dsn, partitions=4)
    other = settings.with_(web_port=free_port())
    values = generated_values(6000, seed=11)
    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
    with running_worker(settings, logs[0]) as a, running_worker(other, logs[1]) as b:
        # Both in the group before the traffic, so both land part of it.
        deadline = time.monotonic() + 120
        while not all("assigned partitions" in log.read_text() for log in logs):
            tails = "\n".join(log.read_text()[-3000:] for log in logs)
            assert a.poll() is None and b.poll() is None, f"a worker exited:\n{tails}"
            assert time.monotonic() < deadline, f"not both assigned in 120 s:\n{tails}"
            time.sleep(0.3)
        time.sleep(3)
        for at in range(0, len(values), 500):
            produce_raw(settings, values[at : at + 500])
        wait_committed(settings, len(values), a)
        landed = connect(settings.data_dir).sql(
            "SELECT count(*), count(DISTINCT event_id) FROM events"
        )
        assert landed.fetchall() == [(len(values), len(values))]
    flushing = [len(re.findall(r"flush: \d+ messages, [1-9]", log.read_text())) for log in logs]
    assert all(n > 0 for n in flushing), flushing  # both workers landed events
    con = connect(settings.data_dir)
    # Every partition's stored position (its highest row: two workers claiming a new
    # partition at once may both have written one) is where its events end.
    assert con.sql(
        "SELECT p.partition, p.next_offset = e.last + 1 FROM (SELECT partition, "
        "max(next_offset) AS next_offset FROM lake.kafka_offsets GROUP BY 1) p JOIN "
        "(SELECT kafka_partition, max(kafka_offset) AS last FROM events GROUP BY 1) e "
        "ON p.partition = e.kafka_partition ORDER BY 1"
    ).fetchall() == [(p, True) for p in range(4)]


def test_a_flush_without_positions_lands_on_postgres_too(catalog: str, tmp_path: Path) -> None:
    dsn = fresh(catalog, tmp_path)
    lake = prepare(tmp_path, dsn)
    lake.commit(Flush(rows={EVENTS.name: pa.concat_tables([tools(0, 0, 4)])}))
    assert connect(tmp_path).sql("SELECT count(*) FROM events").fetchall() == [(5,)]


def test_a_catalog_outage_at_commit_is_no_conflict_and_lands_nothing(tmp_path: Path) -> None:
    """The catalog's server goes down between the flush's statements and its COMMIT: the
    error is not taken for a conflict, nothing lands, and once the server is back the same
    flush lands exactly once."""
    with postgres_instance() as server:
        lake = prepare(tmp_path, server.dsn)
        lake.claim("t", {0: 0}, "g")
        lake.con.execute("BEGIN")
        lake.con.execute("UPDATE lake.kafka_offsets SET next_offset = 100 WHERE partition = 0")
        server.stop()
        with pytest.raises(duckdb.Error) as err:
            lake.con.execute("COMMIT")
        assert not is_conflict(err.value), repr(err.value)
        with suppress(duckdb.Error):
            lake.con.execute("ROLLBACK")
        flush = Flush(rows={EVENTS.name: tools(0, 0, 99)}, positions={("t", 0): (0, 100)})
        with pytest.raises(duckdb.Error) as err:
            lake.commit(flush)  # the catalog is down: nothing to commit to
        assert not is_conflict(err.value), repr(err.value)
        server.start()
        lake.commit(flush)
        assert lake.positions("t") == {0: 100}
        landed = connect(tmp_path).sql("SELECT count(*), count(DISTINCT event_id) FROM events")
        assert landed.fetchall() == [(100, 100)]
