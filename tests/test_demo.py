"""``agentstream demo`` with every scenario ``--list-scenarios`` offers, as a user runs it.

Each demo starts its own embedded broker and worker; they run side by side (most of a demo
is waiting for its last window to close on the wall clock), so the whole set costs about
as much as the slowest one.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline.generate import TrafficConfig
from pipeline.scenarios import ROLLOUT_SCENARIOS, SCENARIOS, budget_truth
from sinks.catalog import prepare
from tests.helpers import REPO
from tests.test_cli import cli_env

pytestmark = pytest.mark.timeout(600)

EVENTS = 3_000


def _demo(
    scenario: str, data_dir: Path, web_port: int | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "pipeline.cli", "demo", "--events", str(EVENTS)]
    argv += ["--seed", "1", "--scenario", scenario, "--data-dir", str(data_dir)]
    # --timeout bounds a hang: the rollout scenarios used to wait it out whole, then warn.
    argv += ["--lateness", "1", "--timeout", "400"]
    env = cli_env()
    if web_port is not None:
        env["AGENTSTREAM_WEB_PORT"] = str(web_port)
    return subprocess.run(
        argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=500, check=False
    )


def test_demo_finishes_for_every_scenario_and_shows_it(tmp_path: Path) -> None:
    listed = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "generate", "--list-scenarios"],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    names = [n for n in SCENARIOS if n in listed]
    assert names == list(SCENARIOS)
    # The first demo's worker is given a web port already in use: it dies on it, and the
    # demo starts it again on another port (a port taken between pick and bind).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = {names[0]: held.getsockname()[1]}
        with ThreadPoolExecutor(len(names)) as pool:
            done = pool.map(lambda n: _demo(n, tmp_path / n, taken.get(n)), names)
            runs = dict(zip(names, done, strict=True))
    assert "web port taken: worker restarted on" in runs[names[0]].stderr
    for name, run in runs.items():
        assert run.returncode == 0, f"{name}: {run.stderr[-2000:]}"
        assert "not in a closed window yet" not in run.stderr, f"{name}: {run.stderr[-800:]}"
        assert f"events landed: {EVENTS} ({EVENTS} distinct event_id" in run.stdout, name
        assert f"scenario {name}: {SCENARIOS[name].description}" in run.stdout
        # A warning is something to investigate; the embedded broker's lack of idempotent
        # producers is expected, so it must not read like one.
        assert "WARNING" not in run.stderr, f"{name}: {run.stderr[-800:]}"
    budget_run = runs["budget-burn"]
    spec = budget_truth(TrafficConfig(events=EVENTS, seed=1, scenario="budget-burn"))[0]
    assert spec, "the budget scenario carries budgets"
    for entry in spec.split(","):
        assert entry in budget_run.stdout  # the worker ran with them: a row per budget
    truth = json.loads((tmp_path / "budget-burn" / "ground_truth.json").read_text())
    assert truth["budgets"] == spec
    for name in ROLLOUT_SCENARIOS:
        incidents = json.loads((tmp_path / name / "ground_truth.json").read_text())["incidents"]
        (release,) = {i["release_id"] for i in incidents if i.get("release_id")}
        assert f"{release}  escalation_rate" in runs[name].stdout


def test_demo_refuses_a_data_dir_that_holds_a_lake(tmp_path: Path) -> None:
    # Its embedded broker starts empty: the lake's stored positions would be past its end.
    prepare(tmp_path)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "demo",
            "--events",
            "10",
            "--data-dir",
            str(tmp_path),
        ],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 2
    assert run.stderr.startswith(f"error: {tmp_path} already holds a lake"), run.stderr
