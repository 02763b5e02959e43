"""The benchmark runs end to end on the session broker, and its profile summary adds up."""

from __future__ import annotations

import json
import time

import pytest

from bench import profile
from bench.run import RESULT_KEYS, main


@pytest.mark.timeout(180)
@pytest.mark.parametrize("workers", [1, 2])
def test_small_bench_run_reports_every_figure(
    bootstrap: str, capsys: pytest.CaptureFixture[str], workers: int
) -> None:
    started = time.monotonic()
    code = main(
        [
            "--broker",
            bootstrap,
            "--events",
            "20000",
            "--naive-cap",
            "5000",
            "--skip-latency",
            "--workers",
            str(workers),
            "--json",
        ]
    )
    elapsed = time.monotonic() - started
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(out)  # exactly one JSON object on stdout
    for key in RESULT_KEYS:
        assert key in result, key
    assert result["events"] == 20_000
    for key in ("publish_eps", "ceiling_eps", "naive_eps", "agentstream_eps", "peak_rss_bytes"):
        assert isinstance(result[key], int | float) and result[key] > 0, (key, result[key])
    for key in ("latency_p50_metrics_s", "latency_p99_metrics_s", "latency_p99_anomaly_s"):
        assert result[key] is None  # skipped
    assert result["naive_events"] == 5_000
    assert result["agentstream_eps"] > result["naive_eps"]
    assert result["worker_health"]["events_landed"] == 20_000
    # The hop carries partials per window and key to every shard, far fewer bytes than the
    # events (about 480 bytes each as published).
    hop = result["worker_telemetry"]
    assert hop["hop_messages"] >= 4 and 0 < hop["hop_bytes_per_event"] < 100, hop
    # Where the cores went while the worker ran: its processes, and the broker (the session's,
    # found by its listening port).
    (run,) = result["workers"].values()
    assert run["worker_cores"] > 0.1 and run["broker_cores"] > 0, run
    # As many processes consumed as the run is labelled with (`--workers 2` once ran one).
    assert result["workers"] == {str(workers): run} and run["processes"] == workers, run
    machine = result["machine"]
    assert machine["cores"] >= 1 and machine["python"]
    assert elapsed < 90, f"the smoke run took {elapsed:.0f} s"


def test_profile_summary_views() -> None:
    raw = [
        "thread (1): MainThread;run (streams/app.py:98);_consume (streams/worker.py:10);"
        "decode (pipeline/schema.py:5) 6",
        "thread (1): MainThread;run (streams/app.py:98);select (selectors.py:468) 3",
        "thread (2): asyncio_0;_land (streams/worker.py:40);write_table (pyarrow/parquet/core.py:9) 1",
    ]
    prof = profile.parse(raw)
    assert prof.total == 10
    assert prof.threads == {"MainThread": 9, "asyncio_0": 1}
    assert prof.top("self_time", 1) == [("decode (pipeline/schema.py)", 6, 60.0)]
    assert (
        dict((n, c) for n, c, _ in prof.top("inclusive", 10))["_consume (streams/worker.py)"] == 6
    )
    project = {n: c for n, c, _ in prof.top("project", 10)}
    # The entry point alone does not count as our code; the innermost line of ours does.
    assert project == {
        "decode (pipeline/schema.py:5)": 6,
        "(outside agentstream code)": 3,
        "_land (streams/worker.py:40)": 1,
    }
    only_main = profile.parse(raw, thread="MainThread")
    assert only_main.total == 9


@pytest.mark.timeout(120)
def test_otlp_bench_posts_every_span_and_publishes_its_events(
    bootstrap: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from bench import otlp

    code = otlp.main(["--broker", bootstrap, "--spans", "3500", "--batch", "500", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    assert result["statuses"] == {"200": 7}
    # Per agent run: 7 spans, the HTTP one skipped, the agent span two task events.
    assert (result["accepted"], result["skipped"], result["events"]) == (3000, 500, 3500)
    assert result["spans_per_s"] > 0 and result["spans_per_cpu_s"] > 0


def test_the_role_and_processes_reach_the_worker() -> None:
    """``--role ingest`` measures the landing alone: the worker is started with that role."""
    from bench.run import parse_args, worker_argv

    opts, _ = parse_args(["--role", "ingest", "--workers", "1,2"])
    assert (opts.role, opts.workers) == ("ingest", (1, 2))
    assert worker_argv(1, opts.role)[-2:] == ["--role", "ingest"]
    assert "--role" not in worker_argv(2, "all")
    assert worker_argv(2, "all")[-2:] == ["--processes", "2"]
    with pytest.raises(SystemExit):
        parse_args(["--role", "aggregate"])
