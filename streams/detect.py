"""Online drift and anomaly detection over closed-window metrics: the ``agent-anomalies`` rows.

``DriftDetector.observe`` takes the ``METRICS_SCHEMA`` rows ``WindowAggregator.close_due``
returns (one row per closed window and key: the low-volume stream, detection never runs per
event) and returns ``ANOMALIES_SCHEMA`` rows. For every watched level and key it keeps, per
measure, a *track*:

* the value on a *stable scale*, where its noise is about symmetric and does not grow with
  the level: log for costs, tokens and latencies (their changes are multiplicative), the
  Anscombe arcsine transform for rates (binomial noise ``1 / (4 n)`` whatever the rate, where
  a normal z on the raw rate turns 7 errors where 1 is usual into a 6-sigma event);
* a baseline: an EWMA of the value, winsorised at ``winsor_z`` deviations so a spike barely
  moves it, paused while a shift is pending or a condition is open (so "back to normal"
  means back to the level from before the change);
* the noise: an EWMA of the moving range (the difference of successive windows, as in an
  individuals control chart), which a slow drift cannot inflate the way the spread around a
  lagging baseline does; widened by ``1 / sqrt(windows learned)`` while the estimate is
  young, by ``sqrt(usual n / n)`` for a mean or quantile over fewer samples than usual, and
  never below the binomial noise of the window's sample count for a rate;
* ``z``: the window's distance from the baseline in those deviations;
* the *outlier* detector ``ewma_zscore``: ``|z| >= outlier_z``, one window far off;
* two one-sided ``river.drift.PageHinkley`` (a CUSUM) on the clipped ``z``, for sustained
  shifts. Standardised input lets one threshold fit every key and measure; one-sided gives
  the direction. Not ``drift.ADWIN``: its bound is for values in [0, 1] and carries a
  ``2 / (3 m) ln(2 / delta)`` term, so on one value per window it needed ~45 windows to
  confirm an escalation step 8 % -> 31 % and ~25 windows even for a 5-deviation step
  (Page-Hinkley: 2-6), by when the baseline has started to follow the shift.

One multivariate detector runs over the key's vector of folded deviations (``|z|`` clipped
at ``hst_clip``): ``preprocessing.MinMaxScaler`` into ``anomaly.HalfSpaceTrees``, one model
shared by all keys (residuals are comparable across keys; a model per key would hold
0.3-1 MB of trees per key and need ``hst_window`` windows of each key before its first
score). It reports windows where several measures are off together but none enough for
``outlier_z``. On these residuals its score alone separates poorly (normal windows reach
0.85-0.95), so it alerts only with ``hst_min_measures`` measures at ``hst_min_z`` or more.

A detection becomes an alert only when the change is also *practically* significant: its
relative change (below) is at least ``min_relative_change``; for a drift, the recent level
(median of the last ``recent_windows`` values) must also be ``drift_z`` deviations off. A
Page-Hinkley detection that is not (yet) significant stays *pending* for ``pending_windows``
with the baseline paused, since river's detectors restart after firing and would then
measure from the drifted level: a slow drift is detected long before it matters, and
reported when it does.

Alerts belong to *conditions*, one at a time per (level, key, measure): the first alert
opens one (stable id: level, key, measure and first window); a drift confirming the outlier
that opened it is reported once more (``confirm_drift``); anything else about it is silent
for ``cooldown_windows``, then reported again if it persists. A condition closes with a
``recovery`` row when a sequential test (a CUSUM of "back at the baseline", see
``_decide``) says the measure is back, after about ``recovery_windows`` normal windows; when
the value crosses to the other side of the baseline (a new condition opens); when it has
lasted ``rebaseline_windows`` (the new level becomes the baseline); or when its key is
evicted after ``evict_after_windows`` without data.

Relative change and severity: on log scales ``larger / smaller - 1`` of the value and the
baseline (x2 and x0.5 are both 1.0); for rates the change in points over the rarer outcome's
baseline share, ``|value - p| / max(min(p, 1 - p), rate_floor)`` (a success rate 0.90 ->
0.80 doubles the failures: 1.0; an escalation rate 0.06 -> 0.30 is 4.0). For an outlier it
is the window's value against the baseline, for a drift the recent level's. Severity is
``critical`` from ``critical_change`` (1.0: doubled or halved), ``warning`` from
``warning_change`` (0.5), else ``info`` (from ``min_relative_change``, 0.25); a move in the
harmless direction of a measure (``MeasureSpec.worse``: cheaper, faster, fewer errors, more
successes) is always ``info``.

Windows are counted on the epoch-aligned window index (``window_start // window length``), so
cooldowns and eviction follow event time, never the wall clock, and a replay of the same
tables gives the same rows. Cost: ~4,000-5,000 rows/s measured on one core of a busy box
(nine measures and one HalfSpaceTrees update a row; the trees are ~30 % of it), against ~1
row per key per minute from the worker; state
~11 kB a key in memory, ~1 kB a key in a snapshot (plus ~200 kB of trees).
"""

from __future__ import annotations

import hashlib
import math
import pickle
import statistics
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import metadata
from typing import Any, Final, Literal

import msgspec
import pyarrow as pa
import pyarrow.compute as pc
from river import anomaly, compose, drift, preprocessing

from sinks.contracts import ANOMALIES_SCHEMA, CONTRIBUTOR
from streams.records import json_records
from streams.windows import DIMENSIONS, EVALUATORS, METRICS_SCHEMA, ROLLUPS

__all__ = [
    "ANOMALIES_SCHEMA",
    "CONTRIBUTOR",
    "DEFAULT_MEASURES",
    "DETECTORS",
    "DetectorConfig",
    "DriftDetector",
    "MeasureSpec",
    "OpenCondition",
    "anomaly_records",
]

Kind = Literal["drift", "outlier", "recovery", "release_regression", "rule"]
"""``release_regression`` rows come from ``streams.releases`` and ``rule`` rows from
``streams.rules``, never from ``DriftDetector``."""
Direction = Literal["up", "down"]
Severity = Literal["info", "warning", "critical"]

_TS: Final = pa.timestamp("us", tz="UTC")
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_US: Final = timedelta(microseconds=1)


_EMPTY: Final = ANOMALIES_SCHEMA.empty_table()
_OPTIONAL: Final = ("rule", "contributors", "explanation")


# --------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------


DETECTORS: Final = ("ewma_zscore", "page_hinkley", "half_space_trees")
"""The detectors: one-window outliers, sustained shifts, joint deviations of a key."""


@dataclass(frozen=True)
class MeasureSpec:
    """How one ``METRICS_SCHEMA`` column is watched.

    ``scale`` is 'log' (positive and multiplicative: costs, tokens, latencies; a value <= 0
    is skipped) or 'rate' (a share in [0, 1]). ``samples`` are the metrics columns whose sum
    is the number of samples behind the value: a window with fewer than
    ``DetectorConfig.min_samples`` is skipped (neither learned nor judged). ``worse`` is the
    direction that is bad news; moves the other way are reported with severity 'info'.
    ``detectors`` are those of ``DETECTORS`` that watch it (default: all three).
    """

    column: str
    scale: Literal["log", "rate"]
    samples: tuple[str, ...]
    worse: Direction = "up"
    detectors: tuple[str, ...] = DETECTORS


DEFAULT_MEASURES: Final = (
    MeasureSpec("cost_per_task", "log", ("tasks_started",)),
    MeasureSpec("tokens_per_call", "log", ("llm_calls",)),
    MeasureSpec("llm_latency_p95_ms", "log", ("llm_calls",)),
    MeasureSpec("tool_latency_p95_ms", "log", ("tool_calls",)),
    MeasureSpec("retrieval_latency_p95_ms", "log", ("retrievals",)),
    MeasureSpec("escalation_rate", "rate", ("tasks_started",)),
    MeasureSpec("retrieval_miss_rate", "rate", ("retrievals",)),
    MeasureSpec("tool_error_rate", "rate", ("tool_calls",)),
    MeasureSpec(
        "task_success_rate",
        "rate",
        ("tasks_completed", "tasks_failed", "tasks_abandoned"),
        worse="down",
    ),
    # Quality signals: each evaluator's pass rate and the share of negative ratings. Not in
    # the joint model: its trees were calibrated on the nine operational measures above.
    *(
        MeasureSpec(
            f"eval_{e}_pass_rate",
            "rate",
            (f"eval_{e}_judged",),
            worse="down",
            detectors=("ewma_zscore", "page_hinkley"),
        )
        for e in EVALUATORS
    ),
    MeasureSpec(
        "feedback_negative_share",
        "rate",
        ("feedback_ratings",),
        detectors=("ewma_zscore", "page_hinkley"),
    ),
)
"""The measures watched by default. ``cost_per_completed_task`` is left out: it is
``cost_per_task`` over the success rate, both already watched; ``hallucination_rate`` is one
minus ``eval_hallucination_pass_rate``."""


@dataclass(frozen=True)
class DetectorConfig:
    """Detection parameters; window counts are windows of one key, in event time.

    Calibrated on synthetic keys of 25-120 tasks a window with autocorrelated noise
    (``tests/test_detect.py``): no alert in 8 x 50 steady keys x 240 windows, and the
    injected changes found within the delays the tests state.

    * ``measures`` (``DEFAULT_MEASURES``): what is watched, and how.
    * ``levels`` (key, agent): metrics levels watched. 'key' finds the version, prompt or
      model that regressed; an 'agent' rollup pools all its keys, so it sees changes (cost,
      mostly) too small for one key's noise, and covers keys too small for ``min_samples``.
      'tenant' is left out: a tenant's trouble shows at its keys and agents.
    * ``warmup_windows`` (30): a track alerts only after learning this many valid windows,
      so a new key, or a restart without a snapshot, never raises a burst.
    * ``min_samples`` (20): a window whose value rests on fewer samples (tasks for task
      rates and cost per task, calls for tokens, latencies and error rates) is skipped.
    * ``cooldown_windows`` (60): after an alert the condition is silent this long (except
      for one drift confirming the outlier that opened it, if ``confirm_drift``), then
      reported again if still detected.
    * ``recovery_windows`` (5): about how many normal windows close a condition.
    * ``rebaseline_windows`` (360): a condition open this long is the new normal: its level
      becomes the baseline and it closes. ``None``: never.
    * ``evict_after_windows`` (1440, a day of 1-minute windows): a key without a window for
      this long is forgotten; its open conditions close with a ``recovery`` row.
    * ``baseline_alpha`` (0.02): EWMA weight of the baseline and the noise (~100 windows of
      memory). ``recent_windows`` (3): the recent level is the median of this many values.
    * ``outlier_z`` (7.0): ``|z|`` of a one-window outlier. ``drift_z`` (1.5): distance of
      the recent level a drift needs. ``normal_z`` (1.5): largest reference of the recovery
      test. ``winsor_z`` (3.0): clip of the baseline's updates. ``z_clip`` (8.0): clip of the
      ``z`` fed to the drift detectors and the recovery test.
    * ``min_relative_change`` (0.25), ``warning_change`` (0.5), ``critical_change`` (1.0),
      ``rate_floor`` (0.05): practical significance and severity (module docstring).
    * ``min_log_sigma`` (0.02): floor of a log-scale deviation (a 2 % wobble is never 1 z).
    * ``ph_delta`` (0.75), ``ph_threshold`` (12.0), ``ph_min_instances`` (10): Page-Hinkley
      on ``z``; a shift of ``d`` deviations is detected after about
      ``threshold / (d - delta)`` windows (a 3-deviation step in ~5, a 1.5-deviation one in
      ~16); shifts under ``delta`` deviations are ignored. ``ph_prime`` (30): in-control
      zeros fed to a new detector of a log-scale measure (see ``DriftDetector._page_hinkley``). ``pending_windows``
      (30): how long a detected shift may wait to become significant.
    * ``hold_evidence`` (3.0), rates only: the baseline stops learning while a one-sided
      CUSUM of ``z`` (reference ``ph_delta``) is at this level or more, a shift building up
      that the drift detectors have not confirmed yet (``DriftDetector._holds``), for at
      most ``pending_windows``. ``ph_prime_rate`` (200): the in-control zeros of a rate's
      Page-Hinkley. Both for rates only: a rate's noise floor is binomial, known from its
      sample count, so a sustained shift of 1.5-2 deviations is a real change; on log scales
      (p95 latencies) the noise is estimated and slow wanders of that size occur in steady
      traffic (either change alone raised a false drift on a steady tool latency p95).
    * ``borrow_baselines`` (True): a new key starts from the baseline of a warm sibling
      key of the same agent, model and tenant (``DriftDetector._borrow``).
    * ``hst_trees`` (25), ``hst_height`` (8), ``hst_window`` (250 rows): HalfSpaceTrees
      (more trees: less score noise; 10 trees left normal and anomalous scores overlapping).
      ``hst_clip`` (6.0): range of the folded deviations. It alerts when its score reaches
      ``hst_threshold`` (0.9) with at least ``hst_min_measures`` (2) measures ``hst_min_z``
      (4.0) or more off; the most deviating one is the alert's measure.
    """

    measures: tuple[MeasureSpec, ...] = DEFAULT_MEASURES
    levels: tuple[str, ...] = ("key", "agent")
    warmup_windows: int = 30
    min_samples: int = 20
    cooldown_windows: int = 60
    recovery_windows: int = 5
    rebaseline_windows: int | None = 360
    evict_after_windows: int = 1440
    baseline_alpha: float = 0.02
    recent_windows: int = 3
    confirm_drift: bool = True
    outlier_z: float = 7.0
    drift_z: float = 1.5
    normal_z: float = 1.5
    winsor_z: float = 3.0
    z_clip: float = 8.0
    min_relative_change: float = 0.25
    warning_change: float = 0.5
    critical_change: float = 1.0
    rate_floor: float = 0.05
    min_log_sigma: float = 0.02
    ph_delta: float = 0.75
    ph_threshold: float = 12.0
    ph_min_instances: int = 10
    ph_prime: int = 30
    ph_prime_rate: int = 200
    pending_windows: int = 30
    hold_evidence: float = 3.0
    hst_trees: int = 25
    hst_height: int = 8
    hst_window: int = 250
    hst_clip: float = 6.0
    hst_threshold: float = 0.9
    hst_min_z: float = 4.0
    hst_min_measures: int = 2
    borrow_baselines: bool = True

    def __post_init__(self) -> None:
        names = set(METRICS_SCHEMA.names)
        seen = set()
        for spec in self.measures:
            for col in (spec.column, *spec.samples):
                if col not in names:
                    raise ValueError(f"{col!r} is not a METRICS_SCHEMA column")
            if spec.column in seen:
                raise ValueError(f"measure {spec.column!r} listed twice")
            unknown = set(spec.detectors) - set(DETECTORS)
            if unknown:
                raise ValueError(f"unknown detectors {sorted(unknown)}; known: {DETECTORS}")
            seen.add(spec.column)
        if not self.measures:
            raise ValueError("at least one measure must be watched")
        for level in self.levels:
            if level not in ROLLUPS:
                raise ValueError(f"unknown level {level!r}; levels are {list(ROLLUPS)}")
        counts = (
            "warmup_windows",
            "min_samples",
            "cooldown_windows",
            "recovery_windows",
            "evict_after_windows",
            "recent_windows",
            "pending_windows",
            "ph_min_instances",
            "ph_prime",
            "hst_trees",
            "hst_height",
            "hst_window",
            "hst_min_measures",
        )
        for name in counts:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rebaseline_windows is not None and self.rebaseline_windows < 1:
            raise ValueError("rebaseline_windows must be >= 1 or None")
        positive = (
            "drift_z",
            "hold_evidence",
            "winsor_z",
            "z_clip",
            "rate_floor",
            "min_log_sigma",
            "hst_clip",
        )
        for name in (*positive, "ph_threshold"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 < self.baseline_alpha <= 1.0:
            raise ValueError("baseline_alpha must be within (0, 1]")
        if not 0 < self.min_relative_change <= self.warning_change <= self.critical_change:
            raise ValueError("need 0 < min_relative_change <= warning_change <= critical_change")
        if not 0 < self.normal_z <= self.outlier_z:
            raise ValueError("need 0 < normal_z <= outlier_z")


# --------------------------------------------------------------------------------------
# state
# --------------------------------------------------------------------------------------


class _Condition:
    """An ongoing anomaly of one track, from its first alert to its recovery."""

    __slots__ = (
        "baseline",
        "calm",
        "condition_id",
        "detector",
        "direction",
        "drift_reported",
        "evidence",
        "last_alert",
        "last_observed",
        "opened",
        "severity",
        "shift",
        "start_us",
    )

    def __init__(
        self,
        condition_id: str,
        start_us: int,
        opened: int,
        direction: Direction,
        detector: str,
        baseline: float,
    ) -> None:
        self.condition_id = condition_id
        self.start_us = start_us
        self.opened = opened  # window index of the first alert
        self.direction: Direction = direction
        self.detector = detector
        self.baseline = baseline
        self.last_alert = opened
        self.drift_reported = False
        self.calm = 0  # windows since the latest detection
        self.shift = 0.0  # size of the latest detection in deviations (its candidate's shift)
        self.evidence = 0.0  # one-sided CUSUM of "back at the baseline" (see _decide)
        self.severity: Severity = "info"
        self.last_observed = math.nan


class _Track:
    """Baseline, detectors and open condition of one (level, key, measure)."""

    __slots__ = (
        "building_down",
        "building_up",
        "cond",
        "held",
        "mr",
        "mu",
        "n",
        "pending",
        "pending_left",
        "ph_down",
        "ph_up",
        "prev",
        "recent",
        "samples",
    )

    def __init__(self) -> None:
        self.n = 0  # valid windows learned
        self.mu = 0.0  # baseline: mean of the log (log scale) or of the rate
        # Noise: mean absolute difference of successive learned windows on the stable scale
        # (_stable), the moving range of an individuals control chart. Unlike the spread
        # around the baseline it does not grow while the level drifts away from the baseline,
        # so a slow drift cannot hide by inflating the noise estimate.
        self.mr = 0.0
        self.prev = 0.0  # stable-scale value of the last learned window
        self.pending: Direction | None = None  # a detected shift waiting to matter
        self.pending_left = 0  # windows it may still wait
        self.samples = 0.0  # typical sample count of a learned window (same EWMA)
        self.recent: list[float] = []  # the last few valid values: the recent level
        self.ph_up: Any = None  # river detectors, created when the track is warm
        self.ph_down: Any = None
        # One-sided CUSUMs of z (reference ph_delta): evidence of a shift building up, which
        # holds the baseline (see DetectorConfig.hold_evidence); held counts those windows.
        self.building_up = 0.0
        self.building_down = 0.0
        self.held = 0
        self.cond: _Condition | None = None


class _Key:
    """One watched key of one level: its tracks (one per measure) and when it was last seen."""

    __slots__ = (
        "dims",
        "donor",
        "last_index",
        "last_us",
        "level",
        "tracks",
        "window_us",
        "windows",
    )

    def __init__(self, level: str, dims: tuple[str | None, ...], n_measures: int) -> None:
        self.level = level
        self.dims = dims
        self.donor: str | None = None  # whose baseline it borrowed (see _borrow)
        self.windows = 0
        self.last_index = -(2**62)
        self.last_us = 0
        self.window_us = 0
        self.tracks = [_Track() for _ in range(n_measures)]


@dataclass(frozen=True)
class OpenCondition:
    """An ongoing condition, as ``DriftDetector.open_conditions`` reports it."""

    condition_id: str
    level: str
    key: dict[str, str | None]
    measure: str
    detector: str
    direction: Direction
    severity: Severity
    since: datetime  # window_start of the window that opened it
    last_alert: datetime  # window_start of its latest alert
    baseline: float
    last_observed: float
    calm_windows: int = field(default=0)  # latest windows without alert (recovery needs more)


class _Candidate:
    """What a detector found in one window for one track, before conditions and cooldown."""

    __slots__ = ("detector", "direction", "kind", "level", "note", "rel", "score", "shift")

    def __init__(
        self,
        kind: Kind,
        direction: Direction,
        detector: str,
        score: float,
        rel: float,
        level: float,
        shift: float,
        note: str = "",
    ) -> None:
        self.kind: Kind = kind
        self.direction: Direction = direction
        self.detector = detector
        self.score = score
        self.rel = rel  # relative change the severity is taken from
        # The value compared to the baseline (the window's; for a drift the recent level), and
        # its distance from the baseline in deviations.
        self.level = level
        self.shift = shift
        self.note = note  # more detail for the message


_SNAPSHOT_MAGIC: Final = b"agentstream.detect\x00"
_SNAPSHOT_FORMAT: Final = 3
# E|X1 - X2| = 2 sigma / sqrt(pi) for independent normals: moving range to deviation.
_MR_TO_SIGMA: Final = math.sqrt(math.pi) / 2


def _version_tag() -> bytes:
    try:
        ours = metadata.version("agentstream")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        ours = "unknown"
    return f"{_SNAPSHOT_FORMAT}:{ours}:{metadata.version('river')}".encode()


# --------------------------------------------------------------------------------------
# the detector
# --------------------------------------------------------------------------------------


class _Window:
    """The window of the row being processed, and where its alerts go."""

    __slots__ = ("detected_at", "end_us", "index", "key", "out", "start_us")

    def __init__(
        self, key: _Key, start_us: int, end_us: int, index: int, detected_at: int, out: _Rows
    ) -> None:
        self.key = key
        self.start_us = start_us
        self.end_us = end_us
        self.index = index
        self.detected_at = detected_at
        self.out = out


class _Rows:
    """Column lists of the output table."""

    def __init__(self) -> None:
        self.cols: dict[str, list[Any]] = {name: [] for name in ANOMALIES_SCHEMA.names}

    def add(self, **values: Any) -> None:
        for name, column in self.cols.items():
            column.append(values[name] if name not in _OPTIONAL else values.get(name))

    def table(self) -> pa.Table:
        if not self.cols["anomaly_id"]:
            return _EMPTY
        return pa.table(self.cols, schema=ANOMALIES_SCHEMA)


class DriftDetector:
    """Per-key online drift and outlier detection over closed-window metrics rows.

    Feed every ``close_due`` table to ``observe`` in order; keep ``snapshot`` with the
    window state. Deterministic: the same config, seed and input give the same output.
    """

    def __init__(self, config: DetectorConfig | None = None, seed: int = 0) -> None:
        self.config = config if config is not None else DetectorConfig()
        self.seed = seed
        cfg = self.config
        self._measures = cfg.measures
        self._memory = 2.0 / cfg.baseline_alpha - 1.0  # windows an EWMA of alpha averages
        self._levels = frozenset(cfg.levels)
        self._keys: OrderedDict[tuple[str, tuple[str | None, ...]], _Key] = OrderedDict()
        self._newest_index: int | None = None
        names = [m.column for m in cfg.measures if "half_space_trees" in m.detectors]
        # The scaler is pinned to [0, hst_clip] by two priming rows and its inputs are clipped
        # to that range, so its min and max never move: one extreme window cannot squeeze the
        # normal range of every key for good, as a plain running min/max would.
        scaler: Any = preprocessing.MinMaxScaler()
        scaler.learn_one(dict.fromkeys(names, 0.0))
        scaler.learn_one(dict.fromkeys(names, cfg.hst_clip))
        self._hst: Any = compose.Pipeline(
            scaler,
            anomaly.HalfSpaceTrees(
                n_trees=cfg.hst_trees, height=cfg.hst_height, window_size=cfg.hst_window, seed=seed
            ),
        )

    # ----------------------------------------------------------------------------------
    # public API
    # ----------------------------------------------------------------------------------

    def observe(self, metrics: pa.Table, detected_at: datetime) -> pa.Table:
        """Feed closed-window metrics rows; return the ``ANOMALIES_SCHEMA`` rows they raise.

        Rows are taken in ``window_start`` order (ties in table order); rows of levels not
        watched are ignored, and so is a row whose window is not newer than the last one seen
        for its key (a replayed window never counts twice). ``detected_at`` (timezone-aware)
        is stamped on every row. Keys silent for ``evict_after_windows`` are then evicted.
        """
        detected_us = _to_us(detected_at)
        out = _Rows()
        if metrics.num_rows:
            level_col = metrics.column("level")
            mask = pc.is_in(level_col, value_set=pa.array(sorted(self._levels), pa.string()))
            rows = metrics.filter(mask)
            if rows.num_rows:
                order = pc.sort_indices(rows, sort_keys=[("window_start", "ascending")])
                rows = rows.take(order)
                self._observe_rows(rows, detected_us, out)
        self._evict(detected_us, out)
        return out.table()

    def open_conditions(self) -> list[OpenCondition]:
        """Every condition not yet recovered, oldest first."""
        found = []
        for key in self._keys.values():
            for spec, track in zip(self._measures, key.tracks, strict=True):
                cond = track.cond
                if cond is None:
                    continue
                found.append(
                    OpenCondition(
                        condition_id=cond.condition_id,
                        level=key.level,
                        key=dict(zip(DIMENSIONS, key.dims, strict=True)),
                        measure=spec.column,
                        detector=cond.detector,
                        direction=cond.direction,
                        severity=cond.severity,
                        since=_from_us(cond.start_us),
                        last_alert=_from_us(cond.last_alert * key.window_us),
                        baseline=cond.baseline,
                        last_observed=cond.last_observed,
                        calm_windows=cond.calm,
                    )
                )
        return sorted(found, key=lambda c: (c.since, c.condition_id))

    def tracked_keys(self) -> int:
        """How many (level, key) pairs hold state."""
        return len(self._keys)

    def snapshot(self) -> bytes:
        """The whole state, for ``restore``: a zlib-compressed pickle (river objects included).

        Only ``restore`` of the same agentstream and river versions reads it (it refuses any
        other); never restore bytes from an untrusted source (pickle runs code).
        """
        body = zlib.compress(pickle.dumps(self.__dict__, protocol=pickle.HIGHEST_PROTOCOL), 3)
        return _SNAPSHOT_MAGIC + _version_tag() + b"\x00" + body

    @classmethod
    def restore(cls, data: bytes) -> DriftDetector:
        """A detector in exactly the state ``snapshot`` saved: its future output is identical.

        Raises ``ValueError`` for a snapshot of another version; the caller then starts a
        fresh detector (warm-up keeps it quiet, but open conditions are forgotten).
        """
        if not data.startswith(_SNAPSHOT_MAGIC):
            raise ValueError("not a DriftDetector snapshot")
        tag, sep, body = data[len(_SNAPSHOT_MAGIC) :].partition(b"\x00")
        if not sep or tag != _version_tag():
            raise ValueError(
                f"detector snapshot of version {tag.decode(errors='replace')!r}, "
                f"this is {_version_tag().decode()!r}"
            )
        state = pickle.loads(zlib.decompress(body))
        detector = cls.__new__(cls)
        detector.__dict__.update(state)
        return detector

    # ----------------------------------------------------------------------------------
    # rows
    # ----------------------------------------------------------------------------------

    def _observe_rows(self, rows: pa.Table, detected_us: int, out: _Rows) -> None:
        cfg = self.config
        measures = self._measures
        levels = rows.column("level").to_pylist()
        starts = pc.cast(rows.column("window_start"), pa.int64()).to_pylist()
        ends = pc.cast(rows.column("window_end"), pa.int64()).to_pylist()
        dims = list(zip(*(rows.column(d).to_pylist() for d in DIMENSIONS), strict=True))
        values = [rows.column(m.column).to_pylist() for m in measures]
        sample_cols: dict[str, list[Any]] = {}
        for spec in measures:
            for col in spec.samples:
                if col not in sample_cols:
                    sample_cols[col] = rows.column(col).to_pylist()
        samples = [[sample_cols[c] for c in m.samples] for m in measures]

        for i in range(rows.num_rows):
            start, end = starts[i], ends[i]
            width = end - start
            if width <= 0:
                continue
            index = start // width
            ident = (levels[i], dims[i])
            key = self._keys.get(ident)
            if key is None:
                key = self._keys[ident] = _Key(levels[i], dims[i], len(measures))
                if cfg.borrow_baselines and levels[i] == "key":
                    self._borrow(key)
            elif index <= key.last_index:
                continue  # a window already seen for this key: replays never count twice
            self._keys.move_to_end(ident)
            key.windows += 1
            key.last_index = index
            key.last_us = start
            key.window_us = width
            if self._newest_index is None or index > self._newest_index:
                self._newest_index = index
            win = _Window(key, start, end, index, detected_us, out)

            # Phase 1: every measure's deviation and detectors; alerts are decided after the
            # multivariate model has seen the whole vector.
            zs: list[float | None] = [None] * len(measures)
            stables: list[float] = [0.0] * len(measures)
            ns: list[int] = [0] * len(measures)
            found: list[_Candidate | None] = [None] * len(measures)
            xs: list[float | None] = [None] * len(measures)
            for j, spec in enumerate(measures):
                x = values[j][i]
                if x is None or not math.isfinite(x):
                    continue
                n = 0
                for counts in samples[j]:
                    n += counts[i] or 0
                if n < cfg.min_samples or (spec.scale == "log" and x <= 0):
                    continue
                xs[j] = x
                stables[j] = _stable(spec, x, n)
                ns[j] = n
                zs[j], found[j] = self._measure(spec, key.tracks[j], x, stables[j], n)

            self._multivariate(key, zs, xs, found)

            # Phase 2: conditions, cooldown and recovery; then the baseline learns the window.
            for j, spec in enumerate(measures):
                x = xs[j]
                if x is None:
                    continue
                track = key.tracks[j]
                z = zs[j]
                assert z is not None
                self._decide(win, spec, track, x, z, found[j])
                if track.cond is None and found[j] is None and track.pending is None:
                    if spec.scale == "rate" and self._holds(track):
                        continue
                    self._learn(spec, track, x, ns[j], stables[j], z)

    def _borrow(self, key: _Key) -> None:
        """Start a new key from the baseline of its closest warm sibling: same agent, model
        and tenant (the cost and latency drivers), preferably the same prompt (the agent's
        previous version), else the same version (the previous prompt), else any.

        So a new version or prompt is judged from its first window instead of after
        ``warmup_windows`` of its own: one costing 6x its predecessor is an outlier at once.
        The borrowed track counts as just warm (``warmup_windows`` learned), so its own
        windows take over the baseline at the warm-up pace (1 / 31 a window, then the EWMA).
        """
        cfg = self.config
        agent, version, prompt, model, tenant = key.dims
        best: tuple[int, int, int] | None = None
        donor: _Key | None = None
        for other in self._keys.values():
            o_agent, o_version, o_prompt, o_model, o_tenant = other.dims
            if other is key or other.level != "key":
                continue
            if (o_agent, o_model, o_tenant) != (agent, model, tenant):
                continue
            warm = sum(t.n >= cfg.warmup_windows for t in other.tracks)
            if not warm:
                continue
            rank = (
                2 if o_prompt == prompt else 1 if o_version == version else 0,
                warm,
                other.windows,
            )
            if best is None or rank > best:
                best, donor = rank, other
        if donor is None:
            return
        key.donor = f"{donor.dims[1]}/{donor.dims[2]}"
        for mine, theirs in zip(key.tracks, donor.tracks, strict=True):
            if theirs.n < cfg.warmup_windows:
                continue
            mine.n = cfg.warmup_windows
            mine.mu, mine.mr, mine.prev = theirs.mu, theirs.mr, theirs.prev
            mine.samples = theirs.samples

    def _measure(
        self, spec: MeasureSpec, track: _Track, x: float, stable: float, n: int
    ) -> tuple[float, _Candidate | None]:
        """``z`` of a valid value ``x`` over ``n`` samples (``stable``: on the stable scale)
        against the baseline, and what the detectors found; feeds the drift detectors."""
        cfg = self.config
        recent = track.recent
        recent.append(x)
        if len(recent) > cfg.recent_windows:
            del recent[0]
        if track.n == 0:
            # The first value is the baseline; it cannot deviate from itself.
            track.mu = _value(spec, x)
            return 0.0, None
        z = (stable - _stable(spec, _unscaled(spec, track.mu), n)) / self._sigma(spec, track, n)
        if track.n < cfg.warmup_windows:
            return z, None
        zc = max(-cfg.z_clip, min(cfg.z_clip, z))
        track.building_up = max(0.0, track.building_up + zc - cfg.ph_delta)
        track.building_down = max(0.0, track.building_down - zc - cfg.ph_delta)
        fired: Direction | None = None
        if "page_hinkley" in spec.detectors:
            if track.ph_up is None:
                prime = cfg.ph_prime_rate if spec.scale == "rate" else cfg.ph_prime
                track.ph_up = self._page_hinkley("up", prime)
                track.ph_down = self._page_hinkley("down", prime)
            track.ph_up.update(zc)
            track.ph_down.update(zc)
            if track.ph_up.drift_detected:
                fired = "up"
            elif track.ph_down.drift_detected:
                fired = "down"

        baseline = self._baseline(spec, track)
        if fired is not None:
            track.pending = fired
            track.pending_left = cfg.pending_windows
            track.building_up = track.building_down = 0.0  # the detector has taken over
        if track.pending is not None:
            # A sustained shift counts only once the recent level (median of the last few
            # windows) confirms it: on the side of the baseline the detector said, by a
            # relevant amount and clear of the noise. A detector that fires before that (a
            # slow drift: statistically visible long before it matters) leaves the shift
            # pending for pending_windows, with the baseline frozen, instead of being lost:
            # river's detectors restart after firing and would then measure from the new level.
            # The level back on the other side cancels it (a shifted value coming back).
            level = statistics.median(recent)
            rel = self._relative(spec, baseline, level)
            level_dir: Direction = "up" if level > baseline else "down"
            shift = abs(_stable(spec, level, n) - _stable(spec, baseline, n))
            score = shift / self._sigma(spec, track, n)
            if level_dir != track.pending or track.pending_left <= 0:
                track.pending = None
            elif rel >= cfg.min_relative_change and score >= cfg.drift_z:
                track.pending = None
                return z, _Candidate("drift", level_dir, "page_hinkley", score, rel, level, score)
            else:
                track.pending_left -= 1
        if abs(z) >= cfg.outlier_z and "ewma_zscore" in spec.detectors:
            rel = self._relative(spec, baseline, x)
            if rel >= cfg.min_relative_change:
                return z, _Candidate("outlier", _dir(z), "ewma_zscore", abs(z), rel, x, abs(z))
        return z, None

    def _page_hinkley(self, mode: str, prime: int) -> Any:
        """A one-sided Page-Hinkley test, primed with ``prime`` in-control values.

        Its statistic is taken around its own running mean since it (re)started. ``z`` is
        already centred on the baseline, so that mean only hurts: started at the end of
        warm-up three windows before a step, it followed the step and never fired (measured
        on the escalation-jump scenario). Zeros anchor it where ``z`` belongs; with 30 of
        them a 1.5-deviation step pulled the mean a third of the way within 20 windows.
        """
        cfg = self.config
        ph: Any = drift.PageHinkley(
            min_instances=cfg.ph_min_instances,
            delta=cfg.ph_delta,
            threshold=cfg.ph_threshold,
            mode=mode,
        )
        for _ in range(prime):
            ph.update(0.0)
        return ph

    def _multivariate(
        self,
        key: _Key,
        zs: list[float | None],
        xs: list[float | None],
        found: list[_Candidate | None],
    ) -> None:
        """Score the key's clipped deviation vector with HalfSpaceTrees, then learn it."""
        cfg = self.config
        warm = [
            x is not None and track.n >= cfg.warmup_windows and "half_space_trees" in spec.detectors
            for spec, x, track in zip(self._measures, xs, key.tracks, strict=True)
        ]
        if not any(warm):
            return
        clip = cfg.hst_clip
        # Folded deviations: |z| clipped, 0 for a measure without a judged value ("as
        # expected"). Folding puts every normal window in one dense corner and anything off,
        # either way, toward the sparse far side where the trees' mass is low; signed z left
        # most of the trees' random splits in empty space and separated far worse.
        vector = {
            spec.column: min(clip, abs(z)) if ok and z is not None else 0.0
            for spec, z, ok in zip(self._measures, zs, warm, strict=True)
            if "half_space_trees" in spec.detectors
        }
        off = [
            j
            for j, (z, ok) in enumerate(zip(zs, warm, strict=True))
            if ok and z is not None and abs(z) >= cfg.hst_min_z
        ]
        # Only a window with several measures off can alert, so only such a window is scored
        # (scoring costs as much as learning; nearly every window is normal).
        score = self._hst.score_one(vector) if len(off) >= cfg.hst_min_measures else 0.0
        self._hst.learn_one(vector)
        if score < cfg.hst_threshold:
            return
        off.sort(key=lambda j: -abs(zs[j] or 0.0))
        top = off[0]
        top_z = zs[top]
        spec, track, x = self._measures[top], key.tracks[top], xs[top]
        assert x is not None and top_z is not None
        if found[top] is not None:
            return  # already an outlier or drift on its own
        rel = self._relative(spec, self._baseline(spec, track), x)
        if rel >= cfg.min_relative_change:
            others = ", ".join(f"{self._measures[j].column} z={zs[j]:+.1f}" for j in off[1:])
            found[top] = _Candidate(
                "outlier",
                _dir(top_z),
                "half_space_trees",
                float(score),
                rel,
                x,
                abs(top_z),
                f"; off together with {others}",
            )

    # ----------------------------------------------------------------------------------
    # conditions
    # ----------------------------------------------------------------------------------

    def _decide(
        self,
        win: _Window,
        spec: MeasureSpec,
        track: _Track,
        x: float,
        z: float,
        cand: _Candidate | None,
    ) -> None:
        """Open, report, keep quiet or close the track's condition for this window."""
        cfg = self.config
        cond = track.cond
        if cond is None:
            if cand is not None:
                self._open(win, spec, track, x, z, cand)
            return
        cond.last_observed = x
        if cand is not None and cand.direction != cond.direction:
            # The value went past the baseline to the other side: a new condition.
            self._close(win, spec, track, x, z, "reversed")
            self._open(win, spec, track, x, z, cand)
            return
        if cand is not None:
            cond.calm = 0
            cond.evidence = 0.0
            cond.shift = cand.shift
            quiet = win.index - cond.last_alert < cfg.cooldown_windows
            confirms = cand.kind == "drift" and cfg.confirm_drift and not cond.drift_reported
            if not quiet or confirms:
                self._alert(win, spec, track, x, cand)
        else:
            # Recovery is a sequential test between "still shifted by `shift` deviations" and
            # "back at the baseline": a CUSUM of (c - z) toward the condition's side, with the
            # reference c halfway (at most normal_z). Back at the baseline it gains ~c a
            # window and closes after about recovery_windows windows; still shifted it drifts
            # down, so the noise of a key shifted by 2 deviations needs ~1e5 windows to close
            # it by mistake (a plain "last K windows look normal" rule fails within hours).
            c = min(cfg.normal_z, cond.shift / 2)
            side = z if cond.direction == "up" else -z
            side = min(side, cfg.z_clip)
            cond.calm += 1
            cond.evidence = max(0.0, cond.evidence + c - side)
            if cond.calm >= cfg.recovery_windows and cond.evidence >= c * cfg.recovery_windows:
                self._close(win, spec, track, x, z, "recovered")
                return
        rebaseline = cfg.rebaseline_windows
        if rebaseline is not None and win.index - cond.opened >= rebaseline:
            # A shift this old is the new normal: learn it instead of alerting on it forever.
            track.mu = _value(spec, statistics.median(track.recent))
            self._close(win, spec, track, x, z, "accepted")

    def _open(
        self, win: _Window, spec: MeasureSpec, track: _Track, x: float, z: float, cand: _Candidate
    ) -> None:
        key = win.key
        cid = _hash([key.level, *key.dims, spec.column, win.start_us])
        track.cond = _Condition(
            cid, win.start_us, win.index, cand.direction, cand.detector, self._baseline(spec, track)
        )
        track.cond.last_observed = x
        track.cond.shift = cand.shift
        self._alert(win, spec, track, x, cand)

    def _alert(
        self, win: _Window, spec: MeasureSpec, track: _Track, x: float, cand: _Candidate
    ) -> None:
        cfg = self.config
        cond = track.cond
        assert cond is not None
        cond.last_alert = win.index
        if cand.kind == "drift":
            cond.drift_reported = True
        severity = _severity(cand.rel, cand.direction, spec.worse, cfg)
        cond.severity = max(cond.severity, severity, key=_SEVERITY_RANK.__getitem__)
        baseline = cond.baseline
        borrowed = ""
        if win.key.donor is not None and win.key.windows <= cfg.warmup_windows:
            borrowed = f", baseline borrowed from {win.key.donor}"
        if cand.kind == "outlier":
            message = (
                f"{spec.column} of {_describe_key(win.key)} jumped {cand.direction} to "
                f"{_fmt(spec, x)} in the window starting {_iso(win.start_us)} (baseline "
                f"{_fmt(spec, baseline)}, {_change(spec, baseline, x)}, "
                f"z={cand.shift if cand.direction == 'up' else -cand.shift:+.1f}"
                f"{cand.note}{borrowed}; {cand.detector}, {severity})."
            )
        else:
            message = (
                f"{spec.column} of {_describe_key(win.key)} shifted {cand.direction}: recent "
                f"level {_fmt(spec, cand.level)} against a baseline of {_fmt(spec, baseline)} "
                f"({_change(spec, baseline, cand.level)}), {_fmt(spec, x)} in the window "
                f"starting {_iso(win.start_us)} ({cand.detector}, {severity}{borrowed})."
            )
        self._row(win, spec, cond, cand.kind, cand.detector, x, severity, cand.score, message)

    def _close(
        self, win: _Window, spec: MeasureSpec, track: _Track, x: float, z: float, why: str
    ) -> None:
        cfg = self.config
        cond = track.cond
        assert cond is not None
        track.cond = None
        # Fresh detectors: their memory of the condition would only skew the next one.
        track.ph_up = track.ph_down = track.pending = None
        track.building_up = track.building_down = 0.0
        track.held = 0
        since = _iso(cond.start_us)
        if why == "recovered":
            text = f"back to normal for {cfg.recovery_windows} windows"
        elif why == "accepted":
            text = (
                f"still {cond.direction} after {win.index - cond.opened} windows: accepted as "
                f"the new baseline ({_fmt(spec, self._baseline(spec, track))})"
            )
        elif why == "reversed":
            text = "now off in the other direction (a new condition opens)"
        else:
            text = f"key silent for {cfg.evict_after_windows} windows: condition dropped"
        message = (
            f"{spec.column} of {_describe_key(win.key)} {text} at {_fmt(spec, x)} "
            f"(baseline {_fmt(spec, cond.baseline)}); condition open since {since} closed."
        )
        self._row(win, spec, cond, "recovery", cond.detector, x, "info", abs(z), message)

    def _row(
        self,
        win: _Window,
        spec: MeasureSpec,
        cond: _Condition,
        kind: Kind,
        detector: str,
        observed: float,
        severity: Severity,
        score: float,
        message: str,
    ) -> None:
        key = win.key
        win.out.add(
            anomaly_id=_hash([cond.condition_id, kind, win.start_us]),
            condition_id=cond.condition_id,
            kind=kind,
            detected_at=win.detected_at,
            window_start=win.start_us,
            window_end=win.end_us,
            level=key.level,
            **dict(zip(DIMENSIONS, key.dims, strict=True)),
            measure=spec.column,
            detector=detector,
            baseline=cond.baseline,
            observed=float(observed),
            direction=cond.direction,
            severity=severity,
            score=float(score),
            example_event_ids=[],
            message=message,
        )

    def _evict(self, detected_us: int, out: _Rows) -> None:
        """Forget keys with no window for ``evict_after_windows`` (least recently seen first)."""
        newest = self._newest_index
        if newest is None:
            return
        limit = newest - self.config.evict_after_windows
        while self._keys:
            ident, key = next(iter(self._keys.items()))
            if key.last_index > limit:
                break
            del self._keys[ident]
            win = _Window(
                key, key.last_us, key.last_us + key.window_us, key.last_index, detected_us, out
            )
            for spec, track in zip(self._measures, key.tracks, strict=True):
                if track.cond is not None:
                    self._close(win, spec, track, track.cond.last_observed, 0.0, "evicted")

    # ----------------------------------------------------------------------------------
    # baseline arithmetic
    # ----------------------------------------------------------------------------------

    def _holds(self, track: _Track) -> bool:
        """Whether a rate's baseline skips this window: a shift is building up (a CUSUM of z
        at ``hold_evidence`` or more) and has not been held for ``pending_windows`` yet.

        Without the hold the baseline absorbs a modest shift before the drift detectors can
        confirm it: its EWMA follows 2-3 % of the gap a window, so a 1.5-deviation step (an
        evaluator's pass rate 96 % -> 89 % over ~50 answers a window) shrank to under one
        deviation within 20 windows and was never reported. A shift held this long without a
        detection is the new normal: learning resumes and the evidence starts over.
        """
        cfg = self.config
        if max(track.building_up, track.building_down) < cfg.hold_evidence:
            track.held = 0
            return False
        if track.held >= cfg.pending_windows:
            track.held = 0
            track.building_up = track.building_down = 0.0
            return False
        track.held += 1
        return True

    def _learn(
        self, spec: MeasureSpec, track: _Track, x: float, n: int, stable: float, z: float
    ) -> None:
        """Move the baseline and the noise estimate toward a normal window."""
        cfg = self.config
        track.n += 1
        if track.n == 1:
            track.prev = stable
            track.samples = n
            return  # the baseline was set by _measure
        # Plain running means until warm (fast, unbiased start), the EWMA after.
        alpha = max(1.0 / track.n, cfg.baseline_alpha)
        step = abs(stable - track.prev)
        track.prev = stable
        shrink = 1.0
        if track.n > cfg.warmup_windows:
            # Winsorised once warm: a window far off moves the baseline only as far as one
            # winsor_z deviations off would, and the noise as much as such a jump.
            sigma = self._sigma(spec, track, 0)
            if abs(z) > cfg.winsor_z:
                shrink = cfg.winsor_z / abs(z)
            step = min(step, cfg.winsor_z * sigma / _MR_TO_SIGMA)
        track.mu += alpha * shrink * (_value(spec, x) - track.mu)
        track.mr += alpha * (step - track.mr)
        track.samples += alpha * (n - track.samples)

    def _floor(self, spec: MeasureSpec) -> float:
        return self.config.min_log_sigma if spec.scale == "log" else 1e-3

    def _sigma(self, spec: MeasureSpec, track: _Track, n: int) -> float:
        """The deviation one window of ``n`` samples (0: any) is expected to show around the
        baseline, on the stable scale."""
        sigma = max(track.mr * _MR_TO_SIGMA, self._floor(spec))
        # The estimate rests on few windows early on (and ~2 / alpha windows of memory later):
        # widen it by its relative uncertainty, ~1 / sqrt(windows), so a key just out of warm-up
        # does not alert on noise its young estimate has not seen yet.
        sigma *= 1.0 + 1.0 / math.sqrt(min(max(track.n, 1), self._memory))
        if n <= 0:
            return sigma
        if spec.scale == "rate":
            # Never less than the binomial noise of this window's sample count, 1 / (2 sqrt n)
            # on the arcsine scale whatever the rate: a small window may wobble more.
            return max(sigma, 0.5 / math.sqrt(n))
        # A mean or a quantile over fewer samples than usual is noisier, as 1 / sqrt(n); more
        # samples than usual do not shrink it (part of the noise is not sampling).
        if n < track.samples:
            sigma *= math.sqrt(track.samples / n)
        return sigma

    def _relative(self, spec: MeasureSpec, baseline: float, value: float) -> float:
        """Relative change from ``baseline`` to ``value`` (measure units; module docstring)."""
        if spec.scale == "log":
            lo, hi = sorted((baseline, value))
            return hi / lo - 1.0
        return abs(value - baseline) / max(min(baseline, 1.0 - baseline), self.config.rate_floor)

    def _baseline(self, spec: MeasureSpec, track: _Track) -> float:
        """The baseline in the measure's units: geometric mean (log scale) or mean rate."""
        return _unscaled(spec, track.mu)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------

_SEVERITY_RANK: Final[dict[Severity, int]] = {"info": 0, "warning": 1, "critical": 2}


def _severity(rel: float, direction: Direction, worse: Direction, cfg: DetectorConfig) -> Severity:
    """Severity of a relative change ``rel`` in ``direction`` (module docstring)."""
    if direction != worse:
        return "info"
    if rel >= cfg.critical_change:
        return "critical"
    if rel >= cfg.warning_change:
        return "warning"
    return "info"


def _dir(z: float) -> Direction:
    return "up" if z > 0 else "down"


def _to_us(when: datetime) -> int:
    """Microseconds since the epoch of a timezone-aware datetime."""
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"naive datetime {when!r}: pass a timezone-aware datetime")
    return (when - _EPOCH) // _US


def _from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def _iso(us: int) -> str:
    return _from_us(us).strftime("%Y-%m-%dT%H:%M:%SZ")


_encode: Final = msgspec.json.Encoder().encode


def _hash(parts: list[Any]) -> str:
    return hashlib.blake2b(_encode(parts), digest_size=16).hexdigest()


def _fmt(spec: MeasureSpec, value: float) -> str:
    """A value for a message, in the measure's units."""
    if spec.scale == "rate":
        return f"{value:.1%}"
    if spec.column.endswith("_ms"):
        return f"{value:,.0f} ms"
    if spec.column.startswith("cost"):
        return f"${value:.4g}"
    return f"{value:,.4g}"


def _change(spec: MeasureSpec, baseline: float, value: float) -> str:
    """The change from the baseline for a message: points for rates, a factor otherwise."""
    if spec.scale == "rate":
        return f"{(value - baseline) * 100:+.1f} points"
    return f"x{value / baseline:.2f}"


def _value(spec: MeasureSpec, x: float) -> float:
    """What the baseline and the recent level average: the log of ``x``, or the rate itself
    (clipped: a rate over tasks started can exceed 1 in a window, escalations of tasks started
    in the window before)."""
    return math.log(x) if spec.scale == "log" else min(max(x, 0.0), 1.0)


def _unscaled(spec: MeasureSpec, v: float) -> float:
    return math.exp(v) if spec.scale == "log" else v


def _arcsine(p: float, n: int) -> float:
    """Anscombe's arcsine transform of a rate ``p`` over ``n`` samples: variance ``1 / (4 n)``
    whatever the rate, and nearly symmetric even for a rare outcome."""
    k = min(max(p, 0.0), 1.0) * n
    return math.asin(math.sqrt((k + 0.375) / (n + 0.75)))


def _stable(spec: MeasureSpec, x: float, n: int) -> float:
    """``x`` (over ``n`` samples) on a scale where its noise is about symmetric and its size
    does not depend on the level: log for costs, tokens and latencies, the arcsine transform
    for rates (a normal z on the raw rate would turn 7 errors where 1 is usual, a Poisson tail
    of 1e-4, into a 6-sigma event)."""
    if spec.scale == "log":
        return math.log(x)
    return _arcsine(x, n)


def _describe_key(key: _Key) -> str:
    """The key for a message: every dimension of a 'key' row, the grouped ones of a rollup."""
    named = dict(zip(DIMENSIONS, key.dims, strict=True))
    if key.level == "key":
        return (
            f"agent {named['agent_id']} {named['agent_version']} (prompt "
            f"{named['prompt_version']}, model {named['model']}, tenant {named['tenant_id']})"
        )
    parts = [f"{d.removesuffix('_id')} {v}" for d, v in named.items() if v is not None]
    return " ".join(parts) if parts else key.level


def anomaly_records(table: pa.Table) -> list[tuple[bytes, bytes]]:
    """``(anomaly_id, JSON)`` pairs for the ``agent-anomalies`` topic, one per anomaly row.

    The JSON object has exactly the ``ANOMALIES_SCHEMA`` columns; times are RFC 3339 in UTC.
    """
    return json_records(table, "anomaly_id")
