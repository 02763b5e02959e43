"""Rules, warm start, explanations and backtest through the real broker and worker.

A lake holds 45 minutes of history (landed as a worker lands metrics); a fresh worker (new
group, no snapshot) reads ten minutes of traffic in which support-bot v4's cost per task
triples five minutes in. It must alert within a few windows, from the detectors (primed
from the lake) and from a user's rule; every alert carries its explanation; and
``agentstream backtest`` over the same lake prints the same alerts with the same ids.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path

import msgspec
import pytest

from pipeline import schema
from pipeline.evaluate import land_history, replay_with_history, score
from pipeline.generate import TrafficConfig, generate
from pipeline.scenarios import ground_truth
from sinks.catalog import connect
from tests.helpers import (
    consume_all,
    produce_raw,
    run_cli,
    running_worker,
    unique_settings,
    wait_committed,
    worker_env,
)

pytestmark = pytest.mark.timeout(600)

EVENTS = 30_000
RULES = """
[[rules]]
name = "support cost doubled"
measure = "cost_per_task"
agent_id = "support-bot"
change_above = 1.0      # 2x the agent's own baseline
for_windows = 2
min_samples = 20
severity = "critical"

[[rules]]
name = "escalations"     # never reached by this traffic: must stay silent
measure = "escalation_rate"
agent_id = "support-bot"
above = 0.5
min_samples = 20
"""


def test_fresh_worker_on_a_lake_with_history_alerts_early_explains_and_backtests(
    bootstrap: str, tmp_path: Path
) -> None:
    config = TrafficConfig(events=EVENTS, seed=3, scenario="early-cost-spike-5m")
    (incident,) = ground_truth(config)
    lake = tmp_path / "lake"
    land_history(config, lake)
    rules_file = tmp_path / "rules.toml"
    rules_file.write_text(RULES)
    settings = unique_settings(bootstrap, lake, rules=f"@{rules_file}")

    events = list(generate(config))
    newest = max(ev.ts for ev in events)
    sentinel = msgspec.structs.replace(
        events[0], event_id="sentinel", ts=newest + timedelta(minutes=5)
    )
    produce_raw(
        settings,
        [schema.encode(ev) for ev in [*events, sentinel]],
        [(ev.task_id or ev.agent_id).encode() for ev in [*events, sentinel]],
    )
    last_window = newest.replace(second=0, microsecond=0)
    log = tmp_path / "worker.log"
    with running_worker(settings, log) as proc:
        wait_committed(settings, EVENTS + 1, proc, timeout=300)
        deadline = time.monotonic() + 60
        query = "SELECT count(*) FROM metrics WHERE window_start = $1"
        while connect(lake).execute(query, [last_window]).fetchall() == [(0,)]:
            assert time.monotonic() < deadline, "the last windows were never emitted"
            time.sleep(0.5)
    assert "warm start:" in log.read_text()

    con = connect(lake)
    landed = con.sql(
        "SELECT * EXCLUDE (date) FROM anomalies ORDER BY window_start, anomaly_id"
    ).to_arrow_table()

    # The detectors, primed from the lake, find the incident within a few windows (a cold
    # worker needs 30 windows of each key first), with no false alert; as in the replay
    # `agentstream evaluate` scores.
    detected = score(config.scenario, config.seed, [incident], landed)
    assert detected.detected == 1, detected
    assert detected.delays_windows[0] <= 3
    assert detected.false_alerts == []
    replayed = score(config.scenario, config.seed, [incident], replay_with_history(config))
    assert replayed.delays_windows == detected.delays_windows

    # The rule fires once, for support-bot, at or after the incident and within 3 windows;
    # the quiet rule never does.
    rules = [r for r in landed.to_pylist() if r["rule"] is not None]
    fired = [r for r in rules if r["kind"] == "rule"]
    assert [r["rule"] for r in fired] == ["support cost doubled"], rules
    (alert,) = fired
    assert alert["level"] == "agent" and alert["agent_id"] == "support-bot"
    assert alert["severity"] == "critical" and alert["measure"] == "cost_per_task"
    assert incident.starts_at <= alert["window_start"] <= incident.starts_at + timedelta(minutes=3)
    # Its value is the window's cost per task, recomputed by DuckDB from the raw events.
    ((cost, tasks),) = con.execute(
        "SELECT sum(cost_usd), count(*) FILTER (type = 'task' AND outcome = 'started') "
        "FROM events WHERE agent_id = 'support-bot' AND NOT late "
        "AND ts >= $1 AND ts < $2",
        [alert["window_start"], alert["window_end"]],
    ).fetchall()
    assert alert["observed"] == pytest.approx(cost / tasks, rel=1e-9)
    assert alert["observed"] >= 2 * alert["baseline"]

    # The explanation names the version that got expensive: v4 holds most of the excess.
    top = alert["contributors"][0]
    assert (top["dimension"], top["value"]) == ("agent_version", "v4"), alert["contributors"]
    assert top["share"] > 0.8
    assert "agent_version v4" in alert["explanation"]

    # Subscribers get the same records, explanation included.
    records = consume_all(settings, settings.anomalies_topic, landed.num_rows)
    on_topic = {r.key.decode(): msgspec.json.decode(r.value) for r in records}
    assert set(on_topic) == set(landed["anomaly_id"].to_pylist())
    assert on_topic[alert["anomaly_id"]]["explanation"] == alert["explanation"]
    assert on_topic[alert["anomaly_id"]]["rule"] == "support cost doubled"

    # The backtest of the same lake prints the same alerts, with the same ids, and changes
    # nothing.
    files_before = sorted(p.name for p in (lake / "anomalies").rglob("*.parquet"))
    proc = run_cli(
        "backtest", "--rules", str(rules_file), "--json", env=worker_env(settings), check=True
    )
    backtested = [json.loads(line) for line in proc.stdout.splitlines()]
    assert sorted(r["anomaly_id"] for r in backtested) == sorted(landed["anomaly_id"].to_pylist())
    assert {r["anomaly_id"]: r["kind"] for r in backtested} == dict(
        zip(landed["anomaly_id"].to_pylist(), landed["kind"].to_pylist(), strict=True)
    )
    assert sorted(p.name for p in (lake / "anomalies").rglob("*.parquet")) == files_before

    # --from / --to select the windows reported.
    text = run_cli(
        "backtest",
        "--rules",
        str(rules_file),
        "--no-detectors",
        "--from",
        alert["window_start"].isoformat(),
        "--to",
        alert["window_end"].isoformat(),
        env=worker_env(settings),
        check=True,
    ).stdout
    assert alert["anomaly_id"] in text
    assert text.strip().endswith("1 alert, 0 recoveries (2 rules)")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--from", "yesterday"], "error: bad --from 'yesterday': expected RFC 3339"),
        (
            ["--to", "2026-01-05T09:00:00"],
            "error: bad --to '2026-01-05T09:00:00': give a UTC offset",
        ),
        (
            ["--from", "2026-01-05T10:00:00Z", "--to", "2026-01-05T09:00:00Z"],
            "error: bad --from '2026-01-05T10:00:00Z': it must be before --to",
        ),
        (["--rules", "nope.toml"], "error: bad rules: cannot read rules file 'nope.toml'"),
        (["--data-dir", "missing"], "error: data directory 'missing' does not exist"),
    ],
)
def test_backtest_mistakes_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "lake").mkdir()
    lake = [] if "--data-dir" in args else ["--data-dir", str(tmp_path / "lake")]
    proc = run_cli("backtest", *lake, *args)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(message), line
