"""SIGKILL the worker while its lake maintenance runs: in the merge of small files, in the
expiry of snapshots, in the deletion of unused files.

Maintenance runs in the worker's process on a schedule (here every few seconds, keeping no
time travel, over a lake of many small flushes). Each step is a DuckLake transaction, and a
merge writes its new file before the transaction that swaps it in, so a kill leaves at worst
an orphaned file or files scheduled for deletion. Whatever the step, the restarted worker
lands every message exactly once, a reader querying all along never sees a row twice or a
total go back, and the next pass completes and leaves a handful of files, no orphans.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import timedelta
from pathlib import Path

import msgspec
import pytest

from sinks.lake import data_path
from sinks.maintenance import maintain
from tests.faults.support import (
    Feeder,
    Figures,
    audit_lake,
    audit_offsets,
    lake_sql,
    orphaned_files,
    report,
    wait_all_committed,
    wait_until,
    worker_pool,
)
from tests.helpers import generated_values, unique_settings

pytestmark = pytest.mark.timeout(300)

STEPS = ("merging files", "expiring snapshots", "deleting unused files")
SUMMARY = "lake maintenance: data files"


class Reader(threading.Thread):
    """Queries the lake throughout: rows and distinct ids of ``events`` each time."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(daemon=True, name="reader")
        self.data_dir = data_dir
        self.seen: list[tuple[int, int]] = []
        self.errors: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                ((rows, ids),) = lake_sql(
                    self.data_dir, "SELECT count(*), count(DISTINCT event_id) FROM events"
                )
                self.seen.append((int(rows), int(ids)))
            except Exception as exc:  # the lake does not exist before the first start
                self.errors.append(f"{type(exc).__name__}: {exc}")
            self.done.wait(0.3)


def test_sigkill_during_lake_maintenance_loses_and_duplicates_nothing(
    bootstrap: str, tmp_path: Path
) -> None:
    t0 = time.monotonic()
    # A flush every 0.2 s of a live feed: many small files and snapshots for each pass.
    settings = unique_settings(
        bootstrap,
        tmp_path / "lake",
        flush_interval_s=0.2,
        maintain_interval_s=3.0,
        lake_retention="0s",
        # Queries of the test's reader take well under a second: snapshots replaced 5 s ago
        # expire within the test's minute (the default grace is a minute).
        lake_query_grace="5s",
    )
    values = generated_values(16_000, seed=61)
    records = [(b"k%d" % (i % 89), v) for i, v in enumerate(values)]
    ids = [msgspec.json.decode(v)["event_id"] for v in values]
    killed_in: list[str] = []
    mid_pass = 0
    reader = Reader(settings.data_dir)
    with worker_pool(settings, tmp_path) as make:
        worker = make("worker").start()
        wait_until(
            "worker consuming", lambda: "consuming" in worker.log_text(), 120, alive=[worker]
        )
        reader.start()
        feeder = Feeder(settings, records, rate=800)
        feeder.start()
        for target in STEPS:
            line = f"lake maintenance: {target}"
            before = worker.log_text().count(line)
            wait_until(
                f"maintenance {target}",
                lambda: worker.log_text().count(line) > before,  # noqa: B023
                timeout=90,
                every=0.01,
                alive=[worker],
            )
            summaries = worker.log_text().count(SUMMARY)
            worker.kill()
            killed_in.append(target)
            # Killed before the pass got to its summary line: the pass was cut.
            mid_pass += worker.log_text().count(SUMMARY) == summaries
            worker.start()
            wait_until(
                "worker consuming again",
                lambda: worker.log_text().count("consuming") == len(killed_in) + 1,
                timeout=120,
                alive=[worker],
            )
        feeder.finish(120)
        wait_all_committed(settings, len(records), worker)
        assert worker.terminate() == 0
    reader.done.set()
    reader.join(10)

    # The next pass completes. Orphans (of flushes and merges cut by the kills) are deleted
    # only past a grace period, since a live writer's uncommitted files look the same: the
    # files are aged past it first.
    old = time.time() - 11 * 60
    for folder, _, names in os.walk(data_path(settings.data_dir)):
        for name in names:
            os.utime(Path(folder) / name, (old, old))
    orphans = orphaned_files(settings.data_dir)
    # Nothing reads any more: no grace either.
    done = maintain(settings.data_dir, retention=timedelta(0), query_grace=timedelta(0))
    partitions = {
        name: n
        for name, n in lake_sql(
            settings.data_dir,
            "SELECT 'events', count(DISTINCT date) FROM events UNION ALL "
            "SELECT 'metrics', count(DISTINCT date) FROM metrics",
        )
    }
    files = dict(
        lake_sql(
            settings.data_dir, "SELECT table_name, file_count FROM ducklake_table_info('lake')"
        )
    )
    on_disk = sum(
        1
        for _, _, names in os.walk(data_path(settings.data_dir))
        for n in names
        if n.endswith(".parquet")
    )

    offsets = audit_offsets(settings)
    lake = audit_lake(settings.data_dir, ids)
    print("offsets:", offsets.summary())
    print("lake:", lake.summary())
    print("maintenance after the kills:", done.summary(), "files", files, "on disk", on_disk)
    report(
        Figures(
            "SIGKILL during lake maintenance",
            messages=len(records),
            faults=len(killed_in),
            fault_kind="SIGKILL in the merge, the expiry and the file deletion of a pass",
            lost=max(offsets.missing, lake.lost),
            duplicates=max(offsets.twice, lake.duplicate_rows),
            seconds=time.monotonic() - t0,
            extra={
                "passes cut": mid_pass,
                "orphans before the next pass": orphans,
                "data files after it": done.files_after,
                "parquet files on disk": on_disk,
                "reader queries": len(reader.seen),
            },
        )
    )

    # Every message exactly once.
    assert (offsets.messages, offsets.missing, offsets.twice) == (len(records), 0, 0)
    assert lake.lost == lake.unexpected == lake.duplicate_rows == lake.metric_duplicates == 0
    assert lake.event_rows == len(ids)
    # The kills cut passes, not just the time between them (at least the merge, the longest).
    assert mid_pass >= 1, killed_in
    # A reader never saw a row twice, nor a total go back.
    assert reader.seen, reader.errors
    assert all(rows == ids_ for rows, ids_ in reader.seen), reader.seen
    totals = [rows for rows, _ in reader.seen]
    assert totals == sorted(totals), totals
    # The next pass completed: one file per table and date, no orphan left on disk.
    assert files["events"] == partitions["events"] and files["metrics"] == partitions["metrics"]
    assert orphaned_files(settings.data_dir) == orphaned_files(settings.data_dir, "metrics") == 0
