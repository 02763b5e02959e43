"""Drift and anomaly detection (streams/detect.py) on synthetic closed-window metrics.

No Kafka and no events: ``synthetic_metrics`` draws ``METRICS_SCHEMA`` rows (level 'key')
for many keys and windows from a seeded model of agent traffic with realistic noise: task
counts vary with a daily cycle and per-window jitter (20-150 tasks a window), rates are
binomial over their counts with extra between-window variation, costs and token counts are
gamma-distributed sums (right-skewed like real per-task costs), latency p95 are sample
quantiles of lognormal calls over the window's call count. Incidents are injected by
editing the ``Scenario`` arrays (one value per key and window) before the draw.

One end-to-end test feeds ``WindowAggregator`` output over generated events, to pin the
detector to the real metrics table.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from streams.detect import (
    ANOMALIES_SCHEMA,
    DEFAULT_MEASURES,
    DetectorConfig,
    DriftDetector,
    MeasureSpec,
    anomaly_records,
)
from streams.windows import DIMENSIONS, METRICS_SCHEMA

START = datetime(2026, 1, 5, 0, 0, tzinfo=UTC)
WINDOW = timedelta(minutes=1)
NOW = datetime(2026, 1, 6, 12, 0, tzinfo=UTC)  # the wall clock stamped on detections
MODELS = ("gpt-4o-mini", "claude-sonnet-4", "gpt-4o")

# --------------------------------------------------------------------------------------
# synthetic metrics
# --------------------------------------------------------------------------------------


@dataclass
class Scenario:
    """Per (key, window) knobs of the traffic model; ``steady`` leaves them neutral."""

    keys: int
    windows: int
    tasks: np.ndarray = field(init=False)  # multiplier of the task rate
    cost: np.ndarray = field(init=False)  # multiplier of the cost per task
    tokens: np.ndarray = field(init=False)  # multiplier of tokens per call
    llm_latency: np.ndarray = field(init=False)  # multiplier of model-call latency
    escalation: np.ndarray = field(init=False)  # escalation probability (nan: the key's own)
    miss: np.ndarray = field(init=False)  # retrieval miss probability (nan: the key's own)
    tasks_exact: np.ndarray = field(init=False)  # tasks started (-1: drawn)
    escalations_exact: np.ndarray = field(init=False)  # escalations (-1: drawn)

    def __post_init__(self) -> None:
        shape = (self.keys, self.windows)
        self.tasks = np.ones(shape)
        self.cost = np.ones(shape)
        self.tokens = np.ones(shape)
        self.llm_latency = np.ones(shape)
        self.escalation = np.full(shape, np.nan)
        self.miss = np.full(shape, np.nan)
        self.tasks_exact = np.full(shape, -1, dtype=np.int64)
        self.escalations_exact = np.full(shape, -1, dtype=np.int64)


def key_dims(k: int) -> dict[str, str]:
    """The dimensions of synthetic key ``k`` (unique per k)."""
    return {
        "agent_id": f"agent-{k % 10}",
        "agent_version": f"v{k // 10}",
        "prompt_version": f"p{k % 4}",
        "model": MODELS[k % 3],
        "tenant_id": f"tenant-{k % 7}",
    }


def _gamma_sum(rng: np.random.Generator, n: np.ndarray, mean: np.ndarray, cv: float) -> np.ndarray:
    """Sum of ``n`` iid positive draws of ``mean`` and coefficient of variation ``cv``."""
    shape = np.maximum(n, 1) / cv**2
    return rng.gamma(shape, mean * cv**2) * (n > 0)


def synthetic_metrics(scenario: Scenario, seed: int = 0) -> pa.Table:
    """``METRICS_SCHEMA`` rows (level 'key') of ``scenario``, in window order."""
    rng = np.random.default_rng(seed)
    nk, nw = scenario.keys, scenario.windows
    # Per key: its own volume and levels.
    rate = rng.uniform(25, 120, nk)
    p_esc = rng.uniform(0.04, 0.10, nk)
    p_success = rng.uniform(0.80, 0.93, nk)
    p_miss = rng.uniform(0.06, 0.15, nk)
    p_tool_err = rng.uniform(0.01, 0.04, nk)
    cost_task = rng.uniform(0.005, 0.05, nk)
    tokens_call = rng.uniform(800, 3000, nk)
    llm_median = rng.uniform(400, 1500, nk)
    tool_median = rng.uniform(100, 400, nk)
    retrieval_median = rng.uniform(30, 120, nk)
    phase = rng.uniform(0, 2 * np.pi, nk)

    def wander(sd: float, phi: float = 0.6) -> np.ndarray:
        """Autocorrelated noise (AR(1), stationary sd ``sd``) per key and window: real traffic
        mixes drift for a few windows, they do not change independently every minute."""
        eps = rng.normal(0, sd * np.sqrt(1 - phi**2), (nk, nw))
        out = np.empty((nk, nw))
        out[:, 0] = rng.normal(0, sd, nk)
        for w in range(1, nw):
            out[:, w] = phi * out[:, w - 1] + eps[:, w]
        return out

    t = np.arange(nw)
    daily = 1 + 0.3 * np.sin(2 * np.pi * t[None, :] / 1440 + phase[:, None])
    lam = rate[:, None] * daily * np.exp(wander(0.15)) * scenario.tasks
    started = rng.poisson(lam)
    started = np.where(scenario.tasks_exact >= 0, scenario.tasks_exact, started)
    ended = rng.poisson(lam * 0.95)

    def jitter(p: np.ndarray, sd: float = 0.1) -> np.ndarray:
        """Between-window variation of a probability (overdispersion), per key and window."""
        out: np.ndarray = np.clip(p[:, None] * np.exp(wander(sd)), 0, 1)
        return out

    esc_p = np.where(np.isnan(scenario.escalation), jitter(p_esc), scenario.escalation)
    escalations = rng.binomial(started, esc_p)
    escalations = np.where(scenario.escalations_exact >= 0, scenario.escalations_exact, escalations)
    success_p = np.clip(1 - jitter(1 - p_success), 0, 1)
    completed = rng.binomial(ended, success_p)
    failed = rng.binomial(ended - completed, 0.6)
    abandoned = ended - completed - failed
    retrievals = rng.poisson(started * 1.8)
    miss_p = np.where(np.isnan(scenario.miss), jitter(p_miss), scenario.miss)
    misses = rng.binomial(retrievals, miss_p)
    tool_calls = rng.poisson(started * 1.4)
    tool_errors = rng.binomial(tool_calls, jitter(p_tool_err, 0.2))
    llm_calls = rng.poisson(started * 4.0)

    cost_mean = cost_task[:, None] * np.exp(wander(0.05)) * scenario.cost
    cost = _gamma_sum(rng, started, cost_mean, cv=0.9)
    tokens = _gamma_sum(rng, llm_calls, tokens_call[:, None] * scenario.tokens, cv=0.6)
    tokens = np.rint(tokens).astype(np.int64)

    def p95(n: np.ndarray, median: np.ndarray, sigma: float) -> np.ndarray:
        """Sample p95 of ``n`` lognormal latencies: the normal quantile plus its sampling error
        (standard error of the 0.95 quantile of a normal: 2.11 / sqrt(n))."""
        z = 1.645 + rng.normal(0, 1, n.shape) * 2.11 / np.sqrt(np.maximum(n, 1))
        drift = np.exp(wander(0.04))
        return np.where(n > 0, median * drift * np.exp(sigma * z), np.nan)

    llm_p95 = p95(llm_calls, llm_median[:, None] * scenario.llm_latency, 0.45)
    tool_p95 = p95(tool_calls, tool_median[:, None] * np.ones((1, nw)), 0.7)
    retrieval_p95 = p95(retrievals, retrieval_median[:, None] * np.ones((1, nw)), 0.4)

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(den > 0, num / np.maximum(den, 1), np.nan)

    # Rows in window order (then key), as close_due emits them.
    def flat(a: np.ndarray) -> np.ndarray:
        return np.asarray(a).T.reshape(-1)

    starts = [START + WINDOW * w for w in range(nw) for _ in range(nk)]
    keys = [k for _ in range(nw) for k in range(nk)]
    cols: dict[str, Any] = {
        "metric_id": [f"m{w}-{k}" for w in range(nw) for k in range(nk)],
        "level": ["key"] * (nk * nw),
        "window_start": starts,
        "window_end": [s + WINDOW for s in starts],
        **{d: [key_dims(k)[d] for k in keys] for d in DIMENSIONS},
        "tasks_started": flat(started),
        "tasks_completed": flat(completed),
        "tasks_failed": flat(failed),
        "tasks_abandoned": flat(abandoned),
        "escalations": flat(escalations),
        "retrievals": flat(retrievals),
        "retrieval_misses": flat(misses),
        "tool_calls": flat(tool_calls),
        "tool_errors": flat(tool_errors),
        "llm_calls": flat(llm_calls),
        "cost_usd": flat(cost),
        "tokens_per_call": flat(ratio(tokens, llm_calls)),
        "cost_per_task": flat(ratio(cost, started)),
        "escalation_rate": flat(ratio(escalations, started)),
        "task_success_rate": flat(ratio(completed, ended)),
        "retrieval_miss_rate": flat(ratio(misses, retrievals)),
        "tool_error_rate": flat(ratio(tool_errors, tool_calls)),
        "llm_latency_p95_ms": flat(llm_p95),
        "tool_latency_p95_ms": flat(tool_p95),
        "retrieval_latency_p95_ms": flat(retrieval_p95),
    }
    n = nk * nw
    arrays = []
    for f in METRICS_SCHEMA:
        if f.name in cols:
            values = cols[f.name]
            if isinstance(values, np.ndarray) and values.dtype.kind == "f":
                arrays.append(pa.array(values, type=f.type, from_pandas=True))  # nan -> null
            else:
                arrays.append(pa.array(values, type=f.type))
        elif pa.types.is_list(f.type):
            arrays.append(pa.array([[]] * n, type=f.type))
        else:
            arrays.append(pa.nulls(n, type=f.type))
    return pa.Table.from_arrays(arrays, schema=METRICS_SCHEMA)


def windows_of(table: pa.Table) -> list[pa.Table]:
    """The table cut per window, as successive flushes would deliver it."""
    starts = pc.unique(table["window_start"])
    return [table.filter(pc.equal(table["window_start"], s)) for s in starts]


def run(detector: DriftDetector, table: pa.Table, per_window: bool = True) -> pa.Table:
    """Observe ``table`` (window by window, or all at once); all anomaly rows."""
    parts = windows_of(table) if per_window else [table]
    out = [detector.observe(part, NOW) for part in parts]
    return pa.concat_tables([ANOMALIES_SCHEMA.empty_table(), *out])


def index_of(row: dict[str, Any]) -> int:
    """Window number (0 = START) of an anomaly row."""
    return int((row["window_start"] - START) / WINDOW)


def key_of(row: dict[str, Any]) -> int:
    """Synthetic key number of an anomaly row or a key (by its agent and version)."""
    return int(row["agent_id"].split("-")[1]) + 10 * int(row["agent_version"][1:])


def alerts(table: pa.Table) -> list[dict[str, Any]]:
    return [r for r in table.to_pylist() if r["kind"] != "recovery"]


def of(rows: list[dict[str, Any]], key: int, measure: str) -> list[dict[str, Any]]:
    return [r for r in rows if key_of(r) == key and r["measure"] == measure]


# --------------------------------------------------------------------------------------
# false positives
# --------------------------------------------------------------------------------------


def test_steady_traffic_raises_nothing() -> None:
    """False-positive control: 50 steady keys x 120 windows, two seeds: no row at all."""
    for seed in (1, 2):
        table = synthetic_metrics(Scenario(50, 120), seed=seed)
        out = run(DriftDetector(seed=seed), table, per_window=seed == 1)
        assert out.num_rows == 0, out.column("message").to_pylist()


# --------------------------------------------------------------------------------------
# injected incidents: one run, each in its own key (latency: every key on one model)
# --------------------------------------------------------------------------------------

INCIDENT_SEED = 4
ESCALATING, SPIKING, MISSING, DRIFTING = 3, 12, 11, 5
SLOW_MODEL = 1  # keys k with k % 3 == 1 run MODELS[1]


def incident_scenario() -> Scenario:
    sc = Scenario(50, 120)
    sc.escalation[ESCALATING, :] = 0.06
    sc.escalation[ESCALATING, 60:90] = 0.30  # a step, then back
    sc.cost[SPIKING, 60:70] = 3.0  # a spike of 10 windows
    sc.miss[MISSING, 60:] = 0.30  # from the key's own 6-15 %
    sc.cost[DRIFTING, 40:100] = np.linspace(1.0, 2.5, 60)  # slow drift, then it stays
    sc.cost[DRIFTING, 100:] = 2.5
    slow = [k for k in range(sc.keys) if k % 3 == SLOW_MODEL]
    sc.llm_latency[slow, 60:] = 1.6  # a model got slower for every key that calls it
    return sc


@pytest.fixture(scope="module")
def incidents() -> list[dict[str, Any]]:
    """Every anomaly row of the incident scenario, fed window by window as the worker would."""
    table = synthetic_metrics(incident_scenario(), seed=INCIDENT_SEED)
    rows: list[dict[str, Any]] = run(DriftDetector(seed=INCIDENT_SEED), table).to_pylist()
    return rows


def test_nothing_but_the_incidents(incidents: list[dict[str, Any]]) -> None:
    expected = {
        (ESCALATING, "escalation_rate"),
        (SPIKING, "cost_per_task"),
        (MISSING, "retrieval_miss_rate"),
        (DRIFTING, "cost_per_task"),
        *((k, "llm_latency_p95_ms") for k in range(50) if k % 3 == SLOW_MODEL),
    }
    assert {(key_of(r), r["measure"]) for r in incidents} == expected
    assert all(r["level"] == "key" for r in incidents)
    assert all(r["detected_at"] == NOW for r in incidents)


def _one_condition(rows: list[dict[str, Any]]) -> str:
    """The rows belong to one condition; its id."""
    ids = {str(r["condition_id"]) for r in rows}
    assert len(ids) == 1, rows
    return ids.pop()


def test_escalation_step(incidents: list[dict[str, Any]]) -> None:
    """6 % -> 30 % at window 60 for one key: a drift, up, critical, within 8 windows; nothing
    more while it lasts (cooldown); a recovery within 8 windows of the return at 90."""
    rows = of(incidents, ESCALATING, "escalation_rate")
    assert [(index_of(r), r["kind"]) for r in rows] == [(64, "drift"), (93, "recovery")]
    drift, recovery = rows
    assert 60 <= index_of(drift) <= 60 + 8
    assert drift["detector"] == "page_hinkley"
    assert drift["direction"] == "up"
    assert drift["severity"] == "critical"
    assert 0.05 < drift["baseline"] < 0.09 and drift["observed"] > 0.25
    assert 90 <= index_of(recovery) <= 90 + 8
    assert recovery["direction"] == "up" and recovery["baseline"] == drift["baseline"]
    _one_condition(rows)
    assert drift["anomaly_id"] != recovery["anomaly_id"]
    assert drift["example_event_ids"] == []
    assert "escalation_rate of agent agent-3 v0" in drift["message"]


def test_cost_spike(incidents: list[dict[str, Any]]) -> None:
    """x3 for windows 60-69: an outlier in the first window, the drift confirming it in the
    next (one more row, then cooldown), a recovery within 8 windows of the end."""
    rows = of(incidents, SPIKING, "cost_per_task")
    assert [(index_of(r), r["kind"], r["detector"]) for r in rows] == [
        (60, "outlier", "ewma_zscore"),
        (61, "drift", "page_hinkley"),
        (74, "recovery", "ewma_zscore"),
    ]
    assert all(r["direction"] == "up" for r in rows)
    assert [r["severity"] for r in rows] == ["critical", "critical", "info"]
    assert 2.4 < rows[0]["observed"] / rows[0]["baseline"] < 3.6
    assert rows[0]["score"] >= DetectorConfig().outlier_z
    _one_condition(rows)


def test_latency_regression_on_one_model(incidents: list[dict[str, Any]]) -> None:
    """Model calls x1.6 slower on one model: each of its 17 keys alerts on llm_latency_p95_ms,
    up, within 5 windows; no key on another model does (test_nothing_but_the_incidents)."""
    rows = [r for r in incidents if r["measure"] == "llm_latency_p95_ms"]
    assert {r["model"] for r in rows} == {MODELS[SLOW_MODEL]}
    first: dict[int, int] = {}
    for r in rows:
        first.setdefault(key_of(r), index_of(r))
        assert r["direction"] == "up" and r["kind"] != "recovery"
    assert len(first) == 17
    assert all(60 <= i <= 60 + 5 for i in first.values()), first
    delays = Counter(i - 60 for i in first.values())
    assert delays == {0: 8, 1: 1, 2: 6, 3: 2}  # half as outliers in the first window
    # Every key's condition is confirmed as a drift: x1.6 is a 'warning' (from 1.5).
    assert {key_of(r) for r in rows if r["kind"] == "drift"} == set(first)
    assert {r["severity"] for r in rows if r["kind"] == "outlier"} == {"warning"}


def test_retrieval_miss_rise(incidents: list[dict[str, Any]]) -> None:
    rows = of(incidents, MISSING, "retrieval_miss_rate")
    assert [(index_of(r), r["kind"], r["direction"]) for r in rows] == [(63, "drift", "up")]
    assert 0.06 < rows[0]["baseline"] < 0.16 and rows[0]["severity"] == "critical"


def test_slow_cost_drift(incidents: list[dict[str, Any]]) -> None:
    """Cost per task x1 -> x2.5 linearly over windows 40-99: detected before the end (here
    15 windows in, at about x1.4), and reported again only after the cooldown."""
    rows = of(incidents, DRIFTING, "cost_per_task")
    assert (index_of(rows[0]), rows[0]["kind"], rows[0]["direction"]) == (55, "drift", "up")
    assert index_of(rows[0]) < 100
    assert all(r["kind"] != "recovery" for r in rows)  # it never came back
    starts = [index_of(r) for r in rows]
    assert all(b - a >= DetectorConfig().cooldown_windows for a, b in itertools.pairwise(starts))
    _one_condition(rows)


# --------------------------------------------------------------------------------------
# noise guards, multivariate, alternatives
# --------------------------------------------------------------------------------------


def test_min_samples_skips_small_windows() -> None:
    """3 tasks and 2 escalations (67 %) in a window is noise, not an alert. The same rate
    over 60 tasks a window, kept up from window 70, is a drift within 2 windows."""
    small = Scenario(20, 80)
    small.tasks_exact[4, 70] = 3
    small.escalations_exact[4, 70] = 2
    out = run(DriftDetector(seed=5), synthetic_metrics(small, seed=5), per_window=False)
    assert out.num_rows == 0, out.column("message").to_pylist()

    large = Scenario(20, 80)
    large.tasks_exact[4, 70:75] = 60
    large.escalations_exact[4, 70:75] = 40
    rows = alerts(run(DriftDetector(seed=5), synthetic_metrics(large, seed=5), per_window=False))
    assert [(key_of(r), index_of(r), r["kind"], r["measure"]) for r in rows] == [
        (4, 72, "drift", "escalation_rate")
    ]


def test_half_space_trees_catches_joint_moderate_deviations() -> None:
    """Ten windows where cost, tokens and model latency of one key are all x1.3 at once: the
    univariate outlier sees those that reach outlier_z on one measure; HalfSpaceTrees adds
    four where several measures are off together but none enough. No false alarm."""
    sc = Scenario(50, 120)
    injected = [(k, 60 + 5 * i) for i, k in enumerate(range(0, 50, 5))]
    for k, w in injected:
        sc.cost[k, w] = sc.tokens[k, w] = sc.llm_latency[k, w] = 1.3
    rows = alerts(run(DriftDetector(seed=3), synthetic_metrics(sc, seed=3), per_window=False))
    found = {(key_of(r), index_of(r)): r for r in rows}
    assert set(found) <= set(injected)
    by_trees = {at for at, r in found.items() if r["detector"] == "half_space_trees"}
    assert by_trees == {(5, 65), (30, 90), (35, 95), (40, 100)}
    assert len(found) == 7
    for at in by_trees:
        r = found[at]
        assert r["kind"] == "outlier" and r["direction"] == "up"
        assert 0.9 <= r["score"] <= 1.0
        assert "off together with" in r["message"]


def test_detectors_are_chosen_per_measure() -> None:
    """A one-window x3 cost spike is an outlier; with only Page-Hinkley watching cost per
    task it is not (a drift must show in the median of the recent windows)."""
    sc = Scenario(20, 80)
    sc.cost[SPIKING, 60] = 3.0
    rows = alerts(run(DriftDetector(seed=4), synthetic_metrics(sc, seed=4), per_window=False))
    assert [(key_of(r), index_of(r), r["detector"]) for r in rows] == [(12, 60, "ewma_zscore")]
    measures = tuple(
        replace(m, detectors=("page_hinkley",)) if m.column == "cost_per_task" else m
        for m in DEFAULT_MEASURES
    )
    detector = DriftDetector(DetectorConfig(measures=measures), seed=4)
    assert run(detector, synthetic_metrics(sc, seed=4), per_window=False).num_rows == 0


# --------------------------------------------------------------------------------------
# state: snapshot, replay, eviction, determinism
# --------------------------------------------------------------------------------------


def test_snapshot_restore_mid_stream(incidents: list[dict[str, Any]]) -> None:
    """Stopping at window 62 (conditions open, shifts pending) and again at 91, restoring
    from the snapshot each time, gives exactly the uninterrupted output: no condition lost,
    no alarm raised twice or spuriously."""
    table = synthetic_metrics(incident_scenario(), seed=INCIDENT_SEED)
    parts = windows_of(table)
    detector = DriftDetector(seed=INCIDENT_SEED)
    out = []
    for i, part in enumerate(parts):
        if i in (62, 91):
            before = detector.open_conditions()
            snap = detector.snapshot()
            detector = DriftDetector.restore(snap)
            assert detector.open_conditions() == before
        out.append(detector.observe(part, NOW))
    assert pa.concat_tables(out).to_pylist() == incidents
    assert len(before) > 0  # the second stop had open conditions to carry over


def test_restore_refuses_other_versions() -> None:
    snap = DriftDetector().snapshot()
    with pytest.raises(ValueError, match="version"):
        DriftDetector.restore(snap.replace(b":0.26", b":0.25", 1).replace(b"\x001:", b"\x009:"))
    with pytest.raises(ValueError, match="not a DriftDetector snapshot"):
        DriftDetector.restore(b"garbage")


def test_replays_and_batching_do_not_change_the_output(incidents: list[dict[str, Any]]) -> None:
    """The whole table at once equals window by window (and the same seed, the same rows);
    a window observed twice counts once."""
    table = synthetic_metrics(incident_scenario(), seed=INCIDENT_SEED)
    assert run(DriftDetector(seed=INCIDENT_SEED), table, per_window=False).to_pylist() == incidents
    detector = DriftDetector(seed=INCIDENT_SEED)
    out = []
    for part in windows_of(table):
        out.append(detector.observe(part, NOW))
        assert detector.observe(part, NOW).num_rows == 0  # the replay adds nothing
    assert pa.concat_tables(out).to_pylist() == incidents


def test_silent_keys_are_evicted() -> None:
    """A key with no window for evict_after_windows is forgotten; its open condition closes
    with a recovery row about its last window."""
    config = DetectorConfig(evict_after_windows=20)
    table = synthetic_metrics(incident_scenario(), seed=INCIDENT_SEED)
    spiking = key_dims(SPIKING)
    others = pc.invert(
        pc.and_(
            pc.equal(table["agent_id"], spiking["agent_id"]),
            pc.equal(table["agent_version"], spiking["agent_version"]),
        )
    )
    # The spiking key stops reporting at window 70, in the middle of its condition.
    table = table.filter(pc.or_(others, pc.less(table["window_start"], START + 70 * WINDOW)))
    detector = DriftDetector(config, seed=INCIDENT_SEED)
    out = []
    for i, part in enumerate(windows_of(table)):
        out.append(detector.observe(part, NOW))
        if i == 88:
            assert detector.tracked_keys() == 50
            assert SPIKING in {key_of(c.key) for c in detector.open_conditions()}
    assert detector.tracked_keys() == 49
    assert SPIKING not in {key_of(c.key) for c in detector.open_conditions()}
    rows = of(pa.concat_tables(out).to_pylist(), SPIKING, "cost_per_task")
    assert [(index_of(r), r["kind"]) for r in rows] == [
        (60, "outlier"),
        (61, "drift"),
        (69, "recovery"),
    ]
    assert "silent for 20 windows" in rows[-1]["message"]


# --------------------------------------------------------------------------------------
# the real metrics table
# --------------------------------------------------------------------------------------


def test_on_window_aggregator_output() -> None:
    """Metrics of generated traffic through WindowAggregator (every level, real nulls): key
    and agent rows are tracked, tenant rows ignored; an agent's cost per task x5 in the last
    window is an agent-level outlier."""
    from pipeline.generate import TrafficConfig, generate
    from sinks.tables import events_to_table
    from streams.enrich import CostEstimator
    from streams.windows import WindowAggregator

    events = list(generate(TrafficConfig(events=60_000, seed=3, rate_per_s=100.0, agents=3)))
    n = len(events)
    extras: dict[str, Sequence[Any]] = {
        "cost_estimated": CostEstimator().fill(events),
        "late": [False] * n,
        "kafka_partition": [0] * n,
        "kafka_offset": list(range(n)),
    }
    aggregator = WindowAggregator(window_s=60, allowed_lateness_s=0)
    aggregator.update(events_to_table(events, extras), now=events[-1].ts)
    metrics = aggregator.flush_all()
    parts = windows_of(metrics)
    last = parts[-1]
    agent = sorted(
        a for a in last.filter(pc.equal(last["level"], "agent"))["agent_id"].to_pylist()
    )[0]
    boosted = pc.if_else(
        pc.and_(pc.equal(last["level"], "agent"), pc.equal(last["agent_id"], agent)),
        pc.multiply(last["cost_per_task"], 5.0),
        last["cost_per_task"],
    )
    parts[-1] = last.set_column(
        last.schema.get_field_index("cost_per_task"), "cost_per_task", boosted
    )

    detector = DriftDetector(DetectorConfig(warmup_windows=5))
    out = pa.concat_tables([detector.observe(p, NOW) for p in parts])
    levels = pc.value_counts(metrics["level"]).to_pylist()
    watched = sum(
        len(
            {
                tuple(r[d] for d in ("level", *DIMENSIONS))
                for r in metrics.to_pylist()
                if r["level"] == lv
            }
        )
        for lv in ("key", "agent")
    )
    assert detector.tracked_keys() == watched
    assert {c["values"] for c in levels} == {"key", "agent", "tenant"}
    rows = out.to_pylist()
    assert [(r["level"], r["agent_id"], r["measure"], r["kind"], r["direction"]) for r in rows] == [
        ("agent", agent, "cost_per_task", "outlier", "up")
    ]
    assert rows[0]["agent_version"] is None and rows[0]["message"].startswith(
        f"cost_per_task of agent {agent} jumped up"
    )


def test_anomaly_records_are_json_keyed_by_id(incidents: list[dict[str, Any]]) -> None:
    table = pa.Table.from_pylist(incidents, schema=ANOMALIES_SCHEMA)
    records = anomaly_records(table)
    assert len(records) == len(incidents)
    for (key, value), row in zip(records, incidents, strict=True):
        assert key == row["anomaly_id"].encode()
        decoded = msgspec.json.decode(value)
        assert set(decoded) == set(ANOMALIES_SCHEMA.names)
        assert decoded["window_start"].endswith("Z") or decoded["window_start"].endswith("+00:00")
    assert len({k for k, _ in records}) == len(records)  # ids are unique


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        DriftDetector().observe(METRICS_SCHEMA.empty_table(), datetime(2026, 1, 1))  # noqa: DTZ001
    with pytest.raises(ValueError, match="not a METRICS_SCHEMA column"):
        DetectorConfig(measures=(MeasureSpec("nope", "log", ("llm_calls",)),))
    with pytest.raises(ValueError, match="unknown detectors"):
        DetectorConfig(
            measures=(
                MeasureSpec("cost_per_task", "log", ("tasks_started",), detectors=("kswin",)),
            )
        )
    with pytest.raises(ValueError, match="unknown level"):
        DetectorConfig(levels=("model",))
    assert DriftDetector().observe(METRICS_SCHEMA.empty_table(), NOW).num_rows == 0


# --------------------------------------------------------------------------------------
# speed
# --------------------------------------------------------------------------------------


def test_speed_10k_rows() -> None:
    """100 keys x 100 windows, window by window. A worker emits about one row per key per
    minute, so even 1,000 rows/s would keep up with 60,000 keys; measured 4,000-5,000 rows/s."""
    table = synthetic_metrics(Scenario(100, 100), seed=7)
    parts = windows_of(table)
    detector = DriftDetector(seed=7)
    started = time.perf_counter()
    for part in parts:
        detector.observe(part, NOW)
    elapsed = time.perf_counter() - started
    rate = table.num_rows / elapsed
    print(f"\nDriftDetector.observe: {table.num_rows} rows in {elapsed:.2f} s = {rate:,.0f} rows/s")
    assert rate > 1_000
