"""Disk trouble at the sink: a landed table's folder becomes unwritable for a while.

Tests run as root, and root ignores permission bits, so ``chmod 0555`` would change nothing.
The fault used instead works for any user: the table's folder is moved away and a regular file
of the same name takes its place, so every write below it fails (``NotADirectoryError`` /
``FileExistsError``), as it would on a full or read-only disk. Putting the folder back ends
the fault.

The table's folder is the one the lake writes its Parquet files to (``lake/main/<table>``).
While the fault lasts the worker must commit nothing (the group's committed offsets stay
where they were), report ``degraded`` on ``/health`` with the error, log it, keep running, and
once the folder is back land everything exactly once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest

from pipeline.config import Settings
from tests.faults.support import (
    Feeder,
    Figures,
    LakeAudit,
    OffsetAudit,
    audit_lake,
    audit_offsets,
    committed,
    committed_by_partition,
    report,
    table_folder,
    wait_all_committed,
    wait_health,
    wait_until,
    worker_pool,
)
from tests.helpers import generated_values, unique_settings

pytestmark = pytest.mark.timeout(240)

BAD_EVERY = 20  # one malformed message every 20, so every flush has dead letters


@dataclass
class Outage:
    """What one run with a broken table folder observed."""

    settings: Settings
    messages: int
    event_ids: list[str]
    invalid: int
    committed_during: list[dict[int, int]] = field(default_factory=list)
    health_during: list[tuple[int, dict[str, Any]] | None] = field(default_factory=list)
    health_after: tuple[int, dict[str, Any]] | None = None
    log: str = ""
    offsets: OffsetAudit | None = None
    lake: LakeAudit | None = None
    seconds: float = 0.0


def run_outage(bootstrap: str, tmp_path: Path, table: str, n: int, seed: int) -> Outage:
    """Feed a worker steadily; break ``table``'s folder for ~5 s in the middle; audit."""
    t0 = time.monotonic()
    settings = unique_settings(bootstrap, tmp_path / "lake")
    values = generated_values(n, seed=seed)
    records: list[tuple[bytes, bytes]] = []
    invalid = 0
    for i, v in enumerate(values):
        records.append((b"k%d" % (i % 97), v))
        if i % BAD_EVERY == 0:
            records.append((b"bad%d" % i, b'{"type": "tool_call", "event_id": '))
            invalid += 1
    ids = [msgspec.json.decode(v)["event_id"] for v in values]
    out = Outage(settings, len(records), ids, invalid)
    folder = table_folder(settings.data_dir, table)
    away = settings.data_dir / f"{table}.away"
    with worker_pool(settings, tmp_path) as make:
        worker = make("worker").start()
        # The feed starts once the worker reads: on a busy machine its start can take longer
        # than the whole feed, and then the fault would find nothing left to land.
        wait_until(
            "worker consuming", lambda: "consuming" in worker.log_text(), 120, alive=[worker]
        )
        feeder = Feeder(settings, records, rate=len(records) / 7)
        feeder.start()
        wait_until(
            "the worker committing", lambda: committed(settings) >= 1500, 120, alive=[worker]
        )
        # The fault starts between two flushes: publishing pauses until the worker has
        # committed all it got, then the table folder is replaced by a file. (A fault that
        # starts while a flush is landing leaves part of it landed: that is the partial
        # landing of test_partial_landing_failure_does_not_duplicate_events.)
        feeder.pause()
        wait_until(
            "the worker idle",
            lambda: committed(settings) >= feeder.sent,
            timeout=60,
            alive=[worker],
        )
        folder.rename(away)
        folder.write_bytes(b"this is not a folder\n")
        feeder.resume()
        try:
            wait_health(worker, 503)
            # A flush that was committing when the fault began may still finish: take the
            # committed offsets once the worker has seen the fault, then watch them stand.
            out.committed_during.append(committed_by_partition(settings))
            for _ in range(8):
                time.sleep(0.5)
                out.health_during.append(worker.health())
                out.committed_during.append(committed_by_partition(settings))
                worker.check_alive()
        finally:
            folder.unlink()
            away.rename(folder)
        feeder.finish(120)
        wait_all_committed(settings, len(records), worker)
        wait_health(worker, 200)
        out.health_after = worker.health()
        assert worker.terminate() == 0
        out.log = worker.log_text()
    out.offsets = audit_offsets(settings)
    out.lake = audit_lake(settings.data_dir, ids)
    out.seconds = time.monotonic() - t0
    print("offsets:", out.offsets.summary())
    print("lake:", out.lake.summary())
    return out


def _report(name: str, out: Outage) -> None:
    assert out.offsets is not None and out.lake is not None
    failures = out.log.count("flush failed, offsets not committed")
    report(
        Figures(
            name,
            messages=out.messages,
            faults=1,
            fault_kind="table folder replaced by a file for ~5 s",
            lost=max(out.offsets.missing, out.lake.lost),
            duplicates=max(out.offsets.twice, out.lake.duplicate_rows),
            seconds=out.seconds,
            extra={"failed flushes retried": failures, "invalid": out.invalid},
        )
    )


def test_unwritable_events_folder_stalls_commits_then_resumes_exactly_once(
    bootstrap: str, tmp_path: Path
) -> None:
    out = run_outage(bootstrap, tmp_path, "events", n=10_000, seed=41)
    _report("sink unwritable (events)", out)
    assert out.offsets is not None and out.lake is not None

    # While the folder was unwritable: nothing committed, degraded with the error, logged.
    first = out.committed_during[0]
    assert first, "nothing had been committed before the fault"
    assert all(c == first for c in out.committed_during), out.committed_during
    assert out.health_during and all(
        h is not None and h[0] == 503 and h[1]["status"] == "degraded" for h in out.health_during
    ), out.health_during
    errors = {h[1]["last_error"] for h in out.health_during if h is not None}
    assert all(e and str(table_folder(out.settings.data_dir, "events")) in e for e in errors), (
        errors
    )
    assert "flush failed, offsets not committed, will retry" in out.log
    assert any(m in out.log for m in ("Not a directory", "File exists", "not a directory"))

    # Afterwards: healthy, and every message exactly once.
    assert out.health_after is not None
    assert out.health_after[1]["status"] == "ok" and out.health_after[1]["last_error"] is None
    assert out.offsets.messages == out.messages
    assert (out.offsets.missing, out.offsets.twice) == (0, 0)
    assert (out.offsets.in_events, out.offsets.in_dead) == (len(out.event_ids), out.invalid)
    assert out.lake.lost == out.lake.unexpected == out.lake.duplicate_rows == 0
    assert out.lake.dead_rows == out.lake.dead_distinct == out.invalid


def test_partial_landing_failure_does_not_duplicate_events(bootstrap: str, tmp_path: Path) -> None:
    out = run_outage(bootstrap, tmp_path, "dead_letters", n=8_000, seed=43)
    _report("sink unwritable (dead_letters)", out)
    assert out.offsets is not None and out.lake is not None
    first = out.committed_during[0]
    assert all(c == first for c in out.committed_during), out.committed_during
    assert (out.offsets.missing, out.lake.lost) == (0, 0)
    assert (out.offsets.twice, out.lake.duplicate_rows) == (0, 0), (
        f"{out.lake.duplicate_rows} duplicate events rows, {out.offsets.twice} offsets twice"
    )
