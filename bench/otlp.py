"""``agentstream bench --otlp``: spans per second through the OTLP receiver into Kafka.

One process, as the receiver runs in production: the receiver (aiohttp, the real
``OtlpReceiver``, publishing with ``Publisher`` to a real broker, acks=all) and a client
that posts ``--spans`` spans as OTLP/HTTP protobuf requests of ``--batch`` spans each (the
SDK's BatchSpanProcessor exports up to 512), ``--concurrency`` requests in flight. The
request bodies are built and encoded before the clock starts; the client's share of the CPU
is inside the figure. Each trace is what an instrumented agent emits: an ``invoke_agent``
span, three ``chat`` spans with token usage, a tool span, a retrieval span and an HTTP span
(skipped by the mapping), GenAI attribute names throughout.

``spans_per_s`` = spans posted / time from the first request to the last 200 answer (every
event of every request acknowledged by Kafka). ``events_per_s`` counts published events (a
task span is two events, an HTTP span none). ``spans_per_cpu_s`` divides by the CPU time
of this process instead, which a busy machine does not lower.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any, Final

import aiohttp
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from pipeline.broker import LocalBroker, free_port
from pipeline.config import Settings
from pipeline.kafka import ensure_pipeline_topics
from pipeline.otel.receiver import OtlpReceiver
from pipeline.publisher import Publisher

SPANS_PER_TRACE: Final = 7


def _kv(key: str, value: Any) -> KeyValue:
    if isinstance(value, bool):
        v = AnyValue(bool_value=value)
    elif isinstance(value, int):
        v = AnyValue(int_value=value)
    elif isinstance(value, float):
        v = AnyValue(double_value=value)
    else:
        v = AnyValue(string_value=str(value))
    return KeyValue(key=key, value=v)


def _span(trace: bytes, n: int, parent: int, name: str, start: int, attrs: dict[str, Any]) -> Span:
    return Span(
        trace_id=trace,
        span_id=n.to_bytes(8, "big"),
        parent_span_id=parent.to_bytes(8, "big") if parent else b"",
        name=name,
        kind=Span.SPAN_KIND_CLIENT,
        start_time_unix_nano=start,
        end_time_unix_nano=start + 850_000_000,
        attributes=[_kv(k, v) for k, v in attrs.items()],
    )


def trace_spans(t: int, now_ns: int) -> list[Span]:
    """The seven spans of one agent run (trace number ``t``)."""
    trace = uuid.uuid5(uuid.NAMESPACE_OID, f"bench-{t}").bytes
    root = t * 16 + 1
    start = now_ns - 60_000_000_000 + (t % 50_000) * 1_000_000
    chat = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
        "gen_ai.usage.input_tokens": 1200 + t % 300,
        "gen_ai.usage.output_tokens": 150 + t % 50,
        "gen_ai.request.temperature": 0.2,
        "server.address": "api.openai.com",
    }
    return [
        _span(trace, root, 0, "invoke_agent support", start, {
            "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "support",
            "gen_ai.agent.version": "v3", "agentstream.tenant.id": f"tenant-{t % 20}",
        }),
        *(_span(trace, root + 1 + i, root, "chat gpt-4o-mini", start + i, chat) for i in range(3)),
        _span(trace, root + 4, root, "execute_tool lookup_order", start + 4, {
            "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "lookup_order",
            "gen_ai.tool.call.id": f"call-{t}",
        }),
        _span(trace, root + 5, root, "retrieval kb", start + 5, {
            "gen_ai.operation.name": "retrieval", "gen_ai.data_source.id": "kb",
            "agentstream.retrieval.hits": 3, "agentstream.retrieval.top_score": 0.8,
        }),
        _span(trace, root + 6, root + 4, "GET /orders", start + 6, {
            "http.request.method": "GET", "url.full": "https://orders.internal/orders/1",
        }),
    ]  # fmt: skip


def bodies(spans: int, batch: int) -> list[bytes]:
    """Encoded ExportTraceServiceRequest bodies of ``batch`` spans, ``spans`` in all."""
    now = time.time_ns()
    out: list[bytes] = []
    pending: list[Span] = []
    t = 0
    total = 0
    while total < spans:
        for s in trace_spans(t, now)[: spans - total]:
            pending.append(s)
            total += 1
        t += 1
        if len(pending) >= batch or total == spans:
            out.append(_request(pending[:batch]))
            pending = pending[batch:]
    if pending:
        out.append(_request(pending))
    return out


def _request(spans: list[Span]) -> bytes:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.append(_kv("service.name", "support-bot"))
    rs.resource.attributes.append(_kv("service.version", "1.4.2"))
    rs.scope_spans.add().spans.extend(spans)
    body: bytes = req.SerializeToString()
    return body


async def _run(settings: Settings, payloads: list[bytes], concurrency: int) -> dict[str, Any]:
    async with Publisher(settings) as publisher:
        receiver = OtlpReceiver(publisher, max_pending=concurrency + 1)
        runner = receiver.runner()
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        url = f"http://127.0.0.1:{port}/v1/traces"
        queue = list(reversed(payloads))
        statuses: dict[int, int] = {}
        try:
            async with aiohttp.ClientSession() as session:

                async def client() -> None:
                    while queue:
                        body = queue.pop()
                        async with session.post(
                            url, data=body, headers={"Content-Type": "application/x-protobuf"}
                        ) as resp:
                            await resp.read()
                            statuses[resp.status] = statuses.get(resp.status, 0) + 1

                started = time.perf_counter()
                cpu = time.process_time()
                await asyncio.gather(*(client() for _ in range(concurrency)))
                elapsed = time.perf_counter() - started
                cpu = time.process_time() - cpu
        finally:
            await runner.cleanup()
        return {
            "seconds": elapsed,
            "cpu_seconds": cpu,
            "statuses": statuses,
            "accepted": receiver.metrics.count("traces", "accepted"),
            "skipped": receiver.metrics.count("traces", "skipped"),
            "events": publisher.published,
        }


def run(spans: int, batch: int, concurrency: int, broker: str | None) -> dict[str, Any]:
    """One measurement; starts a local Apache Kafka unless ``broker`` is given."""
    local = None
    if broker is None:
        local = LocalBroker("kafka")
        broker = local.start(timeout=120)
    try:
        tag = uuid.uuid4().hex[:8]
        settings = Settings.load(
            env={},
            broker=broker,
            events_topic=f"bench-otlp-{tag}",
            dlq_topic=f"bench-otlp-{tag}-dlq",
            metrics_topic=f"bench-otlp-{tag}-metrics",
            anomalies_topic=f"bench-otlp-{tag}-anomalies",
            verdicts_topic=f"bench-otlp-{tag}-verdicts",
        )
        ensure_pipeline_topics(settings)
        payloads = bodies(spans, batch)
        result = asyncio.run(_run(settings, payloads, concurrency))
    finally:
        if local is not None:
            local.stop()
    seconds = result["seconds"]
    return {
        "spans": spans,
        "batch": batch,
        "concurrency": concurrency,
        "requests": len(payloads),
        "bytes_per_span": round(sum(map(len, payloads)) / spans, 1),
        "spans_per_s": round(spans / seconds),
        # The machine may be shared: spans per second of this process's own CPU time says
        # what the receiver does with a core to itself (the broker runs apart).
        "spans_per_cpu_s": round(spans / result["cpu_seconds"]),
        "events_per_s": round(result["events"] / seconds),
        **result,
        "cores": os.cpu_count(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``agentstream bench --otlp [--spans N] [--batch B] [--concurrency C] [--broker URL] [--json]``."""
    p = argparse.ArgumentParser(prog="agentstream bench --otlp", description=__doc__.split("\n")[0])
    p.add_argument("--spans", type=int, default=200_000, help="spans to send [%(default)s]")
    p.add_argument("--batch", type=int, default=512, help="spans per request [%(default)s]")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight [%(default)s]")
    p.add_argument("--broker", default=None, help="use this broker instead of a local Kafka")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    if a.spans < 1 or a.batch < 1 or a.concurrency < 1:
        p.error("--spans, --batch and --concurrency must be positive")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    result = run(a.spans, a.batch, a.concurrency, a.broker)
    if a.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['spans_per_s']:,} spans/s ({result['events_per_s']:,} events/s) through the "
            f"OTLP receiver into Kafka: {a.spans:,} spans in {result['requests']} requests of "
            f"{a.batch}, {a.concurrency} in flight, {result['seconds']:.2f} s "
            f"({result['spans_per_cpu_s']:,} spans per CPU second of this process); "
            f"answers {result['statuses']}"
        )
    return 0 if set(result["statuses"]) == {200} else 1


if __name__ == "__main__":
    sys.exit(main())
