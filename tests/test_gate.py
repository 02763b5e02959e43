"""``agentstream release gate``: the decision rule, and user mistakes as one line and exit 2.

The exit codes on real verdicts (1 for both regressing rollouts, never 1 for the good one)
are tested through the broker in test_release_pipeline.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.gate import EXIT_CODES, UnknownRelease, decide, gate
from sinks.catalog import prepare


@pytest.fixture(scope="module")
def empty_lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A lake as a worker that has read nothing yet leaves it."""
    root = tmp_path_factory.mktemp("lake")
    prepare(root)
    return root


def _row(measure: str, verdict: str, cand: int = 300, base: int = 250) -> dict[str, Any]:
    return {
        "measure": measure,
        "verdict": verdict,
        "candidate_samples": cand,
        "baseline_samples": base,
    }


@pytest.mark.parametrize(
    ("rows", "decision", "reason"),
    [
        (
            [_row("escalation_rate", "regressed"), _row("tool_error_rate", "running")],
            "rollback",
            "regressed on escalation_rate",
        ),
        (
            [_row("escalation_rate", "no_difference"), _row("eval_tone_pass_rate", "better")],
            "promote",
            "all 2 measured measures decided, none regressed",
        ),
        (
            # an evaluator the agent does not run has no samples: not waited for
            [_row("escalation_rate", "better"), _row("eval_accuracy_pass_rate", "running", 0, 0)],
            "promote",
            "all 1 measured measures decided, none regressed",
        ),
        (
            # samples on one side only: still undecided
            [_row("escalation_rate", "better"), _row("eval_tone_pass_rate", "running", 40, 0)],
            "wait",
            "still running on eval_tone_pass_rate",
        ),
        ([_row("latency_p95_ms", "running", 0, 0)], "wait", "no window of the release judged yet"),
        ([], "wait", "no window of the release judged yet"),
    ],
)
def test_decision_rule(rows: list[dict[str, Any]], decision: str, reason: str) -> None:
    result = decide("r1", rows)
    assert (result.decision, result.reason) == (decision, reason)
    assert (
        result.exit_code
        == EXIT_CODES[result.decision]
        == {"promote": 0, "rollback": 1, "wait": 3}[decision]
    )
    assert result.as_dict()["measures"] == rows


def test_a_regression_wins_over_everything_running() -> None:
    rows = [_row(f"m{i}", "running") for i in range(12)] + [
        _row("feedback_negative_share", "regressed")
    ]
    assert decide("r1", rows).exit_code == 1


@settings(max_examples=5, deadline=None)
@given(release_id=st.text(min_size=1, max_size=80))
def test_hostile_release_ids_are_unknown_not_sql(empty_lake: Path, release_id: str) -> None:
    with pytest.raises(UnknownRelease, match="unknown release"):
        gate(empty_lake, release_id)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "release", "gate", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_user_mistakes_are_one_line_and_exit_2(empty_lake: Path, tmp_path: Path) -> None:
    unknown = _cli("--id", "nope'; DROP TABLE x; --", "--data-dir", str(empty_lake))
    assert unknown.returncode == 2 and unknown.stdout == ""
    assert unknown.stderr.splitlines() == [
        f'error: unknown release "nope\'; DROP TABLE x; --" in {empty_lake}: releases known: '
        "none yet (announce it with `agentstream release start`)"
    ]
    missing = _cli("--id", "r1", "--data-dir", str(tmp_path / "absent"))
    assert missing.returncode == 2
    assert (
        missing.stderr.startswith("error: data directory ")
        and len(missing.stderr.splitlines()) == 1
    )
    no_id = _cli("--data-dir", str(empty_lake))
    assert no_id.returncode == 2 and "Missing option '--id'" in no_id.stderr
