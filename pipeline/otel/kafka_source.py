"""The Collector's way in: read the topic its Kafka exporter writes, publish events.

The OpenTelemetry Collector's Kafka exporter writes one ``TracesData`` per message to
``otlp_spans`` by default (``LogsData`` to ``otlp_logs``), as protobuf (``otlp_proto``) or JSON
(``otlp_json``); messages carry no content type, so each is sniffed. Delivery is at least once, like the exporter's:
offsets are committed only after Kafka acknowledged the events (and dead letters) of a
fetch, and a repeated message yields the same event ids, which the worker lands once.

What cannot be decoded goes to the dead-letter topic, in the worker's format (the original
bytes, header ``agentstream.reason``, header ``agentstream.source`` = topic/partition/offset);
an event that fails validation goes there too, as its JSON, with the validation's reason.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from pipeline.config import Settings
from pipeline.kafka import (
    BrokerUnavailable,
    client_kwargs,
    dead_letter_copy,
    send_batches,
    start_producer,
)
from pipeline.otel.decode import OtlpDecodeError, sniff
from pipeline.otel.ingest import Signal, convert
from pipeline.publisher import Publisher

log = logging.getLogger("agentstream.otlp")
DEFAULT_TOPIC: Final = "otlp_spans"
DEFAULT_LOGS_TOPIC: Final = "otlp_logs"
_RETRY_S: Final = 2.0


class KafkaSource:
    """Consumes ``topic`` (traces) and ``logs_topic`` (logs: evaluation and guardrail
    records) in group ``<group_id>-otlp`` and publishes through ``publisher``."""

    def __init__(
        self,
        settings: Settings,
        publisher: Publisher,
        topic: str = DEFAULT_TOPIC,
        logs_topic: str | None = DEFAULT_LOGS_TOPIC,
    ) -> None:
        self.settings = settings
        self.publisher = publisher
        self.topic = topic
        self.signals: dict[str, Signal] = {topic: "traces"}
        if logs_topic is not None:
            self.signals[logs_topic] = "logs"
        self.group = f"{settings.group_id}-otlp"
        self.messages = 0
        self.dead_letters = 0
        self._consumer: Any = None
        self._producer: Any = None

    async def start(self) -> None:
        self._producer = await start_producer(self.settings)
        self._consumer = AIOKafkaConsumer(
            *self.signals,
            **client_kwargs(self.settings),
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=8 << 20,
            fetch_max_bytes=32 << 20,
        )
        await self._consumer.start()

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()

    async def run(self) -> None:
        """Fetch, convert, publish, dead-letter, commit; until cancelled."""
        while True:
            fetched = await self._consumer.getmany(timeout_ms=500, max_records=2000)
            if not fetched:
                continue
            try:
                await self._handle([r for records in fetched.values() for r in records])
                await self._consumer.commit()
            except (BrokerUnavailable, KafkaError) as exc:
                # Nothing of this fetch is committed: read it again once Kafka is back.
                log.warning("OTLP topic %s: %s; retrying in %.0f s", self.topic, exc, _RETRY_S)
                await asyncio.sleep(_RETRY_S)
                for tp in fetched:
                    committed = await self._consumer.committed(tp)
                    if committed is None:
                        await self._consumer.seek_to_beginning(tp)
                    else:
                        self._consumer.seek(tp, committed)

    async def _handle(self, records: list[Any]) -> None:
        out: list[tuple[bytes, bytes]] = []
        dead: list[tuple[bytes | None, bytes | None, str, str]] = []
        for r in records:
            source = f"{r.topic}/{r.partition}/{r.offset}"
            if not r.value:
                dead.append((r.value, r.key, "empty message: Kafka record has no value", source))
                continue
            signal = self.signals[r.topic]
            try:
                result = convert(r.value, sniff(r.value), signal)
            except OtlpDecodeError as exc:
                dead.append((r.value, r.key, f"not OTLP {signal}: {exc}", source))
                continue
            out.extend(result.records)
            dead.extend((value, r.key, reason, source) for value, reason in result.invalid)
        await self.publisher.publish_raw(out)
        if dead:
            copies = (dead_letter_copy(*letter) for letter in dead)
            letters = ((key, value, headers) for value, key, headers in copies)
            dlq = self.settings.dlq_topic
            await asyncio.gather(*await send_batches(self._producer, dlq, letters))
        self.messages += len(records)
        self.dead_letters += len(dead)
