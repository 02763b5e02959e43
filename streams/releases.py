"""Live verdicts on releases: is the candidate version worse than the baseline it replaces?

``ReleaseJudge`` is pure (no I/O): the worker hands it each batch's events (``register``
picks the ``release`` records) and the metrics rows of every window that closes
(``observe``). For each active release it sums the closed windows' ``level = 'key'`` rows of
the release's agent (and tenant, if the release names one) into a *candidate* side (rows whose
``dimension`` equals the candidate version) and a *baseline* side, over the same windows, and
runs one sequential test per measure:

============================ ======== ======================================= =============
measure                      worse    statistic                               effect
============================ ======== ======================================= =============
``escalation_rate``          up       escalations / tasks_started             difference
``retrieval_miss_rate``      up       retrieval_misses / retrievals           difference
``tool_error_rate``          up       tool_errors / tool_calls                difference
``task_success_rate``        down     completed / (completed+failed+abandoned) difference
``cost_per_completed_task``  up       sum cost_usd / sum tasks_completed      relative
``latency_p95_ms``           up       per-window log p95, paired by window    relative
============================ ======== ======================================= =============

The test is the mixture sequential probability ratio test (mSPRT) of Johari, Pekelis and
Walsh, "Always valid inference" (2017/2022): for an estimate ``theta`` of the difference with
variance ``V`` and a normal mixing distribution ``N(0, tau^2)`` over the alternative,

    Lambda = sqrt(V / (V + tau^2)) * exp(theta^2 tau^2 / (2 V (V + tau^2)))

is (asymptotically) a martingale under "no difference", so by Ville's inequality
``P(Lambda >= 1/alpha at any look) <= alpha``: the verdict may be read after every window and
the error rate still holds. The always-valid p-value is the running minimum of ``1 /
Lambda``; the always-valid confidence interval, the set of differences the test would not
reject, is ``theta +- sqrt(V (V + tau^2) / tau^2 * (2 ln(1/alpha) + ln((V + tau^2) / V)))``.

* Rates: ``theta = p_c - p_b`` from the summed counts; ``V = p_c (1 - p_c) / n_c + p_b (1 -
  p_b) / n_b`` with ``p = (x + 0.5) / (n + 1)`` (never zero). Assumes the samples (tasks,
  retrievals, tool calls) are independent.
* Cost per completed task: ``theta = ln(R_c / R_b)`` of the ratios of sums; each side's
  variance by the delta method with windows as clusters (``sum_w (cost_w - R m_w)^2 /
  (sum_w m_w)^2``), so dependence inside a window (one expensive task, many calls) is
  accounted for.
* Latency p95: quantiles of metrics rows do not add up (and a p95 of a row with few steps is
  biased low: of 5 values it is their maximum, on average the 83rd percentile, so the side
  with less traffic would look faster). So ``register`` also folds each side's step
  latencies (llm, tool and retrieval events of the release's agent) into a log-bucket
  histogram per window (``streams.sketch``, 1 % accuracy), and ``observe`` reads each side's
  exact pooled p95 of the window from it, with a standard error from the order-statistic
  interval (the values at ranks ``n p -+ sqrt(n p (1 - p))``). ``theta`` is the mean over
  windows of ``ln p95_c - ln p95_b``, ``V`` the sum of their variances over ``k^2``; a
  window counts when both sides have ``min_window_steps`` steps. Late
  events (``late`` set) are left out, as in the windows.
* The cost variance from ``k`` windows is multiplied by ``(k - 1) / (k - 3)`` (the variance
  of a Student t with ``k - 1`` degrees of freedom), which keeps the early looks, when the
  variance itself is uncertain, from over-rejecting.

A verdict is ``running`` until both sides have ``min_samples`` samples of the measure and
``min_windows`` windows with data on both sides; then ``regressed`` or ``better`` as soon as
the p-value is at most ``alpha / len(measures)`` (Bonferroni: ``alpha`` bounds the chance of
*any* false verdict of a release, over all measures and all looks), in the measure's worse or
better direction, or ``no_difference`` once the always-valid interval lies inside
``+-margin`` (equivalence). Decisions are final (the test's guarantee is for stopping at the
first crossing): the measure then gets no more rows.

Rows: ``VERDICTS_SCHEMA`` for every active release and undecided measure at each window
close with data, and a ``release_regression`` anomaly (``ANOMALIES_SCHEMA``) with each
``regressed`` verdict. Windows are processed in ``window_start`` order; ids are stable hashes
of (release, measure, window), so a replay gives the same ids.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

import msgspec
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from sinks.contracts import VERDICTS_SCHEMA
from streams import sketch
from streams.detect import ANOMALIES_SCHEMA, _from_us, _hash, _to_us
from streams.records import json_records
from streams.windows import EVALUATORS

_VERSION_DIMS: Final = ("agent_version", "prompt_version", "model")

__all__ = [
    "MEASURES",
    "VERDICTS",
    "VERDICTS_SCHEMA",
    "JudgeConfig",
    "ReleaseJudge",
    "ReleaseMeasure",
    "always_valid_halfwidth",
    "msprt_log_lr",
    "verdict_records",
]

Verdict = Literal["running", "no_difference", "better", "regressed"]
VERDICTS: Final[tuple[Verdict, ...]] = ("running", "no_difference", "better", "regressed")
Statistic = Literal["rate", "ratio", "paired_log"]

_TS: Final = pa.timestamp("us", tz="UTC")


_EMPTY_VERDICTS: Final = VERDICTS_SCHEMA.empty_table()
_EMPTY_ANOMALIES: Final = ANOMALIES_SCHEMA.empty_table()


@dataclass(frozen=True)
class ReleaseMeasure:
    """One measure a release is judged on.

    ``statistic`` is 'rate' (``numerator / sum(denominator)`` of counts), 'ratio' (a ratio
    of sums, relative effect) or 'paired_log' (per-window ``ln`` p95 of the events'
    ``numerator``, from the judge's own histograms). ``worse`` is the bad direction; ``margin``
    the equivalence margin (rate points, or ``ln`` of a factor); ``tau`` the standard
    deviation of the mSPRT's normal mixture over effects (on the same scale), best about
    the size of effect one cares to find quickly.
    """

    name: str
    statistic: Statistic
    numerator: str
    denominator: tuple[str, ...]
    worse: Literal["up", "down"]
    margin: float
    tau: float


MEASURES: Final[tuple[ReleaseMeasure, ...]] = (
    ReleaseMeasure(
        "cost_per_completed_task",
        "ratio",
        "cost_usd",
        ("tasks_completed",),
        "up",
        math.log(1.10),
        0.2,
    ),
    ReleaseMeasure("escalation_rate", "rate", "escalations", ("tasks_started",), "up", 0.02, 0.05),
    ReleaseMeasure(
        "retrieval_miss_rate", "rate", "retrieval_misses", ("retrievals",), "up", 0.02, 0.05
    ),
    ReleaseMeasure("tool_error_rate", "rate", "tool_errors", ("tool_calls",), "up", 0.02, 0.05),
    ReleaseMeasure(
        "task_success_rate",
        "rate",
        "tasks_completed",
        ("tasks_completed", "tasks_failed", "tasks_abandoned"),
        "down",
        0.02,
        0.05,
    ),
    ReleaseMeasure(
        "latency_p95_ms",
        "paired_log",
        "latency_ms",
        (),
        "up",
        math.log(1.10),
        0.2,
    ),
    *(
        ReleaseMeasure(
            f"eval_{e}_pass_rate",
            "rate",
            f"eval_{e}_passed",
            (f"eval_{e}_judged",),
            "down",
            0.02,
            0.05,
        )
        for e in EVALUATORS
    ),
    ReleaseMeasure(
        "feedback_negative_share",
        "rate",
        "feedback_negative",
        ("feedback_ratings",),
        "up",
        0.02,
        0.05,
    ),
)
"""Cost per completed task, escalation, retrieval-miss, tool error and task success rates,
latency p95 (over all steps), the pass rate of each evaluator of ``streams.windows.EVALUATORS``
and the share of negative ratings. A measure neither side has samples of (an evaluator the
agent does not run) stays ``running`` with 0 samples; ``agentstream release gate`` does not
wait for those."""


@dataclass(frozen=True)
class JudgeConfig:
    """Error rates and sample floors of the release verdicts (see the module docstring).

    ``alpha`` bounds the chance that a release gets any wrong ``better``/``regressed``
    verdict, over all measures and looks (split evenly over the measures).
    ``min_samples`` per side and ``min_windows`` with both sides present come before any
    decision; ``min_window_steps`` is the steps a side needs in a window for its latency p95
    to count in the paired comparison. ``window_s`` is the metrics' window length (the
    latency histograms are kept per window).
    """

    alpha: float = 0.05
    min_samples: int = 200
    min_windows: int = 5
    min_window_steps: int = 50
    window_s: int = 60
    measures: tuple[ReleaseMeasure, ...] = MEASURES

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be within (0, 1), got {self.alpha}")
        if self.min_windows < 4:
            raise ValueError(
                f"min_windows must be >= 4 (variance of k windows), got {self.min_windows}"
            )

    @property
    def alpha_per_measure(self) -> float:
        """``alpha`` over the number of measures (Bonferroni)."""
        return self.alpha / len(self.measures)


# --------------------------------------------------------------------------------------
# the sequential test
# --------------------------------------------------------------------------------------


def msprt_log_lr(theta: float, variance: float, tau: float) -> float:
    """``ln Lambda`` of the normal-mixture SPRT for an estimate ``theta`` with ``variance``.

    ``Lambda = sqrt(V / (V + tau^2)) exp(theta^2 tau^2 / (2 V (V + tau^2)))``.
    """
    t2 = tau * tau
    return 0.5 * math.log(variance / (variance + t2)) + theta * theta * t2 / (
        2.0 * variance * (variance + t2)
    )


def always_valid_halfwidth(variance: float, tau: float, alpha: float) -> float:
    """Half-width of the always-valid ``1 - alpha`` interval: where ``Lambda < 1 / alpha``."""
    t2 = tau * tau
    return math.sqrt(
        variance
        * (variance + t2)
        / t2
        * (2.0 * math.log(1.0 / alpha) + math.log((variance + t2) / variance))
    )


def _t_inflation(k: int) -> float:
    # Variance of a Student t with k - 1 degrees of freedom: a plug-in variance from k
    # windows is itself uncertain, which a normal test would ignore.
    return (k - 1) / (k - 3) if k > 3 else math.inf


# --------------------------------------------------------------------------------------
# state
# --------------------------------------------------------------------------------------


class _Sums(msgspec.Struct):
    """One side of one measure: sums over the windows so far."""

    num: float = 0.0
    den: float = 0.0
    k: int = 0  # windows with samples
    nn: float = 0.0  # sum of num_w^2, num_w * den_w, den_w^2 (ratio: cluster variance)
    nd: float = 0.0
    dd: float = 0.0


class _Acc(msgspec.Struct):
    """One measure of one release: both sides, the paired differences, the decision."""

    cand: _Sums
    base: _Sums
    windows: int = 0  # windows with samples on both sides
    d_k: int = 0  # paired windows (latency)
    d_sum: float = 0.0  # sum of the differences
    d_sq: float = 0.0  # sum of their variances
    min_p: float = 1.0
    verdict: str = "running"


class _Hist(msgspec.Struct):
    """One window's latency histograms (``streams.sketch`` bucket -> count) of both sides."""

    cand: dict[int, int]
    base: dict[int, int]


class _Release(msgspec.Struct):
    release_id: str
    agent_id: str
    tenant_id: str | None
    dimension: str
    candidate: str
    baseline: str
    traffic_share: float
    started_us: int
    ended_us: int | None
    accs: dict[str, _Acc]
    hists: dict[int, _Hist] = {}
    judged_us: int | None = None  # start of the newest window observed


class _Snapshot(msgspec.Struct):
    version: int
    releases: list[_Release]


_SNAPSHOT_VERSION: Final = 2


@dataclass(frozen=True)
class _Result:
    verdict: Verdict
    effect: float | None
    low: float | None
    high: float | None
    p_value: float
    cand_value: float | None
    base_value: float | None


# --------------------------------------------------------------------------------------
# the judge
# --------------------------------------------------------------------------------------


class ReleaseJudge:
    """Sequential candidate-vs-baseline verdicts for every active release (see module doc)."""

    def __init__(self, config: JudgeConfig | None = None) -> None:
        self.config = config or JudgeConfig()
        self._releases: dict[str, _Release] = {}

    def releases(self) -> list[str]:
        """Ids of the releases known (started, possibly ended)."""
        return sorted(self._releases)

    def register(self, events: pa.Table) -> int:
        """Take the ``release`` rows of an ``events`` batch into account; return how many.

        A ``started`` record opens a release (a repeat of its id updates the share and keeps
        what was measured); ``ended`` closes it from its ``ts`` on. Records are applied in
        event-time order.
        """
        if events.num_rows == 0:
            return 0
        rows = events.filter(pc.equal(events["type"], "release"))
        count = self._register_releases(rows) if rows.num_rows else 0
        if self._releases:
            self._add_latencies(events)
        return count

    def _register_releases(self, rows: pa.Table) -> int:
        cols = [
            "ts",
            "release_id",
            "agent_id",
            "tenant_id",
            "dimension",
            "candidate",
            "baseline",
            "traffic_share",
            "stage",
        ]
        records = sorted(rows.select(cols).to_pylist(), key=lambda r: r["ts"])
        for r in records:
            at = _to_us(r["ts"])
            known = self._releases.get(r["release_id"])
            if r["stage"] == "ended":
                if known is not None:
                    known.ended_us = at if known.ended_us is None else min(known.ended_us, at)
                continue
            if known is not None:
                known.traffic_share = r["traffic_share"]
                continue
            self._releases[r["release_id"]] = _Release(
                release_id=r["release_id"],
                agent_id=r["agent_id"],
                tenant_id=r["tenant_id"],
                dimension=r["dimension"],
                candidate=r["candidate"],
                baseline=r["baseline"],
                traffic_share=r["traffic_share"] if r["traffic_share"] is not None else 1.0,
                started_us=at,
                ended_us=None,
                accs={m.name: _Acc(_Sums(), _Sums()) for m in self.config.measures},
            )
        return len(records)

    def _add_latencies(self, events: pa.Table) -> None:
        """Fold the step latencies of active releases' sides into per-window histograms."""
        agents = sorted({r.agent_id for r in self._releases.values()})
        wanted = pc.and_(
            pc.and_(
                pc.is_in(events["agent_id"], value_set=pa.array(agents, pa.string())),
                pc.is_valid(events["latency_ms"]),
            ),
            pc.invert(pc.fill_null(events["late"], False)),
        )
        steps = events.filter(wanted)
        if steps.num_rows == 0:
            return
        frame = pl.from_arrow(
            steps.select(["ts", "agent_id", "tenant_id", *_VERSION_DIMS, "latency_ms"])
        )
        assert isinstance(frame, pl.DataFrame)
        w = self.config.window_s * 1_000_000
        self.add_latency_counts(
            frame.group_by(
                ((pl.col("ts").dt.epoch("us") // w) * w).alias("_w"),
                "agent_id",
                "tenant_id",
                *_VERSION_DIMS,
                sketch.bucket_expr(pl.col("latency_ms")).alias("_b"),
            ).agg(pl.len().alias("_n"))
        )

    def add_latency_counts(self, counts: pl.DataFrame) -> None:
        """Fold step-latency counts into the active releases' per-window histograms.

        ``counts``: columns ``_w`` (window start, us), ``agent_id``, ``tenant_id``, the version
        dimensions, ``_b`` (``streams.sketch`` bucket) and ``_n`` (how many), late events
        excluded: what the events of a batch give, or the windows' latency sketches (the
        aggregate stage gets those, not events).
        """
        if not self._releases or counts.height == 0:
            return
        w = self.config.window_s * 1_000_000
        for rel in self._releases.values():
            mine = counts.filter(pl.col("agent_id") == rel.agent_id)
            if rel.tenant_id is not None:
                mine = mine.filter(pl.col("tenant_id") == rel.tenant_id)
            first = (rel.started_us // w) * w
            mine = mine.filter(pl.col("_w") >= first)
            if rel.judged_us is not None:  # windows already judged are closed
                mine = mine.filter(pl.col("_w") > rel.judged_us)
            if rel.ended_us is not None:
                mine = mine.filter(pl.col("_w") < rel.ended_us)
            side = pl.col(rel.dimension)
            summed = (
                mine.filter(side.is_in([rel.candidate, rel.baseline]))
                .group_by("_w", side.alias("_side"), "_b")
                .agg(pl.col("_n").sum())
            )
            for window, version, bucket, n in summed.iter_rows():
                hist = rel.hists.get(window)
                if hist is None:
                    hist = rel.hists[window] = _Hist({}, {})
                into = hist.cand if version == rel.candidate else hist.base
                into[bucket] = into.get(bucket, 0) + n

    def observe(self, metrics: pa.Table, detected_at: datetime) -> tuple[pa.Table, pa.Table]:
        """Feed closed-window ``METRICS_SCHEMA`` rows; return (verdict rows, anomaly rows).

        Only ``level = 'key'`` rows are used (the finest level: summing them never double
        counts). ``detected_at`` is stamped on the rows as ``decided_at``/``detected_at``.
        """
        if metrics.num_rows == 0 or not self._releases:
            return _EMPTY_VERDICTS, _EMPTY_ANOMALIES
        agents = sorted({r.agent_id for r in self._releases.values()})
        mask = pc.and_(
            pc.equal(metrics["level"], "key"),
            pc.is_in(metrics["agent_id"], value_set=pa.array(agents, pa.string())),
        )
        keyed = metrics.filter(mask)
        needed = {
            "window_start",
            "window_end",
            "agent_id",
            "agent_version",
            "prompt_version",
            "model",
            "tenant_id",
        }
        for m in self.config.measures:
            if m.statistic != "paired_log":  # latency comes from the judge's histograms
                needed.add(m.numerator)
                needed.update(m.denominator)
        by_window: dict[int, list[dict[str, Any]]] = {}
        ends: dict[int, int] = {}
        # A measure whose columns the rows lack (metrics of an older worker) has no samples.
        for row in keyed.select(sorted(needed & set(keyed.column_names))).to_pylist():
            start = _to_us(row["window_start"])
            by_window.setdefault(start, []).append(row)
            ends[start] = _to_us(row["window_end"])
        verdicts: list[dict[str, Any]] = []
        anomalies: list[dict[str, Any]] = []
        detected_us = _to_us(detected_at)
        for start in sorted(by_window):
            end = ends[start]
            for rel in sorted(self._releases.values(), key=lambda r: r.release_id):
                if end <= rel.started_us or (rel.ended_us is not None and start >= rel.ended_us):
                    continue
                self._window(rel, by_window[start], start, end, detected_us, verdicts, anomalies)
        return (
            pa.Table.from_pylist(verdicts, schema=VERDICTS_SCHEMA),
            pa.Table.from_pylist(anomalies, schema=ANOMALIES_SCHEMA),
        )

    def _window(
        self,
        rel: _Release,
        rows: Sequence[dict[str, Any]],
        start: int,
        end: int,
        detected_us: int,
        verdicts: list[dict[str, Any]],
        anomalies: list[dict[str, Any]],
    ) -> None:
        mine = [
            r
            for r in rows
            if r["agent_id"] == rel.agent_id
            and (rel.tenant_id is None or r["tenant_id"] == rel.tenant_id)
        ]
        cand = [r for r in mine if r[rel.dimension] == rel.candidate]
        base = [r for r in mine if r[rel.dimension] == rel.baseline]
        hist = rel.hists.pop(start, None)
        for old in [w for w in rel.hists if w < start]:
            del rel.hists[old]  # a window that closed without metrics of this agent
        rel.judged_us = start if rel.judged_us is None else max(rel.judged_us, start)
        if not cand and not base:
            return
        cfg = self.config
        for m in cfg.measures:
            # setdefault: a release restored from a snapshot older than some measure
            acc = rel.accs.setdefault(m.name, _Acc(_Sums(), _Sums()))
            if acc.verdict != "running":
                continue
            if m.statistic == "paired_log":
                _add_paired(acc, hist, cfg.min_window_steps)
            else:
                _add(m, acc, cand, base)
            result = _judge(m, acc, cfg)
            acc.verdict = result.verdict
            samples_c, samples_b = int(acc.cand.den), int(acc.base.den)
            verdicts.append(
                {
                    "verdict_id": _hash([rel.release_id, m.name, start]),
                    "release_id": rel.release_id,
                    "agent_id": rel.agent_id,
                    "tenant_id": rel.tenant_id,
                    "dimension": rel.dimension,
                    "candidate_version": rel.candidate,
                    "baseline_version": rel.baseline,
                    "traffic_share": rel.traffic_share,
                    "measure": m.name,
                    "verdict": result.verdict,
                    "effect": result.effect,
                    "effect_low": result.low,
                    "effect_high": result.high,
                    "effect_scale": "difference" if m.statistic == "rate" else "relative",
                    "confidence": 1.0 - result.p_value,
                    "p_value": result.p_value,
                    "alpha": cfg.alpha_per_measure,
                    "candidate_value": result.cand_value,
                    "baseline_value": result.base_value,
                    "candidate_samples": samples_c,
                    "baseline_samples": samples_b,
                    "windows": acc.windows,
                    "started_at": _from_us(rel.started_us),
                    "window_start": _from_us(start),
                    "window_end": _from_us(end),
                    "decided_at": _from_us(detected_us),
                }
            )
            if result.verdict == "regressed":
                anomalies.append(_regression(rel, m, result, start, end, detected_us))

    def snapshot(self) -> bytes:
        """Every release and what was measured so far (msgpack)."""
        return msgspec.msgpack.encode(
            _Snapshot(_SNAPSHOT_VERSION, [self._releases[k] for k in sorted(self._releases)])
        )

    @classmethod
    def restore(cls, data: bytes, config: JudgeConfig | None = None) -> ReleaseJudge:
        """A judge in exactly the state ``snapshot`` saved (empty for ``b''``)."""
        judge = cls(config)
        if not data:
            return judge
        snap = msgspec.msgpack.decode(data, type=_Snapshot)
        if snap.version != _SNAPSHOT_VERSION:
            raise ValueError(f"unsupported release snapshot version {snap.version}")
        judge._releases = {r.release_id: r for r in snap.releases}
        return judge


_P95: Final = 0.95


# Half the width of a 1 % bucket in ln: the sketch cannot resolve a p95 more finely.
_MIN_SE: Final = sketch.LOG_GAMMA / 2


def _ln_quantile(hist: dict[int, int], n: int, ranks: Sequence[int]) -> list[float]:
    """``ln`` of the histogram's values at the given 1-based ranks (ascending)."""
    out: list[float] = []
    seen = 0
    todo = list(ranks)
    for bucket in sorted(hist):
        seen += hist[bucket]
        while todo and seen >= todo[0]:
            value = float(sketch.bucket_values([bucket])[0])
            out.append(math.log(max(value, sketch.MIN_VALUE)))
            todo.pop(0)
    return out


def _ln_p95(hist: dict[int, int]) -> tuple[float, float, int] | None:
    """``ln`` p95 of a histogram (rank ``ceil(0.95 n)``, as the windows), its standard
    error, and ``n``; None when empty.

    The standard error is half the distance between the values at ranks ``n p -+ sqrt(n p
    (1 - p))``: the sample quantile's rank is binomial, so that interval is about one
    standard error either side (the order-statistic interval of Woodruff).
    """
    n = sum(hist.values())
    if n == 0:
        return None
    spread = math.sqrt(n * _P95 * (1 - _P95))
    ranks = [
        max(math.ceil(_P95 * n - spread), 1),
        max(math.ceil(_P95 * n), 1),
        min(math.ceil(_P95 * n + spread), n),
    ]
    low, mid, high = _ln_quantile(hist, n, ranks)
    return mid, max((high - low) / 2, _MIN_SE), n


def _add_paired(acc: _Acc, hist: _Hist | None, min_steps: int) -> None:
    """Add one window's latency p95 of each side, and their difference, to the sums.

    ``d_sum`` is the sum of the differences and ``d_sq`` the sum of their variances, so
    ``theta = d_sum / k`` and ``V = d_sq / k^2``. Equal weights, not inverse-variance ones: a
    window whose (noisy) standard error came out small would otherwise weigh too much and the
    test would over-reject.
    """
    if hist is None:
        return
    sides: list[tuple[float, float] | None] = []
    for h, sums in ((hist.cand, acc.cand), (hist.base, acc.base)):
        got = _ln_p95(h)
        if got is None or got[2] < min_steps:
            sides.append(None)
            continue
        value, se, n = got
        sums.num += value * n  # step-weighted ln p95, for the side's level
        sums.den += n
        sums.k += 1
        sides.append((value, se))
    c, b = sides
    if c is not None and b is not None:
        acc.windows += 1
        acc.d_k += 1
        acc.d_sum += c[0] - b[0]
        acc.d_sq += c[1] ** 2 + b[1] ** 2


def _add(
    m: ReleaseMeasure,
    acc: _Acc,
    cand: Sequence[dict[str, Any]],
    base: Sequence[dict[str, Any]],
) -> None:
    """Add one window's metrics rows of each side to a rate's or ratio's sums."""
    sides: list[float | None] = []
    for rows, sums in ((cand, acc.cand), (base, acc.base)):
        den = float(sum(r.get(c) or 0 for r in rows for c in m.denominator))
        num = float(sum(r.get(m.numerator) or 0 for r in rows))
        if den <= 0:
            sides.append(None)
            continue
        sums.num += num
        sums.den += den
        sums.k += 1
        sums.nn += num * num
        sums.nd += num * den
        sums.dd += den * den
        sides.append(num / den)
    if sides[0] is not None and sides[1] is not None:
        acc.windows += 1


def _ratio_variance(s: _Sums) -> float:
    """Delta-method variance of ``num / den`` with windows as clusters (t-inflated)."""
    r = s.num / s.den
    resid = max(s.nn - 2.0 * r * s.nd + r * r * s.dd, 0.0)
    return resid / (s.den * s.den) * s.k / (s.k - 1) * _t_inflation(s.k)


def _judge(m: ReleaseMeasure, acc: _Acc, cfg: JudgeConfig) -> _Result:
    """The measure's verdict after the latest window (updates the running p-value)."""
    c, b = acc.cand, acc.base
    alpha = cfg.alpha_per_measure
    theta: float | None = None
    variance: float | None = None
    cand_value = base_value = None
    if m.statistic == "rate":
        if c.den > 0 and b.den > 0:
            cand_value, base_value = c.num / c.den, b.num / b.den
            pc_ = (c.num + 0.5) / (c.den + 1.0)
            pb_ = (b.num + 0.5) / (b.den + 1.0)
            theta = cand_value - base_value
            variance = pc_ * (1 - pc_) / c.den + pb_ * (1 - pb_) / b.den
    elif m.statistic == "ratio":
        if c.k >= 2 and b.k >= 2 and c.num > 0 and b.num > 0:
            cand_value, base_value = c.num / c.den, b.num / b.den
            theta = math.log(cand_value / base_value)
            variance = _ratio_variance(c) / cand_value**2 + _ratio_variance(b) / base_value**2
    else:
        if c.den > 0 and b.den > 0:
            cand_value, base_value = math.exp(c.num / c.den), math.exp(b.num / b.den)
        if acc.d_k >= 1:
            theta = acc.d_sum / acc.d_k
            variance = acc.d_sq / acc.d_k**2
    if theta is None or variance is None or not variance > 0 or math.isinf(variance):
        return _Result("running", _scaled(m, theta), None, None, acc.min_p, cand_value, base_value)
    half = always_valid_halfwidth(variance, m.tau, alpha)
    low, high = theta - half, theta + half
    ready = c.den >= cfg.min_samples and b.den >= cfg.min_samples and acc.windows >= cfg.min_windows
    verdict: Verdict = "running"
    if ready:
        p_now = min(1.0, math.exp(-msprt_log_lr(theta, variance, m.tau)))
        acc.min_p = min(acc.min_p, p_now)
        if acc.min_p <= alpha:
            up = theta > 0
            verdict = "regressed" if up == (m.worse == "up") else "better"
        elif -m.margin < low and high < m.margin:
            verdict = "no_difference"
    return _Result(
        verdict,
        _scaled(m, theta),
        _scaled(m, low),
        _scaled(m, high),
        acc.min_p,
        cand_value,
        base_value,
    )


def _scaled(m: ReleaseMeasure, x: float | None) -> float | None:
    """An effect on the reported scale: rate points as they are, log ratios as x - 1."""
    if x is None or m.statistic == "rate":
        return x
    return math.expm1(x)


def _regression(
    rel: _Release, m: ReleaseMeasure, r: _Result, start: int, end: int, detected_us: int
) -> dict[str, Any]:
    """The ``release_regression`` anomaly row of a ``regressed`` verdict."""
    condition = _hash(["release", rel.release_id, m.name])
    base, obs = r.base_value or 0.0, r.cand_value or 0.0
    if m.statistic == "rate":
        rel_change = abs(obs - base) / max(min(base, 1 - base), 0.05)
        change = f"{base:.1%} -> {obs:.1%}"
    else:
        rel_change = abs(r.effect or 0.0)
        change = f"x{1 + (r.effect or 0.0):.2f}"
    dims: dict[str, str | None] = dict.fromkeys(_VERSION_DIMS)
    dims[rel.dimension] = rel.candidate
    return {
        "anomaly_id": _hash([condition, "release_regression", start]),
        "condition_id": condition,
        "kind": "release_regression",
        "detected_at": _from_us(detected_us),
        "window_start": _from_us(start),
        "window_end": _from_us(end),
        "level": "release",
        "agent_id": rel.agent_id,
        **dims,
        "tenant_id": rel.tenant_id,
        "measure": m.name,
        "detector": "msprt",
        "baseline": base,
        "observed": obs,
        "direction": m.worse,
        "severity": "critical" if rel_change >= 0.5 else "warning",
        "score": 1.0 - r.p_value,
        "example_event_ids": [],
        "message": (
            f"release {rel.release_id}: {rel.agent_id} {rel.dimension} {rel.candidate} "
            f"regressed {m.name} against {rel.baseline} ({change}, p = {r.p_value:.2g})"
        ),
    }


def verdict_records(table: pa.Table) -> list[tuple[bytes, bytes]]:
    """``(verdict_id, JSON)`` pairs for the ``agent-release-verdicts`` topic, one per row.

    The JSON object has exactly the ``VERDICTS_SCHEMA`` columns; times are RFC 3339 in UTC.
    """
    return json_records(table, "verdict_id")
