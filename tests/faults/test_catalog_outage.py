"""The lake's catalog goes away mid-stream: the PostgreSQL server is stopped for a while.

A worker on a PostgreSQL catalog (a real server, tests/postgres.py) lands a live feed. The
server is stopped at once (connections cut, like a crash or a network cut) for several
seconds, then started again on the same port and data. While it is down the worker must
commit nothing (the group's committed offsets stand: they follow the lake's commits), report
``degraded`` on ``/health`` with the catalog's error, keep retrying, and once the server is
back land everything exactly once.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tests.faults.support import (
    Feeder,
    Figures,
    audit_lake,
    audit_offsets,
    committed,
    committed_by_partition,
    publish,
    report,
    wait_all_committed,
    wait_health,
    wait_until,
    worker_pool,
)
from tests.helpers import generated_values, unique_settings
from tests.postgres import postgres_instance

pytestmark = pytest.mark.timeout(300)

DOWN_S = 6.0
BEFORE = 3_000  # messages landed before the outage


def test_catalog_outage_degrades_retries_then_lands_exactly_once(
    bootstrap: str, tmp_path: Path
) -> None:
    t0 = time.monotonic()
    values = generated_values(9_000, seed=71)
    records = [(b"k%d" % (i % 83), v) for i, v in enumerate(values)]
    ids = [msgspec.json.decode(v)["event_id"] for v in values]
    health_during: list[tuple[int, dict[str, Any]] | None] = []
    committed_during: list[dict[int, int]] = []
    with postgres_instance() as server:
        settings = unique_settings(bootstrap, tmp_path / "lake", catalog=server.dsn)
        with worker_pool(settings, tmp_path) as make:
            worker = make("worker").start()
            wait_until(
                "worker consuming", lambda: "consuming" in worker.log_text(), 120, alive=[worker]
            )
            # A first part lands before the outage; the rest is fed while the catalog is
            # down (so there is traffic to land then, however slowly the worker started).
            publish(settings, records[:BEFORE])
            wait_until(
                "the first part committed",
                lambda: committed(settings) >= BEFORE,
                timeout=120,
                alive=[worker],
            )
            errors_before = worker.prometheus().get("agentstream_landing_errors_total", 0.0)
            server.stop()
            feeder = Feeder(settings, records[BEFORE:], rate=(len(records) - BEFORE) / 10)
            feeder.start()
            down_at = time.monotonic()
            try:
                wait_health(worker, 503)
                # Sampled until DOWN_S after the stop, and a few times after the worker said
                # degraded (on a loaded machine that can take longer than DOWN_S).
                degraded_at = time.monotonic()
                while time.monotonic() - down_at < DOWN_S or time.monotonic() - degraded_at < 1.5:
                    health_during.append(worker.health())
                    committed_during.append(committed_by_partition(settings))
                    worker.check_alive()
                    time.sleep(0.5)
                errors_during = worker.prometheus().get("agentstream_landing_errors_total", 0.0)
            finally:
                server.start()
            feeder.finish(120)
            wait_all_committed(settings, len(records), worker)
            wait_health(worker, 200)
            health_after = worker.health()
            assert worker.terminate() == 0
            log = worker.log_text()
        offsets = audit_offsets(settings)
        lake = audit_lake(settings.data_dir, ids)
    print("offsets:", offsets.summary())
    print("lake:", lake.summary())
    retries = errors_during - errors_before
    report(
        Figures(
            "catalog (PostgreSQL) down",
            messages=len(records),
            faults=1,
            fault_kind=f"PostgreSQL server stopped for ~{DOWN_S:.0f} s mid-stream",
            lost=max(offsets.missing, lake.lost),
            duplicates=max(offsets.twice, lake.duplicate_rows),
            seconds=time.monotonic() - t0,
            extra={"failed flushes retried during the outage": int(retries)},
        )
    )

    # While the catalog was down: nothing committed, degraded with the catalog's error, and
    # the flush retried (not given up, not taken for a conflict with another writer).
    assert committed_during and all(c == committed_during[0] for c in committed_during), (
        committed_during
    )
    assert health_during and all(
        h is not None and h[0] == 503 and h[1]["status"] == "degraded" for h in health_during
    ), health_during
    reasons = {h[1]["last_error"] for h in health_during if h is not None}
    # Named by the worker, not left to the driver's text (libpq's "connection refused" names
    # no database).
    assert all(
        r and "flush failed on the lake (postgresql catalog" in r.lower() for r in reasons
    ), reasons
    # At least one failed attempt counted while it was down; how many depends on how long
    # each takes to fail (DuckLake retries the connection itself: 2-8 s an attempt seen in
    # CI), and the retry that lands is shown below: every message exactly once.
    assert retries >= 1, (errors_before, errors_during)
    assert "flush failed, offsets not committed, will retry" in log
    assert "conflicted with another writer" not in log
    # Afterwards: healthy, and every message exactly once.
    assert health_after is not None and health_after[1]["last_error"] is None
    assert (offsets.messages, offsets.missing, offsets.twice) == (len(records), 0, 0)
    assert lake.lost == lake.unexpected == lake.duplicate_rows == lake.metric_duplicates == 0
    assert lake.event_rows == len(ids)
