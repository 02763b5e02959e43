"""The ``agentstream`` command line (pipeline/cli.py), run as real subprocesses."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest

from pipeline import schema
from pipeline.broker import free_port
from pipeline.cli import describe
from pipeline.config import Settings
from pipeline.kafka import committed_lag
from pipeline.publisher import SyncPublisher
from pipeline.schema import LlmCall, Task, ToolCall
from sinks.catalog import EVENTS, prepare
from sinks.tables import events_to_table
from tests.helpers import REPO, consume_all, free_ports, unique_settings

pytestmark = pytest.mark.timeout(180)


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTSTREAM_")}
    env.update(PYTHONPATH=str(REPO), TZ="UTC", **extra)
    return env


Command = tuple[Sequence[str], dict[str, str]]


def run_all(commands: Sequence[Command], cwd: Path) -> list[subprocess.CompletedProcess[str]]:
    """Run ``agentstream`` commands ``(args, env)`` side by side (each start costs ~1 s)."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *args],
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args, env in commands
    ]
    done = []
    try:
        for (args, _), proc in zip(commands, procs, strict=True):
            out, err = proc.communicate(timeout=60)
            done.append(subprocess.CompletedProcess([*args], proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return done


def run(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    (proc,) = run_all([(args, env or cli_env())], cwd)
    return proc


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small lake landed by hand: two model calls and a task."""
    root = tmp_path_factory.mktemp("cli-lake") / "lake"
    t0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
    events: list[schema.AgentEvent] = [
        LlmCall(
            event_id="e1",
            schema_version=1,
            ts=t0,
            agent_id="a",
            input_tokens=100,
            output_tokens=20,
            cost_usd=0.25,
        ),
        LlmCall(
            event_id="e2",
            schema_version=1,
            ts=t0 + timedelta(hours=1),
            agent_id="a",
            input_tokens=50,
            output_tokens=5,
        ),
        Task(
            event_id="e3",
            schema_version=1,
            ts=t0 + timedelta(hours=23),
            agent_id="b",
            outcome="completed",
        ),
    ]
    table = events_to_table(
        events,
        {
            "cost_estimated": [False, True, None],
            "late": [False, False, False],
            "kafka_partition": [0, 0, 0],
            "kafka_offset": [0, 1, 2],
        },
    )
    prepare(root).append(EVENTS.name, table)
    return root


# --- user errors ---------------------------------------------------------------------------

RELEASE = ["release", "start", "--broker", "127.0.0.1:9", "--agent", "bot"]
RELEASE += ["--dimension", "prompt_version"]

USER_ERRORS = {
    "bad broker syntax": (
        ["worker", "--broker", "nonsense"],
        {},
        "error: bad broker address 'nonsense': expected host:port or kafka://host:port "
        "(for example 127.0.0.1:9092)",
    ),
    "missing data dir": (
        ["sql", "--data-dir", "/nonexistent", "SELECT 1"],
        {},
        "error: data directory '/nonexistent' does not exist: run `agentstream worker "
        "--data-dir DIR` (or `agentstream demo`) first, or pass the right --data-dir",
    ),
    "bad sql": (
        ["sql", "--data-dir", "{lake}", "SELECT * FROM nope"],
        {},
        "error: Catalog Error: Table with name nope does not exist!",
    ),
    "sql syntax": (
        ["sql", "--data-dir", "{lake}", "SELEC 1"],
        {},
        'error: Parser Error: syntax error at or near "SELEC"',
    ),
    "bad env var": (
        ["sql", "--data-dir", "{lake}", "SELECT 1"],
        {"AGENTSTREAM_PARTITIONS": "abc"},
        "error: bad AGENTSTREAM_PARTITIONS='abc': expected a number",
    ),
    "bad env window": (
        ["sql", "--data-dir", "{lake}", "SELECT 1"],
        {"AGENTSTREAM_WINDOW": "2m"},
        "error: bad window '2m': choose one of 1m, 5m, 1h",
    ),
    "bad topic name": (
        [
            "publish",
            "--broker",
            "127.0.0.1:9",
            "--topic",
            "bad topic",
            str(REPO / "pyproject.toml"),
        ],
        {},
        "error: bad events topic name 'bad topic': use 1-249 characters of letters, digits, "
        "'.', '_', '-'",
    ),
    "release share out of range": (
        [*RELEASE, "--candidate", "p2", "--baseline", "p1", "--share", "1.5"],
        {},
        "error: invalid event: event 'release:bot:prompt_version:p1->p2:started:1.5': "
        "Expected `float` <= 1.0 - at `$.traffic_share`",
    ),
    "release without a change": (
        [*RELEASE, "--candidate", "p1", "--baseline", "p1"],
        {},
        "error: invalid event: event 'release:bot:prompt_version:p1->p1:started:1': candidate "
        "and baseline are both 'p1': a release compares two versions - at `$.candidate`",
    ),
    "release time without offset": (
        [*RELEASE, "--candidate", "p2", "--baseline", "p1", "--at", "2026-11-26T10:00:00"],
        {},
        "error: bad --at '2026-11-26T10:00:00': give a UTC offset, e.g. 2026-11-26T10:00:00Z",
    ),
    "missing publish file": (
        ["publish", "--broker", "127.0.0.1:9", "/nonexistent/events.jsonl"],
        {},
        None,  # click's own usage error, checked below
    ),
}


@pytest.fixture(scope="module")
def user_errors(
    lake: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, subprocess.CompletedProcess[str]]:
    commands: list[Command] = [
        ([a.replace("{lake}", str(lake)) for a in args], cli_env(**env))
        for args, env, _ in USER_ERRORS.values()
    ]
    return dict(zip(USER_ERRORS, run_all(commands, tmp_path_factory.mktemp("cwd")), strict=True))


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_user_error_is_one_line_and_status_2(
    case: str, user_errors: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    _, _, expected = USER_ERRORS[case]
    proc = user_errors[case]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    if expected is None:
        assert "Error: Invalid value for 'SOURCE'" in proc.stderr
        return
    assert error_lines(proc) == [expected]
    assert proc.stderr.strip().splitlines() == [expected]


@pytest.fixture(scope="module")
def unreachable_publish(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], int]:
    port = free_port()
    cwd = tmp_path_factory.mktemp("cwd")
    source = cwd / "events.jsonl"
    source.write_text('{"type":"task"}\n')
    return run("publish", "--broker", f"127.0.0.1:{port}", str(source), cwd=cwd), port


def test_unreachable_broker_on_publish(
    unreachable_publish: tuple[subprocess.CompletedProcess[str], int],
) -> None:
    proc, port = unreachable_publish
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = error_lines(proc)
    assert line.startswith(f"error: cannot reach Kafka at 127.0.0.1:{port} (")
    assert line.endswith(
        "start one with `agentstream broker` or pass --broker host:port (env AGENTSTREAM_BROKER)"
    )


def test_unreachable_broker_on_publish_prints_only_the_error_line(
    unreachable_publish: tuple[subprocess.CompletedProcess[str], int],
) -> None:
    proc, _ = unreachable_publish
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("processes", [1, 2])
def test_a_taken_web_port_is_one_line_before_the_broker_is_asked(
    tmp_path: Path, processes: int
) -> None:
    """The port is checked first: no broker at all here, and the line names the port."""
    import socket

    first = free_ports(processes)
    taken = first + processes - 1  # with --processes 2, the second port of the range
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", taken))
        held.listen()
        proc = run(
            "worker", "--broker", f"127.0.0.1:{free_port()}", "--web-port", str(first),
            "--processes", str(processes), "--data-dir", str(tmp_path), cwd=tmp_path,
        )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    also = " (--processes 2 uses ports from it up)" if processes == 2 else ""
    assert proc.stderr.strip().splitlines() == [
        f"error: the web port 127.0.0.1:{taken} is in use (Address already in use): pass a "
        f"free --web-port or set AGENTSTREAM_WEB_PORT{also}"
    ]


def test_sql_on_an_empty_existing_dir_is_a_user_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run("sql", "--data-dir", str(empty), "SELECT count(*) FROM events", cwd=tmp_path)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode in (0, 2)


# --- generate ------------------------------------------------------------------------------


def test_generate_is_deterministic(tmp_path: Path) -> None:
    first, second, other = run_all(
        [
            (["generate", "--events", "100", "--seed", "5"], cli_env()),
            (["generate", "--events", "100", "--seed", "5"], cli_env()),
            (["generate", "--events", "100", "--seed", "6"], cli_env()),
        ],
        tmp_path,
    )
    assert first.returncode == second.returncode == other.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert first.stdout != other.stdout
    lines = first.stdout.splitlines()
    assert len(lines) == 100
    events, ok_at, rejections, _ = schema.decode_batch([line.encode() for line in lines])
    assert rejections == []
    assert ok_at == list(range(100))
    assert len({ev.event_id for ev in events}) == 100


def test_generate_zero_events(tmp_path: Path) -> None:
    proc = run("generate", "--events", "0", cwd=tmp_path)
    assert (proc.returncode, proc.stdout) == (0, "")


# --- publish -------------------------------------------------------------------------------


def test_publish_reports_invalid_lines_and_sends_the_rest(bootstrap: str, tmp_path: Path) -> None:
    settings = Settings.load(env={}, broker=bootstrap)
    topic = f"cli-{uuid.uuid4().hex[:8]}"
    valid = [
        schema.encode(
            ToolCall(
                event_id=f"v{i:02d}",
                schema_version=1,
                ts=datetime(2026, 1, 5, 9, 0, i, tzinfo=UTC),
                agent_id="cli-agent",
                task_id=f"task-{i % 5}",
                tool_name="search",
                status="ok",
            )
        ).decode()
        for i in range(50)
    ]
    lines = list(valid)
    # 1-based line numbers in the final file: a blank line keeps the numbering honest.
    lines.insert(6, '{"type":"task", "event_id": ')  # line 7
    lines.insert(9, "")  # line 10, blank: skipped, still counted
    lines.insert(22, valid[0].replace('"tool_call"', '"teleport"'))  # line 23
    lines.append(valid[0].replace('"agent_id":"cli-agent",', ""))  # line 54
    assert len(lines) == 54
    source = tmp_path / "events.jsonl"
    source.write_text("\n".join(lines) + "\n")

    tag = uuid.uuid4().hex[:8]
    env = cli_env(
        AGENTSTREAM_DLQ_TOPIC=f"cli-{tag}-dlq",
        AGENTSTREAM_METRICS_TOPIC=f"cli-{tag}-metrics",
        AGENTSTREAM_ANOMALIES_TOPIC=f"cli-{tag}-anomalies",
    )
    proc = run(
        "publish", "--broker", bootstrap, "--topic", topic, str(source), cwd=tmp_path, env=env
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    known = (
        "llm_call, tool_call, retrieval, escalation, task, feedback, evaluation, guardrail, release"
    )
    # aiokafka's own warnings (e.g. NotLeaderForPartition retries on a topic created a moment
    # ago) also reach stderr; see test_unreachable_broker_on_publish_prints_only_the_error_line.
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith(("line ", "published", "error"))]
    assert ours == [
        "line 7: malformed JSON: Input data was truncated",
        f"line 23: unknown event type 'teleport': expected one of {known} - at `$.type`",
        "line 54: missing required field `agent_id` - at `$.agent_id`",
        f"published 50 events to {topic}, refused 3 invalid lines",
    ]

    records = consume_all(settings, topic, 50)
    assert len(records) == 50
    assert sorted(r.value.decode() for r in records) == sorted(valid)
    assert {r.key for r in records} == {f"task-{i}".encode() for i in range(5)}
    # The topic holds exactly those 50: nothing of the refused lines went out.
    assert asyncio.run(committed_lag(settings, topic))[0] == 50


def test_publish_from_stdin(bootstrap: str, tmp_path: Path) -> None:
    settings = unique_settings(bootstrap, tmp_path)
    lines = [
        schema.encode(
            Task(
                event_id=f"s{i}",
                schema_version=1,
                ts=datetime(2026, 1, 5, tzinfo=UTC),
                agent_id="stdin",
                outcome="started",
            )
        )
        for i in range(7)
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "publish", "--broker", bootstrap, "-"],
        input=b"\n".join(lines) + b"\n",
        env=cli_env(
            AGENTSTREAM_EVENTS_TOPIC=settings.events_topic,
            AGENTSTREAM_DLQ_TOPIC=settings.dlq_topic,
            AGENTSTREAM_METRICS_TOPIC=settings.metrics_topic,
            AGENTSTREAM_ANOMALIES_TOPIC=settings.anomalies_topic,
            AGENTSTREAM_VERDICTS_TOPIC=settings.verdicts_topic,
        ),
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr.decode()
    ours = [ln for ln in proc.stderr.decode().splitlines() if ln.startswith("published")]
    assert ours == [f"published 7 events to {settings.events_topic}"]
    records = consume_all(settings, settings.events_topic, 7)
    assert sorted(r.value for r in records) == sorted(lines)


def test_release_start_and_end_are_published(bootstrap: str, tmp_path: Path) -> None:
    """`agentstream release` and ``SyncPublisher.publish_release`` send validated releases."""
    settings = unique_settings(bootstrap, tmp_path)
    env = cli_env(AGENTSTREAM_EVENTS_TOPIC=settings.events_topic)
    common = ["--broker", bootstrap, "--agent", "support-bot", "--dimension", "prompt_version"]
    common += ["--candidate", "p14", "--baseline", "p12"]
    outs = []
    for stage, extra in (
        ("start", ["--share", "0.2", "--at", "2026-11-25T14:00:00Z"]),
        ("end", ["--at", "2026-11-25T15:00:00+00:00"]),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "release", stage, *common, *extra],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        outs.append(proc.stdout.strip())
    assert outs[0] == (
        "release support-bot:prompt_version:p12->p14 started at 2026-11-25T14:00:00+00:00: "
        "support-bot prompt_version p14 (baseline p12) on 20% of its traffic"
    )
    with SyncPublisher(settings) as pub:
        sent = pub.publish_release(
            agent_id="billing-agent",
            tenant_id="acme",
            dimension="model",
            candidate="gpt-4o",
            baseline="gpt-4o-mini",
            traffic_share=0.1,
        )
    assert sent.release_id == "billing-agent/acme:model:gpt-4o-mini->gpt-4o"
    records = consume_all(settings, settings.events_topic, 3)
    got = sorted(
        (
            (e := schema.decode(r.value)).release_id,  # type: ignore[union-attr]
            e.stage,  # type: ignore[union-attr]
            e.traffic_share,  # type: ignore[union-attr]
            e.ts.isoformat(),
            r.key.decode(),
        )
        for r in records
    )
    assert got[1:] == [
        (
            "support-bot:prompt_version:p12->p14",
            "ended",
            1.0,
            "2026-11-25T15:00:00+00:00",
            "support-bot",
        ),
        (
            "support-bot:prompt_version:p12->p14",
            "started",
            0.2,
            "2026-11-25T14:00:00+00:00",
            "support-bot",
        ),
    ]
    assert got[0][:3] == ("billing-agent/acme:model:gpt-4o-mini->gpt-4o", "started", 0.1)
    assert got[0][4] == "billing-agent"


def test_tail_describes_a_verdict() -> None:
    record = type(
        "R",
        (),
        {
            "value": msgspec.json.encode(
                {
                    "window_end": "2026-01-05T09:30:00Z",
                    "verdict": "regressed",
                    "release_id": "r1",
                    "measure": "latency_p95_ms",
                    "candidate_version": "p14",
                    "baseline_version": "p12",
                    "effect": 0.25,
                    "effect_scale": "relative",
                    "confidence": 0.9991,
                    "candidate_samples": 1200,
                    "baseline_samples": 800,
                }
            )
        },
    )()
    assert describe("verdicts", record) == (
        "2026-01-05T09:30:00Z REGRESSED     r1 latency_p95_ms: p14 vs p12 effect=+25.0% "
        "confidence=0.999 n=1200/800"
    )


# --- sql -----------------------------------------------------------------------------------

QUERY = (
    "SELECT event_id, type, input_tokens, cost_usd, outcome, cost_estimated, ts, date "
    "FROM events ORDER BY event_id"
)
SQL_RUNS: dict[str, list[str]] = {
    "csv": ["--format", "csv", QUERY],
    "csv-agg": [
        "--format",
        "csv",
        "SELECT type, count(*) AS n, sum(input_tokens) AS toks FROM events GROUP BY type "
        "ORDER BY type",
    ],
    "json": ["--format", "json", QUERY],
    "json-empty": ["--format", "json", "SELECT * FROM dead_letters"],
    "csv-list": [
        "--format",
        "csv",
        "SELECT agent_id, list(event_id ORDER BY event_id) AS ids FROM events GROUP BY agent_id "
        "ORDER BY agent_id",
    ],
    "table": [
        "SELECT agent_id, count(*) AS n, sum(cost_usd) AS cost FROM events GROUP BY agent_id "
        "ORDER BY agent_id"
    ],
}


@pytest.fixture(scope="module")
def sql_out(
    lake: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, subprocess.CompletedProcess[str]]:
    commands: list[Command] = [
        (["sql", "--data-dir", str(lake), *args], cli_env()) for args in SQL_RUNS.values()
    ]
    done = run_all(commands, tmp_path_factory.mktemp("cwd"))
    return dict(zip(SQL_RUNS, done, strict=True))


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stdout


def test_sql_csv(sql_out: dict[str, subprocess.CompletedProcess[str]]) -> None:
    assert list(csv.reader(io.StringIO(ok(sql_out["csv"])))) == [
        ["event_id", "type", "input_tokens", "cost_usd", "outcome", "cost_estimated", "ts", "date"],
        ["e1", "llm_call", "100", "0.25", "", "false", "2026-01-05 09:00:00.000000Z", "2026-01-05"],
        ["e2", "llm_call", "50", "", "", "true", "2026-01-05 10:00:00.000000Z", "2026-01-05"],
        ["e3", "task", "", "", "completed", "", "2026-01-06 08:00:00.000000Z", "2026-01-06"],
    ]
    assert list(csv.reader(io.StringIO(ok(sql_out["csv-agg"])))) == [
        ["type", "n", "toks"],
        ["llm_call", "2", "150"],
        ["task", "1", ""],
    ]


def test_sql_json(sql_out: dict[str, subprocess.CompletedProcess[str]]) -> None:
    assert json.loads(ok(sql_out["json"])) == [
        {
            "event_id": "e1",
            "type": "llm_call",
            "input_tokens": 100,
            "cost_usd": 0.25,
            "outcome": None,
            "cost_estimated": False,
            "ts": "2026-01-05T09:00:00Z",
            "date": "2026-01-05",
        },
        {
            "event_id": "e2",
            "type": "llm_call",
            "input_tokens": 50,
            "cost_usd": None,
            "outcome": None,
            "cost_estimated": True,
            "ts": "2026-01-05T10:00:00Z",
            "date": "2026-01-05",
        },
        {
            "event_id": "e3",
            "type": "task",
            "input_tokens": None,
            "cost_usd": None,
            "outcome": "completed",
            "cost_estimated": None,
            "ts": "2026-01-06T08:00:00Z",
            "date": "2026-01-06",
        },
    ]
    assert json.loads(ok(sql_out["json-empty"])) == []


def test_sql_table(sql_out: dict[str, subprocess.CompletedProcess[str]]) -> None:
    assert ok(sql_out["table"]).splitlines() == [
        "agent_id  n  cost",
        "--------  -  ----",
        "a         2  0.25",
        "b         1  NULL",
        "(2 rows)",
    ]


def test_sql_csv_of_a_list_column(sql_out: dict[str, subprocess.CompletedProcess[str]]) -> None:
    proc = sql_out["csv-list"]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode in (0, 2)
