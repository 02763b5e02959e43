"""A mergeable quantile sketch: log-bucket histograms in the style of DDSketch.

A value ``x`` lands in bucket ``ceil(log(x) / log(gamma))`` with
``gamma = (1 + a) / (1 - a)`` and ``a = RELATIVE_ACCURACY`` (1 %); values below
``MIN_VALUE`` (including zero) share ``ZERO_BUCKET``. A sketch is just ``bucket -> count``,
so sketches of different batches merge by adding counts, which is what lets the window
aggregator keep quantiles of a window it sees in many pieces.

The quantile ``q`` of ``n`` values is read from the bucket that holds the value of rank
``ceil(q * n)`` (1-based) in sorted order, the rank DuckDB's ``quantile_disc`` uses. Buckets
preserve order, so that bucket holds exactly the value ``quantile_disc`` returns, and its
representative ``2 * gamma**i / (gamma + 1)`` is within ``a`` relative error of every value
in the bucket. The bound: the sketch's quantile is within 1 % (relative) of
``quantile_disc`` for values >= ``MIN_VALUE``; a quantile falling in the zero bucket is
reported as 0.0, within ``MIN_VALUE`` (absolute) of the exact one.

Everything is vectorised: bucket indexes are one polars (or numpy) log over a column, and
quantiles of many sketches at once are one sort, one cumulative sum and a binary search.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final

import numpy as np
import numpy.typing as npt
import polars as pl

RELATIVE_ACCURACY: Final = 0.01
GAMMA: Final = (1 + RELATIVE_ACCURACY) / (1 - RELATIVE_ACCURACY)
LOG_GAMMA: Final = math.log(GAMMA)
MIN_VALUE: Final = 1e-3
# Below every real bucket: ceil(log(1e-3) / log(gamma)) is -345.
ZERO_BUCKET: Final = -(2**31)

BUCKET_DTYPE: Final = pl.Int32
COUNT_DTYPE: Final = pl.Int64


def bucket_expr(value: pl.Expr) -> pl.Expr:
    """Polars expression: the bucket index of each (non-negative) value."""
    return (
        pl.when(value < MIN_VALUE)
        .then(pl.lit(ZERO_BUCKET, dtype=BUCKET_DTYPE))
        .otherwise((value.log() / LOG_GAMMA).ceil().cast(BUCKET_DTYPE))
    )


def bucket_index(values: npt.ArrayLike) -> npt.NDArray[np.int32]:
    """Numpy version of ``bucket_expr``, for callers that hold plain arrays."""
    x = np.asarray(values, dtype=np.float64)
    small = x < MIN_VALUE
    with np.errstate(divide="ignore", invalid="ignore"):
        idx = np.ceil(np.log(np.where(small, 1.0, x)) / LOG_GAMMA)
    return np.where(small, ZERO_BUCKET, idx).astype(np.int32)


def bucket_values(buckets: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """The representative value of each bucket index: ``2 * gamma**i / (gamma + 1)``, or 0.0."""
    b = np.asarray(buckets, dtype=np.float64)
    zero = b == ZERO_BUCKET
    with np.errstate(over="ignore"):
        values = 2.0 * np.exp(np.where(zero, 0.0, b) * LOG_GAMMA) / (GAMMA + 1.0)
    return np.where(zero, 0.0, values)


def quantiles(
    counts: pl.DataFrame,
    group: str,
    qs: Mapping[str, float],
    *,
    bucket: str = "bucket",
    count: str = "count",
) -> pl.DataFrame:
    """Quantiles of many sketches at once.

    ``counts`` holds one row per (sketch, bucket): the integer column ``group`` names the
    sketch, ``bucket`` and ``count`` (>= 1) are its histogram, each (group, bucket) at most
    once. Returns one row per sketch: ``group`` and one Float64 column per entry of ``qs``
    (output name -> q in [0, 1]), the representative value of the bucket holding the value
    of rank ``max(1, ceil(q * n))``.

    One sort and one cumulative sum over all sketches; each quantile is then a binary search
    of the global running count for ``count before the sketch + rank``.
    """
    if counts.height == 0:
        return pl.DataFrame(schema={group: counts.schema[group], **dict.fromkeys(qs, pl.Float64)})
    ordered = counts.select(group, bucket, count).sort(group, bucket)
    g = ordered.get_column(group).to_numpy()
    b = ordered.get_column(bucket).to_numpy()
    cum = np.cumsum(ordered.get_column(count).to_numpy(), dtype=np.int64)
    starts = np.flatnonzero(np.concatenate(([True], g[1:] != g[:-1])))
    ends = np.append(starts[1:], len(g)) - 1
    before = np.where(starts > 0, cum[starts - 1], 0)  # running count before each sketch
    n = (cum[ends] - before).astype(np.float64)
    columns: dict[str, pl.Series] = {group: pl.Series(group, g[starts], dtype=counts.schema[group])}
    for name, q in qs.items():
        rank = np.maximum(np.ceil(n * q), 1.0).astype(np.int64)
        at = np.searchsorted(cum, before + rank, side="left")
        columns[name] = pl.Series(name, bucket_values(b[at]), dtype=pl.Float64)
    return pl.DataFrame(columns)
