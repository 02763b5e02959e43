"""Replaying the lake's metrics through the rules and detectors: ``agentstream backtest``.

``backtest`` feeds the ``metrics`` windows (``streams.warmstart.metrics_history``, through the
catalog) to a fresh ``DriftDetector`` and ``RuleEngine`` one window at a time, in the order a
worker closes them, and returns the rows they raise, explained (``streams.explain``) as the
worker explains them. Nothing is published or landed. Detection is deterministic and its ids
depend only on the windows, so the rows and ids are the ones a worker that read the same
traffic from the start raised (``detected_at`` aside: the replay stamps each row with its
window's end). Budgets are not replayed (they follow events, not windows), nor release
verdicts.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from streams.detect import ANOMALIES_SCHEMA, DetectorConfig, DriftDetector
from streams.explain import explain
from streams.rules import Rule, RuleEngine
from streams.warmstart import frame_lookup, metrics_history

__all__ = ["backtest", "replay_windows"]


def replay_windows(
    metrics: pa.Table,
    rules: Sequence[Rule],
    *,
    detector: DriftDetector,
    detectors: bool = True,
) -> pa.Table:
    """What ``detector`` and a ``RuleEngine`` of ``rules`` raise on ``metrics`` (sorted by
    ``window_start``), fed one window at a time; explained as the worker explains them.
    ``detectors`` False keeps only the rules' rows."""
    engine = RuleEngine(list(rules))
    frame = pl.from_arrow(metrics)
    assert isinstance(frame, pl.DataFrame)
    lookup = frame_lookup(frame)
    if metrics.num_rows == 0:
        return ANOMALIES_SCHEMA.empty_table()
    starts = pc.cast(metrics["window_start"], pa.int64()).to_numpy()
    cuts = [0, *(np.flatnonzero(np.diff(starts)) + 1).tolist(), metrics.num_rows]
    found = []
    for lo, hi in itertools.pairwise(cuts):
        part = metrics.slice(lo, hi - lo)
        at = part["window_end"][0].as_py()
        found_here = detector.observe(part, detected_at=at)
        rows = [found_here] if detectors else []
        raised = pa.concat_tables([*rows, engine.observe(part, detected_at=at)])
        if raised.num_rows:
            found.append(explain(raised, part, lookup))
    return pa.concat_tables(found) if found else ANOMALIES_SCHEMA.empty_table()


def backtest(
    data_dir: Path,
    rules: Sequence[Rule],
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    detectors: bool = True,
    config: DetectorConfig | None = None,
) -> pa.Table:
    """The rows rules (and detectors) raise on the lake's windows before ``until``, those of
    windows from ``since`` on. Earlier windows prime them, as the live worker's history did."""
    history = metrics_history(data_dir, 0, until=until)
    found = replay_windows(history, rules, detector=DriftDetector(config), detectors=detectors)
    if since is not None and found.num_rows:
        found = found.filter(pc.greater_equal(found["window_start"], pa.scalar(since)))
    return found
