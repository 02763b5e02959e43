"""The OTLP decoder and the span -> event mapping, as pure functions (no broker)."""

from __future__ import annotations

import base64
import contextlib
import json
import re
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from google.protobuf.json_format import MessageToDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from pipeline import schema
from pipeline.otel import mapping
from pipeline.otel.decode import LogRecord, OtlpDecodeError, Span, decode_traces, sniff
from pipeline.otel.ingest import convert, validate
from pipeline.otel.mapping import classify, map_logs, map_spans, readme_tables

README = Path(__file__).resolve().parents[1] / "README.md"
TRACE = "0af7651916cd43dd8448eb211c80319c"
NOW = time.time_ns()


def span(
    span_id: str = "b7ad6b7169203331",
    parent: str = "",
    *,
    trace: str = TRACE,
    error: bool = False,
    resource: dict[str, Any] | None = None,
    **attrs: Any,
) -> Span:
    return Span(
        trace, span_id, parent, "s", NOW - 2_000_000_000, NOW - 1_500_000_000, error,
        {k.replace("__", "."): v for k, v in attrs.items()}, resource or {"service.name": "svc"},
    )  # fmt: skip


def events(*spans: Span) -> list[dict[str, Any]]:
    """The validated events, as the worker would decode them."""
    out = validate(map_spans(spans))
    assert out.rejected == 0, out.reasons
    return [msgspec.to_builtins(schema.decode(v)) for _, v in out.records]


# --- the README's table is the mapping -----------------------------------------------------


def test_readme_mapping_tables_are_generated_from_the_mapping_module() -> None:
    text = README.read_text(encoding="utf-8")
    assert readme_tables() in text, "README's OTLP mapping tables differ: paste readme_tables()"


def test_schema_otel_names_agree_with_the_mapping() -> None:
    names = {**mapping.CONTEXT, **mapping.FIELDS, **mapping.EVALUATION, **mapping.FEEDBACK}
    checked = 0
    for field, described in schema.OTEL_NAMES.items():
        primary = described.split()[0]
        if field in names and "." in primary:
            assert primary in names[field], (field, primary, names[field])
            checked += 1
    assert checked >= 20


# --- which span becomes which event ----------------------------------------------------------


@pytest.mark.parametrize(
    ("attrs", "kind"),
    [
        ({"gen_ai.operation.name": "chat", "gen_ai.request.model": "m"}, "llm_call"),
        ({"gen_ai.operation.name": "embeddings"}, "llm_call"),
        ({"gen_ai.operation.name": "execute_tool"}, "tool_call"),
        ({"gen_ai.operation.name": "invoke_agent", "gen_ai.request.model": "m"}, "task"),
        ({"gen_ai.operation.name": "create_agent", "gen_ai.request.model": "m"}, None),
        ({"openinference.span.kind": "LLM"}, "llm_call"),
        ({"openinference.span.kind": "retriever"}, "retrieval"),
        ({"openinference.span.kind": "CHAIN", "llm.model_name": "m"}, None),
        ({"traceloop.span.kind": "tool"}, "tool_call"),
        ({"traceloop.span.kind": "workflow"}, "task"),
        ({"gen_ai.system": "openai", "gen_ai.request.model": "m"}, "llm_call"),  # OpenLLMetry
        ({"tool.name": "search"}, "tool_call"),
        ({"agentstream.event.type": "escalation"}, "escalation"),
        ({"agentstream.event.type": "teleport"}, None),
        ({"http.request.method": "GET"}, None),
        ({"db.system": "postgresql", "db.query.text": "SELECT 1"}, None),
    ],
)
def test_classify(attrs: dict[str, Any], kind: str | None) -> None:
    assert classify(attrs) == kind


def test_types_that_arrive_as_log_records_are_not_span_types() -> None:
    # evaluation results and feedback come as log records: a span claiming to be one is not
    # built as one (there is no span builder for them)
    for claimed in ("evaluation", "feedback"):
        assert classify({"agentstream.event.type": claimed}) is None


def test_each_vocabulary_gives_the_same_model_call() -> None:
    genai = span(
        "0000000000000001",
        gen_ai__operation__name="chat", gen_ai__provider__name="openai",
        gen_ai__request__model="gpt-4o", gen_ai__usage__input_tokens=120,
        gen_ai__usage__output_tokens=30, gen_ai__usage__cache_read__input_tokens=20,
        gen_ai__usage__reasoning__output_tokens=5,
    )  # fmt: skip
    deprecated = span(
        "0000000000000002",
        gen_ai__system="openai", gen_ai__request__model="gpt-4o",
        gen_ai__usage__prompt_tokens=120, gen_ai__usage__completion_tokens=30,
        gen_ai__usage__cache_read_input_tokens=20,
        llm__token_count__completion_details__reasoning=5,
    )  # fmt: skip
    openinference = span(
        "0000000000000003",
        openinference__span__kind="LLM", llm__system="openai", llm__model_name="gpt-4o",
        llm__token_count__prompt=120, llm__token_count__completion=30,
        llm__token_count__prompt_details__cache_read=20,
        llm__token_count__completion_details__reasoning=5,
    )  # fmt: skip
    got = events(genai, deprecated, openinference)
    keys = ("type", "model", "provider", "input_tokens", "output_tokens", "cached_input_tokens",
            "reasoning_output_tokens", "agent_id", "task_id", "trace_id", "latency_ms")  # fmt: skip
    first = {k: got[0][k] for k in keys}
    assert first == {
        "type": "llm_call", "model": "gpt-4o", "provider": "openai", "input_tokens": 120,
        "output_tokens": 30, "cached_input_tokens": 20, "reasoning_output_tokens": 5,
        "agent_id": "svc", "task_id": TRACE, "trace_id": TRACE, "latency_ms": 500.0,
    }  # fmt: skip
    assert all({k: e[k] for k in keys} == first for e in got)
    assert [e["event_id"] for e in got] == [f"otel:{TRACE}:000000000000000{i}" for i in (1, 2, 3)]


def test_agent_tokens_are_not_counted_and_identity_is_inherited_within_an_export() -> None:
    root = span(
        "00000000000000aa",
        gen_ai__operation__name="invoke_agent", gen_ai__agent__name="planner",
        gen_ai__agent__version="v2", agentstream__tenant__id="acme",
        gen_ai__usage__input_tokens=999, gen_ai__usage__output_tokens=999,
    )  # fmt: skip
    sub = span("00000000000000bb", "00000000000000aa", gen_ai__operation__name="invoke_agent")
    call = span(
        "00000000000000cc", "00000000000000bb",
        gen_ai__operation__name="chat", gen_ai__request__model="m",
        gen_ai__usage__input_tokens=10, gen_ai__usage__output_tokens=2,
    )  # fmt: skip
    mapped = map_spans([call, sub, root])  # children first, as exports often are
    assert mapped.skipped == 1  # the sub-agent belongs to the planner's task
    got = events(call, sub, root)
    assert [(e["type"], e.get("outcome")) for e in got] == [
        ("llm_call", None), ("task", "started"), ("task", "completed"),
    ]  # fmt: skip
    assert sum(e.get("input_tokens", 0) for e in got) == 10
    assert {(e["agent_id"], e["agent_version"], e["tenant_id"]) for e in got} == {
        ("planner", "v2", "acme")
    }


def test_parent_cycles_and_self_parents_end() -> None:
    a = span("000000000000000a", "000000000000000b", gen_ai__request__model="m")
    b = span("000000000000000b", "000000000000000a", gen_ai__request__model="m")
    c = span("000000000000000c", "000000000000000c", gen_ai__operation__name="invoke_agent")
    assert len(map_spans([a, b, c]).events) == 4


def test_tool_retrieval_guardrail_escalation_fields() -> None:
    got = events(
        span("0000000000000001", error=True, gen_ai__operation__name="execute_tool", gen_ai__tool__name="db"),
        span(
            "0000000000000002", openinference__span__kind="RETRIEVER",
            retrieval__documents__0__document__score=0.4, retrieval__documents__1__document__score=0.9,
            retrieval__documents__1__document__id="d1", input__value="refund policy",
        ),
        span(
            "0000000000000003", gen_ai__operation__name="retrieval", gen_ai__data_source__id="kb",
            gen_ai__retrieval__documents=json.dumps([{"id": "a", "score": 0.2}]),
        ),
        span("0000000000000004", gen_ai__operation__name="retrieval"),
        span(
            "0000000000000005", gen_ai__operation__name="apply_guardrail",
            gen_ai__guardrail__policy__id="pii", gen_ai__guardrail__result__type="blocked",
            gen_ai__guardrail__result__reason="email address",
        ),
        span("0000000000000006", agentstream__event__type="escalation", agentstream__escalation__reason="angry"),
    )  # fmt: skip
    tool, oi, genai, empty, guard, esc = got
    assert (tool["tool_name"], tool["status"]) == ("db", "error")
    assert (oi["hits"], oi["top_score"], oi["query"], oi["miss"]) == (
        2,
        0.9,
        "refund policy",
        False,
    )
    assert (genai["hits"], genai["top_score"], genai["data_source"]) == (1, 0.2, "kb")
    assert (empty["hits"], empty["miss"]) == (0, True)
    assert (guard["policy_id"], guard["action"], guard["reason"]) == (
        "pii",
        "block",
        "email address",
    )
    assert (esc["type"], esc["reason"], esc["target"]) == ("escalation", "angry", "human")


def test_invalid_values_are_rejected_with_the_field_and_the_rest_kept() -> None:
    ok = span("0000000000000001", gen_ai__request__model="m", gen_ai__usage__input_tokens="12")
    words = span("0000000000000002", gen_ai__request__model="m", gen_ai__usage__input_tokens="lots")
    negative = span("0000000000000003", gen_ai__request__model="m", gen_ai__usage__output_tokens=-1)
    old = span("0000000000000004", gen_ai__request__model="m")
    old.start_ns = 0
    no_ids = span("", gen_ai__request__model="m")
    http = span("0000000000000005", http__route="/x")
    out = validate(map_spans([ok, words, negative, old, no_ids, http]))
    assert (len(out.records), out.rejected, out.skipped, out.total) == (1, 4, 1, 6)
    assert msgspec.json.decode(out.records[0][1])["input_tokens"] == 12
    text = out.message("spans")
    assert text.startswith("4 of 6 spans rejected: ")
    assert "$.input_tokens" in text and "$.output_tokens" in text  # the first 3 reasons
    assert [reason.split(" - at ")[-1] for _, reason in out.invalid] == [
        "`$.input_tokens`", "`$.output_tokens`", "`$.ts`",
    ]  # fmt: skip


def record(
    event_name: str = "gen_ai.evaluation.result",
    span_id: str = "b7ad6b7169203331",
    *,
    trace: str = TRACE,
    **attrs: Any,
) -> LogRecord:
    return LogRecord(
        trace, span_id, NOW - 1_000_000_000, event_name,
        {k.replace("__", "."): v for k, v in attrs.items()},
        {"service.name": "support-bot", "service.version": "v4"},
    )  # fmt: skip


def test_evaluation_results_become_evaluation_events_of_the_evaluated_span() -> None:
    out = validate(
        map_logs(
            [
                record(
                    gen_ai__evaluation__name="hallucination", gen_ai__evaluation__score__value=0.2,
                    gen_ai__evaluation__score__label="Fail", gen_ai__request__model="gpt-4o-mini",
                    gen_ai__evaluation__explanation="cites a refund policy that does not exist",
                    agentstream__prompt__version="p12",
                ),
                record(
                    span_id="0000000000000002", gen_ai__evaluation__name="tone",
                    gen_ai__evaluation__score__label="polite", agentstream__evaluation__passed=True,
                    agentstream__evaluation__evaluator__kind="human", agentstream__evaluation__scope="task",
                    agentstream__task__id="task-9", agentstream__evaluation__suite__id="regress-1",
                    agentstream__evaluation__case__id="case-3",
                ),
                record(span_id="", trace="", gen_ai__evaluation__name="relevance",
                       gen_ai__evaluation__score__value="4", gen_ai__conversation__id="s-1"),
                record(gen_ai__evaluation__name="accuracy", error__type="timeout"),  # no result
                record("app.log", message="hello"),
            ]
        )
    )  # fmt: skip
    assert (out.rejected, out.skipped, out.total) == (0, 2, 5), out.reasons
    got = [msgspec.to_builtins(schema.decode(v)) for _, v in out.records]
    judged, tone, relevance = got
    assert {k: judged.get(k) for k in (
        "type", "evaluator", "score", "label", "passed", "evaluator_kind", "scope", "trace_id",
        "span_id", "task_id", "model", "agent_id", "agent_version", "prompt_version", "explanation",
    )} == {
        "type": "evaluation", "evaluator": "hallucination", "score": 0.2, "label": "Fail",
        "passed": False, "evaluator_kind": "llm_judge", "scope": "span", "trace_id": TRACE,
        "span_id": "b7ad6b7169203331", "task_id": TRACE, "model": "gpt-4o-mini",
        "agent_id": "support-bot", "agent_version": "v4", "prompt_version": "p12",
        "explanation": "cites a refund policy that does not exist",
    }  # fmt: skip
    assert (
        judged["event_id"]
        == f"otel:{TRACE}:b7ad6b7169203331:gen_ai.evaluation.result:hallucination"
    )
    assert (tone["passed"], tone["label"], tone["evaluator_kind"], tone["scope"]) == (
        True, "polite", "human", "task",
    )  # fmt: skip
    assert (tone["task_id"], tone["suite_id"], tone["case_id"]) == ("task-9", "regress-1", "case-3")
    # No trace: the session named by the record is what was judged; a label that is not a
    # pass/fail word decides nothing.
    assert (relevance["scope"], relevance["session_id"], relevance["score"]) == (
        "session",
        "s-1",
        4.0,
    )
    assert relevance["passed"] is None and relevance["event_id"].startswith("otel:log:")


def test_feedback_log_records_and_unjudged_evaluations() -> None:
    out = validate(
        map_logs(
            [
                record("agentstream.feedback", agentstream__feedback__rating=2,
                       agentstream__feedback__correction="the order shipped on Monday"),
                # a rating sent as an evaluation result is still a user's rating
                record(span_id="0000000000000002", gen_ai__evaluation__name="user",
                       agentstream__feedback__rating=5),
                record(span_id="0000000000000003", gen_ai__evaluation__name="tone"),  # no result
                record(span_id="", trace="", gen_ai__evaluation__name="tone",
                       gen_ai__evaluation__score__value=1.0),  # nothing evaluated named
            ]
        )
    )  # fmt: skip
    assert (len(out.records), out.rejected, out.skipped) == (2, 2, 0)
    got = [msgspec.to_builtins(schema.decode(v)) for _, v in out.records]
    assert [(e["type"], e["rating"], e.get("correction")) for e in got] == [
        ("feedback", 2, "the order shipped on Monday"),
        ("feedback", 5, None),
    ]
    assert [r.split(" - at ")[-1] for r in out.reasons] == ["`$.score`", "`$.task_id`"]


# --- decoding ---------------------------------------------------------------------------------


def test_otlp_json_hex_ids_int64_strings_and_base64_ids_decode_alike() -> None:
    doc = {
        "resourceSpans": [{
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "a"}}]},
            "scopeSpans": [{"spans": [
                {"traceId": TRACE, "spanId": "b7ad6b7169203331", "startTimeUnixNano": "1700000000000000000",
                 "attributes": [{"key": "n", "value": {"intValue": "42"}},
                                {"key": "x", "value": {"doubleValue": "NaN"}},
                                {"key": "odd", "value": {"mystery": 1}},
                                {"key": "l", "value": {"arrayValue": {"values": [{"boolValue": True}]}}}],
                 "status": {"code": 2}},
                {"traceId": "CvdlGRbNQ92ESOshHIAxnA==", "spanId": "t61rcWkgMzE=", "kind": 1},
                {"traceId": "zz" * 16, "spanId": "00" * 8},
            ]}],
        }]
    }  # fmt: skip
    spans = decode_traces(json.dumps(doc).encode(), "json")
    assert [(s.trace_id, s.span_id) for s in spans] == [
        (TRACE, "b7ad6b7169203331"), (TRACE, "b7ad6b7169203331"), ("", ""),
    ]  # fmt: skip
    first = spans[0]
    assert first.start_ns == 1_700_000_000_000_000_000 and first.error
    assert first.attrs["n"] == 42 and first.attrs["l"] == [True] and "odd" not in first.attrs
    assert first.resource == {"service.name": "a"}


def test_sniff() -> None:
    assert sniff(b'  {"resourceSpans": []}') == "json"
    assert sniff(ExportTraceServiceRequest().SerializeToString() + b"\n\x00") == "proto"


# Hostile input: whatever the bytes, decoding ends in spans or OtlpDecodeError, and mapping
# plus validation end in records, rejections and skips that add up.

any_value = st.recursive(
    st.one_of(
        st.builds(AnyValue, string_value=st.text(max_size=40)),
        st.builds(AnyValue, int_value=st.integers(-(2**63), 2**63 - 1)),
        st.builds(AnyValue, double_value=st.floats()),
        st.builds(AnyValue, bool_value=st.booleans()),
        st.builds(AnyValue, bytes_value=st.binary(max_size=20)),
        st.just(AnyValue()),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=3).map(lambda vs: AnyValue(array_value={"values": vs})),
        st.lists(st.tuples(st.text(max_size=10), children), max_size=3).map(
            lambda kvs: AnyValue(
                kvlist_value={"values": [KeyValue(key=k, value=v) for k, v in kvs]}
            )
        ),
    ),
    max_leaves=8,
)
MAPPED = {n for names in (*mapping.CONTEXT.values(), *mapping.FIELDS.values()) for n in names}
KINDS = ["openinference.span.kind", "gen_ai.operation.name", "traceloop.span.kind"]
KEYS = st.sampled_from([*sorted(MAPPED), *KINDS, "agentstream.event.type", "x"])
proto_span = st.fixed_dictionaries(
    {
        "trace_id": st.one_of(st.binary(min_size=16, max_size=16), st.binary(max_size=20)),
        "span_id": st.one_of(st.binary(min_size=8, max_size=8), st.binary(max_size=10)),
        "parent_span_id": st.binary(max_size=8),
        "start_time_unix_nano": st.integers(0, 2**64 - 1),
        "end_time_unix_nano": st.integers(0, 2**64 - 1),
        "attributes": st.lists(
            st.one_of(
                st.tuples(KEYS, any_value),
                st.tuples(
                    KEYS,
                    st.sampled_from(["LLM", "chat", "invoke_agent", "tool", "retrieval"]).map(
                        lambda s: AnyValue(string_value=s)
                    ),
                ),
            ),
            max_size=8,
        ).map(lambda kvs: [KeyValue(key=k, value=v) for k, v in kvs]),
    }
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(proto_span, max_size=6))
def test_any_protobuf_spans_map_without_error(spans: list[dict[str, Any]]) -> None:
    request = ExportTraceServiceRequest()
    scope = request.resource_spans.add().scope_spans.add()
    for s in spans:
        scope.spans.add(**s)
    body = request.SerializeToString()
    out = convert(body, "proto", "traces")
    assert out.total == len(spans)
    assert 0 <= out.rejected + out.skipped <= out.total
    for _, value in out.records:
        assert not isinstance(schema.decode(value), schema.Rejection)
    as_json = convert(_to_json(request), "json", "traces")
    assert (as_json.total, as_json.rejected, as_json.skipped) == (
        out.total,
        out.rejected,
        out.skipped,
    )


def _to_json(request: ExportTraceServiceRequest) -> bytes:
    """OTLP/JSON as the Collector writes it: hex ids, int64 as strings, camelCase."""
    doc = MessageToDict(request)
    for rs in doc.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for s in ss.get("spans", []):
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in s:
                        s[key] = base64.b64decode(s[key]).hex()
    return json.dumps(doc).encode()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_decode_or_fail_clearly(raw: bytes) -> None:
    for encoding in ("proto", "json"):
        try:
            convert(raw, encoding, "traces")  # type: ignore[arg-type]
            convert(raw, encoding, "logs")  # type: ignore[arg-type]
        except OtlpDecodeError as exc:
            assert re.match(r"(malformed (protobuf|JSON)|not OTLP/JSON)", str(exc))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_any_json_document_decodes_or_fails_clearly(doc: Any) -> None:
    wrapped = {"resourceSpans": [{"scopeSpans": [{"spans": [doc]}]}]}
    for candidate in (doc, wrapped):
        with contextlib.suppress(OtlpDecodeError):
            convert(json.dumps(candidate).encode(), "json", "traces")


_EVALUATION_ATTRS = [
    *(n for names in mapping.EVALUATION.values() for n in names),
    *(n for names in mapping.FEEDBACK.values() for n in names),
    "gen_ai.request.model",
    "error.type",
]


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["gen_ai.evaluation.result", "agentstream.feedback", "app.log"]),
    st.dictionaries(st.sampled_from(_EVALUATION_ATTRS), json_values, max_size=6),
    st.booleans(),
)
def test_any_evaluation_record_maps_or_is_rejected_with_a_reason(
    event_name: str, attrs: dict[str, Any], with_ids: bool
) -> None:
    """Hostile attribute values on an evaluation or feedback record: a valid event, or a
    rejection naming the field; never an exception."""
    rec = LogRecord(
        TRACE if with_ids else "", "b7ad6b7169203331" if with_ids else "", NOW, event_name,
        attrs, {"service.name": "svc"},
    )  # fmt: skip
    out = validate(map_logs([rec]))
    assert len(out.records) + out.rejected + out.skipped == 1
    assert all(" - at `$." in r for r in out.reasons), out.reasons
