"""Which events are late: each judged on its own partition's stream time.

A partition's stream time is the newest event time read from it before an event (the way
Kafka Streams keeps it per task). An event is late when its window ended at least the allowed
lateness before that, or before what this worker has already told the aggregate stage about
the partition (``floors``: a partition read to its end reports the worker's clock, which
moves on with the wall clock). Both follow the partition's own records in offset order, not
the fetches they came in nor what else the worker reads, so the same events are late with
one worker or three, and when a partition's owner dies its next owner starts from the stream
time the lake holds (``streams.warmstart.stream_times``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

__all__ = ["horizons"]


def horizons(
    partitions: npt.NDArray[np.int32],
    offsets: npt.NDArray[np.int64],
    ts_us: npt.NDArray[np.int64],
    floors: Mapping[int, int],
    lateness_us: int,
) -> npt.NDArray[np.int64]:
    """The horizon (epoch microseconds) each row's lateness is decided on, in row order.

    Per partition, in offset order: the newest ``ts_us`` up to and including the row (an
    event's own time never makes it late: its window ends after it), at least the
    partition's floor (its stream time before this batch, or a clock reported for it), minus
    ``lateness_us``. A window ending at or before its row's horizon is closed for the row.
    """
    n = len(ts_us)
    out = np.empty(n, dtype=np.int64)
    if n == 0:
        return out
    # Rows by partition, then offset; one running max per partition's run of rows (a flush
    # holds a handful of partitions, so the loop is short and each step is numpy's).
    order = np.lexsort((offsets, partitions))
    parts = partitions[order]
    ts = ts_us[order]
    starts = np.flatnonzero(np.r_[True, parts[1:] != parts[:-1]])
    ends = np.r_[starts[1:], n]
    for lo, hi in zip(starts.tolist(), ends.tolist(), strict=True):
        run = np.maximum.accumulate(ts[lo:hi])
        floor = floors.get(int(parts[lo]))
        if floor is not None:
            np.maximum(run, floor, out=run)
        out[order[lo:hi]] = run - lateness_us
    return out
