"""OTLP/HTTP receiver: ``POST /v1/traces`` and ``POST /v1/logs`` -> events on Kafka.

Answers follow the OTLP/HTTP specification, so exporters retry exactly what may be retried:

- 200 once Kafka has acknowledged every event of the request, with ``partial_success``
  (how many spans or records were refused and the first reasons) when some were invalid;
- 400 for a body that is not OTLP (malformed protobuf or JSON, truncated gzip), 413 for one
  over ``max_body_bytes`` (compressed or not), 415 for another content type or encoding;
- 503 with ``Retry-After`` while Kafka does not acknowledge, 429 with ``Retry-After`` while
  more than ``max_pending`` requests are being processed.

The answer is in the request's encoding (protobuf or JSON); error bodies are a
``google.rpc.Status``. Every outcome is counted on ``/metrics`` (Prometheus); ``/health``
says whether the last publish reached Kafka.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from typing import Any, Final

import msgspec
from aiohttp import web
from aiokafka.errors import KafkaError
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from prometheus_client import CollectorRegistry, Counter, generate_latest

from pipeline.kafka import BrokerUnavailable
from pipeline.otel.decode import Encoding, OtlpDecodeError
from pipeline.otel.ingest import Converted, Signal, convert
from pipeline.publisher import Publisher

log = logging.getLogger("agentstream.otlp")

MAX_BODY_BYTES: Final = 20 << 20  # the OTLP specification's recommended minimum to accept
CONTENT_TYPES: Final[dict[str, Encoding]] = {
    "application/x-protobuf": "proto",
    "application/protobuf": "proto",
    "application/json": "json",
}
_CHUNK: Final = 1 << 16
_THREAD_BYTES: Final = 1 << 20
_GRPC_INVALID_ARGUMENT: Final = 3
_GRPC_UNAVAILABLE: Final = 14
_GRPC_RESOURCE_EXHAUSTED: Final = 8


class _Refused(Exception):
    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


class ReceiverMetrics:
    """Counters of the receiver, on a registry of its own (several receivers per process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "agentstream_otlp_requests",
            "OTLP requests by signal and status",
            ["signal", "status"],
            registry=self.registry,
        )
        self.items = Counter(
            "agentstream_otlp_items",
            "Spans and log records by outcome (accepted, rejected, skipped)",
            ["signal", "outcome"],
            registry=self.registry,
        )
        self.events = Counter(
            "agentstream_otlp_events_published", "Events published to Kafka", registry=self.registry
        )

    def count(self, signal: str, outcome: str) -> float:
        """The value of an item counter (tests and the bench read it)."""
        return float(self.items.labels(signal, outcome)._value.get())


class OtlpReceiver:
    """The aiohttp application; publishes through ``publisher`` (started by the caller)."""

    def __init__(
        self,
        publisher: Publisher,
        *,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_pending: int = 64,
        publish_timeout_s: float = 10.0,
        retry_after_s: int = 2,
    ) -> None:
        self.publisher = publisher
        self.max_body_bytes = max_body_bytes
        self.max_pending = max_pending
        self.publish_timeout_s = publish_timeout_s
        self.retry_after_s = retry_after_s
        self.metrics = ReceiverMetrics()
        self.kafka_ok = True
        self._pending = 0

    def app(self) -> web.Application:
        """The routes: the two OTLP endpoints, ``/health`` and ``/metrics``."""
        app = web.Application(client_max_size=self.max_body_bytes + 1)
        app.router.add_post("/v1/traces", self._traces)
        app.router.add_post("/v1/logs", self._logs)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        return app

    def runner(self, **kwargs: Any) -> web.AppRunner:
        """An ``AppRunner`` for ``app()`` that leaves gzip to the receiver, which bounds the
        inflated size and answers a truncated stream with 400."""
        return web.AppRunner(self.app(), auto_decompress=False, access_log=None, **kwargs)

    async def _traces(self, request: web.Request) -> web.Response:
        return await self._export(request, "traces")

    async def _logs(self, request: web.Request) -> web.Response:
        return await self._export(request, "logs")

    async def _export(self, request: web.Request, signal: Signal) -> web.Response:
        encoding: Encoding = "proto"
        try:
            encoding = self._encoding(request)
            if self._pending >= self.max_pending:
                raise _Refused(429, "receiver saturated: retry later", self.retry_after_s)
            self._pending += 1
            try:
                body = await self._body(request)
                result = await self._convert(body, encoding, signal)
                await self._publish(result)
            finally:
                self._pending -= 1
        except _Refused as refused:
            self.metrics.requests.labels(signal, str(refused.status)).inc()
            if refused.status != 429:
                log.info(
                    "refused an OTLP %s request (%d): %s", signal, refused.status, refused.message
                )
            return _status_response(refused, encoding)
        self.metrics.requests.labels(signal, "200").inc()
        items = self.metrics.items
        items.labels(signal, "accepted").inc(result.total - result.rejected - result.skipped)
        items.labels(signal, "rejected").inc(result.rejected)
        items.labels(signal, "skipped").inc(result.skipped)
        self.metrics.events.inc(len(result.records))
        return _success(signal, encoding, result)

    def _encoding(self, request: web.Request) -> Encoding:
        encoding = CONTENT_TYPES.get(request.content_type)
        if encoding is None:
            raise _Refused(
                415,
                f"unsupported content type {request.content_type!r}: send application/x-protobuf "
                "or application/json",
            )
        return encoding

    async def _body(self, request: web.Request) -> bytes:
        limit = self.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise _Refused(
                413, f"body of {request.content_length} bytes exceeds the {limit}-byte limit"
            )
        chunks: list[bytes] = []
        size = 0
        while chunk := await request.content.read(_CHUNK):
            size += len(chunk)
            if size > limit:
                raise _Refused(413, f"body exceeds the {limit}-byte limit")
            chunks.append(chunk)
        body = b"".join(chunks)
        coding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if coding == "gzip":
            return _gunzip(body, limit)
        if coding not in ("identity", ""):
            raise _Refused(415, f"unsupported Content-Encoding {coding!r}: use gzip or none")
        return body

    async def _convert(self, body: bytes, encoding: Encoding, signal: Signal) -> Converted:
        try:
            if len(body) < _THREAD_BYTES:
                return convert(body, encoding, signal)
            # A big body takes seconds: in a thread, /health and small requests still answer.
            return await asyncio.to_thread(convert, body, encoding, signal)
        except OtlpDecodeError as exc:
            raise _Refused(400, str(exc)) from None

    async def _publish(self, result: Converted) -> None:
        if not result.records:
            return
        try:
            await asyncio.wait_for(
                self.publisher.publish_raw(result.records), self.publish_timeout_s
            )
        except (BrokerUnavailable, KafkaError, TimeoutError) as exc:
            self.kafka_ok = False
            # Events sent before the failure may land; the retried request repeats them with
            # the same event ids, and the worker lands each id once.
            raise _Refused(
                503, f"Kafka did not acknowledge the events: {exc or 'timeout'}", self.retry_after_s
            ) from None
        self.kafka_ok = True

    async def _health(self, request: web.Request) -> web.Response:
        status = 200 if self.kafka_ok else 503
        return web.json_response(
            {"status": "ok" if self.kafka_ok else "kafka unreachable"}, status=status
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), content_type="text/plain")


def _gunzip(body: bytes, limit: int) -> bytes:
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise _Refused(400, f"bad gzip body: {exc}") from None
    if len(out) > limit:
        raise _Refused(413, f"body exceeds the {limit}-byte limit once decompressed")
    if not inflater.eof:
        raise _Refused(400, "bad gzip body: truncated")
    return out


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


_GRPC_CODES: Final = {429: _GRPC_RESOURCE_EXHAUSTED, 503: _GRPC_UNAVAILABLE}


def _status_response(refused: _Refused, encoding: Encoding) -> web.Response:
    """A ``google.rpc.Status`` body (code, message) in the request's encoding."""
    code = _GRPC_CODES.get(refused.status, _GRPC_INVALID_ARGUMENT)
    headers = {"Retry-After": str(refused.retry_after)} if refused.retry_after is not None else {}
    if encoding == "json":
        body = msgspec.json.encode({"code": code, "message": refused.message})
        content_type = "application/json"
    else:
        text = refused.message.encode()
        body = b"\x08" + _varint(code) + b"\x12" + _varint(len(text)) + text
        content_type = "application/x-protobuf"
    return web.Response(
        status=refused.status, body=body, content_type=content_type, headers=headers
    )


def _success(signal: Signal, encoding: Encoding, result: Converted) -> web.Response:
    noun = "spans" if signal == "traces" else "log records"
    message = result.message(noun)
    if encoding == "json":
        doc: dict[str, Any] = {}
        if result.rejected:
            key = "rejectedSpans" if signal == "traces" else "rejectedLogRecords"
            doc["partialSuccess"] = {key: str(result.rejected), "errorMessage": message}
        return web.Response(body=msgspec.json.encode(doc), content_type="application/json")
    response: Any = (
        ExportTraceServiceResponse() if signal == "traces" else ExportLogsServiceResponse()
    )
    if result.rejected:
        partial = response.partial_success
        if signal == "traces":
            partial.rejected_spans = result.rejected
        else:
            partial.rejected_log_records = result.rejected
        partial.error_message = message
    return web.Response(body=response.SerializeToString(), content_type="application/x-protobuf")
