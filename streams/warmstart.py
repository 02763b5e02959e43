"""Warm start: prime detectors, rules and budgets from the lake's own history.

A worker that starts without a snapshot (a new consumer group, a lost ``.state``) would
otherwise need ``warmup_windows`` (30) windows of every key before a detector may speak.
The lake already holds those windows: ``metrics_history`` reads the last ``n`` windows of
every key through ``sinks.catalog.connect`` (the ``metrics`` view, never the files) and the
worker feeds them to the detectors and rules as if it had seen them, discarding what they
would have raised then (those alerts were raised, with the same ids, when the windows
closed). A window the worker then reads again is skipped by both (they ignore windows not
newer than a key's last), so nothing counts twice.

Several workers of a group (scale-out) land one row per worker for a window and key; the
history keeps the row with the most events of each, an approximation of the whole.

``spend_history`` gives the budget tracker the spend of the current periods, per minute,
agent and tenant, from the landed events below the committed offsets (the events the
worker will not read again); with no committed offsets (a new group re-reads the topic) it
is empty, so spend is never counted twice.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final

import duckdb
import polars as pl
import pyarrow as pa

from sinks.catalog import QueryError, connect
from sinks.contracts import METRICS
from sinks.lake import ALIAS
from streams.explain import HISTORY_WINDOWS, History
from streams.windows import DIMENSIONS, METRICS_SCHEMA

__all__ = [
    "frame_lookup",
    "history_lookup",
    "landed_ids",
    "metrics_history",
    "spend_history",
    "stream_times",
]

_DIMS: Final = ", ".join(DIMENSIONS)


def metrics_history(
    data_dir: Path,
    windows: int,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
) -> pa.Table:
    """The last ``windows`` windows of every (level, key) in the lake's ``metrics``, one row
    per window and key, ``METRICS_SCHEMA``, in the order the worker emits them
    (``window_start``, level, dimensions). ``since``/``until`` bound ``window_start``
    (``[since, until)``) before the last ``windows`` are taken; ``windows`` 0 means all.
    Raises ``QueryError`` when the lake cannot be read."""
    where = ["true"]
    params: dict[str, object] = {}
    if since is not None:
        where.append("window_start >= $since")
        params["since"] = since
    if until is not None:
        where.append("window_start < $until")
        params["until"] = until
    limit = f"WHERE _k <= {int(windows)}" if windows > 0 else ""
    cols = ", ".join(f'"{n}"' for n in METRICS_SCHEMA.names)
    sql = f"""
        WITH one AS (
            SELECT {cols} FROM metrics WHERE {" AND ".join(where)}
            QUALIFY row_number() OVER (
                PARTITION BY level, window_start, {_DIMS} ORDER BY events DESC, metric_id
            ) = 1
        ), ranked AS (
            SELECT *, row_number() OVER (
                PARTITION BY level, {_DIMS} ORDER BY window_start DESC
            ) AS _k FROM one
        )
        SELECT {cols} FROM ranked {limit}
        ORDER BY window_start, level, {", ".join(f"{d} NULLS LAST" for d in DIMENSIONS)}
    """
    con = connect(data_dir)
    try:
        if not _holds_rows(con, METRICS.name):
            return METRICS_SCHEMA.empty_table()
        table: pa.Table = con.sql(sql, params=params).to_arrow_table()
    except duckdb.Error as exc:
        raise QueryError(f"cannot read metrics in {data_dir}: {str(exc).splitlines()[0]}") from None
    return table.cast(METRICS_SCHEMA)


def _holds_rows(con: duckdb.DuckDBPyConnection, table: str) -> bool:
    """Whether the lake's ``table`` has a row (not when the lake has no such table).

    Asked of the table itself (~10 ms): the history query, planned through the view over
    every column, takes a third of a second of a first start's CPU to find nothing."""
    try:
        return bool(con.sql(f"SELECT 1 FROM {ALIAS}.{table} LIMIT 1").fetchall())
    except duckdb.CatalogException:
        return False


_SPEND: Final = pa.schema(
    [
        pa.field("ts", pa.timestamp("us", tz="UTC")),
        pa.field("agent_id", pa.string()),
        pa.field("tenant_id", pa.string()),
        pa.field("cost_usd", pa.float64()),
        pa.field("calls", pa.int64()),
    ]
)


def spend_history(data_dir: Path, since: datetime, offsets: dict[int, int]) -> pa.Table:
    """Costed events from ``since`` below the committed ``offsets`` (partition -> next
    offset), summed per minute, agent and tenant: ``ts`` (the minute), ``agent_id``,
    ``tenant_id``, ``cost_usd``, ``calls``. Empty without offsets."""
    if not offsets:
        return _SPEND.empty_table()
    below = " OR ".join(
        f"(kafka_partition = {int(p)} AND kafka_offset < {int(o)})" for p, o in offsets.items()
    )
    sql = f"""
        SELECT time_bucket(INTERVAL 1 minute, ts) AS ts, agent_id, tenant_id,
               sum(cost_usd) AS cost_usd, count(*) AS calls
        FROM events
        WHERE cost_usd IS NOT NULL AND ts >= $since AND ({below})
        GROUP BY ALL ORDER BY ts
    """
    try:
        table: pa.Table = connect(data_dir).sql(sql, params={"since": since}).to_arrow_table()
    except (QueryError, duckdb.Error):
        return _SPEND.empty_table()
    return table.cast(_SPEND)


def history_lookup(
    data_dir: Path | None, current: pa.Table, windows: int = HISTORY_WINDOWS
) -> History:
    """For ``streams.explain``: an alert row -> the key-level metrics rows under its key in
    the ``windows`` windows before its own, from the lake (None: none) and from ``current``
    (the flush's rows, not landed yet)."""
    now = pl.from_arrow(current)
    assert isinstance(now, pl.DataFrame)
    con: list[duckdb.DuckDBPyConnection] = []

    def lookup(row: dict[str, Any]) -> pl.DataFrame:
        start, end = row["window_start"], row["window_end"]
        lo = start - windows * (end - start)
        scope = {d: row[d] for d in DIMENSIONS if row[d] is not None}
        mine = now.filter(
            (pl.col("level") == "key")
            & (pl.col("window_start") >= lo)
            & (pl.col("window_start") < start)
            & pl.all_horizontal(pl.lit(True), *(pl.col(d) == v for d, v in scope.items()))
        )
        if data_dir is None:
            return mine
        where = "".join(f" AND {d} = ${d}" for d in scope)
        cols = ", ".join(f'"{n}"' for n in METRICS_SCHEMA.names)
        try:
            if not con:
                con.append(connect(data_dir))
            got = (
                con[0]
                .sql(
                    f"SELECT {cols} FROM metrics WHERE level = 'key' AND window_start >= $lo "
                    f"AND window_start < $start{where}",
                    params={"lo": lo, "start": start, **scope},
                )
                .to_arrow_table()
            )
        except (QueryError, duckdb.Error):
            return mine
        landed = pl.from_arrow(got.cast(METRICS_SCHEMA))
        assert isinstance(landed, pl.DataFrame)
        return pl.concat([landed, mine])

    return lookup


def frame_lookup(metrics: pl.DataFrame, windows: int = HISTORY_WINDOWS) -> History:
    """``history_lookup`` over metrics rows in memory (a backtest holds them all)."""
    keys = metrics.filter(pl.col("level") == "key")

    def lookup(row: dict[str, Any]) -> pl.DataFrame:
        start, end = row["window_start"], row["window_end"]
        width: timedelta = end - start
        scope = [pl.col(d) == row[d] for d in DIMENSIONS if row[d] is not None]
        return keys.filter(
            (pl.col("window_start") >= start - windows * width)
            & (pl.col("window_start") < start)
            & pl.all_horizontal(pl.lit(True), *scope)
        )

    return lookup


def landed_ids(data_dir: Path, partitions: list[int], horizon_s: float) -> pa.Table:
    """``event_id`` and ``ts`` of the events landed from ``partitions`` within ``horizon_s``
    of event time before the newest of them: what a worker taking those partitions over must
    remember to send a repeat to the dead letters, as their previous owner would have."""
    empty = pa.schema(
        [pa.field("event_id", pa.string()), pa.field("ts", pa.timestamp("us", tz="UTC"))]
    ).empty_table()
    if not partitions or horizon_s <= 0:
        return empty
    parts = ", ".join(str(int(p)) for p in partitions)
    sql = f"""
        WITH mine AS (SELECT event_id, ts FROM events WHERE kafka_partition IN ({parts}))
        SELECT event_id, ts FROM mine
        WHERE ts >= (SELECT max(ts) FROM mine) - to_microseconds(CAST($h AS BIGINT))
    """
    try:
        table: pa.Table = (
            connect(data_dir).sql(sql, params={"h": int(horizon_s * 1e6)}).to_arrow_table()
        )
    except (QueryError, duckdb.Error):
        return empty
    return table.cast(empty.schema)


def stream_times(data_dir: Path, partitions: list[int]) -> dict[int, datetime]:
    """The newest event time landed from each of ``partitions`` (those with events).

    A partition's stream time decides the lateness of its next events
    (``streams.lateness``); a worker taking the partition over starts from it, so an event is
    late or not whichever worker reads it, and whether or not its previous owner died.
    """
    if not partitions:
        return {}
    parts = ", ".join(str(int(p)) for p in partitions)
    sql = (
        f"SELECT kafka_partition, max(ts) FROM events WHERE kafka_partition IN ({parts}) "
        "GROUP BY kafka_partition"
    )
    try:
        rows = connect(data_dir).sql(sql).fetchall()
    except (QueryError, duckdb.Error):
        return {}
    return {int(p): ts for p, ts in rows if ts is not None}
