"""The batch hot path: raw Kafka records in, landed-ready Arrow tables out.

Everything here works on a whole fetch at once (validation, enrichment, columns). It has no
I/O, so it is tested without a broker and profiled on its own.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Protocol, overload

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from pipeline import schema
from sinks.tables import DEAD_LETTERS_SCHEMA, events_to_table
from streams.enrich import CostEstimator
from streams.redact import PATTERNS, Redactor


class Record(Protocol):
    """The part of an aiokafka ``ConsumerRecord`` the hot path reads."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int


@dataclass
class Processed:
    """One fetch after validation: landed-ready rows and where they came from."""

    events: pa.Table
    dead_letters: pa.Table
    rejected: list[tuple[Record, schema.Rejection]]
    # partition -> (first offset, last offset) of every record read, valid or not
    ranges: dict[int, tuple[int, int]] = field(default_factory=dict)
    # The records themselves, for dead-lettering a valid event later (a repeated event_id);
    # ``RecordColumns`` from ``BatchProcessor.process``.
    records: Sequence[Record] = ()


def _text(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    return raw[:65_536].decode("utf-8", errors="replace")


class BatchProcessor:
    """Validates and enriches fetched records in bulk."""

    def __init__(
        self,
        *,
        max_message_bytes: int = schema.MAX_EVENT_BYTES,
        redact: Sequence[str] = tuple(PATTERNS),
    ) -> None:
        self.max_message_bytes = max_message_bytes
        self.costs = CostEstimator()
        self.redactor = Redactor(redact)

    def process(
        self, records: Sequence[Record], *, late: Sequence[bool] | None = None
    ) -> Processed:
        """Validate ``records``; valid ones become ``events`` rows, the rest dead letters."""
        n = len(records)
        values = list(map(_VALUE, records))
        events, ok_at, rejections, bad_at = schema.decode_batch(
            values, max_bytes=self.max_message_bytes
        )
        estimated = self.costs.fill(events)
        self.redactor.events(events)
        partitions = np.fromiter(map(_PARTITION, records), dtype=np.int32, count=n)
        offsets = np.fromiter(map(_OFFSET, records), dtype=np.int64, count=n)
        ok = np.asarray(ok_at, dtype=np.int64) if bad_at else slice(None)
        extras: dict[str, Sequence[Any] | pa.Array] = {
            "cost_estimated": estimated,
            "late": pa.repeat(pa.scalar(False), len(events)) if late is None else late,
            "kafka_partition": pa.array(partitions[ok]),
            "kafka_offset": pa.array(offsets[ok]),
        }
        table = events_to_table(events, extras)
        bad = [(records[i], rej) for i, rej in zip(bad_at, rejections, strict=True)]
        kept = RecordColumns(records, values, partitions, offsets)
        return Processed(table, dead_letter_table(bad), bad, _ranges(partitions, offsets), kept)


@dataclass(slots=True)
class KeptRecord:
    """A record as ``RecordColumns`` gives it back."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int


class RecordColumns(Sequence[Record]):
    """The records of a fetch, kept as columns until their flush.

    A pending fetch is kept only to dead-letter a repeated event later, which is rare. An
    aiokafka ``ConsumerRecord`` costs ~290 bytes besides its key and value (an instance
    dict of eleven fields); as columns the fetch holds its keys and values (the same bytes
    objects, not copies) and 36 bytes a record, so the record objects are freed with the
    fetch. Rows come back as ``KeptRecord``.
    """

    def __init__(
        self,
        records: Sequence[Record],
        values: list[bytes | None],
        partitions: npt.NDArray[np.int32],
        offsets: npt.NDArray[np.int64],
    ) -> None:
        n = len(records)
        topics = list(dict.fromkeys(map(_TOPIC, records)))
        self._topics = topics
        self._topic_at = (
            None
            if len(topics) <= 1
            else np.fromiter(
                map({t: i for i, t in enumerate(topics)}.__getitem__, map(_TOPIC, records)),
                dtype=np.int32,
                count=n,
            )
        )
        self._partitions = partitions
        self._offsets = offsets
        self._timestamps = np.fromiter(map(_TIMESTAMP, records), dtype=np.int64, count=n)
        self._keys = list(map(_KEY, records))
        self._values = values

    def __len__(self) -> int:
        return len(self._partitions)

    @overload
    def __getitem__(self, at: int) -> Record: ...

    @overload
    def __getitem__(self, at: slice) -> Sequence[Record]: ...

    def __getitem__(self, at: int | slice) -> Record | Sequence[Record]:
        if isinstance(at, slice):
            return [self[i] for i in range(*at.indices(len(self)))]
        if at < 0:
            at += len(self)
        if not 0 <= at < len(self):
            raise IndexError(at)
        topic = self._topics[0 if self._topic_at is None else int(self._topic_at[at])]
        return KeptRecord(
            topic,
            int(self._partitions[at]),
            int(self._offsets[at]),
            self._keys[at],
            self._values[at],
            int(self._timestamps[at]),
        )


_VALUE: Final = operator.attrgetter("value")
_KEY: Final = operator.attrgetter("key")
_TOPIC: Final = operator.attrgetter("topic")
_TIMESTAMP: Final = operator.attrgetter("timestamp")
_PARTITION: Final = operator.attrgetter("partition")
_OFFSET: Final = operator.attrgetter("offset")


def _ranges(
    partitions: npt.NDArray[np.int32], offsets: npt.NDArray[np.int64]
) -> dict[int, tuple[int, int]]:
    """partition -> (first offset, last offset), partitions in order of first appearance."""
    if len(partitions) == 0:
        return {}
    seen, first = np.unique(partitions, return_index=True)
    ranges: dict[int, tuple[int, int]] = {}
    for part in seen[np.argsort(first)].tolist():
        mine = offsets[partitions == part]
        ranges[part] = (int(mine.min()), int(mine.max()))
    return ranges


def dead_letter_table(bad: Sequence[tuple[Record, schema.Rejection]]) -> pa.Table:
    """Rows of the ``dead_letters`` table for rejected records."""
    now = datetime.now(UTC)
    return pa.Table.from_pydict(
        {
            "reason": [rej.reason for _, rej in bad],
            "field": [rej.field for _, rej in bad],
            "topic": [r.topic for r, _ in bad],
            "partition": [r.partition for r, _ in bad],
            "offset": [r.offset for r, _ in bad],
            "key": [r.key for r, _ in bad],
            "raw": [r.value for r, _ in bad],
            "raw_text": [_text(r.value) for r, _ in bad],
            "kafka_timestamp": [r.timestamp for r, _ in bad],
            "received_at": [now] * len(bad),
        },
        schema=DEAD_LETTERS_SCHEMA,
    )
