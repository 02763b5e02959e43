"""Keeping the lake healthy: merge small files, expire old snapshots, delete unused files.

Every flush is a DuckLake commit with a small file per table (or rows inlined in the
catalog). A pass, run by the worker on a schedule in a thread of its own and by ``agentstream
lake maintain``:

1. flushes rows inlined in the catalog into Parquet files,
2. merges adjacent small files of each table and date into larger ones,
3. drops raw events (and dead letters) older than ``events_retention_days`` when set,
4. expires snapshots older than the retention (time travel kept: a day by default) and
   replaced by a newer one at least ``QUERY_GRACE`` ago, whatever the retention,
5. deletes the files no snapshot references any more, and orphaned files (of commits that
   never happened, e.g. a writer killed between writing and committing) older than the
   retention.

Each step is its own transaction, taken in turn with the worker's commits (one at a time in
a process), so landing waits at most for one step. Readers keep seeing whole snapshots: files
are deleted only once the snapshots referencing them are expired.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb

from pipeline.config import Settings, parse_duration
from sinks.lake import (
    ALIAS,
    CHECKPOINTS,
    INFO,
    POSITIONS,
    LakeError,
    attach,
    commit_lock,
    lake_connection,
)

log = logging.getLogger("agentstream.lake")
# A query reads the snapshot that was the latest when it began. A snapshot is expired only
# once it has been replaced for this long, so a query running at most this long still finds
# its snapshot's files and catalog rows, even with a retention of 0s; and a writer's open
# transaction keeps the newer snapshots its commit checks conflicts against (ducklake#1472).
# (Counting from a snapshot's creation instead, a snapshot that stayed the latest for an hour
# would be expired the instant the next commit replaced it.)
QUERY_GRACE = timedelta(minutes=1)


@dataclass
class Pass:
    """What one maintenance pass did."""

    inlined_flushed: int = 0
    files_before: int = 0
    files_after: int = 0
    rows_expired: int = 0
    snapshots_expired: int = 0
    files_deleted: int = 0
    orphans_deleted: int = 0
    seconds: float = 0.0
    steps: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"data files {self.files_before} -> {self.files_after}, inlined rows flushed "
            f"{self.inlined_flushed}, raw rows dropped {self.rows_expired}, snapshots expired "
            f"{self.snapshots_expired}, files deleted {self.files_deleted} (+{self.orphans_deleted} "
            f"orphaned), {self.seconds:.1f} s"
        )


def _open(
    data_dir: Path, catalog: str, *, read_only: bool
) -> tuple[duckdb.DuckDBPyConnection, str]:
    con = lake_connection()
    con.execute("SET TimeZone = 'UTC'")
    try:
        spec = attach(con, data_dir, catalog, read_only=read_only)
    except BaseException:
        con.close()
        raise
    return con, spec


def data_files(con: duckdb.DuckDBPyConnection) -> int:
    """Data files of the current snapshot, all tables."""
    row = con.execute(
        f"SELECT coalesce(sum(file_count), 0) FROM ducklake_table_info('{ALIAS}')"
    ).fetchone()
    return int(row[0]) if row else 0


def maintain(
    data_dir: Path,
    catalog: str = "",
    *,
    retention: timedelta = timedelta(days=1),
    events_retention_days: int = 0,
    query_grace: timedelta = QUERY_GRACE,
) -> Pass:
    """One maintenance pass over the lake of ``data_dir`` (see the module docstring).

    ``query_grace``: the longest a query on the lake may run (``lake_query_grace``).
    """
    started = time.perf_counter()
    con, spec = _open(data_dir, catalog, read_only=False)
    done = Pass()
    lock = commit_lock(spec)

    def step(sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        with lock:
            return con.execute(sql, params or []).fetchall()

    try:
        done.files_before = data_files(con)
        # Positions and checkpoints are left unmerged: one file per writer's row keeps the
        # writers of other partitions from conflicting (sinks.lake); their old files expire.
        tables = [
            r[0]
            for r in con.execute(
                "SELECT table_name FROM duckdb_tables() WHERE database_name = ? "
                "AND table_name NOT IN (?, ?, ?)",
                [ALIAS, POSITIONS, CHECKPOINTS, INFO],
            ).fetchall()
        ]
        # One line a step: a pass runs every few minutes, and an operator (or a fault test)
        # sees where a pass that was stopped got to.
        log.info("lake maintenance: merging files")
        for table in tables:
            rows = step(f"CALL ducklake_flush_inlined_data('{ALIAS}', table_name => '{table}')")
            done.inlined_flushed += sum(int(r[-1] or 0) for r in rows)
            step(f"CALL ducklake_merge_adjacent_files('{ALIAS}', '{table}')")
        if events_retention_days > 0:
            cutoff = (datetime.now(UTC) - timedelta(days=events_retention_days)).date()
            for table in ("events", "dead_letters"):
                if table in tables:
                    gone = step(f"DELETE FROM {ALIAS}.{table} WHERE date < ?", [cutoff])
                    done.rows_expired += int(gone[0][0]) if gone else 0
        now = datetime.now(UTC)
        expired = _expired_snapshots(con, now, retention, query_grace)
        log.info("lake maintenance: expiring snapshots")
        if expired:  # an empty list is a syntax error in DuckLake 1.5 (ducklake#1300)
            done.snapshots_expired = len(
                step(f"CALL ducklake_expire_snapshots('{ALIAS}', versions => ?)", [expired])
            )
        log.info("lake maintenance: deleting unused files")
        # Every file no snapshot references any more: the expiry above kept what a reader
        # may still use.
        done.files_deleted = len(
            step(f"CALL ducklake_cleanup_old_files('{ALIAS}', cleanup_all => true)")
        )
        # Orphans: files of a flush killed before its commit. A grace period, because a
        # live writer's files are orphans until it commits.
        grace = min(now - retention, now - timedelta(minutes=10))
        done.orphans_deleted = len(
            step(f"CALL ducklake_delete_orphaned_files('{ALIAS}', older_than => ?)", [grace])
        )
        done.files_after = data_files(con)
    except duckdb.Error as exc:
        raise LakeError(f"maintenance failed: {str(exc).splitlines()[0]}") from None
    finally:
        con.close()
    done.seconds = time.perf_counter() - started
    return done


def maintain_configured(settings: Settings) -> Pass:
    """One pass as ``settings`` say (the worker's schedule and ``agentstream lake maintain``)."""

    def span(name: str) -> timedelta:
        return timedelta(seconds=parse_duration(getattr(settings, name), name))

    return maintain(
        settings.data_dir,
        settings.catalog,
        retention=span("lake_retention"),
        events_retention_days=settings.events_retention_days,
        query_grace=span("lake_query_grace"),
    )


def _expired_snapshots(
    con: duckdb.DuckDBPyConnection, now: datetime, retention: timedelta, grace: timedelta
) -> list[int]:
    """The snapshots to expire: made before ``now - retention`` and replaced by a newer one
    before ``now - grace``; never the latest.

    Chosen here, by id, rather than with ``older_than``: DuckLake 1.5.5 on a SQLite catalog
    compared that cutoff coarsely (in a test, snapshots 3 s newer than it were expired).
    """
    rows = con.execute(
        f"SELECT snapshot_id FROM (SELECT snapshot_id, snapshot_time, lead(snapshot_time) "
        f"OVER (ORDER BY snapshot_id) AS replaced_at FROM ducklake_snapshots('{ALIAS}')) "
        "WHERE replaced_at IS NOT NULL AND snapshot_time < ? AND replaced_at < ? "
        "ORDER BY snapshot_id",
        [now - retention, now - grace],
    ).fetchall()
    return [int(r[0]) for r in rows]


def status(data_dir: Path, catalog: str = "") -> str:
    """Tables (rows, files, bytes), snapshots and the stored Kafka positions, as text."""
    con, spec = _open(data_dir, catalog, read_only=True)
    try:
        info = {
            r[0]: r[1:]
            for r in con.execute(
                f"SELECT table_name, file_count, file_size_bytes FROM ducklake_table_info('{ALIAS}')"
            ).fetchall()
        }
        lines = [
            f"catalog: {spec.split(' password', 1)[0]}",
            "",
            f"{'table':<18} {'rows':>12} {'files':>7} {'bytes':>14}",
        ]
        for name in sorted(info):
            if name in (POSITIONS, CHECKPOINTS, INFO):
                continue
            rows = con.execute(f"SELECT count(*) FROM {ALIAS}.{name}").fetchone()
            files, size = info[name]
            lines.append(f"{name:<18} {rows[0] if rows else 0:>12,} {files:>7,} {size:>14,}")
        snaps = con.execute(
            f"SELECT count(*), min(snapshot_time), max(snapshot_time) FROM {ALIAS}.snapshots()"
        ).fetchone()
        assert snaps is not None
        lines += ["", f"snapshots: {snaps[0]:,} (oldest {snaps[1]}, newest {snaps[2]})", ""]
        positions = con.execute(
            f"SELECT topic, partition, next_offset, group_id, updated_at FROM {ALIAS}.{POSITIONS} "
            "ORDER BY topic, partition"
        ).fetchall()
        lines.append("kafka positions (next offset to read):")
        lines += [
            f"  {topic}/{part} @ {offset:,}  ({group}, {when})"
            for topic, part, offset, group, when in positions
        ] or ["  none yet"]
        return "\n".join(lines)
    finally:
        con.close()
