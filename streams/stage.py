"""What the ingest and aggregate stages share: timing a flush's steps, sending what must arrive."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer

log = logging.getLogger("agentstream.stage")


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
