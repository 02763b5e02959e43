"""OTLP bodies -> plain spans and log records, from protobuf or from OTLP/JSON.

Both encodings come out as the same ``Span`` and ``LogRecord`` structs, so the mapping never
knows which one arrived. Protobuf is parsed by ``opentelemetry-proto`` (upb, in C); OTLP/JSON
is decoded by msgspec into typed structs, since protobuf's own ``json_format`` expects base64
ids where OTLP/JSON writes hex, and int64 values as strings are accepted by both.

A body that cannot be parsed at all raises ``OtlpDecodeError`` with the reason (the receiver
answers 400, the Kafka source dead-letters the message). Anything smaller is not an error
here: a span without valid ids comes out with an empty id (the mapping rejects it, counted),
an attribute of an unknown type is left out (OTLP says unknown fields are ignored).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator
from typing import Any, Final, Literal, TypeVar

import msgspec
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

Encoding = Literal["proto", "json"]
Wanted = tuple[frozenset[str], tuple[str, ...]]
STATUS_ERROR: Final = 2  # Status.StatusCode.STATUS_CODE_ERROR
_UNSET: Final = object()


class OtlpDecodeError(ValueError):
    """The body is not an OTLP message in the encoding it claims."""


class Span(msgspec.Struct, gc=False):
    """One span, ids as lowercase hex ("" when missing or malformed), times in ns since epoch."""

    trace_id: str
    span_id: str
    parent_id: str
    name: str
    start_ns: int
    end_ns: int
    error: bool
    attrs: dict[str, Any]
    resource: dict[str, Any]
    exception_type: str | None = None


class LogRecord(msgspec.Struct, gc=False):
    """One log record (evaluation results, guardrail decisions arrive this way)."""

    trace_id: str
    span_id: str
    time_ns: int
    event_name: str
    attrs: dict[str, Any]
    resource: dict[str, Any]


def sniff(body: bytes) -> Encoding:
    """JSON when the body starts with ``{`` (after whitespace), else protobuf.

    For Kafka messages, which carry no content type: a protobuf message whose first field
    is ``resource_spans`` starts with byte 0x0A, never with ``{``.
    """
    return "json" if body.lstrip()[:1] == b"{" else "proto"


def decode_traces(body: bytes, encoding: Encoding, wanted: Wanted | None = None) -> list[Span]:
    """Every span of an ``ExportTraceServiceRequest`` (or the Collector's ``TracesData``).

    ``wanted``: (names, prefixes) of the span attributes the caller reads. From protobuf,
    other attributes are not converted at all (instrumentations attach dozens: prompts,
    messages, HTTP details), which is most of the decoding time.
    """
    if encoding == "json":
        return list(_json_spans(_json(body, _JsonTraces)))
    return list(_proto_spans(_proto(body, ExportTraceServiceRequest), wanted))


def decode_logs(body: bytes, encoding: Encoding) -> list[LogRecord]:
    """Every record of an ``ExportLogsServiceRequest`` (or the Collector's ``LogsData``)."""
    if encoding == "json":
        return list(_json_logs(_json(body, _JsonLogs)))
    return list(_proto_logs(_proto(body, ExportLogsServiceRequest)))


def _proto(body: bytes, message: Any) -> Any:
    try:
        return message.FromString(body)
    except (DecodeError, RecursionError) as exc:
        raise OtlpDecodeError(f"malformed protobuf: {exc or 'cannot parse'}") from None


# --- protobuf ------------------------------------------------------------------------------


def _proto_value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "string_value":
        return v.string_value
    if kind is None:
        return _UNSET
    if kind == "array_value":
        return [x for x in map(_proto_value, v.array_value.values) if x is not _UNSET]
    if kind == "kvlist_value":
        return _proto_attrs(v.kvlist_value.values)
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind)


def _proto_attrs(kvs: Any, wanted: Wanted | None = None) -> dict[str, Any]:
    # Inlined scalar cases: this loop runs for every attribute of every span.
    out: dict[str, Any] = {}
    names, prefixes = wanted or (None, ())
    for kv in kvs:
        key = kv.key
        if names is not None and key not in names and not key.startswith(prefixes):
            continue
        v = kv.value
        kind = v.WhichOneof("value")
        if kind == "string_value":
            out[key] = v.string_value
        elif kind == "int_value":
            out[key] = v.int_value
        elif kind is not None:
            value = _proto_value(v)
            if value is not _UNSET:
                out[key] = value
    return out


_NO_ID: Final = {8: bytes(8), 16: bytes(16)}


def _proto_id(raw: bytes, size: int) -> str:
    return raw.hex() if len(raw) == size and raw != _NO_ID[size] else ""


def _proto_spans(request: Any, wanted: Wanted | None) -> Iterator[Span]:
    # Ids inlined (no _proto_id call): three per span, on the receiver's hot path.
    no_trace, no_span = _NO_ID[16], _NO_ID[8]
    for rs in request.resource_spans:
        resource = _proto_attrs(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                error = s.status.code == STATUS_ERROR
                tid, sid, pid = s.trace_id, s.span_id, s.parent_span_id
                yield Span(
                    tid.hex() if len(tid) == 16 and tid != no_trace else "",
                    sid.hex() if len(sid) == 8 and sid != no_span else "",
                    pid.hex() if len(pid) == 8 and pid != no_span else "",
                    s.name,
                    s.start_time_unix_nano,
                    s.end_time_unix_nano,
                    error,
                    _proto_attrs(s.attributes, wanted),
                    resource,
                    _proto_exception(s.events) if error else None,
                )


def _proto_exception(events: Any) -> str | None:
    for ev in events:
        if ev.name == "exception":
            kind = _proto_attrs(ev.attributes).get("exception.type")
            return str(kind) if kind is not None else None
    return None


def _proto_logs(request: Any) -> Iterator[LogRecord]:
    for rl in request.resource_logs:
        resource = _proto_attrs(rl.resource.attributes)
        for sl in rl.scope_logs:
            for r in sl.log_records:
                attrs = _proto_attrs(r.attributes)
                yield LogRecord(
                    _proto_id(r.trace_id, 16),
                    _proto_id(r.span_id, 8),
                    r.time_unix_nano or r.observed_time_unix_nano,
                    r.event_name or str(attrs.get("event.name", "")),
                    attrs,
                    resource,
                )


# --- OTLP/JSON -----------------------------------------------------------------------------
# Field names are lowerCamelCase; enums are integers; int64 values may be decimal strings.

Int64 = int | str


class _JArray(msgspec.Struct):
    values: list[_JValue] = []


class _JKvList(msgspec.Struct):
    values: list[_JKeyValue] = []


class _JValue(msgspec.Struct, rename="camel"):
    string_value: str | None = None
    bool_value: bool | None = None
    int_value: Int64 | None = None
    double_value: float | str | None = None
    array_value: _JArray | None = None
    kvlist_value: _JKvList | None = None
    bytes_value: str | None = None


class _JKeyValue(msgspec.Struct):
    key: str = ""  # proto3 JSON leaves out default values, the empty key included
    value: _JValue | None = None


class _JResource(msgspec.Struct):
    attributes: list[_JKeyValue] = []


class _JStatus(msgspec.Struct):
    code: int | str = 0


class _JEvent(msgspec.Struct):
    name: str = ""
    attributes: list[_JKeyValue] = []


class _JSpan(msgspec.Struct, rename="camel"):
    trace_id: str = ""
    span_id: str = ""
    parent_span_id: str = ""
    name: str = ""
    start_time_unix_nano: Int64 = 0
    end_time_unix_nano: Int64 = 0
    attributes: list[_JKeyValue] = []
    events: list[_JEvent] = []
    status: _JStatus | None = None


class _JScopeSpans(msgspec.Struct):
    spans: list[_JSpan] = []


class _JResourceSpans(msgspec.Struct, rename="camel"):
    resource: _JResource | None = None
    scope_spans: list[_JScopeSpans] = []


class _JsonTraces(msgspec.Struct, rename="camel"):
    resource_spans: list[_JResourceSpans] = []


class _JLogRecord(msgspec.Struct, rename="camel"):
    time_unix_nano: Int64 = 0
    observed_time_unix_nano: Int64 = 0
    trace_id: str = ""
    span_id: str = ""
    event_name: str = ""
    attributes: list[_JKeyValue] = []


class _JScopeLogs(msgspec.Struct, rename="camel"):
    log_records: list[_JLogRecord] = []


class _JResourceLogs(msgspec.Struct, rename="camel"):
    resource: _JResource | None = None
    scope_logs: list[_JScopeLogs] = []


class _JsonLogs(msgspec.Struct, rename="camel"):
    resource_logs: list[_JResourceLogs] = []


_JSON_DECODERS: dict[type, msgspec.json.Decoder[Any]] = {
    t: msgspec.json.Decoder(t) for t in (_JsonTraces, _JsonLogs)
}


T = TypeVar("T")


def _json(body: bytes, kind: type[T]) -> T:
    try:
        doc: T = _JSON_DECODERS[kind].decode(body)
    except msgspec.ValidationError as exc:
        raise OtlpDecodeError(f"not OTLP/JSON: {exc}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise OtlpDecodeError(f"malformed JSON: {exc}") from None
    except RecursionError:
        raise OtlpDecodeError("malformed JSON: nested too deeply") from None
    return doc


def _json_value(v: _JValue | None) -> Any:
    if v is None:
        return _UNSET
    if v.string_value is not None:
        return v.string_value
    if v.int_value is not None:
        return _int(v.int_value)
    if v.double_value is not None:
        try:
            return float(v.double_value)
        except ValueError:
            return _UNSET
    if v.bool_value is not None:
        return v.bool_value
    if v.array_value is not None:
        return [x for x in map(_json_value, v.array_value.values) if x is not _UNSET]
    if v.kvlist_value is not None:
        return _json_attrs(v.kvlist_value.values)
    if v.bytes_value is not None:
        return v.bytes_value
    return _UNSET


def _json_attrs(kvs: list[_JKeyValue]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kvs:
        value = _json_value(kv.value)
        if value is not _UNSET:
            out[kv.key] = value
    return out


def _int(value: int | str) -> Any:
    if isinstance(value, int):
        return value
    try:
        return int(value)
    except ValueError:
        return _UNSET


def _time(value: int | str) -> int:
    ns = _int(value)
    return ns if isinstance(ns, int) and ns >= 0 else 0


def _json_id(text: str, size: int) -> str:
    """Hex as OTLP/JSON writes it; base64 as protobuf's json_format writes it; else ""."""
    if len(text) == 2 * size:
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            return ""
    else:
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            return ""
    return _proto_id(raw, size)


def _json_status_error(status: _JStatus | None) -> bool:
    if status is None:
        return False
    return status.code in (STATUS_ERROR, "2", "STATUS_CODE_ERROR")


def _json_spans(doc: _JsonTraces) -> Iterator[Span]:
    for rs in doc.resource_spans:
        resource = _json_attrs(rs.resource.attributes) if rs.resource else {}
        for ss in rs.scope_spans:
            for s in ss.spans:
                error = _json_status_error(s.status)
                yield Span(
                    _json_id(s.trace_id, 16),
                    _json_id(s.span_id, 8),
                    _json_id(s.parent_span_id, 8),
                    s.name,
                    _time(s.start_time_unix_nano),
                    _time(s.end_time_unix_nano),
                    error,
                    _json_attrs(s.attributes),
                    resource,
                    _json_exception(s.events) if error else None,
                )


def _json_exception(events: list[_JEvent]) -> str | None:
    for ev in events:
        if ev.name == "exception":
            kind = _json_attrs(ev.attributes).get("exception.type")
            return str(kind) if kind is not None else None
    return None


def _json_logs(doc: _JsonLogs) -> Iterator[LogRecord]:
    for rl in doc.resource_logs:
        resource = _json_attrs(rl.resource.attributes) if rl.resource else {}
        for sl in rl.scope_logs:
            for r in sl.log_records:
                attrs = _json_attrs(r.attributes)
                yield LogRecord(
                    _json_id(r.trace_id, 16),
                    _json_id(r.span_id, 8),
                    _time(r.time_unix_nano) or _time(r.observed_time_unix_nano),
                    r.event_name or str(attrs.get("event.name", "")),
                    attrs,
                    resource,
                )
