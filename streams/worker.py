"""The events consumer: fetch in batches, land, publish dead letters, then commit.

Faust's per-event stream iterator costs about 120 us an event (see the README's speed
section), so the high-volume events topic is read by this service with aiokafka ``getmany``
inside the faust worker. Faust keeps what it is good at: the worker life cycle, the web
endpoint, and agents for the low-volume derived topics.

Fetching and validating go on while the previous flush runs (in a thread: polars, pyarrow and
the file system release the GIL), one flush at a time. Order of a flush, which is what makes
landing exactly-once: (1) repeated event ids dropped, windows updated, due windows closed
and judged by the detectors, (2) Parquet files durable (events, dead letters, metrics,
anomalies), (3) dead letters, metrics and anomalies acknowledged by the broker, (4) state
snapshot saved, (5) offsets committed. A crash anywhere before (5) replays the same offsets; the files from the first
attempt are removed on reassignment (``ParquetLake.discard_uncommitted``), metrics files are
named by window so they are rewritten, and the window state is restored from the snapshot
saved with the committed offsets (``streams.state``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from mode import Service

from pipeline.config import Settings
from pipeline.kafka import client_kwargs, start_producer
from pipeline.schema import Rejection
from sinks.catalog import ANOMALIES, DEAD_LETTERS, EVENTS, METRICS, connect, prepare
from sinks.parquet import ParquetLake
from sinks.tables import DEAD_LETTERS_SCHEMA, EVENTS_SCHEMA
from streams.dedupe import Deduplicator
from streams.detect import DriftDetector, anomaly_records
from streams.hotpath import BatchProcessor, Processed, Record, dead_letter_table
from streams.state import SnapshotStore
from streams.telemetry import WorkerTelemetry
from streams.windows import DIMENSIONS, WindowAggregator, metric_records

log = logging.getLogger("agentstream.worker")
EMPTY_EVENTS = EVENTS_SCHEMA.empty_table()
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
EMPTY_DEAD = DEAD_LETTERS_SCHEMA.empty_table()


class WorkerState(msgspec.Struct, frozen=True):
    """What a snapshot holds: open windows, remembered event ids, drift detectors."""

    windows: bytes
    dedupe: bytes
    detector: bytes


class _Stopwatch:
    """Seconds spent in each step of a flush, for the flush's log line."""

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self.laps: list[tuple[str, float]] = []

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps.append((name, now - self._last))
        self._last = now

    def __str__(self) -> str:
        total = sum(t for _, t in self.laps)
        return f"{total:.2f} s (" + ", ".join(f"{n} {t:.2f}" for n, t in self.laps) + ")"


class EventClock:
    """Event time that keeps moving when the stream goes quiet.

    The windows close on event time, so a replay of old data is windowed as it happened. When
    no newer event arrives, event time is assumed to advance with the wall clock from the newest
    event seen, so the last windows of a quiet stream still close (about window + lateness
    after their last event) without a live stream's windows being closed by a clock that
    disagrees with the agents'.
    """

    def __init__(self) -> None:
        self._ts: datetime | None = None
        self._wall = 0.0

    def advance(self, newest: datetime | None) -> datetime:
        """Take the event time the stream has reached into account; return the current one."""
        wall = time.monotonic()
        if newest is not None and (
            self._ts is None or newest > self._ts + timedelta(seconds=wall - self._wall)
        ):
            self._ts, self._wall = newest, wall
        if self._ts is None:
            return _EPOCH
        return self._ts + timedelta(seconds=wall - self._wall)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: EventConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        await self.owner.flush(reason="rebalance")

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        await self.owner.recover(assigned)


class EventConsumer(Service):
    """Consumes the events topic in batches and lands it; runs inside the faust worker."""

    def __init__(self, settings: Settings, telemetry: WorkerTelemetry, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.telemetry = telemetry
        self.lake: ParquetLake = prepare(settings.data_dir)
        self.processor = BatchProcessor(
            max_message_bytes=settings.max_message_bytes, redact=settings.redact_kinds
        )
        self._pending: list[Processed] = []
        self._pending_since = 0.0
        # _lock guards the pending list (short holds); _flush_lock makes flushes, and the
        # recovery of newly assigned partitions, happen one at a time.
        self._lock = asyncio.Lock()
        self._flush_lock = asyncio.Lock()
        self._flush_task: asyncio.Task[None] | None = None
        self._next_offset: dict[int, int] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self.healthy = False
        self.last_error: str | None = None
        self.landed_events = 0
        self.dead_lettered = 0
        self.metrics_emitted = 0
        self.clock = EventClock()
        self.snapshots = SnapshotStore(settings.data_dir / ".state", settings.group_id)
        self.windows = WindowAggregator(settings.window_seconds, settings.allowed_lateness_s)
        self.dedupe = Deduplicator(settings.dedupe_horizon_s)
        self.detector = DriftDetector()
        self._saved = self._state()
        self._offsets: dict[int, int] = {}
        self._partition_ts: dict[int, datetime] = {}
        self._last_flush = time.monotonic()

    async def on_start(self) -> None:
        s = self.settings
        self._producer = await start_producer(s, linger_ms=5)
        self._consumer = AIOKafkaConsumer(
            **client_kwargs(s),
            group_id=s.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=8 << 20,
            fetch_max_bytes=64 << 20,
            max_poll_interval_ms=600_000,
        )
        self._consumer.subscribe([s.events_topic], listener=_Rebalance(self))
        await self._consumer.start()
        self.healthy = True
        log.info(
            "consuming %s as group %s on %s, landing in %s",
            s.events_topic,
            s.group_id,
            s.broker,
            self.lake.root,
        )

    async def on_stop(self) -> None:
        try:
            if self._flush_task is not None:
                await self._flush_task
            await self.flush(reason="shutdown")
        finally:
            if self._consumer is not None:
                await self._consumer.stop()
            if self._producer is not None:
                await self._producer.stop()

    async def recover(self, assigned: Sequence[TopicPartition]) -> None:
        """Drop files landed for offsets that were never committed, before reading them again,
        and restore the window state saved with the committed offsets."""
        assert self._consumer is not None
        # Under the flush lock: the fetcher may already deliver records of these partitions,
        # and nothing may be landed for them before their uncommitted files are gone.
        async with self._flush_lock:
            await self._recover(assigned)

    async def _recover(self, assigned: Sequence[TopicPartition]) -> None:
        assert self._consumer is not None
        self._offsets = {}
        for tp in assigned:
            committed = await self._consumer.committed(tp)
            if committed is not None:
                self._offsets[tp.partition] = committed
            else:
                committed = (await self._consumer.beginning_offsets([tp]))[tp]
            removed = sum(
                self.lake.discard_uncommitted(t, tp.topic, tp.partition, committed)
                for t in (EVENTS, DEAD_LETTERS)
            )
            if removed:
                log.warning(
                    "partition %s: removed %d files landed after committed offset %d "
                    "(replaying them)",
                    tp.partition,
                    removed,
                    committed,
                )
        self._restore_windows()

    def _restore_windows(self) -> None:
        saved = self.snapshots.load(self._offsets)
        if saved is not None:
            self._saved = msgspec.msgpack.decode(saved, type=WorkerState)
            self._rewind()
            log.info(
                "state restored: %d open windows, %d event ids remembered, %d keys watched",
                self.windows.open_windows(),
                self.dedupe.remembered(),
                self.detector.tracked_keys(),
            )
            return
        if self._offsets:
            log.warning(
                "no window snapshot matches the committed offsets %s: windows open at the last "
                "stop start empty (their metrics will be partial)",
                self._offsets,
            )
        self.windows = WindowAggregator(
            self.settings.window_seconds, self.settings.allowed_lateness_s
        )
        self.dedupe = Deduplicator(self.settings.dedupe_horizon_s)
        self.detector = DriftDetector()
        self._saved = self._state()

    def _state(self) -> WorkerState:
        return WorkerState(
            self.windows.snapshot(), self.dedupe.snapshot(), self.detector.snapshot()
        )

    def _rewind(self) -> None:
        """Windows, ids and detectors back to the last committed state (a flush is retried)."""
        self.windows = WindowAggregator.restore(self._saved.windows)
        self.dedupe = Deduplicator.restore(self._saved.dedupe)
        self.detector = DriftDetector.restore(self._saved.detector)

    def _drop_repeats(
        self, events: pa.Table, pending: Sequence[Processed]
    ) -> tuple[pa.Table, list[tuple[Record, Rejection]]]:
        """Take events whose event_id was already landed within the horizon out of ``events``.

        Returns the rest, and the repeats as dead letters.
        """
        if events.num_rows == 0:
            return events, []
        repeats = self.dedupe.repeats(events["event_id"], events["ts"])
        if not repeats.any():
            return events, []
        at = {(r.partition, r.offset): r for p in pending for r in p.records}
        dups = events.filter(pa.array(repeats))
        horizon = self.settings.dedupe_horizon_s
        bad = [
            (
                at[(part, offset)],
                Rejection(
                    f"duplicate event_id {event_id!r}: already landed within the {horizon:g} s "
                    "de-duplication horizon",
                    "$.event_id",
                ),
            )
            for event_id, part, offset in zip(
                dups["event_id"].to_pylist(),
                dups["kafka_partition"].to_pylist(),
                dups["kafka_offset"].to_pylist(),
                strict=True,
            )
        ]
        self.telemetry.duplicates.inc(len(bad))
        return events.filter(pa.array(~repeats)), bad

    @Service.task
    async def _consume(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        s = self.settings
        while not self.should_stop:
            fetched = await consumer.getmany(timeout_ms=200, max_records=s.fetch_max_records)
            records = [r for batch in fetched.values() for r in batch]
            if records:
                processed = self.processor.process(records)
                async with self._lock:
                    if not self._pending:
                        self._pending_since = time.monotonic()
                    self._pending.append(processed)
                    for part, (_, hi) in processed.ranges.items():
                        self._next_offset[part] = hi + 1
                self.telemetry.events_in.inc(len(records))
            pending_rows = sum(p.events.num_rows + p.dead_letters.num_rows for p in self._pending)
            since = self._pending_since if self._pending else self._last_flush
            due = pending_rows >= s.flush_max_events or (
                time.monotonic() - since >= s.flush_interval_s
                and (self._pending or self.windows.open_windows() > 0)
            )
            flushing = self._flush_task is not None and not self._flush_task.done()
            if due and not flushing:
                self._flush_task = asyncio.create_task(self.flush(reason="batch"))
            elif flushing and pending_rows >= 2 * s.flush_max_events:
                # Backpressure: memory holds at most two flushes' worth of records.
                assert self._flush_task is not None
                await asyncio.shield(self._flush_task)
            self._update_lag(consumer)

    def _update_lag(self, consumer: AIOKafkaConsumer) -> None:
        lag = 0
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            if high is not None:
                lag += max(0, high - self._next_offset.get(tp.partition, high))
        self.telemetry.consumer_lag.set(lag)

    async def flush(self, *, reason: str) -> None:
        """Aggregate and land everything pending, publish, snapshot, then commit offsets."""
        async with self._flush_lock:
            async with self._lock:
                pending, self._pending = self._pending, []
            started = time.perf_counter()
            self._last_flush = time.monotonic()
            try:
                await self._flush(pending)
            except Exception as exc:
                # Nothing was committed: keep the batch, and rewind the state to the last
                # commit, so the retry counts every event exactly once.
                async with self._lock:
                    self._pending = pending + self._pending
                self._rewind()
                self.telemetry.landing_errors.inc()
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.error("flush failed, offsets not committed, will retry: %s", self.last_error)
                await asyncio.sleep(1.0)
                return
            self.last_error = None
            elapsed = time.perf_counter() - started
            self.telemetry.batch_seconds.observe(elapsed)

    async def _flush(self, pending: list[Processed]) -> None:
        assert self._consumer is not None and self._producer is not None
        s = self.settings
        events = pa.concat_tables([p.events for p in pending]) if pending else EMPTY_EVENTS
        dead = pa.concat_tables([p.dead_letters for p in pending]) if pending else EMPTY_DEAD
        ranges: dict[int, tuple[int, int]] = {}
        for p in pending:
            for part, (lo, hi) in p.ranges.items():
                old = ranges.get(part, (lo, hi))
                ranges[part] = (min(old[0], lo), max(old[1], hi))
        loop = asyncio.get_running_loop()
        behind = self._behind({**self._offsets, **{p: hi + 1 for p, (_, hi) in ranges.items()}})
        steps = _Stopwatch()
        events, repeats, metrics, anomalies = await loop.run_in_executor(
            None, self._aggregate, events, pending, behind
        )
        steps.lap("aggregate")
        if not pending and metrics.num_rows == 0:
            return
        rejected = [bad for p in pending for bad in p.rejected] + repeats
        if repeats:
            dead = pa.concat_tables([dead, dead_letter_table(repeats)])
        await loop.run_in_executor(None, self._land, events, dead, metrics, anomalies, ranges)
        steps.lap("land")
        sends = []
        if rejected:
            for record, rejection in rejected:
                headers = [
                    ("agentstream.reason", rejection.reason.encode()),
                    (
                        "agentstream.source",
                        f"{record.topic}/{record.partition}/{record.offset}".encode(),
                    ),
                ]
                sends.append(
                    await self._producer.send(
                        s.dlq_topic, value=record.value, key=record.key, headers=headers
                    )
                )
        for metric_id, value in metric_records(metrics):
            sends.append(await self._producer.send(s.metrics_topic, value=value, key=metric_id))
        for anomaly_id, value in anomaly_records(anomalies):
            sends.append(await self._producer.send(s.anomalies_topic, value=value, key=anomaly_id))
        if sends:
            await asyncio.gather(*sends)
        steps.lap("publish")
        offsets = {**self._offsets, **{part: hi + 1 for part, (_, hi) in ranges.items()}}
        state = await loop.run_in_executor(None, self._state)
        await loop.run_in_executor(
            None, self.snapshots.save, msgspec.msgpack.encode(state), offsets
        )
        steps.lap("snapshot")
        if ranges:
            await self._consumer.commit(
                {TopicPartition(s.events_topic, part): hi + 1 for part, (_, hi) in ranges.items()}
            )
        self._offsets = offsets
        self._saved = state
        self.metrics_emitted += metrics.num_rows
        self.telemetry.metrics_emitted.inc(metrics.num_rows)
        total = sum(hi - lo + 1 for lo, hi in ranges.values())
        self.landed_events += events.num_rows
        self.dead_lettered += dead.num_rows
        self.telemetry.events_landed.inc(events.num_rows)
        self.telemetry.dead_letters.inc(dead.num_rows)
        self.telemetry.batch_events.observe(total)
        steps.lap("commit")
        log.info(
            "flush: %d messages, %d events landed, %d dead letters, %d metrics rows, "
            "%d anomalies, partitions %s; %s",
            total,
            events.num_rows,
            dead.num_rows,
            metrics.num_rows,
            anomalies.num_rows,
            ",".join(f"{p}@{hi + 1}" for p, (_, hi) in sorted(ranges.items())),
            steps,
        )

    def _behind(self, flushed: dict[int, int]) -> set[int]:
        """Assigned partitions with records beyond this flush: they hold event time back.

        ``flushed`` is each partition's next offset once this flush is committed.
        """
        assert self._consumer is not None
        behind = set()
        for tp in self._consumer.assignment():
            high = self._consumer.highwater(tp)
            if high is None or flushed.get(tp.partition, 0) < high:
                behind.add(tp.partition)
        return behind

    def _event_time(self, events: pa.Table, behind: set[int]) -> datetime | None:
        """How far event time has got: the slowest partition that still has records to read.

        Partitions are read unevenly (a fetch often drains one before the next), so taking the
        newest event of any partition would make the others' events late. A partition not read
        yet holds event time where it is (None); one that is caught up does not count.
        """
        if events.num_rows:
            newest = pl.from_arrow(events.select(["kafka_partition", "ts"]))
            assert isinstance(newest, pl.DataFrame)
            for part, ts in newest.group_by("kafka_partition").agg(pl.col("ts").max()).iter_rows():
                self._partition_ts[part] = max(ts, self._partition_ts.get(part, ts))
        if any(p not in self._partition_ts for p in behind):
            return None
        reached = [ts for p, ts in self._partition_ts.items() if p in behind]
        return min(reached) if reached else max(self._partition_ts.values(), default=None)

    def _aggregate(
        self, events: pa.Table, pending: Sequence[Processed], behind: set[int]
    ) -> tuple[pa.Table, list[tuple[Record, Rejection]], pa.Table, pa.Table]:
        """Fold ``events`` into the windows and detectors.

        Returns the events to land (repeats taken out, ``late`` set), the repeats as dead
        letters, the rows of the windows that closed, and the anomalies found in them.
        """
        events, repeats = self._drop_repeats(events, pending)
        reached = self._event_time(events, behind)
        now = self.clock.advance(reached)
        if events.num_rows:
            # While a partition is unread, event time stays where it was (the epoch is below
            # any horizon, so the windows do not advance).
            late = self.windows.update(events, now=now, event_time=reached or _EPOCH)
            events = events.set_column(events.schema.get_field_index("late"), "late", late)
            self.telemetry.late_events.inc(pc.sum(late).as_py() or 0)
        metrics = self.windows.close_due(now=now)
        anomalies = self.detector.observe(metrics, detected_at=datetime.now(UTC))
        if anomalies.num_rows:
            anomalies = self._with_examples(anomalies, events)
            self.telemetry.anomalies.inc(anomalies.num_rows)
        return events, repeats, metrics, anomalies

    def _with_examples(self, anomalies: pa.Table, events: pa.Table) -> pa.Table:
        """Fill ``example_event_ids`` with a few events of each anomaly's window and key.

        Anomalies are rare, so this reads the landed events of those windows from the lake.
        """
        con = connect(self.settings.data_dir)
        con.register("current", events)
        examples = []
        for row in anomalies.select(["window_start", "window_end", *DIMENSIONS]).to_pylist():
            where = " AND ".join(f"{d} = ${d}" for d in DIMENSIONS if row[d] is not None)
            params = {d: row[d] for d in DIMENSIONS if row[d] is not None}
            sql = (
                "SELECT event_id FROM (SELECT event_id, ts, {dims} FROM events UNION ALL "
                "SELECT event_id, ts, {dims} FROM current) WHERE ts >= $start AND ts < $end "
                "AND {where} ORDER BY ts LIMIT 5"
            ).format(dims=", ".join(DIMENSIONS), where=where or "true")
            got = con.execute(
                sql, {**params, "start": row["window_start"], "end": row["window_end"]}
            )
            examples.append([r[0] for r in got.fetchall()])
        index = anomalies.schema.get_field_index("example_event_ids")
        return anomalies.set_column(
            index, "example_event_ids", pa.array(examples, pa.list_(pa.string()))
        )

    def _land(
        self,
        events: pa.Table,
        dead: pa.Table,
        metrics: pa.Table,
        anomalies: pa.Table,
        ranges: dict[int, tuple[int, int]],
    ) -> None:
        # Derived rows are named by their window: a replay rewrites the same files.
        for table, rows in ((METRICS, metrics), (ANOMALIES, anomalies)):
            for start in pc.unique(rows["window_start"]).to_pylist():
                mine = rows.filter(pc.equal(rows["window_start"], start))
                name = f"{self.settings.group_id}~{start.strftime('%Y%m%dT%H%M%S')}.parquet"
                self.lake.write_named(table, mine, name)
        topic = self.settings.events_topic
        for table, rows, column in (
            (EVENTS, events, "kafka_partition"),
            (DEAD_LETTERS, dead, "partition"),
        ):
            self.lake.land_partitions(table, rows, topic=topic, column=column, ranges=ranges)
