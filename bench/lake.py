"""``agentstream lake bench``: a large lake built through the real worker, then the dashboard
queries a user runs, timed warm, before and after one maintenance pass.

1. ``--events`` generated events (``--event-rate`` per second of event time, so 10M events at
   the default 2,000/s span ~83 hours) are published to a fresh 4-partition topic of a local
   Apache Kafka (or ``--broker``), in chunks, while one ``agentstream worker`` lands them
   (its maintenance schedule off, so the file count is what landing alone leaves).
2. Once the worker has committed every event: the lake's data files (current snapshot),
   then each query of ``QUERIES`` run twice through ``sinks.catalog.connect``; the second
   (warm) run is the figure.
3. ``sinks.maintenance.maintain`` (no time travel kept: the benchmark's lake is thrown
   away), then the files and the warm queries again.

``--json`` prints one object. The figures depend on the machine and what else runs on it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

from bench.run import (
    CONSUMING,
    LogWatcher,
    RssSampler,
    WorkerRun,
    _kill_group,
    _say,
    _settings,
    _topics,
    _wait_committed,
    encoded_events,
    publish,
    spawn_worker,
)
from pipeline.broker import LocalBroker, ensure_topics
from sinks.catalog import connect
from sinks.maintenance import data_files, maintain

# The dashboard queries of the issue: cost per agent per hour over the whole range,
# escalation rate by version per day, latency p95 by model, the last hour's anomalies with
# their context.
QUERIES: Final = {
    "cost_per_agent_per_hour": """
        SELECT agent_id, date_trunc('hour', ts) AS hour, sum(cost_usd) AS cost_usd
        FROM events WHERE type = 'llm_call' GROUP BY ALL ORDER BY ALL""",
    "escalation_rate_by_version_per_day": """
        SELECT agent_version, date_trunc('day', window_start) AS day,
               sum(escalations) / nullif(sum(tasks_started), 0) AS escalation_rate
        FROM metrics WHERE level = 'key' GROUP BY ALL ORDER BY ALL""",
    "latency_p95_by_model": """
        SELECT model, quantile_cont(latency_ms, 0.95) AS p95_ms
        FROM llm_calls GROUP BY ALL ORDER BY ALL""",
    "last_hour_anomalies_with_context": """
        WITH recent AS (
            SELECT * FROM anomalies
            WHERE window_start >= (SELECT max(window_start) FROM metrics) - INTERVAL 1 hour)
        SELECT a.anomaly_id, a.kind, a.measure, a.observed, a.baseline,
               count(e.event_id) AS events_in_window, sum(e.cost_usd) AS cost_in_window
        FROM recent a LEFT JOIN events e
          ON e.ts >= a.window_start AND e.ts < a.window_end AND e.agent_id = a.agent_id
        GROUP BY ALL ORDER BY ALL""",
}
CHUNK: Final = 200_000


def time_queries(data_dir: Path) -> dict[str, float]:
    """Seconds of the warm (second) run of each query, on one connection."""
    con = connect(data_dir)
    out = {}
    for name, sql in QUERIES.items():
        con.sql(sql).fetchall()
        started = time.perf_counter()
        con.sql(sql).fetchall()
        out[name] = round(time.perf_counter() - started, 3)
    return out


def run(events: int, seed: int, rate: float, broker: str | None) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="agentstream-lakebench-"))
    local: LocalBroker | None = None
    try:
        if broker is None:
            _say("starting a local Apache Kafka broker")
            local = LocalBroker("kafka", data_dir=workdir / "broker")
            broker = local.start(timeout=120)
        settings = _settings(
            broker, workdir / "lake", uuid.uuid4().hex[:8], maintain_interval_s=0.0
        )
        ensure_topics(settings.broker, _topics(settings))
        result: dict[str, Any] = {"events": events}
        log = workdir / "worker.log"
        proc = spawn_worker(settings, log, workdir)
        sampler = RssSampler(proc.pid)
        sampler.start()
        watcher = LogWatcher(log, CONSUMING)
        watcher.start()
        worker = WorkerRun()
        started = time.monotonic()
        try:
            for at in range(0, events, CHUNK):
                n = min(CHUNK, events - at)
                _say(f"publishing events {at:,}..{at + n:,}")
                # Each chunk its own seed: a chunk's events are new ids, times follow on.
                records = encoded_events(n, seed + at // CHUNK, rate)
                asyncio.run(publish(settings, records))
            asyncio.run(_wait_committed(settings, events, proc, watcher, worker, log, 7200))
        finally:
            watcher.stop()
            result["worker_peak_rss_bytes"] = sampler.stop()
            _kill_group(proc)
        result["build_seconds"] = round(time.monotonic() - started, 1)
        result["landed_eps"] = round(events / result["build_seconds"])
        con = connect(settings.data_dir)
        ((rows,),) = con.sql("SELECT count(*) FROM events").fetchall()
        result["events_landed"] = rows
        result["data_files_before"] = data_files(con)
        result["queries_before_s"] = time_queries(settings.data_dir)
        _say("maintaining the lake")
        done = maintain(settings.data_dir, retention=timedelta(0))
        result["maintain_seconds"] = round(done.seconds, 1)
        result["data_files_after"] = done.files_after
        result["queries_after_s"] = time_queries(settings.data_dir)
        result["lake_bytes"] = sum(
            p.stat().st_size for p in (settings.data_dir / "lake").rglob("*.parquet")
        )
        return result
    finally:
        if local is not None:
            local.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="agentstream lake bench", description=__doc__.split("\n")[0])
    p.add_argument("--events", type=int, default=10_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--event-rate", type=float, default=2000.0)
    p.add_argument("--broker", default=None)
    p.add_argument("--json", action="store_true")
    opts = p.parse_args(argv)
    result = run(opts.events, opts.seed, opts.event_rate, opts.broker)
    if opts.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")
    return 0
