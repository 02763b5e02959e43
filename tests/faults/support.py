"""Machinery shared by the fault tests: worker processes, background publishing, exact audits.

Every fault test follows the same shape: publish a known set of messages (valid events with
known ``event_id`` and, where useful, invalid messages), run real ``agentstream worker``
processes against a real Apache Kafka broker, inject a fault, let the pipeline finish, then
audit the lake exactly:

* per message: every offset of the events topic appears exactly once in ``events`` or
  ``dead_letters`` (``audit_offsets``);
* per event: ``events`` holds each published ``event_id`` once, nothing else (``audit_lake``);
* metrics: level ``key`` rows add up to the landed events and equal DuckDB's recomputation
  (``check_metrics``).

Each test ends with ``report(...)``: one README-style line of figures (messages tried, faults
injected, rows lost, duplicates), printed and repeated in pytest's terminal summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import duckdb
import psutil
import pyarrow as pa
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from pipeline.config import Settings
from pipeline.kafka import committed_lag
from pipeline.publisher import Publisher
from sinks.catalog import connect
from sinks.lake import data_path
from tests.helpers import REPO, worker_env

GiB = 1 << 30
MiB = 1 << 20

# --------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------


@dataclass
class Figures:
    """The README figures of one fault test run."""

    test: str
    messages: int
    faults: int
    fault_kind: str
    lost: int
    duplicates: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        extra = "".join(f", {k}: {v}" for k, v in self.extra.items())
        return (
            f"{self.test}: messages tried {self.messages}, faults injected {self.faults} "
            f"({self.fault_kind}), rows lost: {self.lost}, duplicates: {self.duplicates}"
            f"{extra}, {self.seconds:.0f} s"
        )


FIGURES: list[Figures] = []


def report(figures: Figures) -> None:
    """Print the figures (also shown in pytest's terminal summary) and keep them."""
    FIGURES.append(figures)
    print("FIGURES " + figures.line(), flush=True)
    out = os.environ.get("AGENTSTREAM_FAULT_FIGURES")
    if out:
        with open(out, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(figures.__dict__, default=str) + "\n")


# --------------------------------------------------------------------------------------
# worker processes
# --------------------------------------------------------------------------------------


# faust's own consumer group (``<group>-app``) keeps a SIGKILLed member for faust's
# ``broker_session_timeout`` (60 s by default) and the restarted worker's events consumer only
# starts after faust's rebalance: every restart after a crash would idle ~60 s. The fault tests
# shorten faust's session through its own environment variables; the product is unchanged.
FAST_REJOIN_ENV = {"BROKER_SESSION_TIMEOUT": "8", "BROKER_HEARTBEAT_INTERVAL": "1"}


class WorkerProcess:
    """One ``agentstream worker`` process in a session of its own (so signals reach it all)."""

    def __init__(
        self,
        settings: Settings,
        log: Path,
        name: str = "worker",
        env: dict[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.log = log
        self.name = name
        self.env = FAST_REJOIN_ENV if env is None else env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with open(self.log, "ab") as fh:
            fh.write(f"\n=== test: starting {self.name} at {time.time():.3f}\n".encode())
            fh.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", "worker", "--loglevel", "info"],
                env={**worker_env(self.settings), **self.env},
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(
                f"{self.name} exited with {self.proc.returncode}; end of {self.log}:\n"
                + self.log_tail()
            )

    def kill(self) -> None:
        """SIGKILL: no flush, no commit, no goodbye."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM and wait for a clean stop; SIGKILL and fail if it does not come."""
        assert self.proc is not None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(
                    f"{self.name} did not stop on SIGTERM; log {self.log}"
                ) from None
        return self.proc.returncode

    def rss(self) -> int:
        """Resident memory of the worker and its children, in bytes (0 if gone)."""
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
            return sum(p.memory_info().rss for p in procs)
        except psutil.Error:
            return 0

    def health(self, timeout: float = 3) -> tuple[int, dict[str, Any]] | None:
        """``(HTTP status, JSON body)`` of ``/health``, or None while it does not answer."""
        url = f"http://127.0.0.1:{self.settings.web_port}/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            try:
                return err.code, json.loads(err.read())
            except ValueError:
                return err.code, {}
        except (OSError, ValueError):
            return None

    def prometheus(self, timeout: float = 3) -> dict[str, float]:
        """The worker's ``/metrics`` samples without labels (name -> value); {} if silent."""
        url = f"http://127.0.0.1:{self.settings.web_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                text = resp.read().decode()
        except (OSError, ValueError):
            return {}
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, _, value = line.partition(" ")
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
        return out

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


@contextlib.contextmanager
def worker_pool(settings: Settings, logdir: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """A factory of worker processes; whatever is still running at the end is killed."""
    made: list[WorkerProcess] = []

    def make(name: str = "worker", **changes: Any) -> WorkerProcess:
        s = settings.with_(**changes) if changes else settings
        w = WorkerProcess(s, logdir / f"{name}.log", name)
        made.append(w)
        return w

    try:
        yield make
    finally:
        for w in made:
            if w.alive():
                w.kill()


def wait_until(
    what: str,
    cond: Callable[[], bool],
    timeout: float,
    every: float = 0.3,
    alive: Sequence[WorkerProcess] = (),
) -> float:
    """Poll ``cond`` until true; fail naming ``what`` after ``timeout`` s. Returns the wait."""
    start = time.monotonic()
    while True:
        for w in alive:
            w.check_alive()
        if cond():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            tails = "".join(f"\n--- {w.name}:\n{w.log_tail(15)}" for w in alive)
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{tails}")
        time.sleep(every)


def wait_all_committed(
    settings: Settings, total: int, worker: WorkerProcess, timeout: float = 120
) -> None:
    """Wait until the group has committed ``total`` messages of the events topic."""
    wait_until(
        "everything committed",
        lambda: committed(settings) >= total,
        timeout=timeout,
        alive=[worker],
    )


def wait_health(worker: WorkerProcess, status: int, timeout: float = 30) -> None:
    """Wait until ``/health`` answers with HTTP ``status`` (200 ok, 503 degraded)."""
    wait_until(
        f"/health answering {status}",
        lambda: (h := worker.health()) is not None and h[0] == status,
        timeout=timeout,
        every=0.1,
        alive=[worker],
    )


def committed(settings: Settings) -> int:
    """Messages of the events topic the group has committed (0 while unreachable)."""
    try:
        return asyncio.run(committed_lag(settings))[1]
    except Exception:
        return -1


def committed_by_partition(settings: Settings) -> dict[int, int]:
    """The group's committed offset per partition of the events topic."""

    async def go() -> dict[int, int]:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=settings.broker)
        await admin.start()
        try:
            tps = [TopicPartition(settings.events_topic, p) for p in range(settings.partitions)]
            got = await admin.list_consumer_group_offsets(settings.group_id, partitions=tps)
            return {tp.partition: meta.offset for tp, meta in got.items() if meta.offset >= 0}
        finally:
            await admin.close()

    return asyncio.run(go())


def end_offsets(settings: Settings, topic: str | None = None) -> dict[int, int]:
    """Next offset of every partition of ``topic`` (the events topic by default)."""

    async def go() -> dict[int, int]:
        cons = AIOKafkaConsumer(bootstrap_servers=settings.broker, enable_auto_commit=False)
        await cons.start()
        try:
            name = topic or settings.events_topic
            parts = cons.partitions_for_topic(name) or set()
            if not parts:
                await cons._client.force_metadata_update()
                parts = cons.partitions_for_topic(name) or set()
            tps = [TopicPartition(name, p) for p in sorted(parts)]
            ends = await cons.end_offsets(tps)
            return {tp.partition: off for tp, off in ends.items()}
        finally:
            await cons.stop()

    return asyncio.run(go())


def read_topic(settings: Settings, topic: str, timeout: float = 60) -> list[Any]:
    """Every record of ``topic`` from the beginning up to its current end (no group)."""
    ends = end_offsets(settings, topic)

    async def go() -> list[Any]:
        cons = AIOKafkaConsumer(bootstrap_servers=settings.broker, enable_auto_commit=False)
        await cons.start()
        tps = [TopicPartition(topic, p) for p, end in ends.items() if end > 0]
        out: list[Any] = []
        try:
            if not tps:
                return out
            cons.assign(tps)
            await cons.seek_to_beginning(*tps)
            deadline = time.monotonic() + timeout
            while [tp for tp in tps if await cons.position(tp) < ends[tp.partition]]:
                if time.monotonic() > deadline:
                    raise AssertionError(f"could not read {topic} to its end in {timeout} s")
                got = await cons.getmany(timeout_ms=500)
                for recs in got.values():
                    out.extend(recs)
        finally:
            await cons.stop()
        return out

    return asyncio.run(go())


# --------------------------------------------------------------------------------------
# publishing
# --------------------------------------------------------------------------------------


def produce_to_partitions(
    settings: Settings, values: dict[int, bytes] | Sequence[tuple[int, bytes]]
) -> None:
    """Send values to chosen partitions of the events topic (``{partition: value}`` or pairs)."""
    pairs = list(values.items()) if isinstance(values, dict) else list(values)

    async def go() -> None:
        prod = AIOKafkaProducer(bootstrap_servers=settings.broker, acks="all")
        await prod.start()
        try:
            futs = [
                await prod.send(settings.events_topic, value=v, key=b"p%d" % p, partition=p)
                for p, v in pairs
            ]
            await asyncio.gather(*futs)
        finally:
            await prod.stop()

    asyncio.run(go())


def publish(settings: Settings, records: Sequence[tuple[bytes, bytes]], chunk: int = 5000) -> None:
    """Send ``(key, value)`` pairs as fast as the publisher's per-partition batching goes."""

    async def go() -> None:
        async with Publisher(settings, linger_ms=20) as pub:
            for i in range(0, len(records), chunk):
                await pub.publish_raw(records[i : i + chunk])

    asyncio.run(go())


class Feeder(threading.Thread):
    """Publishes ``records`` in the background at about ``rate`` messages/s.

    A chunk that fails or is not acknowledged within ``chunk_timeout`` seconds (the broker is
    away) is sent again, whole, with a fresh publisher: an agent runtime with an at-least-once
    client does just that, and as the abandoned publisher still delivers what it had buffered
    when it is stopped, the topic may hold a chunk's messages twice. ``retries`` counts such
    chunks.
    """

    def __init__(
        self,
        settings: Settings,
        records: Sequence[tuple[bytes, bytes]],
        rate: float,
        chunk: int = 250,
        chunk_timeout: float = 60,
    ) -> None:
        super().__init__(daemon=True, name="feeder")
        self.chunk_timeout = chunk_timeout
        self.settings = settings
        self.records = records
        self.rate = rate
        self.chunk = chunk
        self.sent = 0
        self.retries = 0
        self.errors: list[str] = []
        self.failed: BaseException | None = None
        self.stop_at = time.monotonic() + 3600
        self._running = threading.Event()
        self._running.set()

    def pause(self) -> None:
        """Stop after the chunk in flight; ``sent`` then stays put until ``resume``."""
        self._running.clear()
        time.sleep(0.5)

    def resume(self) -> None:
        self._running.set()

    def run(self) -> None:
        try:
            asyncio.run(self._go())
        except BaseException as exc:
            self.failed = exc

    async def _go(self) -> None:
        pub: Publisher | None = None
        started = time.monotonic()
        i = 0
        while i < len(self.records):
            if not self._running.is_set():
                paused = time.monotonic()
                while not self._running.is_set():
                    await asyncio.sleep(0.05)
                started += time.monotonic() - paused
            if time.monotonic() > self.stop_at:
                raise TimeoutError(f"feeder gave up after {self.sent} messages: {self.errors}")
            part = self.records[i : i + self.chunk]
            try:
                if pub is None:
                    pub = Publisher(self.settings, linger_ms=5)
                    await asyncio.wait_for(pub.start(), 60)
                await asyncio.wait_for(pub.publish_raw(part), self.chunk_timeout)
            except Exception as exc:
                self.retries += 1
                self.errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                if pub is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(pub.stop(), 10)
                pub = None
                await asyncio.sleep(1.0)
                continue
            i += len(part)
            self.sent = i
            ahead = started + i / self.rate - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)
        if pub is not None:
            await pub.stop()

    def finish(self, timeout: float) -> None:
        self.join(timeout)
        if self.is_alive():
            self.stop_at = 0
            self.join(30)
            raise AssertionError(f"feeder not done after {timeout} s ({self.sent} sent)")
        if self.failed is not None:
            raise AssertionError(f"feeder failed: {self.failed!r}")


# --------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------


class RssSampler(threading.Thread):
    """Samples the resident memory of worker processes every ``every`` seconds."""

    def __init__(self, workers: Callable[[], Sequence[WorkerProcess]], every: float = 0.2):
        super().__init__(daemon=True, name="rss")
        self.workers = workers
        self.every = every
        self.samples: list[tuple[float, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            total = sum(w.rss() for w in self.workers() if w.alive())
            if total:
                self.samples.append((time.monotonic(), total))
            self._halt.wait(self.every)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)

    def peak(self, since: float = 0.0) -> int:
        return max((r for t, r in self.samples if t >= since), default=0)


# --------------------------------------------------------------------------------------
# audits
# --------------------------------------------------------------------------------------


@dataclass
class LakeAudit:
    """What the lake holds, compared with what was published."""

    event_rows: int
    distinct_ids: int
    lost: int  # published event ids missing from events (and not a duplicate dead letter)
    unexpected: int  # event ids in events that were never published
    duplicate_rows: int  # event rows beyond the first of their event_id
    dead_rows: int
    dead_distinct: int  # distinct (partition, offset) among dead letters
    metric_rows: int
    metric_duplicates: int

    def summary(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.__dict__.items())


def audit_lake(data_dir: Path, expected_ids: Collection[str]) -> LakeAudit:
    """Compare ``events`` with the published ``expected_ids`` and count duplicates."""
    con = connect(data_dir)
    con.register("published", pa.table({"event_id": pa.array(sorted(set(expected_ids)))}))

    def one(sql: str) -> int:
        row = con.execute(sql).fetchone()
        assert row is not None
        return int(row[0] or 0)

    return LakeAudit(
        event_rows=one("SELECT count(*) FROM events"),
        distinct_ids=one("SELECT count(DISTINCT event_id) FROM events"),
        lost=one("SELECT count(*) FROM published ANTI JOIN events USING (event_id)"),
        unexpected=one(
            "SELECT count(DISTINCT event_id) FROM events ANTI JOIN published USING (event_id)"
        ),
        duplicate_rows=one("SELECT count(*) - count(DISTINCT event_id) FROM events"),
        dead_rows=one("SELECT count(*) FROM dead_letters"),
        dead_distinct=one('SELECT count(DISTINCT ("partition", "offset")) FROM dead_letters'),
        metric_rows=one("SELECT count(*) FROM metrics"),
        metric_duplicates=one("SELECT count(*) - count(DISTINCT metric_id) FROM metrics"),
    )


@dataclass
class OffsetAudit:
    """Every message of the events topic and where it ended."""

    messages: int  # offsets in the topic
    in_events: int
    in_dead: int
    missing: int  # offsets in neither table
    twice: int  # offsets found more than once (in one table or across both)

    def summary(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.__dict__.items())


def audit_offsets(settings: Settings) -> OffsetAudit:
    """Each offset of the events topic exactly once in ``events`` or ``dead_letters``?"""
    ends = end_offsets(settings)
    con = connect(settings.data_dir)
    parts = [p for p, end in ends.items() for _ in range(end)]
    offs = [o for _, end in ends.items() for o in range(end)]
    con.register("topic", pa.table({"p": pa.array(parts, pa.int64()), "o": pa.array(offs)}))
    con.execute(
        "CREATE TEMP TABLE seen AS "
        "SELECT kafka_partition::BIGINT AS p, kafka_offset::BIGINT AS o, 'e' AS t FROM events "
        'UNION ALL SELECT "partition"::BIGINT, "offset"::BIGINT, \'d\' FROM dead_letters '
        f"WHERE topic = '{settings.events_topic}'"
    )
    row = con.execute(
        "SELECT (SELECT count(*) FROM topic), "
        "(SELECT count(*) FROM seen WHERE t = 'e'), (SELECT count(*) FROM seen WHERE t = 'd'), "
        "(SELECT count(*) FROM topic ANTI JOIN seen USING (p, o)), "
        "(SELECT count(*) - count(DISTINCT (p, o)) FROM seen)"
    ).fetchone()
    assert row is not None
    return OffsetAudit(*map(int, row))


def table_folder(data_dir: Path, table: str) -> Path:
    """Where the lake writes the data files of ``table`` (created if nothing landed yet, so a
    fault can replace it)."""
    folder = data_path(data_dir) / "main" / table
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def landed_files(data_dir: Path, table: str = "events") -> set[str]:
    """Data files of ``table`` on disk, committed or not (cheap enough to poll every few
    milliseconds): a new one appears while a flush writes, before its commit."""
    found: set[str] = set()
    for folder, _, names in os.walk(data_path(data_dir) / "main" / table):
        found.update(f"{folder}/{n}" for n in names if n.endswith(".parquet"))
    return found


def orphaned_files(data_dir: Path, table: str = "events") -> int:
    """Files of ``table`` on disk that no snapshot of the lake references: written by a flush
    that was killed before its commit (and so never seen by a reader)."""
    con = connect(data_dir)
    known = {
        str(Path(r[0]))
        for r in con.execute(
            f"SELECT data_file FROM ducklake_list_files('lake', '{table}')"
        ).fetchall()
    }
    return len({f for f in landed_files(data_dir, table)} - known)


def lake_sql(data_dir: Path, sql: str) -> list[tuple[Any, ...]]:
    return connect(data_dir).sql(sql).fetchall()


def metrics_identity(data_dir: Path, cutoff_us: int) -> tuple[int, int, int]:
    """(sum of events, sum of late_events) of level 'key' rows of windows before ``cutoff_us``,
    and the landed events with ``ts`` before it: the first two must add up to the third."""
    con = connect(data_dir)
    row = con.execute(
        "SELECT coalesce(sum(events), 0), coalesce(sum(late_events), 0) FROM metrics "
        f"WHERE level = 'key' AND epoch_us(window_start) < {cutoff_us}"
    ).fetchone()
    n = con.execute(f"SELECT count(*) FROM events WHERE epoch_us(ts) < {cutoff_us}").fetchone()
    assert row is not None and n is not None
    return int(row[0]), int(row[1]), int(n[0])


def misjudged_lateness(data_dir: Path, window_s: int, lateness_s: float) -> tuple[int, int, int]:
    """(events landed ``late``, on-time events marked late, late events not marked), judged
    independently of the worker: an event is late when its window ended at least
    ``lateness_s`` before the newest event time its partition held up to it, in offset order
    (``streams.lateness``; control records are never late). A worker taking a partition over
    must go on from where its previous owner left it, so both counts are 0 after a kill too."""
    row = lake_sql(
        data_dir,
        f"""
        WITH judged AS (
            SELECT late, type <> 'release'
                AND (epoch_us(ts) // {window_s * 1_000_000} + 1) * {window_s * 1_000_000}
                    <= epoch_us(max(ts) OVER (PARTITION BY kafka_partition ORDER BY kafka_offset
                        ROWS UNBOUNDED PRECEDING)) - {int(lateness_s * 1_000_000)} AS due
            FROM events)
        SELECT count(*) FILTER (late), count(*) FILTER (late AND NOT due),
            count(*) FILTER (due AND NOT late)
        FROM judged
        """,
    )[0]
    return int(row[0]), int(row[1]), int(row[2])


def landed_tables(data_dir: Path) -> tuple[pa.Table, pa.Table]:
    """``events`` (with ``late``) and ``metrics`` as Arrow, for ``assert_metrics_match_events``."""
    con = connect(data_dir)
    ev = con.sql("SELECT * EXCLUDE (date) FROM events").to_arrow_table()
    got = con.sql("SELECT * EXCLUDE (date) FROM metrics").to_arrow_table()
    return ev, got


def aggregate_owner(
    workers: list[WorkerProcess], topic: str, partition: int
) -> WorkerProcess | None:
    """The worker whose latest assignment of the repartition topic holds ``partition``."""
    for w in workers:
        said = [line for line in w.log_text().splitlines() if "aggregating partitions" in line]
        if said and f" of {topic}" in said[-1]:
            held = said[-1].split("aggregating partitions ")[1].split(" of ")[0]
            if str(partition) in held.split(","):
                return w
    return None


def sentinels_ahead(events: Sequence[Any], partitions: int, seconds: float) -> dict[int, Any]:
    """An on-time event for each partition, ``seconds`` after the newest of ``events`` (ids
    ``sentinel-<partition>``): sent to every partition, they move event time on so that
    every earlier window closes."""
    import msgspec

    newest = max(ev.ts for ev in events)
    return {
        p: msgspec.structs.replace(
            events[p], event_id=f"sentinel-{p}", ts=newest + timedelta(seconds=seconds)
        )
        for p in range(partitions)
    }


def wait_window_emitted(
    settings: Settings, window_start: Any, timeout: float, alive: Sequence[WorkerProcess]
) -> None:
    """Wait until every aggregate shard has closed the window starting at ``window_start``.

    Its metrics rows landed says one shard has; the shards close a window on the same clocks
    (every hop message carries them to every partition), so once each repartition partition
    has landed up to where the topic ended at that moment, every shard has had the clocks
    that closed it. Stopping the workers at the first rows would leave other shards' rows
    of the window unlanded (seen with four shards: a shard restored after a kill lagged).
    """

    def emitted() -> bool:
        try:
            rows = (
                connect(settings.data_dir)
                .execute("SELECT count(*) FROM metrics WHERE window_start = $1", [window_start])
                .fetchall()
            )
        except duckdb.Error:
            return False
        return rows != [(0,)]

    wait_until(f"metrics of window {window_start}", emitted, timeout, alive=alive)
    ends = end_offsets(settings, settings.repartition_topic)

    def every_shard_past() -> bool:
        try:
            rows = (
                connect(settings.data_dir)
                .execute(
                    "SELECT partition, max(next_offset) FROM lake.kafka_offsets "
                    "WHERE topic = $1 GROUP BY 1",
                    [settings.repartition_topic],
                )
                .fetchall()
            )
        except duckdb.Error:
            return False
        landed = {int(p): int(n) for p, n in rows}
        return all(landed.get(p, 0) >= end for p, end in ends.items() if end > 0)

    wait_until(f"every shard past window {window_start}", every_shard_past, timeout, alive=alive)
