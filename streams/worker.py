"""The events consumer: fetch in batches, land, publish dead letters, then commit.

Faust's per-event stream iterator costs about 120 us an event (see the README's speed
section), so the high-volume events topic is read by this service with aiokafka ``getmany``
inside the faust worker. Faust keeps what it is good at: the worker life cycle, the web
endpoint, and agents for the low-volume derived topics.

Fetching and validating go on while the previous flush runs (in a thread: polars, pyarrow and
DuckDB release the GIL), one flush at a time. Order of a flush: (1) repeated event ids
dropped, windows updated, due windows closed and judged by the detectors, (2) dead letters,
metrics, anomalies and verdicts acknowledged by the broker, (3) state snapshot saved, (4) one
lake transaction: the rows of every table, the next offset of every partition covered and
the snapshot's number (``sinks.lake.LakeWriter.commit``), (5) offsets committed to Kafka too
(best effort: the lake's positions are the ones that count). A crash anywhere before (4)
lands nothing: the partitions are read again from the positions stored in the lake (seek on
assignment) and the window state is the snapshot that the lake's last commit names
(``streams.state``), so every record lands exactly once. Derived topics are at least once
(consumers de-duplicate on the records' stable ids).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from mode import Service

from pipeline.config import Settings, parse_duration
from pipeline.kafka import Headers, client_kwargs, dead_letter_copy, send_batches, start_producer
from pipeline.schema import Rejection
from sinks.catalog import (
    ANOMALIES,
    BUDGETS,
    DEAD_LETTERS,
    EVENTS,
    METRICS,
    RELEASE_VERDICTS,
    QueryError,
    connect,
    prepare,
)
from sinks.lake import Fenced, Flush, is_conflict
from sinks.maintenance import maintain
from sinks.tables import DEAD_LETTERS_SCHEMA, EVENTS_SCHEMA
from streams.budgets import BudgetTracker, load_budgets
from streams.dedupe import Deduplicator
from streams.detect import ANOMALIES_SCHEMA, DriftDetector, anomaly_records
from streams.explain import explain
from streams.hotpath import BatchProcessor, Processed, Record, dead_letter_table
from streams.releases import JudgeConfig, ReleaseJudge, verdict_records
from streams.rules import RuleEngine, load_rules
from streams.state import SnapshotStore
from streams.telemetry import WorkerTelemetry
from streams.warmstart import history_lookup, metrics_history, spend_history
from streams.windows import DIMENSIONS, WindowAggregator, metric_records

log = logging.getLogger("agentstream.worker")
EMPTY_EVENTS = EVENTS_SCHEMA.empty_table()
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
EMPTY_DEAD = DEAD_LETTERS_SCHEMA.empty_table()
BUDGET_STATUS_EVERY_S = 10.0
# A commit refused because another writer committed first is retried at once this many times
# in a row; a lock held longer than that is an outage (/health degraded).
MAX_QUICK_RETRIES = 5
_MAINTENANCE = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lake-maintenance")


class WorkerState(msgspec.Struct, frozen=True):
    """What a snapshot holds: open windows, remembered event ids, drift detectors, spend,
    releases, rule conditions.

    ``budgets``, ``releases`` and ``rules`` default to empty so an older snapshot still loads.
    """

    windows: bytes
    dedupe: bytes
    detector: bytes
    budgets: bytes = b""
    releases: bytes = b""
    rules: bytes = b""


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
        await self.owner.release(revoked)

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        await self.owner.recover(assigned)


class EventConsumer(Service):
    """Consumes the events topic in batches and lands it; runs inside the faust worker."""

    def __init__(self, settings: Settings, telemetry: WorkerTelemetry, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.telemetry = telemetry
        self.lake = prepare(settings.data_dir, settings.catalog)
        self.processor = BatchProcessor(
            max_message_bytes=settings.max_message_bytes, redact=settings.redact_kinds
        )
        self._pending: list[Processed] = []
        # A batch whose flush failed is retried alone, as it was (nothing of it was committed).
        self._retry: list[Processed] = []
        # Whether the batch to retry had its dead letters and derived records published: the
        # retry computes the same records (same ids) and need not send them again.
        self._retry_published = False
        self._paused = False
        self._inflight = 0  # records in the flush being attempted
        # Whether the window state is this worker's own, consistent with what it committed
        # (so a rebalance keeps it), rather than to be restored from a snapshot.
        self._live = False
        self._pending_since = 0.0
        # _lock guards the pending list (short holds); _flush_lock makes flushes, and the
        # recovery of newly assigned partitions, happen one at a time.
        self._lock = asyncio.Lock()
        self._flush_lock = asyncio.Lock()
        self._flush_task: asyncio.Task[None] | None = None
        self._next_offset: dict[int, int] = {}
        self._resumed = False  # whether the lake held positions of the partitions assigned
        self._seeks: dict[int, int] = {}  # seeks per partition, to tell a stale fetch
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
        self.budgets = self._budget_tracker()
        self._budgets_landed = 0.0
        self.judge = ReleaseJudge(self._judge_config())
        self.rules = self._rule_engine()
        self._saved = self._state()
        self._offsets: dict[int, int] = {}
        self._published = False
        self._conflicts = 0  # failed attempts in a row
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
            await self.flush(reason="shutdown", emit_open=not self._owns_every_partition())
        finally:
            if self._consumer is not None:
                await self._consumer.stop()
            if self._producer is not None:
                await self._producer.stop()

    def _owns_every_partition(self) -> bool:
        """Whether this worker reads the whole events topic (no other worker in its group)."""
        if self._consumer is None:
            return True
        every = self._consumer.partitions_for_topic(self.settings.events_topic) or set()
        mine = {tp.partition for tp in self._consumer.assignment()}
        return mine >= every

    async def release(self, revoked: Sequence[TopicPartition]) -> None:
        """Forget what was fetched from ``revoked`` partitions and not committed.

        Their new owner (maybe this worker again) reads them from the committed offset, so a
        batch kept here (fetched during the revocation, or from a flush that failed) would be
        landed twice.
        """
        gone = {tp.partition for tp in revoked}
        async with self._flush_lock, self._lock:
            kept = [_without(p, gone) for p in self._pending]
            retry = [_without(p, gone) for p in self._retry]
            dropped = sum(len(p.records) for p in [*self._pending, *self._retry]) - sum(
                len(p.records) for p in [*kept, *retry]
            )
            self._pending = [p for p in kept if p.records]
            self._retry = [p for p in retry if p.records]
            for part in gone:
                self._next_offset.pop(part, None)
                self._partition_ts.pop(part, None)
            if dropped:
                log.warning(
                    "partitions %s revoked: dropped %d fetched records not committed (their "
                    "new owner reads them again)",
                    sorted(gone),
                    dropped,
                )
                # The windows may have seen them in a failed flush: back to the last commit.
                self._rewind()

    async def recover(self, assigned: Sequence[TopicPartition]) -> None:
        """Resume newly assigned partitions from the positions stored in the lake, and restore
        the window state that the lake's last commit names."""
        assert self._consumer is not None
        # Under the flush lock: no flush may run between reading the positions and seeking.
        async with self._flush_lock:
            await self._recover(assigned)

    async def _recover(self, assigned: Sequence[TopicPartition]) -> None:
        assert self._consumer is not None
        log.info(
            "assigned partitions %s of %s",
            ",".join(str(tp.partition) for tp in sorted(assigned)) or "none",
            self.settings.events_topic,
        )
        loop = asyncio.get_running_loop()
        topic = self.settings.events_topic
        stored = await loop.run_in_executor(None, self.lake.positions, topic)
        self._offsets = {}
        # Partitions new to the lake start where Kafka's group stands (a topic read before),
        # else at their beginning.
        new = [tp for tp in assigned if tp.partition not in stored]
        first: dict[int, int] = {}
        if new:
            committed = await asyncio.gather(*(self._consumer.committed(tp) for tp in new))
            beginning = await self._consumer.beginning_offsets(new)
            first = {
                tp.partition: beginning[tp] if c is None else c
                for tp, c in zip(new, committed, strict=True)
            }
        for tp in assigned:
            position = stored.get(tp.partition, first.get(tp.partition, 0))
            self._offsets[tp.partition] = position
        async with self._lock:
            # Records fetched before the seek are dropped with it (no await in between), and
            # so is a fetch in flight (``_seeks``): the partitions are read from the position.
            gone = {tp.partition for tp in assigned}
            self._pending = [p for p in (_without(b, gone) for b in self._pending) if p.records]
            for tp in assigned:
                self._consumer.seek(tp, self._offsets[tp.partition])
                self._next_offset[tp.partition] = self._offsets[tp.partition]
                self._seeks[tp.partition] = self._seeks.get(tp.partition, 0) + 1
        await loop.run_in_executor(None, self.lake.claim, topic, first, self.settings.group_id)
        self._resumed = bool(stored)
        if stored:
            log.info(
                "resuming from the lake's positions %s",
                ",".join(f"{p}@{o}" for p, o in sorted(self._offsets.items())),
            )
        self._restore_windows()

    def _restore_windows(self) -> None:
        if self._live:
            # A rebalance: the state holds exactly what this worker committed (the revocation
            # flushed or rewound it), whichever partitions it reads now; nobody else counts
            # those events, so it stays.
            self._rewind()
            log.info(
                "rebalance: keeping %d open windows (state %s)",
                self.windows.open_windows(),
                self.windows.source,
            )
            return
        self._live = True
        saved = self.snapshots.load(self._offsets, self.lake.checkpoints())
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
        if self._resumed:
            log.warning(
                "no window snapshot matches the committed offsets %s: windows open at the last "
                "stop start empty (their metrics will be partial)",
                self._offsets,
            )
        self.windows = WindowAggregator(
            self.settings.window_seconds,
            self.settings.allowed_lateness_s,
            source=_lineage(self.settings.group_id, self._offsets),
        )
        self.dedupe = Deduplicator(self.settings.dedupe_horizon_s)
        self.detector = DriftDetector()
        self.budgets = self._budget_tracker()
        self.judge = ReleaseJudge(self._judge_config())
        self.rules = self._rule_engine()
        self._warm_start()
        self._saved = self._state()

    def _warm_start(self) -> None:
        """Prime detectors, rules and budgets from the lake (``streams.warmstart``): a start
        without a snapshot is then not blind for ``warmup_windows``."""
        self._prime(rules=True)
        if self.budgets.budgets and self._offsets:
            since = self.budgets.history_start(self._newest_landed())
            if since is not None:
                spend = spend_history(self.settings.data_dir, since, self._offsets)
                self.budgets.update(spend)
                log.info("warm start: %d spend minutes primed the budgets", spend.num_rows)

    def _prime(self, *, rules: bool) -> None:
        """Feed the last windows of every key in the lake to the detectors (and rules)."""
        n = self.settings.warm_start_windows
        if n <= 0:
            return
        try:
            history = metrics_history(self.settings.data_dir, n)
        except QueryError as exc:
            log.warning("warm start skipped, the lake's metrics are unreadable: %s", exc)
            return
        if history.num_rows:
            newest = history["window_end"][-1].as_py()
            # What these windows raised was published when they closed (same ids): drop it.
            self.detector.observe(history, detected_at=newest)
            if rules:
                self.rules.observe(history, detected_at=newest)
            log.info(
                "warm start: %d metrics rows from the lake up to %s primed %d keys",
                history.num_rows,
                newest.isoformat(),
                self.detector.tracked_keys(),
            )

    def _newest_landed(self) -> datetime | None:
        try:
            got = metrics_history(self.settings.data_dir, 1)
        except QueryError:
            return None
        return None if got.num_rows == 0 else pc.max(got["window_end"]).as_py()

    def _budget_tracker(self) -> BudgetTracker:
        return BudgetTracker(load_budgets(self.settings.budgets))

    def _rule_engine(self) -> RuleEngine:
        return RuleEngine(load_rules(self.settings.rules))

    def _state(self) -> WorkerState:
        return WorkerState(
            self.windows.snapshot(),
            self.dedupe.snapshot(),
            self.detector.snapshot(),
            self.budgets.snapshot(),
            self.judge.snapshot(),
            self.rules.snapshot(),
        )

    def _rewind(self) -> None:
        """Windows, ids and detectors back to the last committed state (a flush is retried)."""
        self.windows = WindowAggregator.restore(self._saved.windows)
        self.dedupe = Deduplicator.restore(self._saved.dedupe)
        try:
            self.detector = DriftDetector.restore(self._saved.detector)
        except ValueError as exc:
            # A snapshot of another version (an upgrade): fresh detectors, primed from the
            # lake, instead of a worker that cannot start.
            log.warning("detector state not restored (%s): priming new detectors", exc)
            self.detector = DriftDetector()
            self._prime(rules=False)
        self.budgets = self._budget_tracker()
        if self._saved.budgets:
            self.budgets.restore(self._saved.budgets)
        self.judge = ReleaseJudge.restore(self._saved.releases, self._judge_config())
        self.rules = self._rule_engine()
        if self._saved.rules:
            self.rules.restore(self._saved.rules)

    def _judge_config(self) -> JudgeConfig:
        # The judge keeps latency histograms per window: they must be the metrics' windows.
        return JudgeConfig(window_s=self.settings.window_seconds)

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
            seeks = dict(self._seeks)
            fetched = await consumer.getmany(timeout_ms=200, max_records=s.fetch_max_records)
            records = [r for batch in fetched.values() for r in batch]
            if records:
                processed = self.processor.process(records)
                async with self._lock:
                    # A rebalance may have taken partitions away while this fetch was being
                    # validated; their new owner reads them from the committed offset.
                    assigned = {tp.partition for tp in consumer.assignment()}
                    # Fetched before a seek to the lake's position (on assignment): the
                    # consumer reads those partitions again from the position.
                    stale = {p for p in processed.ranges if self._seeks.get(p) != seeks.get(p)}
                    processed = _without(processed, set(processed.ranges) - assigned | stale)
                    for part in stale & assigned:
                        # The fetcher may have moved past the dropped records: back to where
                        # this worker reads on.
                        consumer.seek(TopicPartition(s.events_topic, part), self._next_offset[part])
                        self._seeks[part] = self._seeks.get(part, 0) + 1
                    if not self._pending:
                        self._pending_since = time.monotonic()
                    if processed.records:
                        self._pending.append(processed)
                    for part, (_, hi) in processed.ranges.items():
                        self._next_offset[part] = hi + 1
                self.telemetry.events_in.inc(len(records))
            waiting = sum(len(p.records) for p in [*self._pending, *self._retry])
            held = waiting + (0 if self._retry else self._inflight)
            self.telemetry.records_held.set(held)
            since = self._pending_since if self._pending else self._last_flush
            due = waiting >= s.flush_max_events or (
                time.monotonic() - since >= s.flush_interval_s
                and (self._pending or self._retry or self.windows.open_windows() > 0)
            )
            flushing = self._flush_task is not None and not self._flush_task.done()
            if due and not flushing:
                self._flush_task = asyncio.create_task(self.flush(reason="batch"))
            self._backpressure(consumer, held)
            self._update_lag(consumer)

    def _backpressure(self, consumer: AIOKafkaConsumer, held: int) -> None:
        """Stop fetching while two flushes' worth of records are held (slow or failing sink).

        ``held`` counts the batch being landed (or kept for a retry) and the one waiting behind
        it. Paused partitions stay in the group (getmany keeps polling), so memory holds at
        most ``2 * flush_max_events`` records plus one fetch, however long the sink is down.
        """
        if held >= 2 * self.settings.flush_max_events:
            unpaused = consumer.assignment() - consumer.paused()
            if unpaused:
                consumer.pause(*unpaused)
            if not self._paused:
                log.info("%d records waiting to be landed: fetching paused", held)
            self._paused = True
        elif self._paused:
            consumer.resume(*consumer.paused())
            self._paused = False

    @Service.task
    async def _maintain(self) -> None:
        """Lake maintenance every ``maintain_interval_s``, in a thread of its own: landing
        goes on meanwhile (each step waits only for a commit in progress)."""
        s = self.settings
        if s.maintain_interval_s <= 0:
            return
        loop = asyncio.get_running_loop()
        retention = timedelta(seconds=parse_duration(s.lake_retention, "lake_retention"))
        while not self.should_stop:
            await self.sleep(s.maintain_interval_s)
            if self.should_stop:
                return
            try:
                done = await loop.run_in_executor(
                    _MAINTENANCE,
                    lambda: maintain(
                        s.data_dir,
                        s.catalog,
                        retention=retention,
                        events_retention_days=s.events_retention_days,
                    ),
                )
            except Exception as exc:  # retried at the next pass; landing is unaffected
                log.warning(
                    "lake maintenance failed, retrying in %gs: %s", s.maintain_interval_s, exc
                )
                continue
            log.info("lake maintenance: %s", done.summary())

    def _update_lag(self, consumer: AIOKafkaConsumer) -> None:
        lag = 0
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            if high is not None:
                lag += max(0, high - self._next_offset.get(tp.partition, high))
        self.telemetry.consumer_lag.set(lag)

    async def flush(self, *, reason: str, emit_open: bool = False) -> None:
        """Aggregate and land everything pending, publish, snapshot, then commit offsets.

        A batch that failed before is retried first, alone; a flush on rebalance or shutdown
        then goes on with what is pending. ``emit_open`` also closes every open window (a
        worker leaving a group: nobody else holds its part of them).
        """
        async with self._flush_lock:
            while True:
                async with self._lock:
                    retrying = bool(self._retry)
                    if retrying:
                        batch = self._retry
                    else:
                        batch, self._pending = self._pending, []
                    batch = self._assigned_only(batch)
                last = not (retrying and reason != "batch")
                # A retry computes the same records as the failed attempt (same ids): if
                # that attempt got them to the broker, they are not sent again.
                self._published = retrying and self._retry_published
                if not await self._attempt(batch, emit_open=emit_open and last):
                    return
                if last:
                    return

    def _assigned_only(self, batch: list[Processed]) -> list[Processed]:
        """``batch`` without records of partitions this worker no longer reads.

        A fetch that completes while the group rebalances can hold records of partitions
        that are gone once the new assignment is in; committing them fails, and their new
        owner lands them.
        """
        if self._consumer is None:
            return batch
        assigned = {tp.partition for tp in self._consumer.assignment()}
        kept = [_without(p, set(p.ranges) - assigned) for p in batch]
        return [p for p in kept if p.records or not p.ranges]

    async def _attempt(self, batch: list[Processed], *, emit_open: bool) -> bool:
        started = time.perf_counter()
        self._last_flush = time.monotonic()
        self._inflight = sum(len(p.records) for p in batch)
        try:
            await self._flush(batch, emit_open=emit_open)
        except Fenced as exc:
            # Another worker owns these partitions now and landed them: drop what this one
            # holds and read on from where the lake stands.
            log.error("flush not landed: %s", exc)
            self.last_error = str(exc)
            await self._resync()
            return False
        except Exception as exc:
            # Nothing was committed: keep the batch as it is, and rewind the state to the
            # last commit, so the retry lands the same rows and counts every event once.
            self._retry_published = self._published
            self._retry = batch
            self._rewind()
            self._conflicts += 1
            if is_conflict(exc) and self._conflicts <= MAX_QUICK_RETRIES:
                # Another writer of the lake committed first (several workers on a
                # PostgreSQL catalog): not an error, the retry lands on top of its commit.
                self.telemetry.lake_conflicts.inc()
                log.info("lake commit conflicted with another writer's; retrying")
                await asyncio.sleep(random.uniform(0.05, 0.3))
                return False
            self.telemetry.landing_errors.inc()
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.error("flush failed, offsets not committed, will retry: %s", self.last_error)
            await asyncio.sleep(1.0)
            return False
        finally:
            self._inflight = 0
        self._retry = []
        self._retry_published = False
        self._conflicts = 0
        self.last_error = None
        self.telemetry.batch_seconds.observe(time.perf_counter() - started)
        return True

    async def _flush(self, pending: list[Processed], *, emit_open: bool = False) -> None:
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
        events, repeats, metrics, anomalies, burns, verdicts = await loop.run_in_executor(
            None, self._aggregate, events, pending, behind, emit_open
        )
        steps.lap("aggregate")
        if not pending and metrics.num_rows == 0 and burns.num_rows == 0:
            return
        rejected = [bad for p in pending for bad in p.rejected] + repeats
        if repeats:
            dead = pa.concat_tables([dead, dead_letter_table(repeats)])
        if not self._published:
            await self._publish(rejected, metrics, pa.concat_tables([anomalies, burns]), verdicts)
            self._published = True
        steps.lap("publish")
        offsets = {**self._offsets, **{part: hi + 1 for part, (_, hi) in ranges.items()}}
        state = await loop.run_in_executor(None, self._state)
        lineage = self.windows.source or "default"
        seq = await loop.run_in_executor(
            None, self.snapshots.save, msgspec.msgpack.encode(state), offsets, lineage
        )
        steps.lap("snapshot")
        flush = Flush(
            rows=self._rows(events, dead, metrics, pa.concat_tables([anomalies, burns]), verdicts),
            positions={
                (s.events_topic, part): (self._offsets.get(part, lo), hi + 1)
                for part, (lo, hi) in ranges.items()
            },
            checkpoint=(lineage, seq),
            group_id=s.group_id,
        )
        await loop.run_in_executor(None, self.lake.commit, flush)
        steps.lap("land")
        await loop.run_in_executor(None, self.snapshots.committed, lineage, seq)
        if ranges:
            try:
                await self._consumer.commit(
                    {TopicPartition(s.events_topic, p): hi + 1 for p, (_, hi) in ranges.items()}
                )
            except Exception as exc:  # the lake holds the positions that count
                log.warning("offsets landed in the lake, not committed to Kafka: %s", exc)
        self._offsets = offsets
        self._saved = state
        self.metrics_emitted += metrics.num_rows
        self.telemetry.metrics_emitted.inc(metrics.num_rows)
        total = sum(hi - lo + 1 for lo, hi in ranges.values())
        self.landed_events += events.num_rows
        self.dead_lettered += dead.num_rows
        self.telemetry.events_landed.inc(events.num_rows)
        self.telemetry.observe_events(events)
        self.telemetry.dead_letters.inc(dead.num_rows)
        self.telemetry.batch_events.observe(total)
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
        self,
        events: pa.Table,
        pending: Sequence[Processed],
        behind: set[int],
        emit_open: bool = False,
    ) -> tuple[pa.Table, list[tuple[Record, Rejection]], pa.Table, pa.Table, pa.Table, pa.Table]:
        """Fold ``events`` into the windows, detectors, budgets and release verdicts.

        Returns the events to land (repeats taken out, ``late`` set), the repeats as dead
        letters, the rows of the windows that closed, the anomalies found in them (release
        regressions included), the ``budget_burn`` anomalies, and the release verdicts.
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
        if emit_open:
            metrics = pa.concat_tables([metrics, self.windows.flush_all()])
        detected_at = datetime.now(UTC)
        anomalies = pa.concat_tables(
            [
                self.detector.observe(metrics, detected_at=detected_at),
                self.rules.observe(metrics, detected_at=detected_at),
            ]
        )
        # Releases before metrics: a release and the first window it covers may close in
        # the same flush.
        self.judge.register(events)
        verdicts, regressions = self.judge.observe(metrics, detected_at=detected_at)
        if regressions.num_rows:
            anomalies = pa.concat_tables([anomalies, regressions])
        if anomalies.num_rows:
            history = history_lookup(self.settings.data_dir, metrics)
            anomalies = explain(anomalies, metrics, history)
            anomalies = self._with_examples(anomalies, events)
            self.telemetry.anomalies.inc(anomalies.num_rows)
        burns = ANOMALIES_SCHEMA.empty_table()
        if self.budgets.budgets:
            # Event time, like the windows: a replay forecasts and alerts exactly as before.
            self.budgets.update(events)
            burns = self.budgets.check(now, detected_at)
            self.telemetry.anomalies.inc(burns.num_rows)
        return events, repeats, metrics, anomalies, burns, verdicts

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
            index, anomalies.schema.field(index), pa.array(examples, pa.list_(pa.string()))
        ).cast(anomalies.schema)

    async def _publish(
        self,
        rejected: list[tuple[Record, Rejection]],
        metrics: pa.Table,
        anomalies: pa.Table,
        verdicts: pa.Table,
    ) -> None:
        """Send dead letters and derived records to their topics (one record batch per
        partition); wait for the broker."""
        assert self._producer is not None
        s = self.settings
        dead_copies = (_dead_letter_copy(record, rejection) for record, rejection in rejected)
        derived = [
            (s.dlq_topic, ((key, value, headers) for value, key, headers in dead_copies)),
            (s.metrics_topic, _unkeyed(metric_records(metrics))),
            (s.anomalies_topic, _unkeyed(anomaly_records(anomalies))),
            (s.verdicts_topic, _unkeyed(verdict_records(verdicts))),
        ]
        sends = [
            f for topic, out in derived for f in await send_batches(self._producer, topic, out)
        ]
        if sends:
            await asyncio.gather(*sends)

    def _rows(
        self,
        events: pa.Table,
        dead: pa.Table,
        metrics: pa.Table,
        anomalies: pa.Table,
        verdicts: pa.Table,
    ) -> dict[str, pa.Table]:
        """The rows of each lake table that this flush lands."""
        rows = {
            EVENTS.name: events,
            DEAD_LETTERS.name: dead,
            METRICS.name: metrics,
            ANOMALIES.name: anomalies,
            RELEASE_VERDICTS.name: verdicts,
        }
        # The budgets' status is a running figure: landed every few seconds, and with alerts.
        if self.budgets.budgets and (
            anomalies.num_rows or time.monotonic() - self._budgets_landed >= BUDGET_STATUS_EVERY_S
        ):
            rows[BUDGETS.name] = self.budgets.status()
            self._budgets_landed = time.monotonic()
        return rows

    async def _resync(self) -> None:
        """Drop every batch held and seek each assigned partition to the lake's position."""
        assert self._consumer is not None
        async with self._lock:
            self._pending, self._retry, self._retry_published = [], [], False
        self._rewind()
        stored = self.lake.positions(self.settings.events_topic)
        for tp in self._consumer.assignment():
            if tp.partition in stored:
                self._consumer.seek(tp, stored[tp.partition])
                self._offsets[tp.partition] = stored[tp.partition]


def _lineage(group: str, offsets: dict[int, int]) -> str:
    """Name of a window state started empty at ``offsets``: the same start, the same name, so a
    replay rewrites the files and ids it emitted before a crash."""
    seed = msgspec.json.encode([group, sorted(offsets.items())])
    return hashlib.blake2b(seed, digest_size=5).hexdigest()


def _without(batch: Processed, partitions: set[int]) -> Processed:
    """``batch`` without the records of ``partitions``."""
    if not partitions or not partitions & set(batch.ranges):
        return batch
    gone = pa.array(sorted(partitions), pa.int32())
    keep = pc.invert(pc.is_in(batch.events["kafka_partition"], value_set=gone))
    keep_dead = pc.invert(
        pc.is_in(batch.dead_letters["partition"].cast(pa.int32()), value_set=gone)
    )
    return Processed(
        batch.events.filter(keep),
        batch.dead_letters.filter(keep_dead),
        [(r, why) for r, why in batch.rejected if r.partition not in partitions],
        {p: span for p, span in batch.ranges.items() if p not in partitions},
        [r for r in batch.records if r.partition not in partitions],
    )


def _unkeyed(records: list[tuple[bytes, bytes]]) -> Iterator[tuple[bytes, bytes, Headers]]:
    """``(key, value)`` records of a derived topic as ``send_batches`` takes them (no headers)."""
    return ((key, value, []) for key, value in records)


def _dead_letter_copy(
    record: Record, rejection: Rejection
) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
    """Value, key and headers of a dead letter's copy on the DLQ topic, cut to fit a request."""
    source = f"{record.topic}/{record.partition}/{record.offset}"
    return dead_letter_copy(record.value, record.key, rejection.reason, source)
