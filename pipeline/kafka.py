"""Kafka client settings and small admin helpers shared by the worker, publisher and CLI."""

from __future__ import annotations

import logging
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError

from pipeline.config import Settings

log = logging.getLogger("agentstream.kafka")


class BrokerUnavailable(Exception):
    """No Kafka broker answered at the configured address."""


def client_kwargs(settings: Settings) -> dict[str, Any]:
    """Connection arguments for every aiokafka client, from one place."""
    return {"bootstrap_servers": settings.broker, "client_id": f"agentstream-{settings.group_id}"}


def unreachable(settings: Settings, exc: BaseException | None = None) -> BrokerUnavailable:
    """The error to raise when the broker cannot be reached, with what to do about it."""
    why = f" ({exc})" if exc else ""
    return BrokerUnavailable(
        f"cannot reach Kafka at {settings.broker}{why}: start one with `agentstream broker` "
        "or pass --broker host:port (env AGENTSTREAM_BROKER)"
    )


async def committed_lag(settings: Settings, topic: str | None = None) -> tuple[int, int]:
    """(messages in ``topic``, messages the worker's group has committed) summed over partitions."""
    topic = topic or settings.events_topic
    consumer = AIOKafkaConsumer(**client_kwargs(settings), group_id=settings.group_id,
                                enable_auto_commit=False)
    try:
        await consumer.start()
    except KafkaConnectionError as exc:
        raise unreachable(settings, exc) from None
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            return 0, 0
        ends = await consumer.end_offsets(tps)
        starts = await consumer.beginning_offsets(tps)
        done = 0
        for tp in tps:
            c = await consumer.committed(tp)
            done += (c if c is not None else starts[tp]) - starts[tp]
        return sum(ends[tp] - starts[tp] for tp in tps), done
    except KafkaError as exc:
        raise unreachable(settings, exc) from None
    finally:
        await consumer.stop()


async def start_producer(settings: Settings, **kwargs: Any) -> AIOKafkaProducer:
    """Start an idempotent producer (no duplicates on retry), or a plain one if the broker lacks it.

    Apache Kafka supports idempotence; the embedded Tansu broker answers InitProducerId with an
    error, and there a retried send may duplicate a message (the worker de-duplicates landing
    by offset, so the lake is unaffected; only topic subscribers could see a repeat).
    """
    base = {**client_kwargs(settings), "acks": "all", **kwargs}
    producer = AIOKafkaProducer(**base, enable_idempotence=True)
    try:
        await producer.start()
        return producer
    except KafkaConnectionError as exc:
        await producer.stop()
        raise unreachable(settings, exc) from None
    except KafkaError as exc:
        await producer.stop()
        log.warning("broker refused an idempotent producer (%s); using a plain one", exc)
    producer = AIOKafkaProducer(**base)
    try:
        await producer.start()
    except KafkaConnectionError as exc:
        await producer.stop()
        raise unreachable(settings, exc) from None
    return producer
