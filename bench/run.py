"""``agentstream bench``: one run, one machine, against a real Apache Kafka broker.

What is measured, in order (every phase on its own fresh topics and consumer groups):

1. **publish**: ``--events`` generated events (``pipeline.generate``, ~480 B of JSON each,
   ``--event-rate`` events per second of event time: 10,000 by default, so 1M events span
   ~100 s like a stream that needs this throughput; at the generator's own 50/s they would
   span 5.5 hours and the run would measure a backlog replay that closes ~330 windows) are
   encoded first (not timed), then published to a fresh 4-partition topic with
   ``Publisher.publish_raw`` (keyed by task, per-partition batches, acks=all, idempotent),
   in calls of ``PUBLISH_CHUNK`` records. ``publish_eps = events / time of the publish calls``.
2. **ceiling**: a plain aiokafka consumer-group consumer (the worker's fetch settings,
   ``getmany(max_records=50_000)``, no decoding, a commit after every fetch) reads the topic
   from the first offset to the last. Timed from just after ``consumer.start()`` (the group
   join is inside) to the last commit.
3. **naive**: ``bench/naive_faust.py``, a faust worker process whose agent iterates per event
   and updates a tumbling windowed Table per event (see that module). It stops counting at
   ``--naive-cap`` events or ``--naive-seconds`` seconds, whichever comes first (1M events at
   ~2.4k events/s would take 7 minutes); ``naive_eps`` is its rate over that stretch, timed
   inside the agent from the first event (the faust start-up and group join are not in it).
4. **agentstream**: one ``agentstream worker`` process (``python -m pipeline.cli worker``)
   with production settings (validation, dead letters, windowed aggregates, metrics records,
   Parquet landing, window snapshots, offset commits), from the first offset until the group
   has committed every event. ``agentstream_eps = events / (all committed - "consuming")``,
   where "consuming" is the worker's log line written right after its consumer started
   (the Python and faust start-up before it is not counted; the group join and the final
   flush are). ``agentstream_eps_steady`` is measured from the first commit instead
   (``(events - first committed) / (all committed - first commit)``). The committed offsets
   are polled every 50 ms. Peak RSS: the worker's resident set size (with any children),
   sampled with psutil every 100 ms from spawn to the end. ``worker_telemetry`` is read
   from the worker's ``/metrics`` at the end (flushes, seconds spent flushing, metrics rows);
   ``--profile FILE`` attaches py-spy to the worker (see ``bench.profile``). When the
   backlog spans enough event time to close windows on its own (``--event-rate 50``: 2.8 h
   for 500k events), the run goes on until the aggregate stage has published the metrics of
   the backlog's last closed window (``aggregate_through``; each metrics partition's last
   record is polled every 0.2 s), and ``agentstream_eps_with_aggregate`` is the events over
   that time: catching up is done when the metrics are, not when the events are landed.
5. **latency** (``--skip-latency`` skips it): a new worker with a 1-minute window and
   ``--latency-lateness`` seconds of allowed lateness; events are published at a steady
   ``--latency-rate`` per second for ``--latency-seconds`` seconds with event time = wall
   clock (generated events with ``ts`` and ``event_id`` rewritten at send time), then the
   run waits until every window that got events has been emitted. For each record on the
   metrics topic, latency = time received - (window_end + allowed lateness), i.e. relative
   to the moment the window may close; p50/p99 over records. A window's records are all
   emitted by one flush, so the percentiles mostly reflect the 2-3 window closes of a run;
   ``latency_windows`` lists them. Anomaly latency is the same measure on the anomalies
   topic, or null when no anomaly record arrived (steady traffic should raise none).

The machine may be shared: ``background_cores`` is, per phase, the CPU used by processes
other than the benchmark, its workers and its broker (machine busy time minus ours), and
the report warns when it reaches 0.2 cores, since every figure is then low.

The worker's tunables (``AGENTSTREAM_FLUSH_INTERVAL_S``, ``AGENTSTREAM_FETCH_MAX_RECORDS``, ...)
may be set in the environment to compare settings; the report lists the ones used. The
broker comes only from ``--broker`` (a local Apache Kafka is started otherwise), and the
topics, group, data folder and web port are always the benchmark's own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from pipeline import schema
from pipeline.broker import KAFKA_VERSION, LocalBroker, ensure_topics, free_port
from pipeline.config import Settings
from pipeline.generate import TrafficConfig, generate
from pipeline.kafka import committed_lag
from pipeline.procs import stop_group
from pipeline.publisher import Publisher, event_key

__all__ = ["BenchOptions", "main", "render", "run"]

REPO: Final = Path(__file__).resolve().parent.parent
NAIVE_SCRIPT: Final = Path(__file__).resolve().with_name("naive_faust.py")
PUBLISH_CHUNK: Final = 50_000
CEILING_MAX_RECORDS: Final = 50_000
PARTITIONS: Final = 4
CONSUMING: Final = re.compile(r"consuming \S+ as group")
# faust/mode log lines start with "[2026-11-26 11:45:01,234]" (local time).
_LOG_PID: Final = re.compile(r"^\[[^]]+\] \[(\d+)\]")
_LOG_TS: Final = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")
# What a result always holds; latency keys are null with --skip-latency.
RESULT_KEYS: Final = (
    "events",
    "publish_eps",
    "ceiling_eps",
    "naive_eps",
    "agentstream_eps",
    "peak_rss_bytes",
    "latency_p50_metrics_s",
    "latency_p99_metrics_s",
    "latency_p99_anomaly_s",
    "machine",
)


@dataclass(frozen=True)
class BenchOptions:
    """Everything a run can be told; the defaults are the documented benchmark."""

    events: int = 1_000_000
    broker: str | None = None
    seed: int = 0
    # Event-time rate of the pre-loaded events: 1M events at 10k/s span ~100 s, as a stream
    # that needs this throughput would. At the generator's default (50/s) they span 5.5 h and
    # every ~4 events add a metrics row (333 windows of ~700 keys): a backlog replay.
    event_rate: float = 10_000.0
    naive_cap: int = 100_000
    naive_seconds: float = 60.0
    skip_latency: bool = False
    latency_seconds: float = 75.0
    latency_rate: int = 10_000
    latency_lateness: float = 5.0
    profile: Path | None = None
    profile_idle: bool = False
    keep: bool = False
    # Worker process counts to run the same backlog with, one after another (side by side in
    # one run: a shared machine's load changes between runs).
    workers: tuple[int, ...] = (1,)
    # The main run's worker role: "ingest" leaves the aggregate stage out, so the figure is
    # the landing's own (what the Parquet folders before DuckLake are compared with).
    role: str = "all"


class BenchError(RuntimeError):
    """A phase could not complete (a process died, a timeout passed)."""


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------


def _say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in [0, 1]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def _settings(
    broker: str, data_dir: Path, tag: str, *, tunables: bool = True, **changes: Any
) -> Settings:
    """Settings with topics and group of the benchmark's own; tunables from the env."""
    own = {
        "broker": broker,
        "data_dir": data_dir,
        "events_topic": f"bench-{tag}-events",
        "dlq_topic": f"bench-{tag}-dlq",
        "metrics_topic": f"bench-{tag}-metrics",
        "anomalies_topic": f"bench-{tag}-anomalies",
        "verdicts_topic": f"bench-{tag}-verdicts",
        "group_id": f"bench-{tag}",
        "web_port": free_port(),
        "partitions": PARTITIONS,
        **changes,
    }
    env = {k: v for k, v in os.environ.items() if k.startswith("AGENTSTREAM_")} if tunables else {}
    return Settings.load(env=env, **own)


def _topics(settings: Settings) -> dict[str, int]:
    return {
        t: settings.partitions
        for t in (
            settings.events_topic,
            settings.dlq_topic,
            settings.metrics_topic,
            settings.anomalies_topic,
            settings.verdicts_topic,
        )
    }


def _kill_group(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM the process group we started, SIGKILL it if it does not stop in time."""
    stop_group(proc, timeout)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class LogWatcher(threading.Thread):
    """Tails a log file every 20 ms; records when a line matching ``pattern`` first shows.

    ``seen_at`` is the time (``time.time()``) written in the line itself when it carries a
    faust timestamp, else the time the watcher saw it.
    """

    def __init__(self, path: Path, pattern: re.Pattern[str]) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.pattern = pattern
        self.seen_at: float | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        offset = 0
        buffer = ""
        while not self._stop_event.is_set() and self.seen_at is None:
            try:
                with self.path.open("r", errors="replace") as fh:
                    fh.seek(offset)
                    chunk = fh.read()
                    offset = fh.tell()
            except OSError:
                chunk = ""
            now = time.time()
            buffer += chunk
            *complete, buffer = buffer.split("\n")
            for line in complete:
                if self.pattern.search(line):
                    self.seen_at = _line_time(line, now)
                    return
            self._stop_event.wait(0.02)

    def stop(self) -> None:
        self._stop_event.set()


def _line_time(line: str, fallback: float) -> float:
    m = _LOG_TS.match(line)
    if m is None:
        return fallback
    stamp = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")  # noqa: DTZ007 - local time
    when = stamp.timestamp()
    # A clock-skewed or stale line must not move the start later than we saw it.
    return when if abs(when - fallback) < 5 else fallback


class RssSampler(threading.Thread):
    """Peak resident set size of a process and its children, and the CPU time they and the
    broker (``broker_pid``) have used, sampled every 100 ms."""

    def __init__(self, pid: int, interval: float = 0.1, broker_pid: int | None = None) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.broker_pid = broker_pid
        self.peak = 0
        self.samples = 0
        # (time.time(), CPU seconds of the worker processes, of the broker)
        self.cpu: list[tuple[float, float, float]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        import psutil  # type: ignore[import-untyped]

        try:
            proc = psutil.Process(self.pid)
        except psutil.Error:
            return
        broker = None
        if self.broker_pid is not None:
            with contextlib.suppress(psutil.Error):
                broker = psutil.Process(self.broker_pid)
        used: dict[int, float] = {}  # per process, so one that exits keeps its share
        while not self._stop_event.is_set():
            try:
                total = proc.memory_info().rss
                for p in [proc, *proc.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        t = p.cpu_times()
                        used[p.pid] = t.user + t.system
                        if p is not proc:
                            total += p.memory_info().rss
            except psutil.Error:
                return
            broker_cpu = 0.0
            if broker is not None:
                with contextlib.suppress(psutil.Error):
                    t = broker.cpu_times()
                    broker_cpu = t.user + t.system
            self.cpu.append((time.time(), sum(used.values()), broker_cpu))
            self.peak = max(self.peak, total)
            self.samples += 1
            self._stop_event.wait(self.interval)

    def cores(self, t0: float, t1: float) -> tuple[float | None, float | None]:
        """Cores' worth of CPU the workers and the broker used between ``t0`` and ``t1``."""
        inside = [c for c in self.cpu if t0 <= c[0] <= t1]
        if len(inside) < 2 or inside[-1][0] - inside[0][0] < 0.2:
            return None, None
        (a, w0, b0), (z, w1, b1) = inside[0], inside[-1]
        broker = (b1 - b0) / (z - a) if self.broker_pid is not None else None
        return round((w1 - w0) / (z - a), 2), None if broker is None else round(broker, 2)

    def stop(self) -> int:
        self._stop_event.set()
        self.join(timeout=2)
        return self.peak


class CpuAccount:
    """CPU time used on this machine by processes other than the benchmark's own.

    The benchmark, its workers (once reaped) and a broker it started are "own"; anything else
    (another test run, a build) is background load that slows every figure down. Measured as
    the machine's busy CPU time minus our processes' CPU time, per phase.
    """

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._me = psutil.Process()
        self._extra: list[Any] = []
        self.listener_pid: int | None = None
        self._last = self._sample()

    def include_listener(self, bootstrap: str) -> None:
        """Count the process listening on ``bootstrap``'s port (a ``--broker``) as our own."""
        port = int(bootstrap.split(",")[0].rsplit(":", 1)[1])
        with contextlib.suppress(Exception):
            for conn in self._psutil.net_connections(kind="tcp"):
                if conn.status == "LISTEN" and conn.laddr and conn.laddr.port == port and conn.pid:
                    self._extra.append(self._psutil.Process(conn.pid))
                    self.listener_pid = conn.pid
                    break
        self._last = self._sample()

    def _own(self) -> float:
        t = self._me.cpu_times()
        own = t.user + t.system + t.children_user + t.children_system
        for other in [*self._me.children(recursive=True), *self._extra]:
            with contextlib.suppress(self._psutil.Error):
                c = other.cpu_times()
                own += c.user + c.system
        return float(own)

    def _sample(self) -> tuple[float, float, float]:
        t = self._psutil.cpu_times()
        busy = t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)
        return time.monotonic(), float(busy), self._own()

    def lap(self) -> float | None:
        """Cores' worth of background CPU since the last lap (None for laps under 1 s)."""
        now = self._sample()
        (t0, busy0, own0), (t1, busy1, own1) = self._last, now
        self._last = now
        if t1 - t0 < 1.0:
            return None
        return round(max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0)), 2)


def machine_info(broker: LocalBroker | None, bootstrap: str) -> dict[str, Any]:
    """Cores, CPU model, Python and Kafka versions."""
    import psutil

    model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "cpu": model,
        "memory_bytes": psutil.virtual_memory().total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "kafka_version": broker.version if broker is not None else None,
        "broker": f"local Apache Kafka {KAFKA_VERSION}" if broker is not None else "external",
        "bootstrap": bootstrap,
    }


def code_info() -> dict[str, Any]:
    """The commit measured, and the worker's files that differ from it (a dirty tree)."""

    def git(*args: str) -> str:
        try:
            out = subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return out.stdout.rstrip() if out.returncode == 0 else ""

    status = git("status", "--porcelain", "--", "pipeline", "streams", "sinks")
    return {
        "commit": git("rev-parse", "--short", "HEAD") or None,
        "changed": [line[3:] for line in status.splitlines()],
    }


# --------------------------------------------------------------------------------------
# 1. publish
# --------------------------------------------------------------------------------------


def encoded_events(
    n: int, seed: int, rate: float, start: datetime | None = None
) -> list[tuple[bytes, bytes]]:
    """``n`` generated events as ``(key, JSON)`` pairs, keyed by task like the publisher,
    from ``start`` (the generator's default start if None)."""
    config = TrafficConfig(events=n, seed=seed, rate_per_s=rate)
    if start is not None:
        config = replace(config, start=start)
    return [(event_key(ev), schema.encode(ev)) for ev in generate(config)]


async def publish(settings: Settings, records: Sequence[tuple[bytes, bytes]]) -> float:
    """Publish ``records`` with ``Publisher.publish_raw``; seconds the publish calls took."""
    async with Publisher(settings) as pub:
        started = time.perf_counter()
        for i in range(0, len(records), PUBLISH_CHUNK):
            await pub.publish_raw(records[i : i + PUBLISH_CHUNK])
        return time.perf_counter() - started


# --------------------------------------------------------------------------------------
# 2. ceiling
# --------------------------------------------------------------------------------------


async def ceiling(settings: Settings, total: int, timeout: float = 120) -> float:
    """Seconds a bare consumer-group consumer takes to fetch and commit ``total`` records."""
    consumer = AIOKafkaConsumer(
        settings.events_topic,
        bootstrap_servers=settings.broker,
        group_id=f"{settings.group_id}-ceiling",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=8 << 20,
        fetch_max_bytes=64 << 20,
    )
    await consumer.start()
    try:
        started = time.perf_counter()
        deadline = time.monotonic() + timeout
        seen = 0
        while seen < total:
            if time.monotonic() > deadline:
                raise BenchError(f"ceiling consumer read only {seen} of {total} in {timeout} s")
            fetched = await consumer.getmany(timeout_ms=200, max_records=CEILING_MAX_RECORDS)
            if fetched:
                seen += sum(len(batch) for batch in fetched.values())
                await consumer.commit()
        return time.perf_counter() - started
    finally:
        await consumer.stop()


# --------------------------------------------------------------------------------------
# 3. naive faust
# --------------------------------------------------------------------------------------


def naive(
    settings: Settings, workdir: Path, cap: int, seconds: float, startup_timeout: float = 90
) -> dict[str, Any]:
    """Run the naive faust agent until it has counted ``cap`` events or ``seconds``."""
    result = workdir / "naive-result.json"
    log = workdir / "naive-faust.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "BENCH_BROKER": settings.broker,
        "BENCH_TOPIC": settings.events_topic,
        "BENCH_APP_ID": f"{settings.group_id}-naive",
        "BENCH_DATA_DIR": str(workdir / "naive-faust-data"),
        "BENCH_CAP": str(cap),
        "BENCH_SECONDS": str(seconds),
        "BENCH_RESULT": str(result),
    }
    with log.open("ab") as fh:
        proc = subprocess.Popen(
            [sys.executable, str(NAIVE_SCRIPT)],
            env=env,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + startup_timeout + seconds
        while not result.exists():
            if proc.poll() is not None:
                raise BenchError(f"naive faust worker exited with {proc.returncode}:\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise BenchError(f"naive faust worker gave no result in time:\n{_tail(log)}")
            time.sleep(0.1)
    finally:
        _kill_group(proc, timeout=20)
    body: dict[str, Any] = json.loads(result.read_text())
    return body


# --------------------------------------------------------------------------------------
# 4. agentstream
# --------------------------------------------------------------------------------------


def worker_argv(processes: int = 1, role: str = "all") -> list[str]:
    """The command line of an ``agentstream worker`` the benchmark runs."""
    return (
        [sys.executable, "-m", "pipeline.cli", "worker", "--loglevel", "info"]
        + (["--processes", str(processes)] if processes > 1 else [])
        + (["--role", role] if role != "all" else [])
    )


def spawn_worker(
    settings: Settings, log: Path, cwd: Path, processes: int = 1, role: str = "all"
) -> subprocess.Popen[bytes]:
    """An ``agentstream worker`` process configured by ``settings`` (its own process group),
    with ``--processes`` children when more than one."""
    env = {
        **os.environ,
        **settings.to_env(),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    with log.open("ab") as fh:
        return subprocess.Popen(
            worker_argv(processes, role),
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


class CommitWatcher:
    """The sum of a group's committed offsets on a topic, through one long-lived admin client."""

    def __init__(self, settings: Settings, group: str | None = None) -> None:
        self.settings = settings
        self.group = group or settings.group_id
        self.tps = [TopicPartition(settings.events_topic, p) for p in range(settings.partitions)]
        self._admin = AIOKafkaAdminClient(bootstrap_servers=settings.broker)

    async def __aenter__(self) -> CommitWatcher:
        await self._admin.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._admin.close()

    async def committed(self) -> int:
        return sum((await self.by_partition()).values())

    async def by_partition(self) -> dict[int, int]:
        """Each partition's committed offset (0 for none yet)."""
        try:
            offsets = await self._admin.list_consumer_group_offsets(self.group, partitions=self.tps)
        except Exception:  # the group or the offsets topic does not exist yet
            return {}
        return {
            tp.partition: max(meta.offset, 0) if meta is not None else 0
            for tp, meta in offsets.items()
        }


@dataclass
class WorkerRun:
    """What one agentstream worker run measured."""

    consuming_at: float | None = None
    first_commit_at: float | None = None
    first_committed: int = 0
    done_at: float | None = None
    # When the aggregate stage had published the metrics of the backlog's last windows.
    caught_up_at: float | None = None
    peak_rss_bytes: int = 0
    # Cores' worth of CPU from "consuming" to the last commit: the workers', the broker's.
    worker_cores: float | None = None
    broker_cores: float | None = None
    health: dict[str, Any] = field(default_factory=dict)
    telemetry: dict[str, float] = field(default_factory=dict)
    # Worker processes that logged they were consuming (a run's ``--processes`` check).
    processes: int = 0


async def _wait_committed(
    settings: Settings,
    total: int,
    proc: subprocess.Popen[bytes],
    watcher: LogWatcher,
    run: WorkerRun,
    log: Path,
    timeout: float,
    on_consuming: Callable[[], None] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    async with CommitWatcher(settings) as commits:
        while True:
            if proc.poll() is not None:
                raise BenchError(f"agentstream worker exited with {proc.returncode}:\n{_tail(log)}")
            if time.monotonic() > deadline:
                where = await commits.by_partition()
                raise BenchError(
                    f"agentstream worker did not commit {total} events in {timeout} s "
                    f"(committed per partition: {dict(sorted(where.items()))}); the log's "
                    f"end:\n{_tail(log, 60)}"
                )
            if run.consuming_at is None and watcher.seen_at is not None:
                run.consuming_at = watcher.seen_at
                if on_consuming is not None:
                    on_consuming()
            done = await commits.committed()
            now = time.time()
            if done > 0 and run.first_commit_at is None:
                run.first_commit_at, run.first_committed = now, done
            if done >= total:
                run.done_at = now
                return
            await asyncio.sleep(0.05)


async def _metrics_ends(settings: Settings) -> dict[TopicPartition, int]:
    """The end offset of every partition of the metrics topic (what earlier runs left)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.broker, enable_auto_commit=False)
    await consumer.start()
    try:
        # The bench makes the topic with the events' partition count (``_topics``).
        tps = [TopicPartition(settings.metrics_topic, p) for p in range(settings.partitions)]
        return dict(await consumer.end_offsets(tps))
    finally:
        await consumer.stop()


async def _wait_metrics(
    settings: Settings,
    since: dict[TopicPartition, int],
    window_end: datetime,
    proc: subprocess.Popen[bytes],
    log: Path,
    timeout: float,
) -> float:
    """Wait until a metrics record of a window ending at ``window_end`` or later is on the
    topic after ``since``; return when it was seen (``time.time()``).

    Only each partition's last record is read (the aggregate stage publishes closed windows
    in order), so the watching costs the worker next to no CPU.
    """
    deadline = time.monotonic() + timeout
    target = window_end.timestamp()
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.broker, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = list(since)
        consumer.assign(tps)
        while True:
            if proc.poll() is not None:
                raise BenchError(f"agentstream worker exited with {proc.returncode}:\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise BenchError(
                    f"the aggregate stage did not publish the window ending {window_end} "
                    f"within {timeout:g} s of the last commit; the log's end:\n{_tail(log, 40)}"
                )
            ends = await consumer.end_offsets(tps)
            for tp in tps:
                if ends[tp] <= since[tp]:
                    continue
                consumer.seek(tp, ends[tp] - 1)
                got = await consumer.getmany(tp, timeout_ms=1000, max_records=1)
                for record in got.get(tp, []):
                    end = _window_end(record.value)
                    if end is not None and end >= target:
                        return time.time()
            await asyncio.sleep(0.2)
    finally:
        await consumer.stop()


def _window_end(value: bytes | None) -> float | None:
    try:
        body = json.loads(value or b"")
        return datetime.fromisoformat(str(body["window_end"]).replace("Z", "+00:00")).timestamp()
    except (ValueError, KeyError, TypeError):
        return None


def backlog_through(
    records: Sequence[tuple[bytes, bytes]], window_s: float, lateness_s: float
) -> datetime | None:
    """The end of the last window the aggregate stage closes on the backlog ``records`` alone
    (no wall clock), less one window as partitions end a few events apart; None when the
    backlog spans too little event time to close a window (the default steady run: 100 s).

    The generator writes events in event-time order, so the first and last records are the
    oldest and the newest."""
    oldest = schema.decode(records[0][1])
    newest = schema.decode(records[-1][1])
    if isinstance(oldest, schema.Rejection) or isinstance(newest, schema.Rejection):
        return None
    end = math.floor((newest.ts.timestamp() - lateness_s) / window_s) * window_s - window_s
    first_end = math.floor(oldest.ts.timestamp() / window_s) * window_s + window_s
    return datetime.fromtimestamp(end, UTC) if end >= first_end else None


def _with_aggregate(events: int, start: float, run: WorkerRun) -> float | None:
    """Events per second until the aggregate stage had caught up too (``caught_up_at``)."""
    if run.caught_up_at is None or run.caught_up_at <= start:
        return None
    return events / (run.caught_up_at - start)


def _health(settings: Settings, processes: int = 1) -> dict[str, Any]:
    """The worker's ``/health``; of several processes (web ports from ``web_port`` up), their
    landed counts summed and the first unhealthy status or error."""
    bodies = [_health_of(settings, settings.web_port + i) for i in range(processes)]
    if len(bodies) == 1:
        return bodies[0]
    out: dict[str, Any] = {
        "status": next((b.get("status") for b in bodies if b.get("status") != "ok"), "ok"),
        "processes": bodies,
    }
    for key in ("events_landed", "dead_letters"):
        out[key] = sum(int(b.get(key) or 0) for b in bodies)
    errors = [b.get("error") or b.get("last_error") for b in bodies]
    out["last_error"] = next((e for e in errors if e), None)
    return out


def _health_of(settings: Settings, port: int) -> dict[str, Any]:
    url = f"http://{settings.web_host}:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            body: dict[str, Any] = json.loads(resp.read())
            return body
    except Exception as exc:
        if hasattr(exc, "read"):
            with contextlib.suppress(Exception):
                return dict(json.loads(exc.read()))
        return {"error": f"{type(exc).__name__}: {exc}"}


_PROM_LINE: Final = re.compile(r"^(agentstream_[a-z_]+?)(?:_total)? ([0-9.eE+-]+)$")


def _telemetry(settings: Settings, processes: int = 1) -> dict[str, float]:
    """The worker's unlabelled Prometheus samples (``/metrics``), ``_total`` suffix dropped;
    of several processes, each sample summed over them (the figures read are counters)."""
    out: dict[str, float] = {}
    for i in range(processes):
        url = f"http://{settings.web_host}:{settings.web_port + i}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                text = resp.read().decode()
        except Exception:
            continue
        for line in text.splitlines():
            m = _PROM_LINE.match(line)
            if m is not None:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def py_spy() -> str | None:
    """The py-spy executable (on PATH or beside this Python), or None."""
    beside = Path(sys.executable).with_name("py-spy")
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


class Profiler:
    """py-spy attached to a process (raw collapsed stacks), if py-spy is installed."""

    def __init__(self, pid: int, out: Path, rate: int = 100, idle: bool = False) -> None:
        exe = py_spy()
        if exe is None:
            raise BenchError("--profile needs py-spy: pip install py-spy")
        self.out = out
        self._proc = subprocess.Popen(
            [
                exe,
                "record",
                "--pid",
                str(pid),
                "--rate",
                str(rate),
                "--format",
                "raw",
                "--threads",
                # A run of several processes: the parent only waits, its children work.
                "--subprocesses",
                "--nonblocking",
                "--output",
                str(out),
                *(["--idle"] if idle else []),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def stop(self) -> Path:
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        return self.out


def agentstream(
    settings: Settings,
    workdir: Path,
    total: int,
    profile: Path | None,
    *,
    profile_idle: bool = False,
    timeout: float = 300,
    processes: int = 1,
    role: str = "all",
    broker_pid: int | None = None,
    through: datetime | None = None,
) -> WorkerRun:
    """Run one worker (``processes`` of them) from the first offset until ``total`` events
    are committed, and then, with ``through``, until the aggregate stage has published the
    metrics of the window ending there."""
    log = workdir / f"worker-{settings.group_id}.log"
    run = WorkerRun()
    since = asyncio.run(_metrics_ends(settings)) if through is not None else {}
    proc = spawn_worker(settings, log, workdir, processes, role)
    sampler = RssSampler(proc.pid, broker_pid=broker_pid)
    sampler.start()
    watcher = LogWatcher(log, CONSUMING)
    watcher.start()
    profiler: list[Profiler] = []

    def attach() -> None:
        if profile is not None:
            profiler.append(Profiler(proc.pid, profile, idle=profile_idle))

    try:
        asyncio.run(
            _wait_committed(settings, total, proc, watcher, run, log, timeout, on_consuming=attach)
        )
        if run.consuming_at is None:  # committed before the watcher's next poll
            watcher.join(timeout=1)
            run.consuming_at = watcher.seen_at
        if through is not None and since:
            run.caught_up_at = asyncio.run(
                _wait_metrics(settings, since, through, proc, log, timeout)
            )
        run.health = _health(settings, processes)
        run.telemetry = _telemetry(settings, processes)
    finally:
        for p in profiler:
            p.stop()
        watcher.stop()
        run.peak_rss_bytes = sampler.stop()
        if run.consuming_at is not None and run.done_at is not None:
            run.worker_cores, run.broker_cores = sampler.cores(run.consuming_at, run.done_at)
        _kill_group(proc)
        run.processes = consuming_processes(log)
    return run


def consuming_processes(log: Path) -> int:
    """How many processes (log lines' ``[pid]``) logged that they were consuming."""
    pids = set()
    for line in log.read_text(errors="replace").splitlines():
        if CONSUMING.search(line) and (m := _LOG_PID.search(line)) is not None:
            pids.add(m.group(1))
    return len(pids)


# --------------------------------------------------------------------------------------
# 5. end-to-end latency
# --------------------------------------------------------------------------------------


@dataclass
class _Received:
    latencies: list[float] = field(default_factory=list)
    # window_end (epoch s) -> (first, last) latency of its records
    windows: dict[float, list[float]] = field(default_factory=dict)
    without_window: int = 0


def _window_close_latency(value: bytes | None, received: float, lateness: float) -> float | None:
    end = _window_end(value)
    return None if end is None else received - (end + lateness)


async def _collect(
    settings: Settings, topic: str, into: _Received, stop: asyncio.Event, lateness: float
) -> None:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.broker,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=100,
    )
    await consumer.start()
    try:
        while not stop.is_set():
            fetched = await consumer.getmany(timeout_ms=100)
            received = time.time()
            for batch in fetched.values():
                for record in batch:
                    latency = _window_close_latency(record.value, received, lateness)
                    if latency is None:
                        into.without_window += 1
                        continue
                    into.latencies.append(latency)
                    end = round(received - lateness - latency)
                    span = into.windows.setdefault(end, [latency, latency])
                    span[0], span[1] = min(span[0], latency), max(span[1], latency)
    finally:
        await consumer.stop()


async def _steady_publish(
    settings: Settings, pool: list[Any], rate: int, seconds: float, tag: str
) -> tuple[int, float, float]:
    """Publish ``rate`` events/s for ``seconds``, ts = now; (sent, first ts, last ts)."""
    tick = 0.1
    sent = 0
    async with Publisher(settings) as pub:
        started = time.monotonic()
        first = time.time()
        last = first
        while True:
            elapsed = time.monotonic() - started
            if elapsed >= seconds:
                break
            due = min(int(rate * (elapsed + tick)), int(rate * seconds)) - sent
            if due > 0:
                now = datetime.now(UTC)
                last = now.timestamp()
                batch = []
                for i in range(sent, sent + due):
                    ev = pool[i % len(pool)]
                    ev.ts = now
                    ev.event_id = f"lat-{tag}-{i:09d}"
                    batch.append((event_key(ev), schema.encode(ev)))
                await pub.publish_raw(batch)
                sent += due
            next_tick = started + (sent / rate)
            await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
    return sent, first, last


async def _latency_run(
    settings: Settings, opts: BenchOptions, tag: str, proc: subprocess.Popen[bytes], log: Path
) -> dict[str, Any]:
    lateness = settings.allowed_lateness_s
    window = settings.window_seconds
    pool = list(
        generate(
            TrafficConfig(
                events=min(100_000, int(opts.latency_rate * opts.latency_seconds)),
                seed=opts.seed + 1,
                rate_per_s=float(opts.latency_rate),
            )
        )
    )
    metrics, anomalies = _Received(), _Received()
    stop = asyncio.Event()
    collectors = [
        asyncio.create_task(_collect(settings, settings.metrics_topic, metrics, stop, lateness)),
        asyncio.create_task(
            _collect(settings, settings.anomalies_topic, anomalies, stop, lateness)
        ),
    ]
    try:
        await asyncio.sleep(1.0)  # let the collectors get their partitions
        _say(
            f"latency: publishing {opts.latency_rate:,} events/s for {opts.latency_seconds:g} s "
            f"(window {window} s, lateness {lateness:g} s)"
        )
        sent, first, last = await _steady_publish(
            settings, pool, opts.latency_rate, opts.latency_seconds, tag
        )
        expected = {
            float(w + window) for w in range(int(first // window) * window, int(last) + 1, window)
        }
        last_close = max(expected) + lateness
        _say(f"latency: published {sent:,}; waiting for {len(expected)} windows to close")
        deadline = last_close + 20 + settings.flush_interval_s
        while time.time() < deadline:
            if proc.poll() is not None:
                raise BenchError(f"latency worker exited with {proc.returncode}:\n{_tail(log)}")
            if expected <= set(metrics.windows):
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)  # the last records of a window's flush
    finally:
        stop.set()
        await asyncio.gather(*collectors, return_exceptions=True)
    total, committed = await committed_lag(settings)
    return {
        "latency_p50_metrics_s": _percentile(metrics.latencies, 0.50),
        "latency_p99_metrics_s": _percentile(metrics.latencies, 0.99),
        "latency_max_metrics_s": max(metrics.latencies, default=None),
        "latency_p50_anomaly_s": _percentile(anomalies.latencies, 0.50),
        "latency_p99_anomaly_s": _percentile(anomalies.latencies, 0.99),
        "latency_metrics_records": len(metrics.latencies),
        "latency_anomaly_records": len(anomalies.latencies) + anomalies.without_window,
        "latency_windows": [
            {
                "window_end": datetime.fromtimestamp(end, UTC).isoformat(),
                "first_s": span[0],
                "last_s": span[1],
            }
            for end, span in sorted(metrics.windows.items())
        ],
        "latency_windows_expected": len(expected),
        "latency_published": sent,
        "latency_committed": committed,
        "latency_topic_events": total,
        "latency_window_s": window,
        "latency_lateness_s": lateness,
        "latency_rate": opts.latency_rate,
        "latency_seconds": opts.latency_seconds,
    }


def latency(
    settings: Settings, workdir: Path, opts: BenchOptions, tag: str, processes: int = 1
) -> dict[str, Any]:
    """Steady live traffic through a fresh worker (``processes`` of them); window-close
    latency of its records."""
    log = workdir / f"latency-worker-x{processes}.log"
    proc = spawn_worker(settings, log, workdir, processes)
    watcher = LogWatcher(log, CONSUMING)
    watcher.start()
    try:
        deadline = time.monotonic() + 90
        while watcher.seen_at is None:
            if proc.poll() is not None:
                raise BenchError(f"latency worker exited with {proc.returncode}:\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise BenchError("latency worker did not start consuming within 90 s")
            time.sleep(0.05)
        return asyncio.run(_latency_run(settings, opts, tag, proc, log))
    finally:
        watcher.stop()
        _kill_group(proc)


# --------------------------------------------------------------------------------------
# the whole run
# --------------------------------------------------------------------------------------


def run(opts: BenchOptions) -> dict[str, Any]:
    """Run every phase; return the result (see ``RESULT_KEYS`` and ``render``)."""
    if opts.events < 1:
        raise ValueError("events must be >= 1")
    try:
        import psutil  # noqa: F401
    except ImportError:
        raise BenchError(
            "the benchmark needs psutil (RSS and CPU sampling): pip install psutil"
        ) from None
    if opts.profile is not None and py_spy() is None:
        raise BenchError("--profile needs py-spy: pip install py-spy")
    phases: dict[str, float] = {}
    background: dict[str, float | None] = {}
    clock = time.monotonic()
    cpu = CpuAccount()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.monotonic()
        phases[name] = round(now - clock, 2)
        background[name] = cpu.lap()
        clock = now

    local: LocalBroker | None = None
    workdir = Path(tempfile.mkdtemp(prefix="agentstream-bench-"))
    try:
        if opts.broker is None:
            _say("starting a local Apache Kafka broker")
            local = LocalBroker("kafka", data_dir=workdir / "broker")
            bootstrap = local.start(timeout=120)
        else:
            bootstrap = opts.broker
            cpu.include_listener(bootstrap)
        broker_pid = local.pid if local is not None else cpu.listener_pid
        lap("broker")
        tag = uuid.uuid4().hex[:8]
        settings = _settings(bootstrap, workdir / "lake", tag)
        try:
            ensure_topics(settings.broker, _topics(settings))
        except Exception as exc:
            raise BenchError(f"cannot create the benchmark's topics on {bootstrap}: {exc}") from exc
        result: dict[str, Any] = {"events": opts.events}

        _say(f"generating and encoding {opts.events:,} events")
        records = encoded_events(opts.events, opts.seed, opts.event_rate)
        result["event_bytes_avg"] = round(sum(len(v) for _, v in records) / len(records), 1)
        through = (
            backlog_through(records, settings.window_seconds, settings.allowed_lateness_s)
            if opts.role == "all"
            else None
        )
        lap("generate")
        _say(f"publishing {opts.events:,} events to {settings.events_topic}")
        seconds = asyncio.run(publish(settings, records))
        result["publish_eps"] = opts.events / seconds
        result["publish_seconds"] = seconds
        del records
        gc.collect()
        lap("publish")

        _say("ceiling: bare aiokafka consumer group")
        seconds = asyncio.run(ceiling(settings, opts.events))
        result["ceiling_eps"] = opts.events / seconds
        result["ceiling_seconds"] = seconds
        lap("ceiling")

        cap = min(opts.naive_cap, opts.events)
        _say(f"naive: faust agent + windowed table (cap {cap:,} events / {opts.naive_seconds:g} s)")
        body = naive(settings, workdir, cap, opts.naive_seconds)
        counted, seconds = int(body["events"]), float(body["seconds"])
        result["naive_eps"] = (counted - 1) / seconds if seconds > 0 else None
        result["naive_events"] = counted
        result["naive_seconds"] = seconds
        result["naive_cap"] = {"events": cap, "seconds": opts.naive_seconds}
        lap("naive")

        first = opts.workers[0]
        _say(
            f"agentstream: {first} worker process{'es' if first > 1 else ''} (--role "
            f"{opts.role}) until {opts.events:,} events are committed"
        )
        w = agentstream(
            settings,
            workdir,
            opts.events,
            opts.profile,
            profile_idle=opts.profile_idle,
            # `--workers 2` alone ran one process and reported it as two.
            processes=first,
            role=opts.role,
            broker_pid=broker_pid,
            through=through,
        )
        result["agentstream_role"] = opts.role
        assert w.done_at is not None
        start = w.consuming_at if w.consuming_at is not None else w.first_commit_at
        assert start is not None
        result["agentstream_eps"] = opts.events / (w.done_at - start)
        result["agentstream_seconds"] = w.done_at - start
        steady = w.done_at - (w.first_commit_at or start)
        result["agentstream_eps_steady"] = (
            (opts.events - w.first_committed) / steady if steady > 0 else None
        )
        result["agentstream_first_commit_s"] = (w.first_commit_at or start) - start
        result["agentstream_eps_with_aggregate"] = _with_aggregate(opts.events, start, w)
        result["aggregate_through"] = through.isoformat() if through is not None else None
        result["peak_rss_bytes"] = w.peak_rss_bytes
        result["worker_health"] = w.health
        t = w.telemetry
        result["worker_telemetry"] = {
            "flushes": t.get("agentstream_batch_seconds_count"),
            "flush_seconds": t.get("agentstream_batch_seconds_sum"),
            "metrics_rows": t.get("agentstream_metrics_emitted"),
            "late_events": t.get("agentstream_late_events"),
            "hop_messages": t.get("agentstream_hop_messages"),
            "hop_bytes": t.get("agentstream_hop_bytes"),
            # The repartition hop's cost per event: partials per window and key, not events.
            "hop_bytes_per_event": (t.get("agentstream_hop_bytes") or 0) / opts.events,
        }
        result["worker_settings"] = {
            k: getattr(settings, k)
            for k in (
                "flush_interval_s",
                "flush_max_events",
                "fetch_max_records",
                "window",
                "allowed_lateness_s",
            )
        }
        if opts.profile is not None:
            result["profile"] = str(opts.profile)
        lap("agentstream")
        result["workers"] = {
            opts.workers[0]: {
                "eps": result["agentstream_eps"],
                "eps_steady": result["agentstream_eps_steady"],
                "eps_with_aggregate": result["agentstream_eps_with_aggregate"],
                "seconds": result["agentstream_seconds"],
                "worker_cores": w.worker_cores,
                "processes": w.processes,
                "broker_cores": w.broker_cores,
            }
        }
        for n in opts.workers[1:]:
            _say(f"agentstream: {n} worker processes until {opts.events:,} events are committed")
            mine = settings.with_(
                group_id=f"{settings.group_id}-x{n}",
                data_dir=workdir / f"lake-x{n}",
                web_port=free_port(),
            )
            w = agentstream(
                mine,
                workdir,
                opts.events,
                None,
                processes=n,
                broker_pid=broker_pid,
                through=through,
            )
            assert w.done_at is not None
            start = w.consuming_at if w.consuming_at is not None else w.first_commit_at
            assert start is not None
            steady = w.done_at - (w.first_commit_at or start)
            result["workers"][n] = {
                "eps": opts.events / (w.done_at - start),
                "eps_steady": (opts.events - w.first_committed) / steady if steady > 0 else None,
                "eps_with_aggregate": _with_aggregate(opts.events, start, w),
                "seconds": w.done_at - start,
                "worker_cores": w.worker_cores,
                "processes": w.processes,
                "broker_cores": w.broker_cores,
            }
            lap(f"agentstream x{n}")

        result.update(
            {
                "latency_p50_metrics_s": None,
                "latency_p99_metrics_s": None,
                "latency_p50_anomaly_s": None,
                "latency_p99_anomaly_s": None,
            }
        )
        if not opts.skip_latency:
            live = _settings(
                bootstrap,
                workdir / "latency-lake",
                f"{tag}-live",
                window="1m",
                allowed_lateness_s=opts.latency_lateness,
            )
            ensure_topics(live.broker, _topics(live))
            got = latency(live, workdir, opts, tag)
            result.update(got)
            if opts.workers[0] == 1:
                result["workers"][1].update(
                    {k: v for k, v in got.items() if k.startswith(("latency_p50", "latency_p99"))}
                )
            lap("latency")
            for n in opts.workers[1:]:
                _say(f"latency with {n} worker processes")
                live_n = _settings(
                    bootstrap,
                    workdir / f"latency-lake-x{n}",
                    f"{tag}-live-x{n}",
                    window="1m",
                    allowed_lateness_s=opts.latency_lateness,
                )
                ensure_topics(live_n.broker, _topics(live_n))
                got = latency(live_n, workdir, opts, f"{tag}x{n}", processes=n)
                result["workers"][n].update(
                    {k: v for k, v in got.items() if k.startswith(("latency_p50", "latency_p99"))}
                )
                lap(f"latency x{n}")

        result["agentstream_vs_ceiling"] = result["agentstream_eps"] / result["ceiling_eps"]
        result["agentstream_vs_naive"] = (
            result["agentstream_eps"] / result["naive_eps"] if result["naive_eps"] else None
        )
        result["machine"] = machine_info(local, bootstrap)
        result["code"] = code_info()
        result["phase_seconds"] = phases
        result["background_cores"] = background
        result["options"] = {
            k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()
        }
        if opts.keep:
            result["workdir"] = str(workdir)
        return result
    finally:
        if local is not None:
            local.stop()
        if not opts.keep:
            shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------


def _eps(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f} events/s"


def _secs(value: float | None) -> str:
    return "null" if value is None else f"{value:.2f} s"


def render(result: dict[str, Any]) -> str:
    """The human-readable report of a ``run`` result, ratios first."""
    m = result["machine"]
    lines = [
        f"agentstream bench: {result['events']:,} events (~{result.get('event_bytes_avg', 0):.0f} B), "
        f"{m['broker']} ({m['bootstrap']}), {m['cores']} cores, Python {m['python']}",
        f"  event time: {result['options']['event_rate']:,.0f} events/s; code: "
        f"{result['code']['commit']}"
        + (
            f" + {len(result['code']['changed'])} changed files"
            if result["code"]["changed"]
            else ""
        ),
        "",
        f"  agentstream / ceiling   {result['agentstream_vs_ceiling']:.2f}x",
    ]
    by_workers = result.get("workers") or {}
    if len(by_workers) > 1:
        first = next(iter(by_workers.values()))["eps"]
        for n, w in by_workers.items():
            p99 = w.get("latency_p99_metrics_s")
            cores = w.get("worker_cores")
            lines.append(
                f"  {n} worker process{'es' if int(n) > 1 else ''}: {_eps(w['eps'])} "
                f"(steady {_eps(w['eps_steady'])}), {w['eps'] / first:.2f}x the first"
                + (
                    f"; with the aggregate caught up {_eps(w['eps_with_aggregate'])}"
                    if w.get("eps_with_aggregate")
                    else ""
                )
                + (f"; publish-to-metrics p99 {p99:.2f} s" if p99 is not None else "")
                + (
                    f"; CPU: workers {cores:.2f} cores, broker {w.get('broker_cores') or 0:.2f}"
                    if cores is not None
                    else ""
                )
            )
    vs_naive = result.get("agentstream_vs_naive")
    lines.append(
        f"  agentstream / naive     {vs_naive:.1f}x"
        if vs_naive
        else "  agentstream / naive     n/a"
    )
    cap = result["naive_cap"]
    lines += [
        "",
        f"  publish       {_eps(result['publish_eps']):>20}   Publisher.publish_raw, pre-encoded, keyed by task",
        f"  ceiling       {_eps(result['ceiling_eps']):>20}   aiokafka group consumer, getmany + commit, no decoding",
        f"  naive faust   {_eps(result['naive_eps']):>20}   per-event agent + windowed Table; "
        f"{result['naive_events']:,} events in {result['naive_seconds']:.1f} s "
        f"(cap {cap['events']:,} events / {cap['seconds']:g} s)",
        f"  agentstream   {_eps(result['agentstream_eps']):>20}   all {result['events']:,} committed "
        f"{result['agentstream_seconds']:.1f} s after 'consuming'; "
        f"{_eps(result['agentstream_eps_steady'])} from the first commit",
        f"  peak RSS      {result['peak_rss_bytes'] / 2**20:>13,.0f} MiB   agentstream worker",
    ]
    if result.get("agentstream_eps_with_aggregate"):
        lines.insert(
            -1,
            f"  + aggregate   {_eps(result['agentstream_eps_with_aggregate']):>20}   until the "
            f"metrics of the window ending {result['aggregate_through']} were published",
        )
    health = result.get("worker_health") or {}
    if "events_landed" in health:
        lines.append(
            f"  landed        {health['events_landed']:>13,} rows  "
            f"(dead letters {health.get('dead_letters', 0):,})"
        )
    if "latency_metrics_records" in result:
        lines += [
            "",
            f"  latency after window close (window {result['latency_window_s']} s, lateness "
            f"{result['latency_lateness_s']:g} s, {result['latency_rate']:,} events/s for "
            f"{result['latency_seconds']:g} s):",
            f"    metrics     p50 {_secs(result['latency_p50_metrics_s'])}, "
            f"p99 {_secs(result['latency_p99_metrics_s'])} over "
            f"{result['latency_metrics_records']:,} records in {len(result['latency_windows'])} "
            f"of {result['latency_windows_expected']} windows",
        ]
        for w in result["latency_windows"]:
            lines.append(
                f"      window ending {w['window_end']}: {w['first_s']:.2f} .. {w['last_s']:.2f} s"
            )
        if result["latency_p99_anomaly_s"] is None:
            lines.append("    anomalies   null: no anomaly record arrived (steady traffic)")
        else:
            lines.append(
                f"    anomalies   p50 {_secs(result['latency_p50_anomaly_s'])}, "
                f"p99 {_secs(result['latency_p99_anomaly_s'])} over "
                f"{result['latency_anomaly_records']:,} records"
            )
    else:
        lines += ["", "  latency: skipped"]
    lines += [
        "",
        "  phases: " + ", ".join(f"{k} {v:.0f} s" for k, v in result["phase_seconds"].items()),
    ]
    busy = {k: v for k, v in result.get("background_cores", {}).items() if v and v >= 0.2}
    if busy:
        lines.append(
            "  warning: other processes used CPU during the run (cores): "
            + ", ".join(f"{k} {v:.1f}" for k, v in busy.items())
            + "; the figures above are low by about that share of the machine"
        )
    if "profile" in result:
        lines.append(f"  profile: {result['profile']} (py-spy raw; python -m bench.profile FILE)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> tuple[BenchOptions, bool]:
    """``(options, as_json)`` from command-line arguments."""
    d = BenchOptions()
    p = argparse.ArgumentParser(
        prog="agentstream bench",
        description="Throughput and latency of agentstream against a real Kafka broker.",
    )
    p.add_argument("--events", type=int, default=d.events, help="events to pre-load [%(default)s]")
    p.add_argument("--broker", default=None, help="use this broker instead of a local Kafka")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--event-rate",
        type=float,
        default=d.event_rate,
        help="event-time rate of the pre-loaded events, per second [%(default)s]",
    )
    p.add_argument("--naive-cap", type=int, default=d.naive_cap, help="[%(default)s] events")
    p.add_argument("--naive-seconds", type=float, default=d.naive_seconds, help="[%(default)s]")
    p.add_argument("--skip-latency", action="store_true", help="skip the live latency phase")
    p.add_argument("--latency-seconds", type=float, default=d.latency_seconds, help="[%(default)s]")
    p.add_argument(
        "--latency-rate", type=int, default=d.latency_rate, help="[%(default)s] events/s"
    )
    p.add_argument(
        "--latency-lateness", type=float, default=d.latency_lateness, help="[%(default)s] s"
    )
    p.add_argument("--profile", type=Path, default=None, help="py-spy raw profile of the worker")
    p.add_argument(
        "--profile-idle",
        action="store_true",
        help="sample idle threads too (wall-clock view; use bench.profile --thread MainThread)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, lake)")
    p.add_argument(
        "--role",
        choices=("all", "ingest"),
        default=d.role,
        help="the main run's worker role; ingest leaves the aggregate stage out (the "
        "landing's own rate) [%(default)s]",
    )
    p.add_argument(
        "--workers",
        default="1",
        help="worker process counts to run the backlog with, one after another, e.g. 1,2 "
        "[%(default)s]",
    )
    a = p.parse_args(argv)
    try:
        workers = tuple(int(n) for n in a.workers.split(","))
    except ValueError:
        workers = ()
    if not workers or min(workers) < 1 or max(workers) > 64:
        p.error(f"--workers {a.workers!r}: give counts from 1 to 64, comma-separated (e.g. 1,2)")
    if a.events < 1 or a.naive_cap < 2 or a.latency_rate < 1 or not a.event_rate > 0:
        p.error("--events, --naive-cap (>= 2), --event-rate and --latency-rate must be positive")
    opts = BenchOptions(
        events=a.events,
        broker=a.broker,
        seed=a.seed,
        event_rate=a.event_rate,
        naive_cap=a.naive_cap,
        naive_seconds=a.naive_seconds,
        skip_latency=a.skip_latency,
        latency_seconds=a.latency_seconds,
        latency_rate=a.latency_rate,
        latency_lateness=a.latency_lateness,
        profile=a.profile,
        profile_idle=a.profile_idle,
        keep=a.keep,
        workers=workers,
        role=a.role,
    )
    return opts, bool(a.json)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark from command-line arguments; print the report; exit status."""
    opts, as_json = parse_args(argv)
    # aiokafka logs retries (e.g. while the offsets topic is created) the run recovers from.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        result = run(opts)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(result, default=str))
    else:
        print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
