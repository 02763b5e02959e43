"""``streams.lateness.horizons``: each event judged on its own partition's stream time."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.lateness import horizons

LATENESS = 10


def _one_at_a_time(
    rows: list[tuple[int, int, int]], floors: dict[int, int], lateness: int
) -> list[int]:
    """The horizons by reading each partition's records one by one in offset order."""
    newest: dict[int, int] = dict(floors)
    out = [0] * len(rows)
    for at in sorted(range(len(rows)), key=lambda i: (rows[i][0], rows[i][1])):
        part, _, ts = rows[at]
        newest[part] = max(ts, newest.get(part, ts))
        out[at] = newest[part] - lateness
    return out


def _columns(rows: list[tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    parts, offsets, ts = zip(*rows, strict=True) if rows else ((), (), ())
    return (
        np.array(parts, dtype=np.int32),
        np.array(offsets, dtype=np.int64),
        np.array(ts, dtype=np.int64),
    )


def test_an_event_is_judged_on_the_newest_before_it_in_its_own_partition() -> None:
    # Rows out of offset order (a flush groups rows by event type); partition 1 is far ahead.
    rows = [(0, 11, 50), (1, 3, 900), (0, 10, 100), (0, 12, 120), (1, 4, 80)]
    got = horizons(*_columns(rows), {}, LATENESS).tolist()
    assert got == [90, 890, 90, 110, 890]
    # Partition 0 was at 200 before this batch; partition 1 was reported read to 1,000.
    got = horizons(*_columns(rows), {0: 200, 1: 1_000}, LATENESS).tolist()
    assert got == [190, 990, 190, 190, 990]


def test_nothing_to_judge() -> None:
    assert horizons(*_columns([]), {0: 5}, LATENESS).tolist() == []


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(-(2**40), 2**40)), min_size=0, max_size=60),
    st.dictionaries(st.integers(0, 5), st.integers(-(2**40), 2**40), max_size=4),
    st.randoms(use_true_random=False),
)
def test_any_batch_in_any_row_order_matches_reading_one_by_one(
    draws: list[tuple[int, int]], floors: dict[int, int], rnd: object
) -> None:
    rows = [(part, offset, ts) for offset, (part, ts) in enumerate(draws)]
    rnd.shuffle(rows)  # type: ignore[attr-defined]
    assert horizons(*_columns(rows), floors, LATENESS).tolist() == _one_at_a_time(
        rows, floors, LATENESS
    )


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 10**6)), min_size=1, max_size=80))
def test_split_into_fetches_anywhere_the_horizons_are_the_same(
    draws: list[tuple[int, int]],
) -> None:
    rows = [(part, offset, ts) for offset, (part, ts) in enumerate(draws)]
    whole = horizons(*_columns(rows), {}, LATENESS).tolist()
    for cut in range(len(rows) + 1):
        first, second = rows[:cut], rows[cut:]
        floors: dict[int, int] = {}
        for part, _, ts in first:
            floors[part] = max(ts, floors.get(part, ts))
        got = (
            horizons(*_columns(first), {}, LATENESS).tolist()
            + horizons(*_columns(second), floors, LATENESS).tolist()
        )
        assert got == whole, cut
