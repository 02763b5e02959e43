"""Scoring drift detection against the scenarios' ground truth.

``score`` compares anomaly rows with a scenario's incidents; it is shared by
``agentstream evaluate`` and the scenario tests that run the whole pipeline on Kafka.
``replay`` feeds a scenario's events through the same window aggregator and detectors the
worker runs, in order and in batches, without a broker, so many seeds can be scored in
minutes. The broker adds delivery, not detection: the tests check both find the same
incidents with the same first detection.

Matching rules. An anomaly (kind drift or outlier) *matches* an incident when it is about the
incident's key (every dimension the incident names is equal, or null in a rollup row; a
prompt version or data source that *appears* at the incident is not a key) and about the
incident's measure family (cost: cost per task, cost per completed task, cost, tokens per
call; latency: the llm latency quantiles; the rates: themselves), in a window at or after
the incident start. Recall is the share of incidents matched; precision the share of
anomalies that match some incident or are a side effect on the incident's key (3x tokens
also slow a call down); the delay is counted in windows from the incident start to the
first matching anomaly.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final

import pyarrow as pa

from pipeline.generate import TrafficConfig, generate
from pipeline.scenarios import (
    DRIFT_SCENARIOS,
    EARLY_SCENARIOS,
    STARTUP_SCENARIOS,
    Incident,
    ground_truth,
)
from sinks.catalog import METRICS, prepare
from sinks.tables import events_to_table
from streams.detect import DriftDetector
from streams.enrich import CostEstimator
from streams.releases import JudgeConfig, ReleaseJudge
from streams.warmstart import metrics_history
from streams.windows import WindowAggregator

DEFAULT_EVENTS: Final = 200_000
BATCH: Final = 20_000

FAMILIES: Final[dict[str, frozenset[str]]] = {
    "cost_per_task": frozenset(
        {"cost_per_task", "cost_per_completed_task", "cost_usd", "tokens_per_call"}
    ),
    "llm_latency_p95_ms": frozenset(
        {"llm_latency_p50_ms", "llm_latency_p95_ms", "llm_latency_p99_ms", "latency_p95_ms"}
    ),
}
_KEY_FIELDS: Final = ("agent_id", "agent_version", "model", "tenant_id")
_ALERTS: Final = ("drift", "outlier")


def _family(measure: str) -> frozenset[str]:
    return FAMILIES.get(measure, frozenset({measure}))


def _same_key(incident: Incident, row: dict[str, Any]) -> bool:
    for name in _KEY_FIELDS:
        wanted = getattr(incident, name)
        if wanted is not None and row.get(name) not in (None, wanted):
            return False
    # A rollup row that names none of the incident's dimensions is about everyone.
    return any(
        getattr(incident, name) is not None and row.get(name) == getattr(incident, name)
        for name in _KEY_FIELDS
    )


@dataclass
class ScenarioScore:
    """Detection of one scenario run: what was found, missed, and raised wrongly."""

    scenario: str
    seed: int
    incidents: int
    detected: int
    alerts: int
    true_alerts: int
    delays_windows: list[float] = field(default_factory=list)
    false_alerts: list[str] = field(default_factory=list)


def score(
    scenario: str,
    seed: int,
    incidents: Sequence[Incident],
    anomalies: pa.Table,
    window_s: int = 60,
) -> ScenarioScore:
    """Score ``anomalies`` (ANOMALIES_SCHEMA rows) against a scenario's ``incidents``."""
    rows = [r for r in anomalies.to_pylist() if r["kind"] in _ALERTS]
    result = ScenarioScore(scenario, seed, len(incidents), 0, len(rows), 0)
    for incident in incidents:
        family = _family(incident.measure)
        hits = [
            r
            for r in rows
            if r["measure"] in family
            and _same_key(incident, r)
            and r["window_start"] >= incident.starts_at
        ]
        if hits:
            result.detected += 1
            first = min(r["window_start"] for r in hits)
            result.delays_windows.append((first - incident.starts_at) / timedelta(seconds=window_s))
    for r in rows:
        related = any(_same_key(i, r) and r["window_start"] >= i.starts_at for i in incidents)
        if related:
            result.true_alerts += 1
        else:
            result.false_alerts.append(
                f"{r['window_start']:%H:%M} {r['level']} {r['agent_id']}/{r['agent_version']}/"
                f"{r['model']} {r['measure']} {r['kind']} ({r['detector']})"
            )
    return result


def _batches(config: TrafficConfig) -> Iterator[tuple[pa.Table, datetime]]:
    """``config``'s events as the worker lands them, ``BATCH`` at a time, with the newest ts."""
    costs = CostEstimator()
    batch: list[Any] = []
    for ev in _then_flush(generate(config)):
        if ev is not None:
            batch.append(ev)
            if len(batch) < BATCH:
                continue
        if not batch:
            continue
        estimated = costs.fill(batch)
        n = len(batch)
        table = events_to_table(
            batch,
            {
                "cost_estimated": estimated,
                "late": [False] * n,
                "kafka_partition": [0] * n,
                "kafka_offset": list(range(n)),
            },
        )
        yield table, max(e.ts for e in batch)
        batch = []


def replay(
    config: TrafficConfig,
    window_s: int = 60,
    lateness_s: float = 60.0,
    detector: DriftDetector | None = None,
) -> pa.Table:
    """Anomalies the worker's windows and ``detector`` (a fresh one by default) raise on
    ``config``'s traffic."""
    windows = WindowAggregator(window_s, lateness_s)
    detector = detector if detector is not None else DriftDetector()
    found = []
    for table, newest in _batches(config):
        windows.update(table, now=newest)
        closed = windows.close_due(now=newest)
        found.append(detector.observe(closed, detected_at=newest))
    found.append(detector.observe(windows.flush_all(), detected_at=newest))
    return pa.concat_tables(found)


def replay_releases(
    config: TrafficConfig, window_s: int = 60, lateness_s: float = 60.0
) -> tuple[pa.Table, pa.Table]:
    """Release verdicts and ``release_regression`` anomalies the worker makes on ``config``.

    The same steps as the worker's flush: register the batch's releases, then judge the
    windows that closed.
    """
    windows = WindowAggregator(window_s, lateness_s)
    judge = ReleaseJudge(JudgeConfig(window_s=window_s))
    verdicts, anomalies = [], []
    for table, newest in _batches(config):
        windows.update(table, now=newest)
        judge.register(table)
        v, a = judge.observe(windows.close_due(now=newest), detected_at=newest)
        verdicts.append(v)
        anomalies.append(a)
    v, a = judge.observe(windows.flush_all(), detected_at=newest)
    return pa.concat_tables([*verdicts, v]), pa.concat_tables([*anomalies, a])


@dataclass
class RolloutScore:
    """Release verdicts of one rollout scenario run against its ground truth.

    ``found`` is whether the expected verdict came, on the expected measure (for a
    ``never_regressed`` rollout: True unless something regressed); ``delay_windows`` the
    windows from the rollout's start to the end of the window of that verdict;
    ``false_regressions`` the measures judged ``regressed`` that the truth does not expect.
    """

    scenario: str
    seed: int
    found: bool
    delay_windows: float | None
    false_regressions: list[str]
    final: dict[str, str]


def score_rollout(
    scenario: str, seed: int, incidents: Sequence[Incident], verdicts: pa.Table, window_s: int = 60
) -> RolloutScore:
    """Score ``verdicts`` (VERDICTS_SCHEMA rows) against a rollout scenario's incidents."""
    rows = verdicts.to_pylist()
    final = {r["measure"]: r["verdict"] for r in sorted(rows, key=lambda r: r["window_start"])}
    (inc,) = [i for i in incidents if i.release_id is not None]
    regressed = [r for r in rows if r["verdict"] == "regressed"]
    if inc.expected_verdict == "regressed":
        hits = [r for r in regressed if r["measure"] == inc.measure]
        false = sorted({r["measure"] for r in regressed if r["measure"] != inc.measure})
        delay = None
        if hits:
            end = min(r["window_end"] for r in hits)
            delay = (end - inc.starts_at) / timedelta(seconds=window_s)
        return RolloutScore(scenario, seed, bool(hits), delay, false, final)
    false = sorted({r["measure"] for r in regressed})
    return RolloutScore(scenario, seed, not false, None, false, final)


def _then_flush(events: Iterable[Any]) -> Iterable[Any]:
    yield from events
    yield None


@dataclass
class Evaluation:
    """Precision, recall and delay over scenarios and seeds."""

    runs: list[ScenarioScore]

    @property
    def recall(self) -> float:
        incidents = sum(r.incidents for r in self.runs)
        return sum(r.detected for r in self.runs) / incidents if incidents else 1.0

    @property
    def precision(self) -> float:
        alerts = sum(r.alerts for r in self.runs)
        return sum(r.true_alerts for r in self.runs) / alerts if alerts else 1.0

    @property
    def median_delay_windows(self) -> float | None:
        delays = [d for r in self.runs for d in r.delays_windows]
        return statistics.median(delays) if delays else None

    def as_dict(self) -> dict[str, Any]:
        """The figures as plain data (for ``--json``)."""
        return {
            "precision": round(self.precision, 4),
            "recall": round(self.recall, 4),
            "median_delay_windows": self.median_delay_windows,
            "runs": [
                {
                    "scenario": r.scenario,
                    "seed": r.seed,
                    "incidents": r.incidents,
                    "detected": r.detected,
                    "alerts": r.alerts,
                    "false_alerts": r.false_alerts,
                    "delays_windows": r.delays_windows,
                }
                for r in self.runs
            ],
        }


def evaluate(
    seeds: Sequence[int],
    events: int = DEFAULT_EVENTS,
    scenarios: Sequence[str] = (*DRIFT_SCENARIOS, *STARTUP_SCENARIOS),
) -> Evaluation:
    """Replay every scenario for every seed and score the detection."""
    runs = []
    for name in scenarios:
        for seed in seeds:
            config = TrafficConfig(events=events, seed=seed, scenario=name)
            runs.append(score(name, seed, ground_truth(config), replay(config)))
            if name in EARLY_SCENARIOS:
                label = f"{name} +history"
                runs.append(score(label, seed, ground_truth(config), replay_with_history(config)))
    return Evaluation(runs)


# --------------------------------------------------------------------------------------
# A fresh worker on a lake with history (early scenarios)
# --------------------------------------------------------------------------------------

HISTORY_MINUTES: Final = 45


def history_config(config: TrafficConfig, minutes: int = HISTORY_MINUTES) -> TrafficConfig:
    """Steady traffic of the ``minutes`` before ``config.start`` (another seed): what an
    earlier worker saw and landed before the one being scored starts."""
    return TrafficConfig(
        events=int(minutes * 60 * config.rate_per_s),
        seed=config.seed + 10_000,
        start=config.start - timedelta(minutes=minutes + 2),
        rate_per_s=config.rate_per_s,
        agents=config.agents,
        tenants=config.tenants,
        scenario="steady",
    )


def land_history(
    config: TrafficConfig, data_dir: Path, window_s: int = 60, minutes: int = HISTORY_MINUTES
) -> None:
    """Land ``history_config(config, minutes)``'s closed windows as ``metrics`` in a lake."""
    lake = prepare(data_dir)
    windows = WindowAggregator(window_s, 60.0)
    closed = []
    for table, newest in _batches(history_config(config, minutes)):
        windows.update(table, now=newest)
        closed.append(windows.close_due(now=newest))
    closed.append(windows.flush_all())
    lake.append(METRICS.name, pa.concat_tables(closed))


def replay_with_history(config: TrafficConfig, windows: int = 60) -> pa.Table:
    """``replay`` on a fresh detector primed as the worker primes it at a start without a
    snapshot: from the last ``windows`` windows of each key in a lake holding history."""
    with tempfile.TemporaryDirectory(prefix="agentstream-history-") as tmp:
        land_history(config, Path(tmp))
        history = metrics_history(Path(tmp), windows)
    detector = DriftDetector()
    detector.observe(history, detected_at=config.start)
    return replay(config, detector=detector)


def by_scenario(result: Evaluation) -> list[dict[str, Any]]:
    """Per scenario (and mode): incidents found, precision, recall, median delay."""
    names = list(dict.fromkeys(r.scenario for r in result.runs))
    out = []
    for name in names:
        sub = Evaluation([r for r in result.runs if r.scenario == name])
        out.append(
            {
                "scenario": name,
                "incidents": sum(r.incidents for r in sub.runs),
                "detected": sum(r.detected for r in sub.runs),
                "alerts": sum(r.alerts for r in sub.runs),
                "false_alerts": sum(len(r.false_alerts) for r in sub.runs),
                "precision": round(sub.precision, 4),
                "recall": round(sub.recall, 4),
                "delays_windows": [d for r in sub.runs for d in r.delays_windows],
                "median_delay_windows": sub.median_delay_windows,
            }
        )
    return out
