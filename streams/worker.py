"""The events consumer: fetch in batches, land, publish dead letters, then commit.

Faust's per-event stream iterator costs about 120 us an event (see the README's speed
section), so the high-volume events topic is read by this service with aiokafka ``getmany``
inside the faust worker. Faust keeps what it is good at: the worker life cycle, the web
endpoint, and agents for the low-volume derived topics.

Order of a flush, which is what makes landing exactly-once: (1) Parquet files durable,
(2) dead letters acknowledged by the broker, (3) derived records published, (4) offsets
committed. A crash anywhere before (4) replays the same offsets; the files from the first
attempt are removed on reassignment (``ParquetLake.discard_uncommitted``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from mode import Service

from pipeline.config import Settings
from pipeline.kafka import client_kwargs, start_producer
from sinks.catalog import DEAD_LETTERS, EVENTS, prepare
from sinks.parquet import ParquetLake
from streams.hotpath import BatchProcessor, Processed
from streams.telemetry import WorkerTelemetry

log = logging.getLogger("agentstream.worker")


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
        self.processor = BatchProcessor(max_message_bytes=settings.max_message_bytes)
        self._pending: list[Processed] = []
        self._pending_since = 0.0
        self._lock = asyncio.Lock()
        self._next_offset: dict[int, int] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self.healthy = False
        self.last_error: str | None = None
        self.landed_events = 0
        self.dead_lettered = 0

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
            await self.flush(reason="shutdown")
        finally:
            if self._consumer is not None:
                await self._consumer.stop()
            if self._producer is not None:
                await self._producer.stop()

    async def recover(self, assigned: Sequence[TopicPartition]) -> None:
        """Drop files landed for offsets that were never committed, before reading them again."""
        assert self._consumer is not None
        for tp in assigned:
            committed = await self._consumer.committed(tp)
            if committed is None:
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

    @Service.task
    async def _consume(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        s = self.settings
        while not self.should_stop:
            fetched = await consumer.getmany(timeout_ms=200, max_records=s.fetch_max_records)
            records = [r for batch in fetched.values() for r in batch]
            async with self._lock:
                if records:
                    processed = self.processor.process(records)
                    if not self._pending:
                        self._pending_since = time.monotonic()
                    self._pending.append(processed)
                    for part, (_, hi) in processed.ranges.items():
                        self._next_offset[part] = hi + 1
                    self.telemetry.events_in.inc(len(records))
                due = self._pending and (
                    sum(p.events.num_rows + p.dead_letters.num_rows for p in self._pending)
                    >= s.flush_max_events
                    or time.monotonic() - self._pending_since >= s.flush_interval_s
                )
            if due:
                await self.flush(reason="batch")
            self._update_lag(consumer)

    def _update_lag(self, consumer: AIOKafkaConsumer) -> None:
        lag = 0
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            if high is not None:
                lag += max(0, high - self._next_offset.get(tp.partition, high))
        self.telemetry.consumer_lag.set(lag)

    async def flush(self, *, reason: str) -> None:
        """Land everything pending, publish dead letters, then commit their offsets."""
        async with self._lock:
            if not self._pending:
                return
            pending, self._pending = self._pending, []
            started = time.perf_counter()
            try:
                await self._flush(pending)
            except Exception as exc:
                # Nothing was committed: keep the batch so the next flush retries it.
                self._pending = pending + self._pending
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
        events = pa.concat_tables([p.events for p in pending])
        dead = pa.concat_tables([p.dead_letters for p in pending])
        ranges: dict[int, tuple[int, int]] = {}
        for p in pending:
            for part, (lo, hi) in p.ranges.items():
                old = ranges.get(part, (lo, hi))
                ranges[part] = (min(old[0], lo), max(old[1], hi))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._land, events, dead, ranges)
        sends = []
        for p in pending:
            for record, rejection in p.rejected:
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
        if sends:
            await asyncio.gather(*sends)
        offsets = {TopicPartition(s.events_topic, part): hi + 1 for part, (_, hi) in ranges.items()}
        await self._consumer.commit(offsets)
        total = sum(hi - lo + 1 for lo, hi in ranges.values())
        self.landed_events += events.num_rows
        self.dead_lettered += dead.num_rows
        self.telemetry.events_landed.inc(events.num_rows)
        self.telemetry.dead_letters.inc(dead.num_rows)
        self.telemetry.batch_events.observe(total)
        log.info(
            "flush: %d messages, %d events landed, %d dead letters, partitions %s",
            total,
            events.num_rows,
            dead.num_rows,
            ",".join(f"{p}@{hi + 1}" for p, (_, hi) in sorted(ranges.items())),
        )

    def _land(self, events: pa.Table, dead: pa.Table, ranges: dict[int, tuple[int, int]]) -> None:
        topic = self.settings.events_topic
        for part, (lo, hi) in ranges.items():
            for table, rows, column in (
                (EVENTS, events, "kafka_partition"),
                (DEAD_LETTERS, dead, "partition"),
            ):
                mine = rows.filter(pc.equal(rows[column], part))
                self.lake.land(table, mine, topic=topic, partition=part, first=lo, last=hi)
