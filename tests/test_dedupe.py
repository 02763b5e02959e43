"""De-duplication by event_id: exact marks, the horizon, snapshots."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa

from streams.dedupe import Deduplicator

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def batch(ids: list[str], seconds: list[float]) -> tuple[pa.Array, pa.Array]:
    ts = [T0 + timedelta(seconds=s) for s in seconds]
    return pa.array(ids), pa.array(ts, pa.timestamp("us", tz="UTC"))


def test_repeats_within_and_across_batches() -> None:
    d = Deduplicator(horizon_s=600)
    assert d.repeats(*batch(["a", "b", "a", "c"], [0, 1, 2, 3])).tolist() == [
        False,
        False,
        True,
        False,
    ]
    assert d.repeats(*batch(["c", "d", "b", "d"], [70, 71, 130, 131])).tolist() == [
        True,
        False,
        True,
        True,
    ]
    assert d.remembered() == 4


def test_horizon_forgets_old_ids() -> None:
    d = Deduplicator(horizon_s=120)
    d.repeats(*batch(["old"], [0]))
    d.repeats(*batch(["new"], [600]))  # event time moves 10 minutes on: "old" is forgotten
    assert d.repeats(*batch(["old", "new"], [601, 602])).tolist() == [False, True]


def test_snapshot_round_trip_and_disabled() -> None:
    d = Deduplicator(horizon_s=600)
    d.repeats(*batch([f"e{i}" for i in range(1000)], [i * 0.5 for i in range(1000)]))
    r = Deduplicator.restore(d.snapshot())
    probe = batch([f"e{i}" for i in range(990, 1010)], [500.0] * 20)
    assert r.repeats(*probe).tolist() == d.repeats(*probe).tolist() == [True] * 10 + [False] * 10
    off = Deduplicator(horizon_s=0)
    assert not off.repeats(*batch(["x", "x"], [0, 0])).any()


def test_many_ids_no_false_repeats() -> None:
    d = Deduplicator(horizon_s=3600)
    ids = [f"{i:x}-{i * 7919 % 1000003}" for i in range(200_000)]
    marks = d.repeats(*batch(ids, list(np.linspace(0, 3000, len(ids)))))
    assert not marks.any()
    assert d.repeats(*batch(ids[::1000], [3001.0] * 200)).all()
