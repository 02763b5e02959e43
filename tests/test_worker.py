"""The worker end to end on the real Apache Kafka broker: exact counts, dead letters, replays."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.broker import free_port
from pipeline.config import Settings
from pipeline.kafka import commit_offsets
from sinks.lake import LakeWriter
from tests.helpers import (
    consume_all,
    free_ports,
    generated_values,
    produce_raw,
    running_worker,
    scalar,
    unique_settings,
    wait_committed,
)

pytestmark = pytest.mark.timeout(300)

VALID_TEMPLATE = (
    b'{"type":"tool_call","event_id":"%s","schema_version":1,"ts":"2026-01-05T09:00:00Z",'
    b'"agent_id":"a1","tool_name":"search","status":"ok"}'
)

# Each invalid message and the words its dead-letter reason must contain.
INVALID: list[tuple[bytes | None, str]] = [
    (b'{"type":"llm_call", "event_id": ', "malformed JSON"),
    (b"not json at all", "malformed JSON"),
    (VALID_TEMPLATE.replace(b'"status":"ok"', b'"status":"maybe"') % b"bad-enum", "$.status"),
    (
        VALID_TEMPLATE.replace(b'"schema_version":1', b'"schema_version":"1"') % b"bad-type",
        "Expected `int`, got `str` - at `$.schema_version`",
    ),
    (
        VALID_TEMPLATE.replace(b'"agent_id":"a1",', b"") % b"missing",
        "missing required field `agent_id`",
    ),
    (
        VALID_TEMPLATE.replace(b'"type":"tool_call"', b'"type":"teleport"') % b"unknown",
        "unknown event type",
    ),
    (VALID_TEMPLATE.replace(b'"agent_id":"a1"', b'"agent_id":"a\xff\xfe"') % b"utf8", "not UTF-8"),
    (
        VALID_TEMPLATE.replace(b'"schema_version":1', b'"schema_version":9') % b"future",
        "unsupported schema_version 9",
    ),
    (
        VALID_TEMPLATE.replace(b"2026-01-05T09:00:00Z", b"1970-01-01T00:00:00Z") % b"epoch",
        "before 2000",
    ),
    (
        VALID_TEMPLATE.replace(b"2026-01-05T09:00:00Z", b"2026-01-05T09:00:00") % b"naive",
        "timezone",
    ),
    (b'{"pad":"' + b"x" * 70_000 + b'"}', "oversized message"),
    (None, "empty message"),
    (b"[1,2,3]", "an event is one JSON object"),
]


def test_mixed_valid_and_invalid_land_with_exact_counts(bootstrap: str, tmp_path: Path) -> None:
    settings = unique_settings(bootstrap, tmp_path / "lake", max_message_bytes=65_536)
    valid = generated_values(3000, seed=7)
    bad = [raw for raw, _ in INVALID]
    # Interleave so invalid messages sit between valid ones in every partition.
    mixed: list[bytes | None] = []
    for i, raw in enumerate(valid):
        mixed.append(raw)
        if i % 200 == 0 and i // 200 < len(bad):
            mixed.append(bad[i // 200])
    assert mixed.count(None) == 1 and len(mixed) == len(valid) + len(bad)
    produce_raw(settings, mixed)

    with running_worker(settings) as proc:
        wait_committed(settings, len(mixed), proc)

    lake = settings.data_dir
    assert scalar(lake, "SELECT count(*) FROM events") == len(valid)
    assert scalar(lake, "SELECT count(DISTINCT event_id) FROM events") == len(valid)
    assert scalar(lake, "SELECT count(*) FROM dead_letters") == len(bad)
    reasons = dict(
        (bytes(raw) if raw is not None else None, reason)
        for raw, reason in _rows(lake, "SELECT raw, reason FROM dead_letters")
    )
    for raw, words in INVALID:
        assert words in reasons[raw], (raw[:60] if raw else raw, reasons[raw])
    # The dead-letter topic carries the original bytes and the reason as a header.
    dlq = consume_all(settings, settings.dlq_topic, len(bad))
    assert sorted((r.value or b"") for r in dlq) == sorted((b or b"") for b in bad)
    for r in dlq:
        assert dict(r.headers)["agentstream.reason"].decode() == reasons[r.value]
    # Every landed row is traceable to exactly one Kafka record.
    assert scalar(
        lake, "SELECT count(DISTINCT (kafka_partition, kafka_offset)) FROM events"
    ) == len(valid)


def _rows(lake: Path, sql: str) -> list[tuple[object, ...]]:
    from sinks.catalog import connect

    return connect(lake).sql(sql).fetchall()


def test_rewound_kafka_offsets_do_not_land_rows_again(bootstrap: str, tmp_path: Path) -> None:
    """The lake's positions count, not the group's offsets in Kafka: rewinding those (as an
    operator might, or a crash between the lake's commit and Kafka's) lands nothing twice."""
    settings = unique_settings(bootstrap, tmp_path / "lake")
    values = generated_values(4000, seed=3)
    produce_raw(settings, values)
    with running_worker(settings) as proc:
        wait_committed(settings, len(values), proc)
    before = _rows(
        settings.data_dir, "SELECT event_id, kafka_partition, kafka_offset FROM events ORDER BY 1"
    )
    assert len(before) == len(values)
    ends = dict(
        _rows(
            settings.data_dir,
            "SELECT kafka_partition, max(kafka_offset) + 1 FROM events GROUP BY 1",
        )
    )
    asyncio.run(commit_offsets(settings, {0: 0, 1: ends[1] // 2}))
    more = generated_values(400, seed=4)
    produce_raw(settings, more, keys=[f"m{i}".encode() for i in range(len(more))])
    replayed = settings.with_(fetch_max_records=97)
    with running_worker(replayed) as proc:
        wait_committed(replayed, len(values) + len(more), proc)
    after = _rows(settings.data_dir, "SELECT count(*), count(DISTINCT event_id) FROM events")
    assert after == [(len(values) + len(more), len(values) + len(more))]


def test_repeated_event_ids_go_to_dead_letters_once(bootstrap: str, tmp_path: Path) -> None:
    """An at-least-once publisher's repeats are dead-lettered, in the same and later batches."""
    settings = unique_settings(bootstrap, tmp_path / "lake")
    values = generated_values(2000, seed=9)
    produce_raw(settings, values + values[:50])
    with running_worker(settings) as proc:
        wait_committed(settings, 2050, proc)
        produce_raw(settings, values[1000:1030])  # again, in a later batch
        wait_committed(settings, 2080, proc)
    lake = settings.data_dir
    assert scalar(lake, "SELECT count(*) FROM events") == 2000
    assert scalar(lake, "SELECT count(DISTINCT event_id) FROM events") == 2000
    assert scalar(lake, "SELECT count(*) FROM dead_letters") == 80
    assert (
        scalar(lake, "SELECT count(*) FROM dead_letters WHERE reason LIKE 'duplicate event_id%'")
        == 80
    )


def _another_writer_meddles(
    settings: Settings, log: Path, meddle: Callable[[LakeWriter], object], seed: int
) -> list[tuple[Any, ...]]:
    """1,000 events landed by a running worker; then ``meddle`` changes the lake through a
    writer of its own and 2,000 more events are published. Returns (count, distinct offsets,
    lowest, highest, offsets 1000-1499) of the landed events."""
    from sinks.contracts import DEAD_LETTERS, EVENTS
    from sinks.lake import LakeWriter

    produce_raw(settings, generated_values(1000, seed=seed))
    with running_worker(settings, log) as proc:
        wait_committed(settings, 1000, proc)
        other = LakeWriter(settings.data_dir, [EVENTS, DEAD_LETTERS])
        meddle(other)
        other.con.close()
        produce_raw(settings, generated_values(3000, seed=seed + 1)[1000:])
        wait_committed(settings, 3000, proc, timeout=60)
    return _rows(
        settings.data_dir,
        "SELECT count(*), count(DISTINCT kafka_offset), min(kafka_offset), max(kafka_offset), "
        "count(*) FILTER (WHERE kafka_offset BETWEEN 1000 AND 1499) FROM events",
    )


def test_a_fenced_flush_reads_on_from_the_lakes_position(bootstrap: str, tmp_path: Path) -> None:
    """Another writer lands a partition this worker reads (as a previous owner finishing its
    flush after a rebalance does): the worker's next flush is refused, and it reads on from
    the lake's position: nothing the other writer landed comes twice, nothing after it is
    lost, and landing goes on."""
    from sinks.lake import Flush

    # Small fetches: the consumer goes on fetching while the fenced flush reads the lake's
    # positions, which is when records read from the old position used to slip through.
    settings = unique_settings(bootstrap, tmp_path / "lake", partitions=1, fetch_max_records=50)
    topic = settings.events_topic

    def land_1000_to_1500(other: LakeWriter) -> None:
        # Offsets 1000-1499 are landed (their rows elsewhere, say).
        other.commit(Flush(positions={(topic, 0): (1000, 1500)}, group_id="other"))

    log = tmp_path / "worker.log"
    offsets = _another_writer_meddles(settings, log, land_1000_to_1500, seed=5)
    assert "flush not landed: partition" in log.read_text()
    assert offsets == [(2500, 2500, 0, 2999, 0)]


def test_a_partition_without_a_position_is_claimed_again(bootstrap: str, tmp_path: Path) -> None:
    """A partition's position row is gone from the lake (a claim that did not stay: seen when
    two processes' claims committed at the same moment): the worker's flushes of it are
    refused, so it claims the partition again where it stands and lands on, nothing twice."""
    from sinks.lake import ALIAS, POSITIONS, transaction

    settings = unique_settings(bootstrap, tmp_path / "lake", partitions=1)
    topic = settings.events_topic

    def drop_the_position(other: LakeWriter) -> None:
        with transaction(other.con, other.spec):
            other.con.execute(f"DELETE FROM {ALIAS}.{POSITIONS} WHERE topic = ?", [topic])

    log = tmp_path / "worker.log"
    offsets = _another_writer_meddles(settings, log, drop_the_position, seed=7)
    assert "partitions [0] have no position in the lake: claimed again" in log.read_text()
    assert offsets == [(3000, 3000, 0, 2999, 500)]


def test_roles_and_processes_split_the_work(bootstrap: str, tmp_path: Path) -> None:
    """``--role ingest --processes 2`` (two ingest processes under one parent) and a separate
    ``--role aggregate`` worker: events land once, every window is closed once by the
    aggregate process, and SIGTERM to the parent stops its children cleanly."""
    import subprocess
    import sys
    import time

    from pipeline.procs import stop_group
    from sinks.catalog import connect
    from streams.windows import DIMENSIONS
    from tests.helpers import REPO, worker_env

    # Little lateness: the 3,000 events span under a second of event time, so their window
    # closes once the clocks (moving on with the wall clock) pass its end plus the lateness.
    settings = unique_settings(
        bootstrap, tmp_path / "lake", partitions=4, allowed_lateness_s=2, web_port=free_ports(2)
    )
    values = generated_values(3000, seed=4)
    produce_raw(settings, values)

    def start(*args: str, name: str) -> subprocess.Popen[bytes]:
        with open(tmp_path / f"{name}.log", "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", "worker", *args],
                env=worker_env(settings),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                start_new_session=True,
            )

    ingest = start("--role", "ingest", "--processes", "2", name="ingest")
    aggregate = start("--role", "aggregate", "--web-port", str(free_port()), name="aggregate")
    try:
        try:
            wait_committed(settings, len(values), ingest)
        except AssertionError as exc:
            tail = (tmp_path / "ingest.log").read_text()[-6000:]
            raise AssertionError(f"{exc}\ningest log's end:\n{tail}") from None
        # Two ingest processes under the one parent, each a member of the group.
        deadline = time.monotonic() + 60
        while True:
            text = (tmp_path / "ingest.log").read_text()
            if len(set(re.findall(r"\[(\d+)\] \[INFO\] consuming", text))) == 2:
                break
            assert time.monotonic() < deadline, text[-2000:]
            time.sleep(0.5)
        con_sql = "SELECT count(*) FROM metrics WHERE level = 'key'"
        deadline = time.monotonic() + 90
        while scalar(settings.data_dir, con_sql) == 0:
            assert aggregate.poll() is None, (tmp_path / "aggregate.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the aggregate process closed no window"
            time.sleep(0.5)
    finally:
        assert stop_group(ingest, 60), "the ingest parent did not stop on SIGTERM"
        assert stop_group(aggregate, 60)
    assert ingest.returncode == 0 and aggregate.returncode == 0
    agg_log = (tmp_path / "aggregate.log").read_text()
    assert "landed" not in agg_log.split("aggregating")[0]  # no ingest stage in it
    con = connect(settings.data_dir)
    assert con.sql("SELECT count(*), count(DISTINCT event_id) FROM events").fetchall() == [
        (len(values), len(values))
    ]
    dims = ", ".join(DIMENSIONS)
    rows, distinct = con.sql(
        f"SELECT count(*), count(DISTINCT (window_start, level, {dims})) FROM metrics"
    ).fetchall()[0]
    assert rows == distinct > 0
