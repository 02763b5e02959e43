"""What the ingest and aggregate stages share: timing a flush's steps, sending what must arrive."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition

from pipeline.config import Settings
from pipeline.kafka import client_kwargs
from sinks.lake import is_conflict, is_lake_error
from streams.telemetry import WorkerTelemetry

log = logging.getLogger("agentstream.stage")
# A commit refused because another writer committed first is retried at once this many times
# in a row; a lock held longer than that is an outage (/health degraded).
MAX_QUICK_RETRIES = 5


class Stopwatch:
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


async def deliver(
    producer: AIOKafkaProducer, topic: str, messages: Sequence[tuple[int, bytes]]
) -> None:
    """Send ``(partition, value)`` messages in order and wait until the broker has them all,
    retrying (the whole list, in order) until it does.

    What is sent here was landed already: giving up would lose it downstream, and a repeat is
    harmless (the receiver drops what it has applied), so a broker outage only waits.
    """
    delay = 0.5
    while True:
        try:
            sent = [await producer.send(topic, value=v, partition=p) for p, v in messages]
            await asyncio.gather(*sent)
            return
        except Exception as exc:
            log.warning("sending %d messages to %s failed, retrying: %s", len(messages), topic, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


class KafkaCommits:
    """Landed positions of one topic still to commit to Kafka (partition -> next offset).

    The lake holds the positions that count; Kafka's are what lag monitoring reads. A commit
    refused during a rebalance is owed and tried again with the next one (an idle flush too:
    with nothing new to land nothing else would move them, and the group would show lag for
    records landed long ago).
    """

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self._owed: dict[int, int] = {}

    @property
    def owed(self) -> bool:
        return bool(self._owed)

    def forget(self) -> None:
        """Drop what is owed (the lake's positions may be ahead of it now)."""
        self._owed.clear()

    async def commit(self, consumer: AIOKafkaConsumer, positions: dict[int, int]) -> None:
        """Commit ``positions`` and whatever is owed for partitions still assigned."""
        self._owed.update(positions)
        assigned = {tp.partition for tp in consumer.assignment() if tp.topic == self.topic}
        self._owed = {p: o for p, o in self._owed.items() if p in assigned}
        owed = dict(self._owed)  # a flush may add to it while this commit waits
        if not owed:
            return
        try:
            await consumer.commit({TopicPartition(self.topic, p): o for p, o in owed.items()})
        except Exception as exc:  # the lake holds the positions that count
            log.warning(
                "offsets of %s landed in the lake, not committed to Kafka yet: %s", self.topic, exc
            )
            return
        for p, o in owed.items():
            if self._owed.get(p) == o:
                del self._owed[p]


async def pause_after_failure(
    exc: BaseException, conflicts: int, telemetry: WorkerTelemetry, what: str, lake: str
) -> str | None:
    """Wait before a stage retries a flush that landed nothing; returns the error to show on
    ``/health`` (None: another writer of the lake committed first, not an error).

    ``lake`` names the lake's catalog (``catalog_label``): the driver's own message may not
    (a refused connection is libpq's text, with no word of which database it was).

    ``conflicts`` counts the failed attempts in a row, this one included: a conflict is
    retried at once (after a short random pause) this many times, then it is an outage.
    """
    if is_conflict(exc) and conflicts <= MAX_QUICK_RETRIES:
        # Several workers on one lake: the retry lands on top of the other's commit.
        telemetry.lake_conflicts.inc()
        log.info("lake commit conflicted with another writer's; retrying")
        await asyncio.sleep(random.uniform(0.05, 0.3))
        return None
    telemetry.landing_errors.inc()
    error = f"{type(exc).__name__}: {exc}"
    log.error("%s failed, offsets not committed, will retry: %s", what, error)
    if is_lake_error(exc):
        error = f"{what} failed on the lake ({lake}): {error}"
    await asyncio.sleep(1.0)
    return error


async def stop_stage(
    flush_task: asyncio.Task[None] | None,
    last_flush: Callable[[], Awaitable[None]],
    consumer: AIOKafkaConsumer | None,
    producer: AIOKafkaProducer | None,
) -> None:
    """A stage's shutdown: the flush in progress ends, a last one lands what is held, then the
    Kafka clients close (even if that flush failed: the lake's positions say what landed)."""
    try:
        if flush_task is not None:
            await flush_task
        await last_flush()
    finally:
        if consumer is not None:
            await consumer.stop()
        if producer is not None:
            await producer.stop()


# Heartbeats of the group consumers (aiokafka and faust default to 3 s; sessions last 10 s).
HEARTBEAT_MS: Final = 1000


def group_consumer(
    settings: Settings,
    group: str,
    topic: str,
    listener: ConsumerRebalanceListener,
    **options: Any,
) -> AIOKafkaConsumer:
    """A consumer of ``topic`` in ``group`` (subscribed; start it once the stage holds it: its
    rebalance listener uses it) that commits only what a stage landed
    (the lake's positions count; Kafka's are for lag monitoring) and whose flushes, however
    long, never make it leave the group."""
    consumer = AIOKafkaConsumer(
        **client_kwargs(settings),
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_interval_ms=600_000,
        # A member learns of a rebalance at its next heartbeat: at the default 3 s, a second
        # process joining the group left the first one alone with every partition for 2-3 s
        # longer (seen in `agentstream bench --workers 2`).
        heartbeat_interval_ms=HEARTBEAT_MS,
        **options,
    )
    consumer.subscribe([topic], listener=listener)
    return consumer
