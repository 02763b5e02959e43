"""De-duplication by ``event_id`` within a horizon of event time.

An at-least-once publisher may send an event twice (a retry after a lost acknowledgement).
The worker remembers the ids it has landed for ``horizon_s`` of event time and sends a repeat
to the dead letters instead of landing it again, so every message still ends exactly once in
``events`` or ``dead_letters``.

Ids are kept as 64-bit hashes in sorted numpy arrays, one per minute of event time: 8 bytes an
id (10 minutes at 10k events/s is 48 MB), checked per batch with one vectorised search per
minute. Two different ids collide with probability about n^2 / 2^65 (1e-6 for six million ids
in the horizon); such a pair would be reported as a duplicate. A repeat whose event time is
older than the horizon (measured from the newest event time seen) is not recognised.
"""

from __future__ import annotations

from typing import Final

import msgspec
import numpy as np
import numpy.typing as npt
import polars as pl
import pyarrow as pa

_BUCKET_US: Final = 60 * 1_000_000
_SEED: Final = 0x5EED

U64 = npt.NDArray[np.uint64]


class _State(msgspec.Struct, frozen=True):
    horizon_s: float
    newest_us: int | None
    buckets: dict[int, bytes]


def id_hashes(event_ids: pa.Array | pa.ChunkedArray) -> U64:
    """Stable 64-bit hashes of ``event_ids`` (stable for one polars version, as snapshots are)."""
    series = pl.Series(values=event_ids)
    return series.hash(seed=_SEED).to_numpy().astype(np.uint64, copy=False)


class Deduplicator:
    """Which events of a batch repeat an ``event_id`` seen within the horizon."""

    def __init__(self, horizon_s: float = 600.0) -> None:
        self.horizon_s = horizon_s
        self._newest_us: int | None = None
        self._buckets: dict[int, U64] = {}

    def repeats(
        self, event_ids: pa.Array | pa.ChunkedArray, ts: pa.Array | pa.ChunkedArray
    ) -> npt.NDArray[np.bool_]:
        """Mark repeats (True) in a batch and remember the rest; one entry per row.

        Within the batch, the first occurrence of an id counts as new and later ones repeat it.
        """
        n = len(event_ids)
        if n == 0 or self.horizon_s <= 0:
            return np.zeros(n, dtype=np.bool_)
        hashes = id_hashes(event_ids)
        ts_us = pl.Series(values=ts).dt.epoch("us").to_numpy()
        seen = np.zeros(n, dtype=np.bool_)
        for bucket in self._buckets.values():
            if len(bucket):
                at = np.minimum(np.searchsorted(bucket, hashes), len(bucket) - 1)
                seen |= bucket[at] == hashes
        seen |= ~pl.Series(values=hashes).is_first_distinct().to_numpy()
        fresh = ~seen
        keys = ts_us[fresh] // _BUCKET_US
        new_hashes = hashes[fresh]
        for key in np.unique(keys):
            added = new_hashes[keys == key]
            old = self._buckets.get(int(key))
            merged = added if old is None else np.concatenate([old, added])
            merged.sort()
            self._buckets[int(key)] = merged
        newest = int(ts_us.max())
        self._newest_us = newest if self._newest_us is None else max(self._newest_us, newest)
        self._evict()
        return seen

    def _evict(self) -> None:
        assert self._newest_us is not None
        oldest = (self._newest_us - int(self.horizon_s * 1_000_000)) // _BUCKET_US
        for key in [k for k in self._buckets if k < oldest]:
            del self._buckets[key]

    def remembered(self) -> int:
        """How many ids are held."""
        return sum(len(b) for b in self._buckets.values())

    def snapshot(self) -> bytes:
        """The remembered ids, compact."""
        return msgspec.msgpack.encode(
            _State(
                self.horizon_s, self._newest_us, {k: v.tobytes() for k, v in self._buckets.items()}
            )
        )

    @classmethod
    def restore(cls, data: bytes) -> Deduplicator:
        """A de-duplicator in the state ``snapshot`` saved."""
        state = msgspec.msgpack.decode(data, type=_State)
        dedupe = cls(state.horizon_s)
        dedupe._newest_us = state.newest_us
        dedupe._buckets = {
            k: np.frombuffer(v, dtype=np.uint64).copy() for k, v in state.buckets.items()
        }
        return dedupe
