"""Release verdicts through the real broker: every rollout scenario in one stream, one worker.

The regressing rollout is judged ``regressed`` on the escalation rate and the tone regression
on the tone evaluator's pass rate within the stated number of windows, the good one never
``regressed``; the landed verdicts are those of the in-process replay (the statistics are
tested over many seeds there, see test_releases.py), subscribers get each verdict on the
verdicts topic, and ``agentstream release gate`` answers 1 (roll back) for both regressions
and never 1 for the good rollout.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.evaluate import replay_releases, score_rollout
from pipeline.generate import TrafficConfig
from pipeline.scenarios import ROLLOUT_SCENARIOS, ground_truth
from sinks.analysis import connect
from tests.helpers import consume_all, land_all, side_by_side, unique_settings

pytestmark = pytest.mark.timeout(300)

# One agent (support-bot) so each window holds ~300 tasks: 16 windows, rollout from the 8th.
# Seed 2: the statistics are covered over many seeds in-process; here the point is delivery.
SEED = 2
EVENTS = 48_000
MAX_DELAY_WINDOWS = 6  # measured 5 on seeds 1-5 at this traffic (min_windows is 5)


def _config(name: str) -> TrafficConfig:
    return TrafficConfig(events=EVENTS, seed=SEED, scenario=name, agents=1)


def test_rollouts_on_kafka(bootstrap: str, tmp_path: Path) -> None:
    settings = unique_settings(bootstrap, tmp_path / "lake")
    stream = side_by_side({name: _config(name) for name in ROLLOUT_SCENARIOS})
    started = time.monotonic()
    land_all(settings, stream, timeout=120)
    print(f"published and judged in {time.monotonic() - started:.1f} s")

    con = connect(settings.data_dir)
    assert con.sql(
        "SELECT agent_id, candidate, baseline, traffic_share, stage FROM releases ORDER BY 1"
    ).fetchall() == [(f"{n}/support-bot", "p14", "p12", 0.5, "started") for n in ROLLOUT_SCENARIOS]
    n_releases = len(ROLLOUT_SCENARIOS)
    # release events count in no KPI: every landed event but them (and the sentinel, whose
    # window never closes) is in the metrics
    assert con.sql(
        "SELECT (SELECT count(*) FROM events WHERE type <> 'release'), "
        "(SELECT sum(events) FROM metrics WHERE level = 'key')"
    ).fetchall() == [(len(stream) - n_releases, len(stream) - n_releases - 1)]

    landed = con.sql("SELECT * EXCLUDE (date) FROM release_verdicts").to_arrow_table()
    for name in ROLLOUT_SCENARIOS:
        rows = landed.filter(pc.starts_with(landed["release_id"], name))
        result = score_rollout(name, SEED, ground_truth(_config(name)), rows)
        print(name, result)
        assert result.found and result.false_regressions == [], result
        if name != "good-rollout":
            assert result.delay_windows is not None
            assert result.delay_windows <= MAX_DELAY_WINDOWS, result
        # The same verdicts as the in-process replay, window by window.
        replayed, _ = replay_releases(_config(name))

        def pairs(t: pa.Table) -> list[tuple[str, str]]:
            return sorted(zip(t["verdict_id"].to_pylist(), t["verdict"].to_pylist(), strict=True))

        assert pairs(rows) == pairs(replayed)

    regressions = con.sql(
        "SELECT agent_id, prompt_version, measure, len(example_event_ids) FROM anomalies "
        "WHERE kind = 'release_regression' ORDER BY agent_id"
    ).fetchall()
    assert [r[:3] for r in regressions] == [
        ("regressing-rollout/support-bot", "p14", "escalation_rate"),
        ("tone-regression/support-bot", "p14", "eval_tone_pass_rate"),
    ]
    assert all(1 <= r[3] <= 5 for r in regressions)

    # The deploy pipeline's question, through the real command line.
    for name in ROLLOUT_SCENARIOS:
        (inc,) = ground_truth(_config(name))
        ask = ["release", "gate", "--id", str(inc.release_id), "--data-dir", str(settings.data_dir)]
        gate = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", *ask, "--json"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        answer = msgspec.json.decode(gate.stdout)
        print(name, gate.returncode, answer["decision"], answer["reason"])
        assert gate.returncode == answer["exit_code"], gate.stderr
        if inc.expected_verdict == "regressed":
            assert (gate.returncode, answer["decision"]) == (1, "rollback")
            assert inc.measure in answer["reason"]
        else:
            assert gate.returncode in (0, 3) and answer["decision"] in ("promote", "wait")
        summary = (
            connect(settings.data_dir)
            .execute(
                "SELECT measure, verdict FROM release_summary WHERE release_id = ? ORDER BY measure",
                [inc.release_id],
            )
            .fetchall()
        )
        assert [(m["measure"], m["verdict"]) for m in answer["measures"]] == summary

    # Subscribers see every verdict on the topic, keyed by its id.
    records = consume_all(settings, settings.verdicts_topic, landed.num_rows)
    assert sorted(r.key.decode() for r in records) == sorted(landed["verdict_id"].to_pylist())
    decided = [
        msgspec.json.decode(r.value)
        for r in records
        if msgspec.json.decode(r.value)["verdict"] == "regressed"
    ]
    assert sorted(
        (d["measure"], d["candidate_version"], d["baseline_version"]) for d in decided
    ) == [("escalation_rate", "p14", "p12"), ("eval_tone_pass_rate", "p14", "p12")]
