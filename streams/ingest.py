"""The ingest stage: fetch events in batches, land them, hand window partials on.

Faust's per-event stream iterator costs about 120 us an event (see the README's speed
section), so the high-volume events topic is read by this service with aiokafka ``getmany``
inside the faust worker. Any number of ingest workers share the events topic (one consumer
group); each lands the partitions it reads and pre-aggregates them, and the aggregate stage
(``streams.aggregate``) owns every key's windows, detectors, releases and budgets.

Fetching and validating go on while the previous flush runs (in a thread: polars, pyarrow and
DuckDB release the GIL), one flush at a time. Order of a flush: (1) repeated event ids dropped,
lateness decided on each partition's stream time (``streams.lateness``), windows folded and
drained into partials (``streams.windows.WindowPartial``), spend per minute and release records
taken, (2) dead letters acknowledged by the broker, (3) one lake transaction: the events, dead
letters, the hop messages of the flush (``hop_outbox``) and the next offset of every partition
covered (``sinks.lake.LakeWriter.commit``), (4) the hop messages sent to the repartition topic
and acknowledged, (5) offsets committed to Kafka too (best effort: the lake's positions are the
ones that count). A crash before (3) lands nothing: the partitions are read again from the
positions stored in the lake (seek on assignment). A crash between (3) and (4) leaves the
messages in the outbox: the next owner of the partitions sends them before its own
(``streams.hop``). So every record lands exactly once and counts once downstream.

State: the ids remembered for de-duplication (rebuilt from the lake for partitions taken
over, ``streams.warmstart.landed_ids``) and the event clock; windows never stay open here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from mode import Service

from pipeline.config import Settings
from pipeline.kafka import dead_letter_copy, send_batches, start_producer
from pipeline.schema import Rejection
from sinks.catalog import DEAD_LETTERS, EVENTS, prepare
from sinks.contracts import HOP_OUTBOX
from sinks.lake import Fenced, Flush, is_lake_error
from sinks.maintenance import maintain_configured
from sinks.tables import DEAD_LETTERS_SCHEMA, EVENTS_SCHEMA
from streams import hop, lateness
from streams.budgets import spend_rows
from streams.dedupe import Deduplicator
from streams.hotpath import BatchProcessor, Processed, Record, dead_letter_table
from streams.stage import (
    KafkaCommits,
    Stopwatch,
    deliver,
    group_consumer,
    pause_after_failure,
    stop_stage,
)
from streams.telemetry import WorkerTelemetry
from streams.warmstart import landed_ids, stream_times
from streams.windows import WindowAggregator, WindowPartial

log = logging.getLogger("agentstream.worker")
EMPTY_EVENTS = EVENTS_SCHEMA.empty_table()
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
EMPTY_DEAD = DEAD_LETTERS_SCHEMA.empty_table()
_MAINTENANCE = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lake-maintenance")


@dataclass(frozen=True)
class _Saved:
    """The ingest state as of the last commit, in memory (a failed flush rewinds to it)."""

    windows: bytes
    dedupe: bytes
    clock: tuple[datetime | None, float]
    partition_ts: dict[int, datetime]
    reported: dict[int, int]


class EventClock:
    """Event time that keeps moving when the stream goes quiet.

    The windows close on event time, so a replay of old data is windowed as it happened. When
    no newer event arrives, event time is assumed to advance with the wall clock from the newest
    event seen, so the last windows of a quiet stream still close (about window + lateness
    after their last event) without a live stream's windows being closed by a clock that
    disagrees with the agents'.
    """

    def __init__(self, state: tuple[datetime | None, float] = (None, 0.0)) -> None:
        self._ts, self._wall = state

    @property
    def newest(self) -> datetime | None:
        """The newest event time seen (no wall-clock extrapolation)."""
        return self._ts

    def state(self) -> tuple[datetime | None, float]:
        return self._ts, self._wall

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
    def __init__(self, owner: IngestConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        await self.owner.flush(reason="rebalance")
        await self.owner.release(revoked)

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        await self.owner.recover(assigned)


class IngestConsumer(Service):
    """Consumes the events topic in batches, lands it and hands window partials on to the
    aggregate stage; runs inside the faust worker."""

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
        self.clock = EventClock()
        # Windows only decide lateness and fold a flush's events: drained at every flush.
        self.windows = WindowAggregator(settings.window_seconds, settings.allowed_lateness_s)
        self._partition_ts: dict[int, datetime] = {}
        # The clock told the aggregate stage for a partition read to its end (microseconds):
        # its later events are judged on it too (``streams.lateness``).
        self._reported: dict[int, int] = {}
        self.dedupe = Deduplicator(settings.dedupe_horizon_s)
        # The state as of the last commit (a failed flush rewinds to it), in memory only: the
        # lake holds everything a new owner of a partition needs.
        self._saved = self._state()
        # Names this process's row in the hop outbox (each flush replaces it).
        self.writer = f"{settings.group_id}/{uuid.uuid4().hex[:12]}"
        self.hop_messages = 0
        self._offsets: dict[int, int] = {}
        self._known: set[int] = set()  # partitions whose landed ids the de-duplicator holds
        # Landed positions (partition -> next offset) Kafka has not accepted yet.
        self._kafka = KafkaCommits(settings.events_topic)
        self._sources = 0  # partitions of the events topic
        self._shards = 1  # partitions of the repartition topic (the aggregate state's shards)
        self._published = False
        self._conflicts = 0  # failed attempts in a row
        self._last_flush = time.monotonic()

    async def on_start(self) -> None:
        s = self.settings
        self._producer = await start_producer(s, linger_ms=5)
        self._sources = len(await self._producer.partitions_for(s.events_topic))
        self._shards = len(await self._producer.partitions_for(s.repartition_topic))
        self._consumer = group_consumer(
            s,
            s.group_id,
            s.events_topic,
            _Rebalance(self),
            max_partition_fetch_bytes=8 << 20,
            fetch_max_bytes=64 << 20,
        )
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
        await stop_stage(
            self._flush_task, lambda: self.flush(reason="shutdown"), self._consumer, self._producer
        )

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
            self._known -= gone
            for part in gone:
                self._next_offset.pop(part, None)
                self._partition_ts.pop(part, None)
                self._reported.pop(part, None)
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
            self._seek(self._offsets)
        await loop.run_in_executor(None, self.lake.claim, topic, first, self.settings.group_id)
        if stored:
            # Kafka's offsets are for lag monitoring: a flush whose commit to Kafka met a
            # rebalance left them behind the lake's, and nothing new may come to move them.
            await self._commit_to_kafka(
                {tp.partition: stored[tp.partition] for tp in assigned if tp.partition in stored}
            )
        self._resumed = bool(stored)
        if stored:
            log.info(
                "resuming from the lake's positions %s",
                ",".join(f"{p}@{o}" for p, o in sorted(self._offsets.items())),
            )
        await self._take_over(assigned, set(stored))

    def _seek(self, positions: dict[int, int]) -> None:
        """Read each partition of ``positions`` again from its offset there.

        Called holding ``_lock``, with no await in between: records of those partitions
        fetched before are dropped with the seek, and so is a fetch in flight (``_seeks``
        tells it stale in ``_consume``).
        """
        assert self._consumer is not None
        gone = set(positions)
        self._pending = [p for p in (_without(b, gone) for b in self._pending) if p.records]
        for part, offset in positions.items():
            self._consumer.seek(TopicPartition(self.settings.events_topic, part), offset)
            self._next_offset[part] = offset
            self._seeks[part] = self._seeks.get(part, 0) + 1

    async def _take_over(self, assigned: Sequence[TopicPartition], landed: set[int]) -> None:
        """Remember the ids landed from partitions new to this worker (their repeats go to
        the dead letters, as with their previous owner), and send again the hop messages a
        previous owner landed but may not have sent.

        ``landed``: the partitions with a position in the lake. The others were never landed
        (every landing moves a position): nothing to remember or send, and no lake query,
        which at a first start would compete with the first fetches for the GIL.
        """
        s = self.settings
        loop = asyncio.get_running_loop()
        new = sorted({tp.partition for tp in assigned} - self._known)
        read = [p for p in new if p in landed]
        if read:
            ids = await loop.run_in_executor(None, landed_ids, s.data_dir, read, s.dedupe_horizon_s)
            if ids.num_rows:
                self.dedupe.repeats(ids["event_id"], ids["ts"])
            log.info("%d event ids of partitions %s remembered from the lake", ids.num_rows, read)
            # Their lateness goes on from where their previous owner left it.
            newest = await loop.run_in_executor(None, stream_times, s.data_dir, read)
            self._partition_ts.update({p: ts.astimezone(UTC) for p, ts in newest.items()})
        self._known |= set(new)
        self._saved = self._state()
        if landed & {tp.partition for tp in assigned}:
            await self._resend(self._offsets)

    async def _resend(self, positions: dict[int, int]) -> None:
        """Send the outbox rows that end at ``positions`` (the aggregate stage drops repeats)."""
        assert self._producer is not None
        loop = asyncio.get_running_loop()
        rows = await loop.run_in_executor(None, hop.outbox, self.settings.data_dir)
        for writer, ranges, payloads in rows:
            if any(positions.get(p) == nxt for p, (_, nxt) in ranges.items()):
                log.info("sending again the hop messages of %s for %s", writer, ranges)
                await self._hand_on(payloads)

    async def _hand_on(self, payloads: list[tuple[int, bytes]]) -> None:
        """Send hop messages until the broker has them all (``streams.stage.deliver``)."""
        assert self._producer is not None
        await deliver(self._producer, self.settings.repartition_topic, payloads)
        self.telemetry.hop_messages.inc(len(payloads))
        self.telemetry.hop_bytes.inc(sum(len(p) for _, p in payloads))

    def _state(self) -> _Saved:
        return _Saved(
            self.windows.snapshot(),
            self.dedupe.snapshot(),
            self.clock.state(),
            dict(self._partition_ts),
            dict(self._reported),
        )

    def _rewind(self) -> None:
        """Windows, remembered ids and the event clock back to the last commit (a flush is
        retried): a clock moved on by events that did not land would tell the aggregate
        stage that windows are complete while their events are still to come."""
        self.windows = WindowAggregator.restore(self._saved.windows)
        self.dedupe = Deduplicator.restore(self._saved.dedupe)
        self.clock = EventClock(self._saved.clock)
        self._partition_ts = {
            p: ts for p, ts in self._saved.partition_ts.items() if p in self._known
        }
        self._reported = {p: c for p, c in self._saved.reported.items() if p in self._known}

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
                    for part in stale & assigned & set(self._next_offset):
                        # The fetcher may have moved past the dropped records: back to where
                        # this worker reads on. (A partition with no next offset was revoked
                        # and assigned again meanwhile: its recovery, under way, seeks it.
                        # Seen: a KeyError that crashed the stage, after a fenced flush's
                        # resync and a rebalance while a fetch was in flight.)
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
                # Nothing to land: the flush still reports the event clock downstream.
                and bool(self._pending or self._retry or consumer.assignment())
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
        while not self.should_stop:
            await self.sleep(s.maintain_interval_s)
            if self.should_stop:
                return
            try:
                done = await loop.run_in_executor(_MAINTENANCE, maintain_configured, s)
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

    async def flush(self, *, reason: str) -> None:
        """Land everything pending, hand its partials on, then commit offsets.

        A batch that failed before is retried first, alone; a flush on rebalance or shutdown
        then goes on with what is pending.
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
                if not await self._attempt(batch):
                    return
                if last:
                    return

    async def _commit_to_kafka(self, positions: dict[int, int]) -> None:
        assert self._consumer is not None
        await self._kafka.commit(self._consumer, positions)

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

    async def _attempt(self, batch: list[Processed]) -> bool:
        started = time.perf_counter()
        self._last_flush = time.monotonic()
        self._inflight = sum(len(p.records) for p in batch)
        try:
            await self._flush(batch)
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
            self.last_error = await pause_after_failure(
                exc, self._conflicts, self.telemetry, "flush", self.lake.label
            )
            return False
        finally:
            self._inflight = 0
        self._retry = []
        self._retry_published = False
        self._conflicts = 0
        self.last_error = None
        self.telemetry.batch_seconds.observe(time.perf_counter() - started)
        return True

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
        steps = Stopwatch()
        owned = {tp.partition for tp in self._consumer.assignment()}
        events, repeats, partial, clocks = await loop.run_in_executor(
            None, self._ingest, events, pending, behind, owned
        )
        covered = {part: (self._offsets.get(part, lo), hi + 1) for part, (lo, hi) in ranges.items()}
        payloads = await loop.run_in_executor(
            None, self._messages, covered, clocks, partial, events
        )
        steps.lap("aggregate")
        if not pending:
            # Nothing to land: the event clock goes downstream (windows close on it).
            await self._hand_on(payloads)
            await self._commit_to_kafka({})
            # The horizon moved with the clock sent: a retry must not decide lateness on an
            # older one than the aggregate stage has seen.
            self._saved = self._state()
            return
        rejected = [bad for p in pending for bad in p.rejected] + repeats
        if repeats:
            dead = pa.concat_tables([dead, dead_letter_table(repeats)])
        if not self._published:
            await self._publish(rejected)
            self._published = True
        steps.lap("publish")
        offsets = {**self._offsets, **{part: nxt for part, (_, nxt) in covered.items()}}
        state = await loop.run_in_executor(None, self._state)
        outbox = pa.Table.from_pylist(
            [
                {
                    "writer": self.writer,
                    "ranges": json.dumps({str(p): list(r) for p, r in sorted(covered.items())}),
                    "payloads": [payload for _, payload in payloads],
                    "created_at": datetime.now(UTC),
                }
            ],
            schema=HOP_OUTBOX.schema,
        )
        flush = Flush(
            rows={EVENTS.name: events, DEAD_LETTERS.name: dead, HOP_OUTBOX.name: outbox},
            positions={(s.events_topic, part): span for part, span in covered.items()},
            group_id=s.group_id,
        )
        await loop.run_in_executor(None, self.lake.commit, flush, self.telemetry.lake_conflicts.inc)
        steps.lap("land")
        # Landed: from here on the messages must reach the repartition topic (a new owner of
        # these partitions would send them again from the outbox if this worker died now).
        await self._hand_on(payloads)
        self.hop_messages += len(payloads)
        steps.lap("hop")
        await self._commit_to_kafka({p: nxt for p, (_, nxt) in covered.items()})
        self._offsets = offsets
        self._saved = state
        total = sum(hi - lo + 1 for lo, hi in ranges.values())
        self.landed_events += events.num_rows
        self.dead_lettered += dead.num_rows
        self.telemetry.events_landed.inc(events.num_rows)
        self.telemetry.observe_events(events)
        self.telemetry.dead_letters.inc(dead.num_rows)
        self.telemetry.batch_events.observe(total)
        log.info(
            "flush: %d messages, %d events landed, %d dead letters, %d hop messages "
            "(%d bytes), partitions %s; %s",
            total,
            events.num_rows,
            dead.num_rows,
            len(payloads),
            sum(len(p) for _, p in payloads),
            ",".join(f"{p}@{nxt}" for p, (_, nxt) in sorted(covered.items())),
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

    def _ingest(
        self,
        events: pa.Table,
        pending: Sequence[Processed],
        behind: set[int],
        owned: set[int],
    ) -> tuple[pa.Table, list[tuple[Record, Rejection]], WindowPartial, dict[int, int]]:
        """Drop repeats, decide lateness, fold ``events`` into windows and drain them.

        Returns the events to land (repeats taken out, ``late`` set), the repeats as dead
        letters, the flush's window partial, and the event clock of each owned partition
        that has one (``hop.HopMessage.clocks``).
        """
        events, repeats = self._drop_repeats(events, pending)
        judged = self._horizons(events)  # on stream times before this flush's events
        reached = self._event_time(events, behind)
        now = self.clock.advance(reached)
        if events.num_rows:
            # While a partition is unread, event time stays where it was (the epoch is below
            # any horizon, so the windows do not advance).
            late = self.windows.update(
                events, now=now, event_time=reached or _EPOCH, horizons=judged
            )
            events = events.set_column(events.schema.get_field_index("late"), "late", late)
            self.telemetry.late_events.inc(pc.sum(late).as_py() or 0)
        partial = self.windows.drain()
        # Advances the horizon with the clock (a quiet stream); nothing is open to close.
        self.windows.close_due(now=now)
        return events, repeats, partial, self._clocks(now, behind, owned)

    def _horizons(self, events: pa.Table) -> npt.NDArray[np.int64]:
        """Each event's lateness horizon: its partition's stream time (``streams.lateness``)."""
        floors = {p: _us(ts) for p, ts in self._partition_ts.items()}
        for p, clock in self._reported.items():
            floors[p] = max(clock, floors.get(p, clock))
        return lateness.horizons(
            _numpy(events["kafka_partition"], np.int32),
            _numpy(events["kafka_offset"], np.int64),
            _numpy(events["ts"].cast(pa.int64()), np.int64),
            floors,
            int(self.settings.allowed_lateness_s * 1_000_000),
        )

    def _clocks(self, now: datetime, behind: set[int], owned: set[int]) -> dict[int, int]:
        """What this worker tells the aggregate stage about each partition's event time.

        A partition with records still to read: the newest event read from it (a partition
        not read since it was assigned: nothing, its previous report stands). A partition
        read to its end: this worker's clock, so that it does not hold windows back, as in
        ``_event_time``. Never more than this worker's clock, whose horizon decides lateness.
        """
        out: dict[int, int] = {}
        for part in owned:
            if part in behind:
                ts = self._partition_ts.get(part)
                if ts is not None:
                    out[part] = _us(min(ts, now))
            elif now > _EPOCH:
                out[part] = _us(now)
                self._reported[part] = max(out[part], self._reported.get(part, out[part]))
        return out

    def _messages(
        self,
        covered: dict[int, tuple[int, int]],
        clocks: dict[int, int],
        partial: WindowPartial,
        events: pa.Table,
    ) -> list[tuple[int, bytes]]:
        """The encoded hop messages of a flush: ``(repartition partition, chunk)``."""
        releases = events.filter(pc.equal(events["type"], "release")) if events.num_rows else None
        return hop.messages(
            covered,
            self._sources,
            clocks,
            partial if covered else None,
            spend_rows(events) if events.num_rows else None,
            releases,
            self._shards,
        )

    async def _publish(self, rejected: list[tuple[Record, Rejection]]) -> None:
        """Send dead letters to their topic (one record batch per partition); wait for the
        broker."""
        assert self._producer is not None
        copies = (_dead_letter_copy(record, rejection) for record, rejection in rejected)
        sends = await send_batches(
            self._producer,
            self.settings.dlq_topic,
            ((key, value, headers) for value, key, headers in copies),
        )
        if sends:
            await asyncio.gather(*sends)

    async def _resync(self) -> None:
        """Drop every batch held and seek each assigned partition to the lake's position."""
        assert self._consumer is not None
        self._kafka.forget()  # the lake's positions may be ahead of them now
        # In a thread: the writer's connection may be busy with a flush's commit.
        loop = asyncio.get_running_loop()
        topic = self.settings.events_topic
        stored = await loop.run_in_executor(None, self.lake.positions, topic)
        assigned = list(self._consumer.assignment())
        mine = {tp.partition for tp in assigned}
        lost = {p: self._offsets[p] for p in sorted(mine - set(stored)) if p in self._offsets}
        if lost:
            # Fenced because the partition has no row at all (a claim that did not stay):
            # every flush of it would be refused until it is claimed again.
            log.warning("partitions %s have no position in the lake: claimed again", sorted(lost))
            try:
                await loop.run_in_executor(
                    None, self.lake.claim, topic, lost, self.settings.group_id
                )
            except Exception as exc:
                if not is_lake_error(exc):
                    raise
                # The catalog busy (another process's commit): the next flush is fenced
                # again and claims them again; an exception here would end the flush task.
                log.warning("partitions %s not claimed yet: %s", sorted(lost), exc)
        async with self._lock:
            # Everything held goes, including what a fetch appended while the positions were
            # read: it was read on from where this worker stood, and a flush would land it as
            # if it began at the lake's position. Partitions the lake has no newer position
            # for are read again from their last landed one.
            self._pending, self._retry, self._retry_published = [], [], False
            self._offsets.update({p: o for p, o in stored.items() if p in mine})
            self._seek({p: self._offsets[p] for p in mine if p in self._offsets})
        self._rewind()
        # Another writer landed some of them: remember its ids, send what it may not have.
        self._known -= mine
        await self._take_over(assigned, set(stored))


def _us(when: datetime) -> int:
    return (when - _EPOCH) // timedelta(microseconds=1)


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


def _dead_letter_copy(
    record: Record, rejection: Rejection
) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
    """Value, key and headers of a dead letter's copy on the DLQ topic, cut to fit a request."""
    source = f"{record.topic}/{record.partition}/{record.offset}"
    return dead_letter_copy(record.value, record.key, rejection.reason, source)


def _numpy(column: pa.ChunkedArray | pa.Array, dtype: type[np.generic]) -> npt.NDArray[Any]:
    """A null-free numeric column as one numpy array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=dtype)
