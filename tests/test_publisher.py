"""The publisher (pipeline/publisher.py) against the real Apache Kafka broker."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline import schema
from pipeline.broker import free_port
from pipeline.config import Settings
from pipeline.kafka import BrokerUnavailable
from pipeline.publisher import Publisher, SyncPublisher, event_key
from pipeline.schema import InvalidEvent, LlmCall, Retrieval, Task, ToolCall
from tests.helpers import consume_all, unique_settings

pytestmark = pytest.mark.timeout(120)

TS = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
PARTITIONS = 6


# --- Kafka's partitioner, written out independently of aiokafka ---------------------------


def murmur2(data: bytes) -> int:
    """Kafka's ``Utils.murmur2`` (Java), as a signed 32-bit int."""
    m, mask = 0x5BD1E995, 0xFFFFFFFF
    length = len(data)
    h = (0x9747B28C ^ length) & mask
    for i in range(0, length - length % 4, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * m) & mask
        k ^= k >> 24
        k = (k * m) & mask
        h = (h * m) & mask
        h ^= k
    tail, rest = length & ~3, length % 4
    if rest >= 3:
        h ^= data[tail + 2] << 16
    if rest >= 2:
        h ^= data[tail + 1] << 8
    if rest >= 1:
        h ^= data[tail]
        h = (h * m) & mask
    h ^= h >> 13
    h = (h * m) & mask
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def java_partition(key: bytes, partitions: int) -> int:
    """The partition the Java client's default partitioner picks for ``key``."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def test_murmur2_matches_kafka_test_vectors() -> None:
    # From Kafka's UtilsTest.testMurmur2.
    assert murmur2(b"21") == -973932308
    assert murmur2(b"foobar") == -790332482
    assert murmur2(b"a-little-bit-long-string") == -985981536
    assert murmur2(b"a-little-bit-longer-string") == -1486304829
    assert murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8") == -58897971
    assert murmur2(b"abc") == 479470107


# --- helpers -------------------------------------------------------------------------------


def task_events(n_tasks: int, per_task: int, tag: str) -> list[schema.AgentEvent]:
    """``n_tasks * per_task`` events, tasks interleaved round-robin, mixed types."""
    out: list[schema.AgentEvent] = []
    for step in range(per_task):
        for t in range(n_tasks):
            common: dict[str, Any] = {
                "event_id": f"{tag}-t{t:02d}-{step:03d}",
                "schema_version": 1,
                "ts": TS + timedelta(seconds=step),
                "agent_id": f"agent-{t % 3}",
                "session_id": f"sess-{t % 7}",
                "task_id": f"{tag}-task-{t:02d}",
            }
            kind = (t + step) % 4
            if kind == 0:
                out.append(LlmCall(**common, input_tokens=100 + step, output_tokens=t))
            elif kind == 1:
                out.append(ToolCall(**common, tool_name="search", status="ok"))
            elif kind == 2:
                out.append(Retrieval(**common, hits=step % 3))
            else:
                out.append(Task(**common, outcome="started"))
    return out


def end_offsets(settings: Settings, topic: str | None = None) -> dict[int, int]:
    """The end offset of every partition of ``topic``."""
    topic = topic or settings.events_topic

    async def go() -> dict[int, int]:
        cons = AIOKafkaConsumer(bootstrap_servers=settings.broker, enable_auto_commit=False)
        await cons.start()
        try:
            tps = [TopicPartition(topic, p) for p in range(settings.partitions)]
            ends = await cons.end_offsets(tps)
            return {tp.partition: off for tp, off in ends.items()}
        finally:
            await cons.stop()

    return asyncio.run(go())


def unreachable_settings() -> tuple[Settings, str]:
    address = f"127.0.0.1:{free_port()}"
    return Settings.load(env={}, broker=address), address


# --- tests ---------------------------------------------------------------------------------


def test_event_key_prefers_task_then_session_then_agent() -> None:
    base: dict[str, Any] = {"event_id": "e", "schema_version": 1, "ts": TS, "agent_id": "ag"}
    assert event_key(Task(**base, outcome="started", task_id="t", session_id="s")) == b"t"
    assert event_key(Task(**base, outcome="started", session_id="s")) == b"s"
    assert event_key(Task(**base, outcome="started")) == b"ag"
    assert event_key(Task(**base, outcome="started", task_id="tâche")) == "tâche".encode()


def test_publish_many_keeps_each_task_in_one_partition_in_order(
    bootstrap: str, tmp_path: Path
) -> None:
    settings = unique_settings(bootstrap, tmp_path, partitions=PARTITIONS)
    events = task_events(50, 40, "pm")
    assert len(events) == 2000

    async def go() -> tuple[int, int]:
        async with Publisher(settings) as pub:
            sent = await pub.publish_many(events)
            return sent, pub.published

    assert asyncio.run(go()) == (2000, 2000)

    records = consume_all(settings, settings.events_topic, 2000)
    assert len(records) == 2000
    ends = end_offsets(settings)
    assert sum(ends.values()) == 2000

    by_id = {ev.event_id: ev for ev in events}
    published_order: dict[str, list[str]] = defaultdict(list)
    for ev in events:
        published_order[ev.task_id].append(ev.event_id)  # type: ignore[index]

    seen: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
    per_partition: dict[int, int] = defaultdict(int)
    for rec in records:
        ev = schema.decode(rec.value)
        assert isinstance(ev, schema.Envelope)
        assert ev == by_id[ev.event_id]
        assert rec.value == schema.encode(by_id[ev.event_id])
        assert rec.key == ev.task_id.encode()  # type: ignore[union-attr]
        assert rec.partition == java_partition(rec.key, PARTITIONS)
        seen[ev.task_id].append((rec.partition, rec.offset, ev.event_id))  # type: ignore[index]
        per_partition[rec.partition] += 1

    assert sorted(seen) == sorted(published_order)
    for task, got in seen.items():
        partitions = {p for p, _, _ in got}
        assert len(partitions) == 1, f"{task} spread over {partitions}"
        assert [eid for _, _, eid in sorted(got)] == published_order[task]
        assert len(got) == 40
    # The end offsets agree with what was read, partition by partition.
    assert dict(per_partition) == {p: n for p, n in ends.items() if n}
    assert len(per_partition) > 1


def test_sync_publisher(bootstrap: str, tmp_path: Path) -> None:
    settings = unique_settings(bootstrap, tmp_path, partitions=PARTITIONS)
    events = task_events(10, 30, "sync")
    singles = [
        {
            "type": "tool_call",
            "event_id": f"single-{i}",
            "schema_version": 1,
            "ts": "2026-01-05T09:00:00Z",
            "agent_id": "solo-agent",
            "tool_name": "lookup",
            "status": "error",
            "error_type": "timeout",
        }
        for i in range(3)
    ]
    with SyncPublisher(settings) as pub:
        assert pub.publish_many(iter(events)) == 300
        for event in singles:
            pub.publish(event)
        assert pub.publish_many([]) == 0

    assert sum(end_offsets(settings).values()) == 303
    records = consume_all(settings, settings.events_topic, 303)
    assert len(records) == 303
    solo = [r for r in records if r.key == b"solo-agent"]
    assert [schema.decode(r.value).event_id for r in solo] == [  # type: ignore[union-attr]
        "single-0",
        "single-1",
        "single-2",
    ]
    assert {r.partition for r in solo} == {java_partition(b"solo-agent", PARTITIONS)}


def test_invalid_event_sends_nothing_of_the_call(bootstrap: str, tmp_path: Path) -> None:
    settings = unique_settings(bootstrap, tmp_path, partitions=PARTITIONS)
    good = task_events(20, 5, "ok")  # 100 events
    bad_dict = {
        "type": "llm_call",
        "event_id": "bad-tokens",
        "schema_version": 1,
        "ts": "2026-01-05T09:00:00Z",
        "agent_id": "a",
        "input_tokens": -3,
        "output_tokens": 1,
    }
    future = Task(
        event_id="from-the-future",
        schema_version=1,
        ts=datetime.now(UTC) + timedelta(seconds=schema.MAX_FUTURE_SECONDS + 3600),
        agent_id="a",
        outcome="started",
    )

    async def go() -> tuple[dict[int, int], list[str]]:
        errors = []
        async with Publisher(settings) as pub:
            assert await pub.publish_many(good) == 100
            before = end_offsets_async_safe()
            for batch in (
                [*task_events(20, 2, "x1"), bad_dict, *task_events(20, 2, "x2")],
                (ev for ev in [*task_events(5, 2, "g"), future]),
            ):
                with pytest.raises(InvalidEvent) as info:
                    await pub.publish_many(batch)
                errors.append(str(info.value))
            with pytest.raises(InvalidEvent):
                await pub.publish(bad_dict)
            assert pub.published == 100
            assert await pub.publish_many(task_events(10, 1, "after")) == 10
        return before, errors

    def end_offsets_async_safe() -> dict[int, int]:
        # end_offsets() runs its own event loop; run it on a thread from inside this one.
        box: list[dict[int, int]] = []
        th = threading.Thread(target=lambda: box.append(end_offsets(settings)))
        th.start()
        th.join()
        return box[0]

    before, errors = asyncio.run(go())
    assert sum(before.values()) == 100
    assert errors[0] == (
        "invalid event: event 'bad-tokens': Expected `int` >= 0 - at `$.input_tokens`"
    )
    assert errors[1].startswith("invalid event: event 'from-the-future': ts ")
    assert " in the future " in errors[1]
    assert errors[1].endswith(" - at `$.ts`")
    after = end_offsets(settings)
    # Only the 10 events of the last, valid call were added after the failed calls.
    assert sum(after.values()) == 110
    records = consume_all(settings, settings.events_topic, 110)
    ids = {schema.decode(r.value).event_id for r in records}  # type: ignore[union-attr]
    assert len(records) == 110
    assert ids == {ev.event_id for ev in good} | {f"after-t{t:02d}-000" for t in range(10)}


def test_unreachable_broker_raises_broker_unavailable_quickly() -> None:
    settings, address = unreachable_settings()
    start = time.monotonic()

    async def go() -> None:
        pub = Publisher(settings)
        await asyncio.wait_for(pub.start(), timeout=20)

    with pytest.raises(BrokerUnavailable) as info:
        asyncio.run(go())
    assert time.monotonic() - start < 20
    assert f"cannot reach Kafka at {address}" in str(info.value)
    assert "--broker" in str(info.value)


def test_sync_publisher_unreachable_broker() -> None:
    settings, address = unreachable_settings()
    start = time.monotonic()
    with pytest.raises(BrokerUnavailable, match=f"cannot reach Kafka at {address}"):
        SyncPublisher(settings)
    assert time.monotonic() - start < 20


def test_failed_sync_publisher_leaves_no_thread_behind() -> None:
    settings, _ = unreachable_settings()
    before = {t.ident for t in threading.enumerate()}
    with pytest.raises(BrokerUnavailable):
        SyncPublisher(settings)
    time.sleep(0.5)
    leaked = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    assert leaked == []
