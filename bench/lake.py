"""``agentstream lake bench``: a large lake built through the real worker, then the dashboard
queries a user runs, timed warm, before and after one maintenance pass.

1. ``--events`` generated events (``--event-rate`` per second of event time, so 10M events at
   the default 50/s span ~56 hours over 3 dates: a backlog, one chunk after another in event
   time) are published to a fresh 4-partition topic of a local Apache Kafka (or
   ``--broker``), in chunks, while one ``agentstream worker`` lands them
   (its maintenance schedule off, so the file count is what landing alone leaves).
2. Once the worker has committed every event: the lake's data files (current snapshot),
   then each query of ``QUERIES`` run twice through ``sinks.catalog.connect``; the second
   (warm) run is the figure.
3. ``sinks.maintenance.maintain`` (no time travel kept: the benchmark's lake is thrown
   away), then the files and the warm queries again.

``--live SECONDS`` measures the other case of the issue instead: ``--live-rate`` events a
second (default 2,000) published as they happen, for SECONDS, to a worker with its default
flush interval and its own maintenance schedule; then every landed id checked against what was
published, the data files of the current snapshot (per table) and on disk, one maintenance
pass, and the files again.

``--json`` prints one object. The figures depend on the machine and what else runs on it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

from bench.run import (
    CONSUMING,
    PUBLISH_CHUNK,
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
from pipeline.config import Settings
from pipeline.generate import DEFAULT_START
from pipeline.publisher import Publisher
from sinks.catalog import connect
from sinks.maintenance import data_files, maintain

# The dashboard queries of the issue: cost per agent per hour over the whole range,
# escalation rate by version per day, latency p95 by model, the last hour's anomalies with
# their context.
# Hours are bucketed with time_bucket: date_trunc on a TIMESTAMPTZ goes through ICU's calendar
# for every value (2-4x slower here); the date_trunc form is timed too, to show the difference.
QUERIES: Final = {
    "cost_per_agent_per_hour": """
        SELECT agent_id, time_bucket(INTERVAL 1 hour, ts) AS hour, sum(cost_usd) AS cost_usd
        FROM events WHERE type = 'llm_call' GROUP BY ALL ORDER BY ALL""",
    "cost_per_agent_per_hour_date_trunc": """
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


@contextmanager
def _workplace(prefix: str, broker: str | None) -> Iterator[tuple[Path, str]]:
    """A work folder (removed after) and a broker: ``broker``, or a local Apache Kafka."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    local: LocalBroker | None = None
    try:
        if broker is None:
            _say("starting a local Apache Kafka broker")
            local = LocalBroker("kafka", data_dir=workdir / "broker")
            broker = local.start(timeout=120)
        yield workdir, broker
    finally:
        if local is not None:
            local.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _files_on_disk(data_dir: Path) -> int:
    return sum(1 for _ in (data_dir / "lake").rglob("*.parquet"))


def run(events: int, seed: int, rate: float, broker: str | None) -> dict[str, Any]:
    with _workplace("agentstream-lakebench-", broker) as (workdir, broker):
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
                # Each chunk its own seed (new ids) and its own stretch of event time, after
                # the previous chunk's: the lake spans events / rate seconds, as a stream would.
                start = DEFAULT_START + timedelta(seconds=at / rate)
                records = encoded_events(n, seed + at // CHUNK, rate, start)
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


async def publish_live(
    settings: Settings, records: Sequence[tuple[bytes, bytes]], rate: float
) -> None:
    """Publish ``records`` at ``rate`` a second, a tenth of a second's worth at a time."""
    step = max(1, min(PUBLISH_CHUNK, math.ceil(rate / 10)))
    async with Publisher(settings) as pub:
        started = time.monotonic()
        for i in range(0, len(records), step):
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await pub.publish_raw(records[i : i + step])


def _files_by_table(data_dir: Path) -> dict[str, int]:
    con = connect(data_dir)
    rows = con.sql(
        "SELECT table_name, file_count FROM ducklake_table_info('lake') WHERE file_count > 0 "
        "ORDER BY table_name"
    ).fetchall()
    return {str(name): int(n) for name, n in rows}


def run_live(seconds: float, rate: float, seed: int, broker: str | None) -> dict[str, Any]:
    with _workplace("agentstream-lakebench-live-", broker) as (workdir, broker):
        # The worker's defaults (flush every second, maintenance every 5 minutes).
        settings = _settings(broker, workdir / "lake", uuid.uuid4().hex[:8])
        ensure_topics(settings.broker, _topics(settings))
        total = int(seconds * rate)
        records = encoded_events(total, seed, rate)
        published = {json.loads(value)["event_id"] for _, value in records}
        result: dict[str, Any] = {
            "live_seconds": seconds,
            "rate_eps": rate,
            "published": total,
            "maintain_interval_s": settings.maintain_interval_s,
        }
        log = workdir / "worker.log"
        proc = spawn_worker(settings, log, workdir)
        watcher = LogWatcher(log, CONSUMING)
        watcher.start()
        worker = WorkerRun()
        try:
            _say(f"publishing {total:,} events live at {rate:,.0f}/s for {seconds:g} s")
            asyncio.run(publish_live(settings, records, rate))
            asyncio.run(_wait_committed(settings, total, proc, watcher, worker, log, 600))
        finally:
            watcher.stop()
            _kill_group(proc)
        con = connect(settings.data_dir)
        landed = {str(r[0]) for r in con.sql("SELECT event_id FROM events").fetchall()}
        ((rows,),) = con.sql("SELECT count(*) FROM events").fetchall()
        ((dead,),) = con.sql("SELECT count(*) FROM dead_letters").fetchall()
        result.update(
            events_rows=rows,
            events_distinct=len(landed),
            dead_letters=dead,
            missing=len(published - landed),
            unexpected=len(landed - published),
            data_files_before=data_files(con),
            files_by_table_before=_files_by_table(settings.data_dir),
            files_on_disk_before=_files_on_disk(settings.data_dir),
        )
        con.close()
        _say("maintaining the lake")
        done = maintain(settings.data_dir)
        result["maintain_seconds"] = round(done.seconds, 1)
        result["data_files_after"] = done.files_after
        result["files_by_table_after"] = _files_by_table(settings.data_dir)
        result["files_on_disk_after"] = _files_on_disk(settings.data_dir)
        return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="agentstream lake bench", description=__doc__.split("\n")[0])
    p.add_argument("--events", type=int, default=10_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--event-rate", type=float, default=50.0, help="[%(default)s] events/s")
    p.add_argument("--broker", default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--live",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="publish live for SECONDS instead (see above) [off]",
    )
    p.add_argument("--live-rate", type=float, default=2000.0, help="events/s live [%(default)s]")
    opts = p.parse_args(argv)
    if opts.live < 0 or opts.live_rate <= 0 or opts.events < 1:
        p.error("--live must be >= 0, --live-rate and --events positive")
    if opts.live:
        result = run_live(opts.live, opts.live_rate, opts.seed, opts.broker)
    else:
        result = run(opts.events, opts.seed, opts.event_rate, opts.broker)
    if opts.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")
    return 0
