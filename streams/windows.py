"""Event-time tumbling windows over whole batches: the agent KPIs, one row per window and key.

``WindowAggregator.update`` takes a fetch as an Arrow table with the ``events`` schema and
folds it into the open windows with a handful of polars group-bys (no per-event Python):
each batch becomes small partial aggregates per (window, key) that are added to the state.
Every measure is mergeable: counts and sums add, per-tool and per-action tallies add, and
latency quantiles come from log-bucket histograms (``streams.sketch``) whose counts add.
State is kept at the finest level (``DIMENSIONS``); the rollups of ``ROLLUPS`` are computed
from it when a window is emitted, so ``level='key'`` rows sum exactly to the others.

Time and lateness (all event time, windows aligned to the Unix epoch, ``[start, end)``):

* The *closing horizon* ``H`` is the largest of: the newest event time seen minus
  ``allowed_lateness_s`` (the event-time ``watermark``), every ``now`` passed to ``update`` or
  ``close_due`` minus ``allowed_lateness_s`` (the wall-clock rule, so a quiet stream still
  emits), and the end of the newest window already emitted. ``H`` never goes back.
* A window is *due* when ``window_end <= H``; ``close_due`` removes and returns every due
  window. Open windows are exactly those with ``window_end > H``.
* An event is *late* when its window was due at the start of the ``update`` call that brought
  it (``window_end <= H`` before the batch; that includes every emitted window). Whether a
  window is due never depends on when ``close_due`` is called, so late events can never change
  an emitted row.
* A late event is not added to its window. It is counted in ``late_events`` of the same key
  in the *oldest open window*, the window containing ``H`` (``start = floor(H / w) * w``) as
  of the start of the batch: the next window to be emitted, so a late event is reported with
  the very next window close, at every level (the rollups sum it like any measure). If that
  key has no events in that window, its row carries only ``late_events`` (``events = 0``).
  Invariant: ``sum(late_events) over level 'key' rows == number of late-masked events``.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Final

import msgspec
import numpy as np
import numpy.typing as npt
import polars as pl
import pyarrow as pa

from pipeline.schema import ACTIVITY_TYPES, CONTROL_TYPES
from sinks.contracts import (
    DIMENSIONS,
    EVALUATORS,
    METRICS_SCHEMA,
    NEGATIVE_RATING,
    QUALITY_COUNTS,
    QUALITY_SUMS,
    QUANTILES,
    ROLLUPS,
    STEP_TYPES,
    TASK_OUTCOMES,
)
from streams import sketch
from streams.records import json_records

__all__ = [
    "DIMENSIONS",
    "EVALUATORS",
    "METRICS_SCHEMA",
    "NEGATIVE_RATING",
    "QUALITY_COUNTS",
    "QUALITY_SUMS",
    "QUANTILES",
    "ROLLUPS",
    "STEP_TYPES",
    "WindowAggregator",
    "WindowPartial",
    "metric_records",
]


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_US: Final = timedelta(microseconds=1)
_W: Final = "window_start"  # Int64 microseconds since the epoch inside the state
_KEY: Final = [_W, *DIMENSIONS]
# Steps are small ints in the state: the position in STEP_TYPES; _ALL_STEPS is all three.
_STEP_CODES: Final = {t: i for i, t in enumerate(STEP_TYPES)}
_ALL_STEPS: Final = len(STEP_TYPES)
_N_STEPS: Final = _ALL_STEPS + 1
_STEP_PREFIXES: Final = [*(f"{p}_" for p in STEP_TYPES.values()), ""]

_INPUT_COLUMNS: Final = [
    "ts",
    "type",
    *DIMENSIONS,
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cost_usd",
    "cost_estimated",
    "latency_ms",
    "tool_name",
    "status",
    "hits",
    "miss",
    "outcome",
    "action",
    "rating",
    "correction",
    "evaluator",
    "score",
    "passed",
]

# Summable measures kept per (window, key); ratios and aliases are derived on emit.
_COUNTS: Final = [
    "events",
    *(f"events_{t}" for t in ACTIVITY_TYPES),
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    *(f"tasks_{o}" for o in TASK_OUTCOMES),
    "retrieval_misses",
    "tool_errors",
    "guardrail_incidents",
    "late_events",
    *QUALITY_COUNTS[1:],  # evaluations is events_evaluation
]
_SUMS: Final = ["cost_usd", "cost_estimated_usd", *QUALITY_SUMS]

_DIM_SCHEMA: Final[dict[str, pl.DataType]] = {d: pl.String() for d in DIMENSIONS}
_AGG_SCHEMA: Final = pl.Schema(
    {
        _W: pl.Int64(),
        **_DIM_SCHEMA,
        **{c: pl.Int64() for c in _COUNTS},
        **{c: pl.Float64() for c in _SUMS},
    }
)
_TOOLS_SCHEMA: Final = pl.Schema(
    {
        _W: pl.Int64(),
        **_DIM_SCHEMA,
        "tool_name": pl.String(),
        "calls": pl.Int64(),
        "errors": pl.Int64(),
    }
)
_GUARD_SCHEMA: Final = pl.Schema(
    {_W: pl.Int64(), **_DIM_SCHEMA, "action": pl.String(), "count": pl.Int64()}
)
_SKETCH_SCHEMA: Final = pl.Schema(
    {
        _W: pl.Int64(),
        **_DIM_SCHEMA,
        "step": pl.Int8(),
        "bucket": sketch.BUCKET_DTYPE(),
        "count": sketch.COUNT_DTYPE(),
    }
)

_TS: Final = pa.timestamp("us", tz="UTC")


_EMPTY_METRICS: Final = METRICS_SCHEMA.empty_table()


def _to_us(when: datetime) -> int:
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"naive datetime {when!r}: pass a timezone-aware datetime")
    return (when - _EPOCH) // _US


def _from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def _merge(state: pl.DataFrame, part: pl.DataFrame, keys: Sequence[str]) -> pl.DataFrame:
    """Add a batch's partial aggregate (unique per key) to the state: concat, sum per key.

    Measures the partial lacks are 0; columns come out in the state's order and types. Used
    for the table with float sums (cost), where the order of additions must not depend on
    how often the state was compacted.
    """
    if part.height == 0:
        return state
    part = part.select(
        pl.col(name).cast(dtype) if name in part.columns else pl.lit(0, dtype=dtype).alias(name)
        for name, dtype in state.schema.items()
    )
    if state.height == 0:
        return part
    # Only windows present in both need the group-by; each key then sums exactly two values
    # (state + part), so a float sum never depends on row order or thread scheduling and a
    # restored snapshot continues bit for bit like the uninterrupted run.
    shared = pl.col(_W).is_in(state.get_column(_W).unique().implode())
    fresh = part.filter(~shared)
    part = part.filter(shared)
    if part.height == 0:
        return pl.concat([state, fresh])
    summed = pl.concat([state.filter(shared), part]).group_by(keys).agg(pl.exclude(keys).sum())
    return pl.concat([state.filter(~shared), summed, fresh])


class _Counts:
    """A state table of integer counts per key, kept as appended chunks and summed on read.

    Integer sums are exact in any order, so adding a batch is just an append (O(batch), not
    O(state)); the chunks are summed per key when read, or once the appended rows outgrow
    the summed part, which keeps memory and the amortised cost linear in the input.
    """

    def __init__(self, schema: pl.Schema, keys: Sequence[str]) -> None:
        self.schema = schema
        self.keys = list(keys)
        self._summed = schema.to_frame()
        self._chunks: list[pl.DataFrame] = []
        self._pending = 0

    def add(self, part: pl.DataFrame) -> None:
        """Append counts (any rows, keys may repeat) in this table's columns and types."""
        if part.height == 0:
            return
        self._chunks.append(part.select(pl.col(n).cast(t) for n, t in self.schema.items()))
        self._pending += part.height
        if self._pending > max(self._summed.height, _MIN_COMPACTION_ROWS):
            self.frame()

    def frame(self) -> pl.DataFrame:
        """The table with one row per key."""
        if self._chunks:
            rows = pl.concat([self._summed, *self._chunks])
            self._summed = rows.group_by(self.keys).agg(pl.exclude(self.keys).sum())
            self._chunks = []
            self._pending = 0
        return self._summed

    def load(self, summed: pl.DataFrame) -> None:
        """Replace the contents with ``summed`` (one row per key, as ``frame`` returns)."""
        self._summed = summed
        self._chunks = []
        self._pending = 0

    def take(self, rows: pl.Expr) -> pl.DataFrame:
        """Remove and return the rows matching ``rows``, one per key."""
        summed = self.frame()
        self._summed = summed.filter(~rows)
        return summed.filter(rows)


_MIN_COMPACTION_ROWS: Final = 50_000


def _ipc(frame: pl.DataFrame) -> bytes:
    buf = io.BytesIO()
    frame.write_ipc(buf, compression="zstd")
    return buf.getvalue()


def _from_ipc(data: bytes, schema: pl.Schema) -> pl.DataFrame:
    frame = pl.read_ipc(io.BytesIO(data))
    if frame.schema != schema and all(frame.schema.get(c) == t for c, t in frame.schema.items()):
        # A snapshot from before some measures existed (evaluations, feedback): they start at 0.
        missing = [c for c in schema if c not in frame.schema]
        if missing and all(schema[c] in (pl.Int64(), pl.Float64()) for c in missing):
            frame = frame.with_columns(pl.lit(0, dtype=schema[c]).alias(c) for c in missing)
            frame = frame.select(schema.names())
    if frame.schema != schema:
        raise ValueError(f"snapshot state has schema {frame.schema}, expected {schema}")
    return frame


class _Snapshot(msgspec.Struct, frozen=True):
    version: int
    window_s: int
    allowed_lateness_s: float
    max_ts_us: int | None
    horizon_us: int | None
    agg: bytes
    tools: bytes
    guard: bytes
    sketch: bytes
    source: str = ""


_SNAPSHOT_VERSION: Final = 1


class WindowPartial(msgspec.Struct, frozen=True):
    """What ``WindowAggregator.drain`` hands on: the open-window state of one aggregator, to be
    added to another's with ``merge`` (two-phase aggregation: counts, sums and latency
    histograms per window and key add, so merging partials equals aggregating the events).

    Zstd Arrow IPC of the four state tables; rows of windows that are due at the receiver
    count there as late.
    """

    agg: bytes
    tools: bytes
    guard: bytes
    sketch: bytes

    def frames(self) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, pl.DataFrame]:
        return (
            _from_ipc(self.agg, _AGG_SCHEMA),
            _from_ipc(self.tools, _TOOLS_SCHEMA),
            _from_ipc(self.guard, _GUARD_SCHEMA),
            _from_ipc(self.sketch, _SKETCH_SCHEMA),
        )

    def latency_counts(self) -> pl.DataFrame:
        """Step latencies per window, key and histogram bucket (every step type together):
        what the release judge folds in (``ReleaseJudge.add_latency_counts``)."""
        steps = _from_ipc(self.sketch, _SKETCH_SCHEMA)
        return (
            steps.group_by([_W, *DIMENSIONS, "bucket"])
            .agg(pl.col("count").sum().cast(pl.Int64))
            .rename({_W: "_w", "bucket": "_b", "count": "_n"})
        )


class WindowAggregator:
    """Tumbling event-time windows of agent KPIs, fed whole Arrow batches.

    ``window_s`` is the window length in seconds (windows start at multiples of it since the
    epoch); ``allowed_lateness_s`` how long after a window's end (in event time, or on the
    wall clock) events for it are still accepted. See the module docstring for the exact
    closing and lateness rules.
    """

    def __init__(
        self, window_s: int = 60, allowed_lateness_s: float = 60.0, *, source: str = ""
    ) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        if not allowed_lateness_s >= 0:
            raise ValueError(f"allowed_lateness_s must be >= 0, got {allowed_lateness_s}")
        self.window_s = int(window_s)
        # Which aggregator emitted a row: several workers of one group each emit their part
        # of a window, and their rows need ids (and lake files) of their own.
        self.source = source
        self.allowed_lateness_s = float(allowed_lateness_s)
        self._w = self.window_s * 1_000_000
        self._lateness = round(self.allowed_lateness_s * 1_000_000)
        self._max_ts: int | None = None
        self._horizon: int | None = None
        self._agg = _AGG_SCHEMA.to_frame()
        self._tools = _Counts(_TOOLS_SCHEMA, [*_KEY, "tool_name"])
        self._guard = _Counts(_GUARD_SCHEMA, [*_KEY, "action"])
        self._sketch = _Counts(_SKETCH_SCHEMA, [*_KEY, "step", "bucket"])

    # ----------------------------------------------------------------------------------
    # time
    # ----------------------------------------------------------------------------------

    @property
    def watermark(self) -> datetime | None:
        """Event-time watermark: the newest event time seen minus the allowed lateness."""
        return None if self._max_ts is None else _from_us(self._max_ts - self._lateness)

    @property
    def closed_until(self) -> datetime | None:
        """The closing horizon ``H``: windows ending at or before it are due (or emitted)."""
        return None if self._horizon is None else _from_us(self._horizon)

    def open_windows(self) -> int:
        """How many windows hold state (not yet emitted)."""
        return int(self._agg.get_column(_W).n_unique())

    def _advance(self, now_us: int | None, max_ts: int | None) -> None:
        candidates = [c for c in (self._horizon,) if c is not None]
        if max_ts is not None:
            self._max_ts = max_ts if self._max_ts is None else max(self._max_ts, max_ts)
            candidates.append(self._max_ts - self._lateness)
        if now_us is not None:
            candidates.append(now_us - self._lateness)
        if candidates:
            self._horizon = max(candidates)

    # ----------------------------------------------------------------------------------
    # hot path
    # ----------------------------------------------------------------------------------

    def update(
        self,
        batch: pa.Table,
        now: datetime | None = None,
        event_time: datetime | None = None,
        horizons: npt.NDArray[np.int64] | None = None,
    ) -> pa.Array:
        """Fold a batch of ``events`` rows into the open windows; return the ``late`` mask.

        The mask (bool, one per row, in row order) marks events whose window was already due
        at the start of this call; they only count in ``late_events``. Afterwards the horizon
        advances with the batch's newest event time and ``now`` (default: the wall clock), so
        ``now`` affects the lateness of later batches, not this one. ``event_time`` replaces
        the batch's newest event time as the point event time has reached: a consumer of
        several partitions passes the minimum over them, so a partition read ahead of the
        others does not make theirs late. ``horizons`` (epoch microseconds, one per row)
        replaces this aggregator's horizon as what decides each row's lateness, and a late
        row counts in the oldest window open at its own horizon: the ingest stage judges each
        event on its partition's stream time (``streams.lateness``). Not idempotent: applying
        the same batch twice counts it twice.
        """
        now_us = _to_us(now if now is not None else datetime.now(UTC))
        if batch.num_rows == 0:
            self._advance(now_us, None)
            return pa.array([], type=pa.bool_())
        w = self._w
        frame = pl.from_arrow(batch.select(_INPUT_COLUMNS))
        assert isinstance(frame, pl.DataFrame)
        ts = frame.get_column("ts").dt.epoch("us")
        window = (ts // w) * w
        # One horizon per row: the caller's, or this aggregator's for every row.
        if horizons is not None:
            own: pl.Series | None = pl.Series("_horizon", horizons, dtype=pl.Int64)
        elif self._horizon is not None:
            own = pl.repeat(self._horizon, frame.height, dtype=pl.Int64, eager=True)
        else:
            own = None
        if own is None:
            late = pl.repeat(False, frame.height, dtype=pl.Boolean, eager=True).alias("late")
            frame = frame.with_columns(window.alias(_W))
        else:
            late = (window + w <= own).alias("late")
            frame = frame.with_columns(window.alias(_W), own.alias("_horizon"))
        control = frame.get_column("type").is_in(CONTROL_TYPES)
        if control.any():
            # Control records (releases) are not agent activity: in no window, never late.
            late = late & ~control
            frame = frame.filter(~control)
            late_kept = late.filter(~control)
        else:
            late_kept = late
        n_late = int(late.sum())
        if n_late:
            late_rows = frame.filter(late_kept)
            frame = frame.filter(~late_kept)
            # Counted in the oldest window open at the row's horizon.
            late_part = late_rows.group_by(
                ((pl.col("_horizon") // w) * w).alias(_W), *DIMENSIONS
            ).agg(pl.len().cast(pl.Int64).alias("late_events"))
            self._agg = _merge(self._agg, late_part.select(_W, *DIMENSIONS, "late_events"), _KEY)
        if frame.height:
            self._add(frame)
        reached = int(ts.max()) if event_time is None else _to_us(event_time)  # type: ignore[arg-type]
        self._advance(now_us, reached)
        return late.to_arrow()

    def _add(self, frame: pl.DataFrame) -> None:
        typ = pl.col("type")
        count = _count
        part = frame.group_by(_KEY).agg(
            pl.len().cast(pl.Int64).alias("events"),
            *(count(typ == t, f"events_{t}") for t in ACTIVITY_TYPES),
            pl.col("input_tokens").sum().cast(pl.Int64),
            pl.col("output_tokens").sum().cast(pl.Int64),
            pl.col("cached_input_tokens").sum().cast(pl.Int64),
            *(count(pl.col("outcome") == o, f"tasks_{o}") for o in TASK_OUTCOMES),
            count(
                (typ == "retrieval") & pl.col("miss").fill_null(pl.col("hits") == 0),
                "retrieval_misses",
            ),
            count((typ == "tool_call") & (pl.col("status") == "error"), "tool_errors"),
            count((typ == "guardrail") & (pl.col("action") != "allow"), "guardrail_incidents"),
            *_quality_counts(typ),
            pl.col("cost_usd").sum().cast(pl.Float64),
            pl.col("cost_usd")
            .filter(pl.col("cost_estimated").fill_null(False))
            .sum()
            .cast(pl.Float64)
            .alias("cost_estimated_usd"),
        )
        self._agg = _merge(self._agg, part, _KEY)

        tools = (
            frame.filter(typ == "tool_call")
            .group_by([*_KEY, "tool_name"])
            .agg(
                pl.len().cast(pl.Int64).alias("calls"),
                count(pl.col("status") == "error", "errors"),
            )
        )
        self._tools.add(tools)

        guard = (
            frame.filter(typ == "guardrail")
            .group_by([*_KEY, "action"])
            .agg(pl.len().cast(pl.Int64).alias("count"))
        )
        self._guard.add(guard)

        steps = (
            frame.filter(typ.is_in(list(STEP_TYPES)) & pl.col("latency_ms").is_not_null())
            .select(
                *_KEY,
                typ.replace_strict(_STEP_CODES, return_dtype=pl.Int8).alias("step"),
                sketch.bucket_expr(pl.col("latency_ms")).alias("bucket"),
            )
            .group_by([*_KEY, "step", "bucket"])
            .agg(pl.len().cast(sketch.COUNT_DTYPE).alias("count"))
        )
        self._sketch.add(steps)

    # ----------------------------------------------------------------------------------
    # two-phase aggregation: one aggregator's state handed on and merged into another's
    # ----------------------------------------------------------------------------------

    def drain(self) -> WindowPartial:
        """Remove and return every open window's state (the clocks stay): an upstream stage
        decides lateness with its own horizon and hands on what it counted."""
        part = WindowPartial(
            _ipc(self._agg),
            _ipc(self._tools.frame()),
            _ipc(self._guard.frame()),
            _ipc(self._sketch.frame()),
        )
        self._agg = _AGG_SCHEMA.to_frame()
        for table in (self._tools, self._guard, self._sketch):
            table.load(table.schema.to_frame())
        return part

    def merge(self, partial: WindowPartial) -> int:
        """Add a drained partial to the open windows; returns how many of its events counted
        late here.

        Rows of a window already due here (its owner upstream had not seen that window close
        yet: an upstream clock behind this one's after a rebalance) count as ``late_events``
        of their key in the oldest open window, as ``update`` counts a late event.
        """
        agg, tools, guard, steps = partial.frames()
        late = 0
        if self._horizon is not None and agg.height:
            due = pl.col(_W) + self._w <= self._horizon
            gone = agg.filter(due)
            if gone.height:
                late = int(gone.get_column("events").sum())
                oldest = (self._horizon // self._w) * self._w
                moved = (
                    gone.group_by(DIMENSIONS)
                    .agg((pl.col("events") + pl.col("late_events")).sum().alias("late_events"))
                    .with_columns(pl.lit(oldest, dtype=pl.Int64).alias(_W))
                )
                agg, tools, guard, steps = (f.filter(~due) for f in (agg, tools, guard, steps))
                self._agg = _merge(self._agg, moved.select(_W, *DIMENSIONS, "late_events"), _KEY)
        self._agg = _merge(self._agg, agg, _KEY)
        self._tools.add(tools)
        self._guard.add(guard)
        self._sketch.add(steps)
        return late

    # ----------------------------------------------------------------------------------
    # emitting
    # ----------------------------------------------------------------------------------

    def close_due(self, now: datetime | None = None) -> pa.Table:
        """Remove and return the ``METRICS_SCHEMA`` rows of every due window.

        ``now`` (default: the wall clock) first advances the horizon: a window is due once
        ``window_end + allowed_lateness <= max(newest event time, now)`` or it ends before
        the newest emitted window. Rows are sorted by window_start, level, then dimensions
        (nulls last).
        """
        self._advance(_to_us(now if now is not None else datetime.now(UTC)), None)
        if self._horizon is None:
            return _EMPTY_METRICS
        return self._emit(pl.col(_W) + self._w <= self._horizon)

    def flush_all(self) -> pa.Table:
        """Emit every open window now (end of a finite run); later events for them are late."""
        if self._agg.height == 0:
            return _EMPTY_METRICS
        newest_end = int(self._agg.get_column(_W).max()) + self._w  # type: ignore[arg-type]
        table = self._emit(pl.lit(True))
        self._horizon = newest_end if self._horizon is None else max(self._horizon, newest_end)
        return table

    def _emit(self, due: pl.Expr) -> pa.Table:
        agg = self._agg.filter(due)
        if agg.height == 0:
            return _EMPTY_METRICS
        self._agg = self._agg.filter(~due)
        tools, guard, steps = (t.take(due) for t in (self._tools, self._guard, self._sketch))
        return _metrics(agg, tools, guard, steps, self._w, self.source)

    # ----------------------------------------------------------------------------------
    # persistence
    # ----------------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The open-window state and clocks, compact (msgpack of zstd Arrow IPC tables)."""
        return msgspec.msgpack.encode(
            _Snapshot(
                version=_SNAPSHOT_VERSION,
                window_s=self.window_s,
                allowed_lateness_s=self.allowed_lateness_s,
                max_ts_us=self._max_ts,
                horizon_us=self._horizon,
                agg=_ipc(self._agg),
                tools=_ipc(self._tools.frame()),
                guard=_ipc(self._guard.frame()),
                sketch=_ipc(self._sketch.frame()),
                source=self.source,
            )
        )

    @classmethod
    def restore(cls, data: bytes) -> WindowAggregator:
        """An aggregator in exactly the state ``snapshot`` saved."""
        snap = msgspec.msgpack.decode(data, type=_Snapshot)
        if snap.version != _SNAPSHOT_VERSION:
            raise ValueError(f"unsupported window snapshot version {snap.version}")
        agg = cls(snap.window_s, snap.allowed_lateness_s, source=snap.source)
        agg._max_ts = snap.max_ts_us
        agg._horizon = snap.horizon_us
        agg._agg = _from_ipc(snap.agg, _AGG_SCHEMA)
        agg._tools.load(_from_ipc(snap.tools, _TOOLS_SCHEMA))
        agg._guard.load(_from_ipc(snap.guard, _GUARD_SCHEMA))
        agg._sketch.load(_from_ipc(snap.sketch, _SKETCH_SCHEMA))
        return agg


# --------------------------------------------------------------------------------------
# building the metrics rows of emitted windows
# --------------------------------------------------------------------------------------


def _count(cond: pl.Expr, name: str) -> pl.Expr:
    return cond.sum().cast(pl.Int64).alias(name)


def _quality_counts(typ: pl.Expr) -> list[pl.Expr]:
    """The evaluation and feedback counts and sums of ``_add``'s group-by."""
    evaluation = typ == "evaluation"
    judged = evaluation & pl.col("passed").is_not_null()
    passed = evaluation & pl.col("passed").fill_null(False)
    scored = evaluation & pl.col("score").is_not_null()
    rated = (typ == "feedback") & pl.col("rating").is_not_null()
    count = _count

    def total(cond: pl.Expr, value: str, name: str) -> pl.Expr:
        return pl.col(value).filter(cond).sum().cast(pl.Float64).alias(name)

    out = [
        count(judged, "evaluations_judged"),
        count(passed, "evaluations_passed"),
        count(scored, "evaluations_scored"),
        total(scored, "score", "evaluation_score_sum"),
        count(rated, "feedback_ratings"),
        count(rated & (pl.col("rating") <= NEGATIVE_RATING), "feedback_negative"),
        count((typ == "feedback") & pl.col("correction").is_not_null(), "feedback_corrections"),
        total(rated, "rating", "feedback_rating_sum"),
    ]
    for e in EVALUATORS:
        mine = pl.col("evaluator") == e
        out += [
            count(evaluation & mine, f"eval_{e}_evaluations"),
            count(judged & mine, f"eval_{e}_judged"),
            count(passed & mine, f"eval_{e}_passed"),
            count(scored & mine, f"eval_{e}_scored"),
            total(scored & mine, "score", f"eval_{e}_score_sum"),
        ]
    return out


def _quality_ratios() -> list[pl.Expr]:
    """The evaluation and feedback ratios of a metrics row, from its summed counts."""
    c = pl.col
    hall = "eval_hallucination"
    out = [
        c("events_evaluation").alias("evaluations"),
        _ratio(c("evaluations_passed"), c("evaluations_judged")).alias("eval_pass_rate"),
        _ratio(c("evaluation_score_sum"), c("evaluations_scored")).alias("eval_score_mean"),
        _ratio(c(f"{hall}_judged") - c(f"{hall}_passed"), c(f"{hall}_judged")).alias(
            "hallucination_rate"
        ),
        _ratio(c("feedback_rating_sum"), c("feedback_ratings")).alias("feedback_rating_mean"),
        _ratio(c("feedback_negative"), c("feedback_ratings")).alias("feedback_negative_share"),
    ]
    for e in EVALUATORS:
        p = f"eval_{e}"
        out += [
            _ratio(c(f"{p}_passed"), c(f"{p}_judged")).alias(f"{p}_pass_rate"),
            _ratio(c(f"{p}_score_sum"), c(f"{p}_scored")).alias(f"{p}_score_mean"),
        ]
    return out


def _ratio(num: pl.Expr, den: pl.Expr) -> pl.Expr:
    return pl.when(den > 0).then(num.cast(pl.Float64) / den.cast(pl.Float64)).otherwise(None)


def _rollups(key_rows: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Every level's rows, each with an integer ``_rid``, and the ``_kid -> _rid`` mapping.

    ``key_rows`` are the due state rows (one per window and key) with a row id ``_kid``. The
    mapping has one row per (key row, level), so any per-key frame joined to it and summed
    by ``_rid`` is rolled up to every level at once, on integer keys only.
    """
    measures = [c for c in key_rows.columns if c not in (*_KEY, "_kid")]
    rows, maps = [], []
    offset = 0
    for level, dims in ROLLUPS.items():
        group = [_W, *dims]
        rolled = (
            key_rows.group_by(group, maintain_order=True)
            .agg(*(pl.col(m).sum() for m in measures), pl.col("_kid"))
            .with_row_index("_rid", offset=offset)
        )
        offset += rolled.height
        maps.append(rolled.select("_kid", "_rid").explode("_kid"))
        rows.append(
            rolled.drop("_kid").with_columns(
                pl.lit(level).alias("level"),
                *(pl.lit(None, dtype=pl.String).alias(d) for d in DIMENSIONS if d not in dims),
            )
        )
    return pl.concat(rows, how="diagonal"), pl.concat(maps)


def _per_row(
    frame: pl.DataFrame, kids: pl.DataFrame, mapping: pl.DataFrame, by: Sequence[str]
) -> pl.DataFrame:
    """Sum a per-(window, key, ``by``) state frame into every level's rows: (_rid, by) rows."""
    keys = ["_rid", *by]
    return (
        frame.join(kids, on=_KEY, how="inner", nulls_equal=True)
        .drop(_KEY)
        .join(mapping, on="_kid", how="inner")
        .drop("_kid")
        .group_by(keys)
        .agg(pl.exclude(keys).sum())
    )


def _metrics(
    agg: pl.DataFrame,
    tools: pl.DataFrame,
    guard: pl.DataFrame,
    steps: pl.DataFrame,
    w: int,
    source: str,
) -> pa.Table:
    key_rows = agg.sort(_KEY, nulls_last=True).with_row_index("_kid")
    kids = key_rows.select(*_KEY, "_kid")
    out, mapping = _rollups(key_rows)

    tool_lists = (
        _per_row(tools, kids, mapping, ["tool_name"])
        .group_by("_rid")
        .agg(
            pl.struct("tool_name", "calls", "errors")
            .sort_by("tool_name")
            .alias("tool_errors_by_tool")
        )
    )
    guard_lists = (
        _per_row(guard, kids, mapping, ["action"])
        .group_by("_rid")
        .agg(pl.struct("action", "count").sort_by("action").alias("guardrail_by_action"))
    )
    counts = _per_row(steps, kids, mapping, ["step", "bucket"])
    counts_all = (
        counts.group_by("_rid", "bucket")
        .agg(pl.col("count").sum())
        .with_columns(pl.lit(_ALL_STEPS, dtype=pl.Int8).alias("step"))
    )
    sketches = pl.concat([counts, counts_all], how="diagonal").with_columns(
        (pl.col("_rid").cast(pl.Int64) * _N_STEPS + pl.col("step")).alias("_sketch")
    )
    quants = sketch.quantiles(sketches, "_sketch", QUANTILES).with_columns(
        (pl.col("_sketch") // _N_STEPS).cast(pl.UInt32).alias("_rid"),
        (pl.col("_sketch") % _N_STEPS).alias("step"),
    )
    out = out.join(tool_lists, on="_rid", how="left").join(guard_lists, on="_rid", how="left")
    for step, prefix in enumerate(_STEP_PREFIXES):
        one = quants.filter(pl.col("step") == step).select(
            "_rid", *(pl.col(q).alias(f"{prefix}latency_{q}_ms") for q in QUANTILES)
        )
        out = out.join(one, on="_rid", how="left")

    c = pl.col
    tasks_ended = c("tasks_completed") + c("tasks_failed") + c("tasks_abandoned")
    out = out.with_columns(
        c(_W).alias("_start_us"),
        (pl.from_epoch(c(_W), time_unit="us").dt.replace_time_zone("UTC")).alias("window_start"),
        (pl.from_epoch(c(_W) + w, time_unit="us").dt.replace_time_zone("UTC")).alias("window_end"),
        c("events_llm_call").alias("llm_calls"),
        c("events_escalation").alias("escalations"),
        c("events_retrieval").alias("retrievals"),
        c("events_tool_call").alias("tool_calls"),
        _ratio(c("input_tokens") + c("output_tokens"), c("events_llm_call")).alias(
            "tokens_per_call"
        ),
        _ratio(c("tasks_completed"), tasks_ended).alias("task_success_rate"),
        _ratio(c("cost_usd"), c("tasks_started")).alias("cost_per_task"),
        _ratio(c("cost_usd"), c("tasks_completed")).alias("cost_per_completed_task"),
        _ratio(c("events_escalation"), c("tasks_started")).alias("escalation_rate"),
        _ratio(c("retrieval_misses"), c("events_retrieval")).alias("retrieval_miss_rate"),
        _ratio(c("tool_errors"), c("events_tool_call")).alias("tool_error_rate"),
        c("tool_errors_by_tool").fill_null(pl.lit([], dtype=out.schema["tool_errors_by_tool"])),
        c("guardrail_by_action").fill_null(pl.lit([], dtype=out.schema["guardrail_by_action"])),
        *_quality_ratios(),
    ).sort(["window_start", "level", *DIMENSIONS], nulls_last=True)

    columns = [out.get_column(name).to_list() for name in ["level", "_start_us", *DIMENSIONS]]
    ids = [
        _metric_id(level, start, start + w, dims, source)
        for level, start, *dims in zip(*columns, strict=True)
    ]
    out = out.with_columns(pl.Series("metric_id", ids, dtype=pl.String))
    return out.select(METRICS_SCHEMA.names).to_arrow().cast(METRICS_SCHEMA)


_encode: Final = msgspec.json.Encoder().encode


def _metric_id(
    level: str, start_us: int, end_us: int, dims: Sequence[str | None], source: str = ""
) -> str:
    """Stable id of a metrics row: the same window, level, key and source give the same id."""
    parts: list[object] = [level, start_us, end_us, *dims]
    if source:
        parts.append(source)
    return hashlib.blake2b(_encode(parts), digest_size=16).hexdigest()


def metric_records(metrics: pa.Table) -> list[tuple[bytes, bytes]]:
    """``(metric_id, JSON)`` pairs for the ``agent-metrics`` topic, one per metrics row.

    The JSON object has exactly the ``METRICS_SCHEMA`` columns; times are RFC 3339 in UTC.
    """
    return json_records(metrics, "metric_id")
