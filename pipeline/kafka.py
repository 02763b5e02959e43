"""Kafka client settings and small admin helpers shared by the worker, publisher and CLI."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import GroupCoordinatorNotAvailableError, KafkaConnectionError, KafkaError
from aiokafka.helpers import create_ssl_context
from aiokafka.partitioner import DefaultPartitioner

from pipeline.config import Settings

log = logging.getLogger("agentstream.kafka")
# The copy of a dead letter on the DLQ topic is cut to this size (the lake keeps it whole):
# the producer's max_request_size and a topic's default max.message.bytes are 1 MiB, and a
# copy that cannot be sent would stop every later commit behind it.
DLQ_VALUE_LIMIT = 900 * 1024
DLQ_KEY_LIMIT = 16 * 1024

Headers = list[tuple[str, bytes]]
_PARTITIONER = DefaultPartitioner()

# A producer's record batch, per partition (aiokafka's default is 16 KiB). A metrics record
# is ~3.4 KB, so at 16 KiB a backlog flush of 48,000 went out as ~12,000 batches, each a
# ``send_batch`` and its own request: 2.3-3.8 s against 0.8 s at 512 KiB (a local broker,
# 2026-12-05). 1 MiB stays within the broker's default max.message.bytes (1 MiB + 12 B).
BATCH_BYTES = 1 << 20


async def send_batches(
    producer: AIOKafkaProducer,
    topic: str,
    records: Iterable[tuple[bytes | None, bytes | None, Headers]],
) -> list[Awaitable[Any]]:
    """Send ``(key, value, headers)`` records as one record batch per partition; return the
    delivery futures (await them all before counting the records as sent).

    ``producer.send`` per record costs ~75 us of Python (~13k records/s): a backlog flush that
    closes 20k windows spent seconds there. A batch per partition is several times faster.
    Records go to the partition ``send`` would pick (murmur2 of the key; a None key at random),
    so subscribers see the same keying as before; each distinct key is hashed once, since
    aiokafka's murmur2 is pure Python (~3.5 us a key).
    """
    parts = sorted(await producer.partitions_for(topic))
    batches: dict[int, Any] = {}
    sent: list[Awaitable[Any]] = []
    partition_of: dict[bytes, int] = {}
    for key, value, headers in records:
        p = partition_of.get(key, -1) if key is not None else -1
        if p < 0:
            p = _PARTITIONER(key, parts, parts)
            if key is not None:
                partition_of[key] = p
        batch = batches.get(p)
        if batch is None:
            batch = batches[p] = producer.create_batch()
        if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
            sent.append(await producer.send_batch(batch, topic, partition=p))
            batch = batches[p] = producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                # Larger than a whole batch: send it alone, as the producer would.
                sent.append(await producer.send(topic, value=value, key=key, headers=headers))
    for p, batch in batches.items():
        if batch.record_count():
            sent.append(await producer.send_batch(batch, topic, partition=p))
    return sent


class BrokerUnavailable(Exception):
    """No Kafka broker answered at the configured address."""


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context for SSL and SASL_SSL connections, None for plaintext."""
    if not settings.security_protocol.endswith("SSL"):
        return None
    context: ssl.SSLContext = create_ssl_context(
        cafile=str(settings.ssl_cafile) if settings.ssl_cafile else None,
        certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
        keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
    )
    return context


def client_kwargs(settings: Settings) -> dict[str, Any]:
    """Connection arguments for every aiokafka client, from one place (TLS and SASL too)."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": settings.broker,
        "client_id": f"agentstream-{settings.group_id}",
        "security_protocol": settings.security_protocol,
    }
    context = ssl_context(settings)
    if context is not None:
        kwargs["ssl_context"] = context
    if settings.security_protocol.startswith("SASL"):
        assert settings.sasl_password is not None
        kwargs["sasl_mechanism"] = settings.sasl_mechanism
        kwargs["sasl_plain_username"] = settings.sasl_username
        kwargs["sasl_plain_password"] = settings.sasl_password.reveal()
    return kwargs


def pipeline_topics(settings: Settings) -> dict[str, int]:
    """Every topic agentstream reads or writes, with its partition count."""
    return {
        settings.events_topic: settings.partitions,
        settings.dlq_topic: settings.partitions,
        settings.metrics_topic: settings.partitions,
        settings.anomalies_topic: settings.partitions,
        settings.verdicts_topic: settings.partitions,
        # The aggregate state's shards (streams.hop.partition_of: by agent and tenant).
        settings.repartition_topic: settings.aggregate_partitions,
    }


def ensure_pipeline_topics(
    settings: Settings, timeout: float = 15, extra: dict[str, int] | None = None
) -> None:
    """Create the missing pipeline topics (and ``extra``: name -> partitions);
    ``BrokerUnavailable`` if the broker does not answer."""
    from pipeline.broker import ensure_topics

    client = {k: v for k, v in client_kwargs(settings).items() if k != "bootstrap_servers"}
    try:
        ensure_topics(
            settings.broker, {**pipeline_topics(settings), **(extra or {})}, timeout, **client
        )
    except Exception as exc:
        raise unreachable(settings, exc) from None


def unreachable(settings: Settings, exc: BaseException | None = None) -> BrokerUnavailable:
    """The error to raise when the broker cannot be reached, with what to do about it."""
    why = f" ({exc})" if exc else ""
    return BrokerUnavailable(
        f"cannot reach Kafka at {settings.broker}{why}: start one with `agentstream broker` "
        "or pass --broker host:port (env AGENTSTREAM_BROKER)"
    )


async def committed_lag(settings: Settings, topic: str | None = None) -> tuple[int, int]:
    """(messages in ``topic``, messages the worker's group has committed), over all partitions."""
    topic = topic or settings.events_topic
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    consumer = AIOKafkaConsumer(**client_kwargs(settings), enable_auto_commit=False)
    try:
        await admin.start()
        await consumer.start()
    except KafkaConnectionError as exc:
        await consumer.stop()
        await admin.close()
        raise unreachable(settings, exc) from None
    try:
        (described,) = await admin.describe_topics([topic])
        tps = [TopicPartition(topic, p["partition"]) for p in described.get("partitions", ())]
        if not tps:
            return 0, 0
        ends = await consumer.end_offsets(tps)
        starts = await consumer.beginning_offsets(tps)
        try:
            committed = await admin.list_consumer_group_offsets(settings.group_id, partitions=tps)
        except GroupCoordinatorNotAvailableError:
            # The offsets topic is still being created on a fresh broker: nothing committed yet.
            committed = {}
        done = 0
        for tp in tps:
            meta = committed.get(tp)
            if meta is not None and meta.offset >= 0:
                done += meta.offset - starts[tp]
        return sum(ends[tp] - starts[tp] for tp in tps), done
    except KafkaError as exc:
        raise unreachable(settings, exc) from None
    finally:
        await consumer.stop()
        await admin.close()


async def commit_offsets(
    settings: Settings, offsets: dict[int, int], topic: str | None = None
) -> None:
    """Set the worker group's committed offsets (the group must have no running member)."""
    topic = topic or settings.events_topic
    consumer = AIOKafkaConsumer(
        **client_kwargs(settings), group_id=settings.group_id, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tps = {TopicPartition(topic, p): o for p, o in offsets.items()}
        consumer.assign(list(tps))
        await consumer.commit(tps)
    finally:
        await consumer.stop()


async def start_producer(settings: Settings, **kwargs: Any) -> AIOKafkaProducer:
    """Start an idempotent producer (no duplicates on retry), or a plain one if the broker lacks it.

    Apache Kafka supports idempotence; the embedded Tansu broker answers InitProducerId with an
    error, and there a retried send may duplicate a message (the worker de-duplicates landing
    by offset, so the lake is unaffected; only topic subscribers could see a repeat).
    """
    base = {**client_kwargs(settings), "acks": "all", "max_batch_size": BATCH_BYTES, **kwargs}
    producer = AIOKafkaProducer(**base, enable_idempotence=True)
    try:
        await producer.start()
        return producer
    except KafkaConnectionError as exc:
        await producer.stop()
        raise unreachable(settings, exc) from None
    except KafkaError as exc:
        await producer.stop()
        # Expected on the embedded Tansu broker (the demo's default), not a fault to chase.
        log.info(
            "this broker has no idempotent producers (%s); using a plain producer: a retried"
            " send may repeat a derived record, the lake is unaffected",
            exc,
        )
    producer = AIOKafkaProducer(**base)
    try:
        await producer.start()
    except KafkaConnectionError as exc:
        await producer.stop()
        raise unreachable(settings, exc) from None
    return producer


def dead_letter_copy(
    value: bytes | None, key: bytes | None, reason: str, source: str
) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
    """Value, key and headers of a dead letter on the DLQ topic, cut to fit a request.

    The one DLQ record format: the original bytes as the value, the reason in header
    ``agentstream.reason``, where it came from (``topic/partition/offset``) in
    ``agentstream.source``.
    """
    headers = [
        ("agentstream.reason", reason.encode()[:4096]),
        ("agentstream.source", source.encode()),
    ]
    key = key if key is None else key[:DLQ_KEY_LIMIT]
    if value is not None and len(value) > DLQ_VALUE_LIMIT:
        headers.append(("agentstream.truncated_from", str(len(value)).encode()))
        value = value[:DLQ_VALUE_LIMIT]
    return value, key, headers
