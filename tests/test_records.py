"""Derived topics' JSON records: the column-at-a-time encoder gives the bytes of the plain one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.records import json_records

_EPOCH = datetime(2026, 1, 5, tzinfo=UTC)
_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("n", pa.int64()),
        pa.field("x", pa.float64()),
        pa.field("ok", pa.bool_()),
        pa.field("name", pa.string()),
        pa.field("at", pa.timestamp("us", tz="UTC")),
        pa.field("tools", pa.list_(pa.struct([("tool", pa.string()), ("calls", pa.int64())]))),
    ]
)


def _plain(table: pa.Table, key: str) -> list[tuple[bytes, bytes]]:
    encode = msgspec.json.Encoder().encode
    return [(row[key].encode(), encode(row)) for row in table.to_pylist()]


def _maybe(values: st.SearchStrategy[Any], nulls: bool) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), values) if nulls else values


@st.composite
def _tables(draw: st.DrawFn) -> pa.Table:
    n = draw(st.integers(0, 30))
    nulls = draw(st.booleans())  # columns without nulls take the numpy path
    rows = []
    for i in range(n):
        rows.append(
            {
                "id": f"row-{i}",
                "n": draw(_maybe(st.integers(-(2**63), 2**63 - 1), nulls)),
                "x": draw(_maybe(st.floats(allow_nan=True, allow_infinity=True), nulls)),
                "ok": draw(_maybe(st.booleans(), nulls)),
                "name": draw(_maybe(st.text(max_size=8), True)),
                # Few distinct times (a window's rows), some with microseconds.
                "at": draw(
                    _maybe(
                        st.sampled_from([0, 60_000_000, 60_000_123, 3_600_000_001]).map(
                            lambda us: _EPOCH + timedelta(microseconds=us)
                        ),
                        nulls,
                    )
                ),
                "tools": draw(
                    _maybe(
                        st.lists(
                            st.fixed_dictionaries(
                                {"tool": st.text(max_size=4), "calls": st.integers(0, 9)}
                            ),
                            max_size=3,
                        ),
                        True,
                    )
                ),
            }
        )
    table = pa.Table.from_pylist(rows, schema=_SCHEMA)
    cut = draw(st.integers(0, n))  # several chunks, as concatenated flush tables have
    return pa.concat_tables([table.slice(0, cut), table.slice(cut)])


@settings(max_examples=200, deadline=None)
@given(_tables())
def test_records_are_the_rows_json_byte_for_byte(table: pa.Table) -> None:
    assert json_records(table, "id") == _plain(table, "id")


def test_times_are_rfc3339_utc_and_nulls_are_null() -> None:
    table = pa.Table.from_pylist(
        [
            {"id": "a", "n": 1, "at": _EPOCH + timedelta(seconds=60)},
            {"id": "b", "n": None, "at": None},
        ],
        schema=pa.schema(
            [("id", pa.string()), ("n", pa.int64()), ("at", _SCHEMA.field("at").type)]
        ),
    )
    assert json_records(table, "id") == [
        (b"a", b'{"id":"a","n":1,"at":"2026-01-05T00:01:00Z"}'),
        (b"b", b'{"id":"b","n":null,"at":null}'),
    ]
