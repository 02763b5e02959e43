"""Arrow schemas of the landed tables, and the batch-to-columns step of the hot path.

The ``events`` schema is derived from ``pipeline.schema`` so a field added there becomes a
column here without a second list to keep in step. Conversion goes type by type: each event
class has a fixed field set, so a column is one list comprehension over plain attributes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import msgspec
import pyarrow as pa

from pipeline import schema

_SCALARS: Final[dict[type, pa.DataType]] = {
    msgspec.inspect.StrType: pa.string(),
    msgspec.inspect.IntType: pa.int64(),
    msgspec.inspect.FloatType: pa.float64(),
    msgspec.inspect.BoolType: pa.bool_(),
    msgspec.inspect.LiteralType: pa.string(),
    msgspec.inspect.DateTimeType: pa.timestamp("us", tz="UTC"),
}


def _arrow_type(t: Any) -> pa.DataType:
    if isinstance(t, msgspec.inspect.UnionType):
        (inner,) = [x for x in t.types if not isinstance(x, msgspec.inspect.NoneType)]
        return _arrow_type(inner)
    return _SCALARS[type(t)]


def _fields_of(cls: type) -> list[tuple[str, Any]]:
    return [(f.name, f.type) for f in msgspec.inspect.type_info(cls).fields]  # type: ignore[attr-defined]


_ENVELOPE: Final = [name for name, _ in _fields_of(schema.Envelope)]

# Columns the worker adds to every landed event: provenance (which Kafka record it came from,
# for audits and replay checks) and enrichment (estimated cost, lateness).
ENRICHMENT_FIELDS: Final = [
    pa.field("cost_estimated", pa.bool_()),
    pa.field("late", pa.bool_()),
    pa.field("kafka_partition", pa.int32()),
    pa.field("kafka_offset", pa.int64()),
]


def _events_schema() -> pa.Schema:
    fields: dict[str, pa.Field] = {}
    types = dict(schema.iter_fields())
    for name in ["event_id", "schema_version", "type", *_ENVELOPE]:
        if name not in fields:
            fields[name] = pa.field(
                name, pa.string() if name == "type" else _arrow_type(types[name])
            )
    for cls in schema.EVENT_CLASSES:
        for name, t in _fields_of(cls):
            if name not in fields:
                fields[name] = pa.field(name, _arrow_type(t))
    return pa.schema([*fields.values(), *ENRICHMENT_FIELDS])


EVENTS_SCHEMA: Final = _events_schema()
EVENT_COLUMNS: Final = EVENTS_SCHEMA.names

DEAD_LETTERS_SCHEMA: Final = pa.schema(
    [
        pa.field("reason", pa.string()),
        pa.field("field", pa.string()),
        pa.field("topic", pa.string()),
        pa.field("partition", pa.int32()),
        pa.field("offset", pa.int64()),
        pa.field("key", pa.binary()),
        pa.field("raw", pa.binary()),
        pa.field("raw_text", pa.string()),
        pa.field("kafka_timestamp", pa.timestamp("ms", tz="UTC")),
        pa.field("received_at", pa.timestamp("us", tz="UTC")),
    ]
)

_PER_CLASS: Final[dict[type, list[str]]] = {
    cls: [name for name, _ in _fields_of(cls)] for cls in schema.EVENT_CLASSES
}


def events_to_table(
    events: Sequence[schema.AgentEvent], extras: dict[str, Sequence[Any]]
) -> pa.Table:
    """Turn validated events into an Arrow table with the ``events`` schema.

    ``extras`` holds the enrichment columns, one value per event in input order. Rows come
    out grouped by event type (each type's columns are filled in one pass), which also makes
    the Parquet files compress and prune better.
    """
    groups: dict[type, list[int]] = {}
    for i, ev in enumerate(events):
        groups.setdefault(type(ev), []).append(i)
    columns: dict[str, list[Any]] = {name: [] for name in EVENT_COLUMNS}
    astuple = msgspec.structs.astuple
    for cls, idx in groups.items():
        size = len(idx)
        # One C-level transpose per type rather than a Python attribute lookup per cell.
        transposed = zip(*[astuple(events[i]) for i in idx], strict=True)
        filled: dict[str, Sequence[Any]] = dict(zip(_PER_CLASS[cls], transposed, strict=True))
        filled["type"] = (cls.type_name,) * size  # type: ignore[attr-defined]
        for name, values in extras.items():
            filled[name] = [values[i] for i in idx]
        for name, col in columns.items():
            got = filled.get(name)
            col.extend(got if got is not None else (None,) * size)
    return pa.Table.from_pydict(columns, schema=EVENTS_SCHEMA)
