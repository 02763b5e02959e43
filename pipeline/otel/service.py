"""``agentstream otlp``: the receiver and the Kafka source in one process, until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

from pipeline.config import Settings
from pipeline.listen import listen
from pipeline.otel.kafka_source import KafkaSource
from pipeline.otel.receiver import OtlpReceiver
from pipeline.publisher import Publisher


async def serve(
    settings: Settings,
    host: str,
    port: int,
    kafka_topic: str | None,
    *,
    max_body_bytes: int,
    kafka_logs_topic: str | None = None,
) -> None:
    """Serve OTLP/HTTP on ``host:port`` (and consume ``kafka_topic``, traces, and
    ``kafka_logs_topic``, logs, unless ``kafka_topic`` is None) until a
    SIGTERM or SIGINT; then stop taking requests, finish the ones in flight, disconnect."""
    async with Publisher(settings) as publisher:
        receiver = OtlpReceiver(publisher, max_body_bytes=max_body_bytes)
        runner = receiver.runner(shutdown_timeout=15)
        await runner.setup()
        source: KafkaSource | None = None
        task: asyncio.Task[None] | None = None
        # Before listening: /health answers as soon as the server is up, and a SIGTERM from
        # then on (while the Kafka source is still joining its group) must stop it cleanly,
        # not kill it by default.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await listen(runner, host, port)
            if kafka_topic is not None:
                source = KafkaSource(settings, publisher, kafka_topic, kafka_logs_topic)
                await source.start()
                task = asyncio.create_task(source.run())
            topics = ", ".join(t for t in (kafka_topic, kafka_logs_topic) if t)
            where = f", reading Kafka {topics}" if kafka_topic else ""
            print(
                f"OTLP/HTTP on http://{host}:{port} (/v1/traces, /v1/logs){where}", file=sys.stderr
            )
            waiter = asyncio.create_task(stop.wait())
            watched = {waiter} | ({task} if task else set())
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                task.result()  # the source failed: raise its error
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if source is not None:
                await source.stop()
            await runner.cleanup()
