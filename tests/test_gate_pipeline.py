"""``agentstream release gate`` on real verdicts: promote a candidate as good as its baseline
(exit 0), roll back one that regresses (exit 1).

Two rollouts of one agent each, announced with ``agentstream release start`` and judged by a
real worker from the real broker; the gate is asked through the command line, as a deploy
pipeline would. The traffic is built here, not drawn from the generator's scenarios: to be
*decided* ``no_difference`` on every measure, the good candidate must be measurably equal on
all of them, which with the generator's rates (6 % escalations, 18 % negative ratings, an
evaluator on a tenth of the answers) takes tens of thousands of tasks; a healthy agent (no
escalations or failures, steady costs and latencies) is decided in a few windows.
"""

from __future__ import annotations

import random
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from pipeline.schema import AgentEvent, Escalation, Evaluation, LlmCall, Task
from sinks.catalog import connect
from tests.helpers import land_all, unique_settings, worker_env

pytestmark = pytest.mark.timeout(300)

WINDOWS = 20  # one-minute windows of traffic after the release (min_windows is 5)
TASKS_PER_WINDOW = 200  # half on each side: over the 50 steps a side needs for its p95


def rollout_traffic(
    agent: str, start: datetime, escalate_candidate: float, seed: int
) -> list[AgentEvent]:
    """``agent``'s tasks for ``WINDOWS`` minutes from ``start``, half on prompt p2 (the
    candidate) and half on p1: each task starts, calls the model once (steady cost and
    latency), is judged by a hallucination evaluator (99 % pass) and completes; 1 % of the
    tasks escalate to a human, ``escalate_candidate`` of the candidate's."""
    rng = random.Random(seed)
    out: list[AgentEvent] = []
    step = timedelta(seconds=60 / TASKS_PER_WINDOW)
    for i in range(WINDOWS * TASKS_PER_WINDOW):
        ts = start + i * step + timedelta(milliseconds=rng.randrange(100))
        prompt = "p2" if i % 2 else "p1"
        env: dict[str, Any] = {
            "schema_version": 1,
            "agent_id": agent,
            "prompt_version": prompt,
            "task_id": f"{agent}-t{i}",
        }
        eid = f"{agent}-{i}"
        out.append(Task(event_id=f"{eid}-s", ts=ts, outcome="started", **env))
        out.append(
            LlmCall(
                event_id=f"{eid}-m",
                ts=ts + timedelta(milliseconds=150),
                model="gpt-4o-mini",
                input_tokens=800,
                output_tokens=200,
                cost_usd=0.002 * rng.uniform(0.97, 1.03),
                latency_ms=900 * rng.uniform(0.97, 1.03),
                **env,
            )
        )
        out.append(
            Evaluation(
                event_id=f"{eid}-e",
                ts=ts + timedelta(milliseconds=250),
                model="gpt-4o-mini",
                evaluator="hallucination",
                score=1.0 if (passed := rng.random() < 0.99) else 0.0,
                passed=passed,
                **env,
            )
        )
        if rng.random() < (escalate_candidate if prompt == "p2" else 0.01):
            out.append(Escalation(event_id=f"{eid}-x", ts=ts + timedelta(milliseconds=300), **env))
        out.append(
            Task(
                event_id=f"{eid}-c", ts=ts + timedelta(milliseconds=350), outcome="completed", **env
            )
        )
    return out


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_gate_promotes_an_equal_candidate_and_rolls_back_a_regressing_one(
    bootstrap: str, tmp_path: Path
) -> None:
    settings = unique_settings(bootstrap, tmp_path / "lake")
    env = worker_env(settings)
    start = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=1)
    rollouts = {"gate-good": 0.01, "gate-bad": 0.3}
    for agent in rollouts:
        announced = _cli(
            env, "release", "start", "--agent", agent, "--dimension", "prompt_version",
            "--candidate", "p2", "--baseline", "p1", "--share", "0.5", "--id", f"{agent}:p2",
            "--at", start.isoformat(),
        )  # fmt: skip
        assert announced.returncode == 0, announced.stderr
    stream: list[Any] = []
    for seed, (agent, share) in enumerate(rollouts.items()):
        stream += rollout_traffic(agent, start, share, seed)
    stream.sort(key=lambda ev: ev.ts)
    # a last event five minutes on closes every window, as time passing would
    stream.append(
        Task(
            event_id="sentinel", schema_version=1, ts=stream[-1].ts + timedelta(minutes=5),
            agent_id="sentinel", outcome="started",
        )
    )  # fmt: skip
    land_all(settings, stream, timeout=180)

    answers = {}
    for agent in rollouts:
        gate = _cli(env, "release", "gate", "--id", f"{agent}:p2", "--json")
        answer = msgspec.json.decode(gate.stdout)
        assert gate.returncode == answer["exit_code"], gate.stderr
        answers[agent] = (gate.returncode, answer)
        print(agent, gate.returncode, answer["reason"])

    code, good = answers["gate-good"]
    assert (code, good["decision"]) == (0, "promote"), good
    measured = {
        m["measure"]: m["verdict"]
        for m in good["measures"]
        if m["candidate_samples"] or m["baseline_samples"]
    }
    assert measured == {
        "cost_per_completed_task": "no_difference",
        "escalation_rate": "no_difference",
        "task_success_rate": "no_difference",
        "latency_p95_ms": "no_difference",
        "eval_hallucination_pass_rate": "no_difference",
    }
    code, bad = answers["gate-bad"]
    assert (code, bad["decision"]) == (1, "rollback"), bad
    assert bad["reason"] == "regressed on escalation_rate"

    # The gate's samples are the lake's: the candidate's started tasks, counted from events.
    ((started,),) = (
        connect(settings.data_dir)
        .execute(
            "SELECT count(*) FROM events WHERE agent_id = 'gate-good' AND type = 'task' "
            "AND outcome = 'started' AND prompt_version = 'p2' AND ts < ?",
            [_decided_at(good, "escalation_rate")],
        )
        .fetchall()
    )
    (escalation,) = [m for m in good["measures"] if m["measure"] == "escalation_rate"]
    assert escalation["candidate_samples"] == started


def _decided_at(answer: dict[str, Any], measure: str) -> datetime:
    """The end of the window at which ``measure`` was decided."""
    (row,) = [m for m in answer["measures"] if m["measure"] == measure]
    return datetime.fromisoformat(row["decided_window_end"])
