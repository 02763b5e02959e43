"""Schema v1 (pipeline/schema.py): round trips, every rejection reason, batch alignment."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest

from pipeline import schema
from pipeline.schema import (
    EVENT_TYPES,
    OTEL_NAMES,
    Escalation,
    Evaluation,
    Feedback,
    Guardrail,
    InvalidEvent,
    LlmCall,
    Rejection,
    Release,
    Retrieval,
    Task,
    ToolCall,
    decode,
    decode_batch,
    encode,
    from_dict,
)

TS = datetime(2026, 1, 5, 9, 30, 15, 123456, tzinfo=UTC)
KNOWN = "llm_call, tool_call, retrieval, escalation, task, feedback, evaluation, guardrail, release"

ENVELOPE: dict[str, Any] = {
    "schema_version": 1,
    "ts": TS,
    "agent_id": "support-bot",
    "agent_version": "v7",
    "prompt_version": "triage-3",
    "model": "gpt-4o-mini",
    "provider": "openai",
    "tenant_id": "acme",
    "session_id": "sess-1",
    "task_id": "task-1",
    "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
    "span_id": "00f067aa0ba902b7",
}


def full_events() -> list[schema.AgentEvent]:
    """One event of every type with every field set (no field left None)."""
    return [
        LlmCall(
            event_id="e-llm",
            **ENVELOPE,
            input_tokens=1200,
            output_tokens=300,
            cached_input_tokens=1000,
            reasoning_output_tokens=50,
            cost_usd=0.0125,
            latency_ms=812.5,
            finish_reason="stop",
            operation="text_completion",
        ),
        ToolCall(
            event_id="e-tool",
            **ENVELOPE,
            tool_name="search_orders",
            status="error",
            error_type="timeout",
            latency_ms=3000.0,
        ),
        Retrieval(
            event_id="e-ret",
            **ENVELOPE,
            hits=4,
            data_source="kb-main",
            top_score=0.87,
            miss=True,
            latency_ms=42.0,
            query="refund policy for damaged goods",
        ),
        Escalation(event_id="e-esc", **ENVELOPE, reason="user asked for a human", target="tier2"),
        Task(event_id="e-task", **ENVELOPE, outcome="completed"),
        Feedback(event_id="e-fb", **ENVELOPE, rating=-0.5, correction="wrong order number"),
        Evaluation(
            event_id="e-eval",
            **ENVELOPE,
            evaluator="hallucination",
            score=0.91,
            label="grounded",
            passed=True,
            evaluator_kind="benchmark",
            scope="task",
            suite_id="support-regression",
            case_id="case-17",
            explanation="every claim is in the retrieved article",
        ),
        Guardrail(
            event_id="e-guard", **ENVELOPE, policy_id="pii-filter", action="modify", reason="email"
        ),
        Release(
            event_id="e-rel",
            **ENVELOPE,
            release_id="rel-1",
            dimension="prompt_version",
            candidate="p13",
            baseline="p12",
            traffic_share=0.2,
            stage="ended",
        ),
    ]


def wire(type_: str = "tool_call", **fields: Any) -> bytes:
    """A JSON message: a valid tool call, changed by ``fields`` (``...`` removes a field)."""
    base: dict[str, Any] = {
        "type": type_,
        "event_id": "e1",
        "schema_version": 1,
        "ts": "2026-01-05T09:00:00Z",
        "agent_id": "a1",
        "tool_name": "search",
        "status": "ok",
    }
    base.update(fields)
    return msgspec.json.encode({k: v for k, v in base.items() if v is not ...})


def llm(**fields: Any) -> bytes:
    return wire(
        "llm_call",
        **{"tool_name": ..., "status": ..., "input_tokens": 10, "output_tokens": 5, **fields},
    )


def iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


# --- round trips ---------------------------------------------------------------------------


def test_full_events_cover_every_type_and_every_field() -> None:
    events = full_events()
    assert [type(ev) for ev in events] == list(schema.EVENT_CLASSES)
    for ev in events:
        unset = [f for f in ev.__struct_fields__ if getattr(ev, f) is None]
        assert unset == [], f"{type(ev).__name__} leaves {unset} unset"


@pytest.mark.parametrize("event", full_events(), ids=lambda ev: type(ev).__name__)
def test_round_trip(event: schema.AgentEvent) -> None:
    raw = encode(event)
    as_json = msgspec.json.decode(raw)
    assert as_json["type"] == type(event).type_name
    assert as_json["ts"] == "2026-01-05T09:30:15.123456Z"
    back = decode(raw)
    assert type(back) is type(event)
    assert back == event
    assert encode(back) == raw
    # The same event built from a dict (as the publisher does) is equal too.
    assert from_dict(as_json) == event


def test_round_trip_keeps_the_instant_of_a_non_utc_offset() -> None:
    raw = wire(ts="2026-01-05T11:00:00+02:00")
    ev = decode(raw)
    assert isinstance(ev, ToolCall)
    assert ev.ts == datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
    assert ev.ts.utcoffset() == timedelta(hours=2)
    assert decode(encode(ev)) == ev


def test_unknown_fields_are_ignored_not_rejected() -> None:
    ev = decode(wire(custom_attribute={"nested": [1, 2]}))
    assert isinstance(ev, ToolCall)
    assert ev.tool_name == "search"
    assert b"custom_attribute" not in encode(ev)


def test_type_may_come_last_in_the_object() -> None:
    raw = (
        b'{"event_id":"e1","schema_version":1,"ts":"2026-01-05T09:00:00Z","agent_id":"a1",'
        b'"outcome":"started","type":"task"}'
    )
    ev = decode(raw)
    assert isinstance(ev, Task)
    assert ev.outcome == "started"


def test_str_input_decodes_like_bytes() -> None:
    assert decode(wire().decode()) == decode(wire())


def test_otel_names_cover_every_wire_field_and_type() -> None:
    fields = {name for name, _ in schema.iter_fields()}
    assert len(fields) == 51  # 36 + the 6 fields of release + the 9 of evaluation
    assert set(OTEL_NAMES) == fields | {"type"}
    assert all(isinstance(v, str) and v for v in OTEL_NAMES.values())


def test_iter_fields_has_no_repeats() -> None:
    names = [name for name, _ in schema.iter_fields()]
    assert len(names) == len(set(names)) == 51
    types = dict(schema.iter_fields())
    assert isinstance(types["ts"], msgspec.inspect.DateTimeType)
    assert isinstance(types["input_tokens"], msgspec.inspect.IntType)


def test_iter_fields_lists_envelope_first() -> None:
    names = [name for name, _ in schema.iter_fields()]
    assert names[:13] == [
        "event_id",
        "schema_version",
        "ts",
        "agent_id",
        "agent_version",
        "prompt_version",
        "model",
        "provider",
        "tenant_id",
        "session_id",
        "task_id",
        "trace_id",
        "span_id",
    ]


def test_event_types() -> None:
    assert EVENT_TYPES == (
        "llm_call",
        "tool_call",
        "retrieval",
        "escalation",
        "task",
        "feedback",
        "evaluation",
        "guardrail",
        "release",
    )
    assert EVENT_TYPES[:-1] == schema.ACTIVITY_TYPES
    assert schema.CONTROL_TYPES == ("release",)


# --- rejections ----------------------------------------------------------------------------

NAN_RAW = wire(latency_ms=1.0).replace(b"1.0", b"NaN")

NON_UTF8 = wire().replace(b'"a1"', b'"a\xff\xfe"')

REJECTIONS: list[tuple[str, bytes | str | None, Rejection]] = [
    (
        "malformed json",
        b'{"type":"llm_call", "event_id": ',
        Rejection("malformed JSON: Input data was truncated"),
    ),
    (
        "single quotes",
        b"{'type':'task'}",
        Rejection("malformed JSON: JSON is malformed: object keys must be strings (byte 1)"),
    ),
    (
        "trailing comma",
        b'{"type":"task",}',
        Rejection("malformed JSON: JSON is malformed: trailing comma in object (byte 15)"),
    ),
    (
        "wrong type",
        wire(schema_version="1"),
        Rejection("Expected `int`, got `str` - at `$.schema_version`", "$.schema_version"),
    ),
    (
        "bool is not a count",
        llm(input_tokens=True),
        Rejection("Expected `int`, got `bool` - at `$.input_tokens`", "$.input_tokens"),
    ),
    (
        "float is not a count",
        llm(output_tokens=1.5),
        Rejection("Expected `int`, got `float` - at `$.output_tokens`", "$.output_tokens"),
    ),
    (
        "null in a required field",
        wire(agent_id=None),
        Rejection("Expected `str`, got `null` - at `$.agent_id`", "$.agent_id"),
    ),
    (
        "bad enum",
        wire(status="maybe"),
        Rejection("Invalid enum value 'maybe' - at `$.status`", "$.status"),
    ),
    (
        "empty event_id",
        wire(event_id=""),
        Rejection("Expected `str` of length >= 1 - at `$.event_id`", "$.event_id"),
    ),
    (
        "missing envelope field",
        wire(agent_id=...),
        Rejection("missing required field `agent_id` - at `$.agent_id`", "$.agent_id"),
    ),
    (
        "missing type field",
        llm(output_tokens=...),
        Rejection(
            "missing required field `output_tokens` - at `$.output_tokens`", "$.output_tokens"
        ),
    ),
    (
        "unknown type",
        wire("teleport"),
        Rejection(
            f"unknown event type 'teleport': expected one of {KNOWN} - at `$.type`", "$.type"
        ),
    ),
    (
        "missing type",
        wire(type=...),
        Rejection(
            f"missing event type: field `type` must be one of {KNOWN} - at `$.type`", "$.type"
        ),
    ),
    (
        "unsupported schema_version",
        wire(schema_version=2),
        Rejection(
            "unsupported schema_version 2 (this agentstream reads [1]) - at `$.schema_version`",
            "$.schema_version",
        ),
    ),
    (
        "naive timestamp",
        wire(ts="2026-01-05T09:00:00"),
        Rejection("Expected `datetime` with a timezone component - at `$.ts`", "$.ts"),
    ),
    (
        "ts before 2000",
        wire(ts="1999-12-31T23:59:59Z"),
        Rejection("ts 1999-12-31T23:59:59+00:00 is before 2000-01-01 - at `$.ts`", "$.ts"),
    ),
    (
        "ts before 2000 through its offset",
        wire(ts="2000-01-01T00:30:00+01:00"),
        Rejection("ts 2000-01-01T00:30:00+01:00 is before 2000-01-01 - at `$.ts`", "$.ts"),
    ),
    (
        "negative tokens",
        llm(input_tokens=-1),
        Rejection("Expected `int` >= 0 - at `$.input_tokens`", "$.input_tokens"),
    ),
    (
        "negative cost",
        llm(cost_usd=-0.01),
        Rejection("Expected `float` >= 0.0 - at `$.cost_usd`", "$.cost_usd"),
    ),
    (
        "cached > input",
        llm(cached_input_tokens=11),
        Rejection(
            "cached_input_tokens 11 exceeds input_tokens 10 - at `$.cached_input_tokens`",
            "$.cached_input_tokens",
        ),
    ),
    (
        "feedback without rating or correction",
        wire("feedback", tool_name=..., status=...),
        Rejection("feedback needs a rating or a correction - at `$.rating`", "$.rating"),
    ),
    (
        "evaluation without score, label or passed",
        wire("evaluation", tool_name=..., status=..., evaluator="tone", task_id="t1"),
        Rejection("evaluation needs a score, a label or passed - at `$.score`", "$.score"),
    ),
    (
        "evaluation of a span without span_id",
        wire("evaluation", tool_name=..., status=..., evaluator="tone", passed=True, scope="span"),
        Rejection(
            "evaluation of scope 'span' needs span_id (the evaluated span) - at `$.span_id`",
            "$.span_id",
        ),
    ),
    (
        "evaluation by an unknown kind of evaluator",
        wire(
            "evaluation",
            tool_name=...,
            status=...,
            evaluator="tone",
            passed=True,
            task_id="t1",
            evaluator_kind="oracle",
        ),
        Rejection(
            "Invalid enum value 'oracle' - at `$.evaluator_kind`",
            "$.evaluator_kind",
        ),
    ),
    (
        "non-utf8 inside a string",
        NON_UTF8,
        Rejection(f"not UTF-8: invalid byte at position {NON_UTF8.index(0xFF)}"),
    ),
    (
        "json array",
        b'[{"type":"task"}]',
        Rejection("Expected `object`, got `array`: an event is one JSON object"),
    ),
    ("json null", b"null", Rejection("Expected `object`, got `null`: an event is one JSON object")),
    ("empty bytes", b"", Rejection("malformed JSON: Input data was truncated")),
    ("none", None, Rejection("empty message: Kafka record has no value")),
    (
        "NaN literal",
        NAN_RAW,
        Rejection(
            f"malformed JSON: JSON is malformed: invalid character (byte {NAN_RAW.index(b'NaN')})"
        ),
    ),
    (
        "overflowing float",
        wire(latency_ms=1.0).replace(b"1.0", b"1e999"),
        Rejection("Number out of range - at `$.latency_ms`", "$.latency_ms"),
    ),
]


@pytest.mark.parametrize(
    ("raw", "expected"), [c[1:] for c in REJECTIONS], ids=[c[0] for c in REJECTIONS]
)
def test_rejection(raw: bytes | None, expected: Rejection) -> None:
    got = decode_batch([raw])
    assert got == ([], [], [expected], [0])
    # The field is the JSON path the reason ends with, when there is one.
    if expected.field is not None:
        assert expected.reason.endswith(f" - at `{expected.field}`")


def future_reason(ts: datetime) -> re.Pattern[str]:
    """What a rejection of ``ts`` for being ahead of the clock must look like."""
    return re.compile(
        rf"ts {re.escape(ts.isoformat())} is \d+ (s|h) in the future .* - at `\$\.ts`"
    )


def test_timestamps_at_the_edges_of_the_plausible_range() -> None:
    assert isinstance(decode(wire(ts="2000-01-01T00:00:00Z")), ToolCall)
    skew = schema.MAX_FUTURE_SECONDS
    now = datetime.now(UTC)
    soon = decode(wire(ts=iso(now + timedelta(seconds=skew / 2))))
    assert isinstance(soon, ToolCall)
    far = now + timedelta(seconds=skew + 60)
    rej = decode(wire(ts=iso(far)))
    assert isinstance(rej, Rejection)
    assert rej.field == "$.ts"
    assert future_reason(far).fullmatch(rej.reason), rej.reason


def test_oversized_message() -> None:
    raw = wire()
    assert isinstance(decode(raw, max_bytes=len(raw)), ToolCall)
    assert decode(raw, max_bytes=len(raw) - 1) == Rejection(
        f"oversized message: {len(raw)} bytes exceeds the {len(raw) - 1}-byte limit"
    )
    big = wire(padding="x" * schema.MAX_EVENT_BYTES)
    assert decode(big) == Rejection(
        f"oversized message: {len(big)} bytes exceeds the {schema.MAX_EVENT_BYTES}-byte limit"
    )


def test_oversized_str_is_measured_in_bytes() -> None:
    text = wire(tool_name="é" * 100).decode()
    limit = len(text) + 10  # characters fit, UTF-8 bytes (100 more) do not
    assert len(text.encode()) > limit
    assert isinstance(decode(text, max_bytes=limit), Rejection)


def test_non_utf8_position_is_the_offset_in_the_message() -> None:
    raw = wire(tool_name="sear-ch").replace(b"sear-ch", b"sear\xffch")
    rej = decode(raw)
    assert isinstance(rej, Rejection)
    at = raw.index(b"\xff")
    assert rej.reason == f"not UTF-8: invalid byte at position {at}"


@pytest.mark.parametrize(
    "raw",
    [
        # a bad byte in a field the schema does not know: a decoder that skips unknown fields
        # never looks at it, but the message is still not JSON (JSON is UTF-8)
        wire().replace(b"{", b'{"extra":"x\xc3(y",', 1),
        # outside any string, and a truncated multi-byte sequence at the very end
        wire() + b" \xff",
        wire() + b"\xe2\x82",
    ],
    ids=["unknown field", "after the object", "truncated sequence"],
)
def test_not_utf8_is_the_projects_check_not_the_decoders(raw: bytes) -> None:
    at = next(i for i, byte in enumerate(raw) if byte > 127)  # each case's first is the bad one
    rej = decode(raw)
    assert rej == Rejection(f"not UTF-8: invalid byte at position {at}")
    assert decode_batch([wire(), raw])[2] == [rej]


def test_batch_and_single_decoding_agree_on_utf8() -> None:
    good_ascii = wire(event_id="ascii")
    good_text = wire(event_id="é-text", tool_name="recherche-é")
    bad = NON_UTF8
    raws: list[bytes | str | None] = [good_ascii, bad, good_text, bad, good_ascii]
    events, ok_at, rejected, bad_at = decode_batch(raws)
    assert ok_at == [0, 2, 4] and bad_at == [1, 3]
    assert [e.event_id for e in events] == ["ascii", "é-text", "ascii"]
    assert rejected == [decode(bad), decode(bad)]
    assert all(r.reason.startswith("not UTF-8: invalid byte at position") for r in rejected)


# --- retrieval miss ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hits", "miss", "expected"),
    [(0, ..., True), (3, ..., False), (0, False, False), (5, True, True)],
)
def test_retrieval_miss_defaults_to_no_hits(hits: int, miss: Any, expected: bool) -> None:
    raw = wire("retrieval", tool_name=..., status=..., hits=hits, miss=miss)
    ev = decode(raw)
    assert isinstance(ev, Retrieval)
    assert ev.miss is expected
    assert msgspec.json.decode(encode(ev))["miss"] is expected
    kwargs = {} if miss is ... else {"miss": miss}
    built = Retrieval(event_id="r", schema_version=1, ts=TS, agent_id="a", hits=hits, **kwargs)
    assert built.miss is expected


# --- from_dict -----------------------------------------------------------------------------


def dict_event(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "llm_call",
        "event_id": "evt-42",
        "schema_version": 1,
        "ts": TS,
        "agent_id": "a",
        "input_tokens": 10,
        "output_tokens": 3,
    }
    base.update(fields)
    return base


def test_from_dict_builds_the_event() -> None:
    ev = from_dict(dict_event(cost_usd=0.5))
    assert ev == LlmCall(
        event_id="evt-42",
        schema_version=1,
        ts=TS,
        agent_id="a",
        input_tokens=10,
        output_tokens=3,
        cost_usd=0.5,
    )


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"outcome": "meh", "type": "task"}, "Invalid enum value 'meh' - at `$.outcome`"),
        (
            {"schema_version": 3},
            "unsupported schema_version 3 (this agentstream reads [1]) - at `$.schema_version`",
        ),
        ({"input_tokens": -5}, "Expected `int` >= 0 - at `$.input_tokens`"),
        (
            {"ts": datetime(2026, 1, 5, 9, 0)},  # noqa: DTZ001 - naive on purpose
            "Expected `datetime` with a timezone component - at `$.ts`",
        ),
        (
            {"type": "teleport"},
            f"unknown event type 'teleport': expected one of {KNOWN} - at `$.type`",
        ),
    ],
    ids=["enum", "version", "negative", "naive", "unknown-type"],
)
def test_from_dict_raises_invalid_event_naming_id_and_reason(
    fields: dict[str, Any], reason: str
) -> None:
    with pytest.raises(InvalidEvent) as info:
        from_dict(dict_event(**fields))
    assert str(info.value) == f"invalid event: event 'evt-42': {reason}"
    assert info.value.reason == reason
    assert info.value.event_id == "evt-42"


def test_from_dict_without_event_id_still_names_the_reason() -> None:
    data = dict_event()
    del data["event_id"]
    with pytest.raises(InvalidEvent) as info:
        from_dict(data)
    assert str(info.value) == ("invalid event: missing required field `event_id` - at `$.event_id`")
    assert info.value.event_id is None


def test_from_dict_rejects_ts_far_in_the_future() -> None:
    far = datetime.now(UTC) + timedelta(seconds=schema.MAX_FUTURE_SECONDS + 3600)
    with pytest.raises(InvalidEvent) as info:
        from_dict(dict_event(ts=far))
    assert info.value.event_id == "evt-42"
    assert future_reason(far).fullmatch(info.value.reason), info.value.reason


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        ({"cost_usd": float("nan")}, "$.cost_usd"),
        ({"cost_usd": float("inf")}, "$.cost_usd"),
        ({"latency_ms": float("nan")}, "$.latency_ms"),
        ({"latency_ms": float("-inf")}, "$.latency_ms"),
        ({"type": "retrieval", "hits": 1, "top_score": float("nan")}, "$.top_score"),
        ({"type": "feedback", "rating": float("inf")}, "$.rating"),
        ({"type": "feedback", "rating": float("-inf")}, "$.rating"),
        ({"type": "feedback", "rating": float("nan")}, "$.rating"),
    ],
)
def test_from_dict_rejects_nan_and_inf(fields: dict[str, Any], path: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        from_dict(dict_event(**fields))
    assert info.value.reason.endswith(f" - at `{path}`")
    assert info.value.event_id == "evt-42"


# --- batches -------------------------------------------------------------------------------


def test_decode_batch_keeps_positions_aligned() -> None:
    future = iso(datetime.now(UTC) + timedelta(seconds=schema.MAX_FUTURE_SECONDS + 3600))
    raws: list[bytes | str | None] = [
        wire(event_id="ok-0"),  # 0 ok
        None,  # 1 bad
        b"{",  # 2 bad
        llm(event_id="ok-3"),  # 3 ok
        wire(event_id="ok-4").decode(),  # 4 ok (str)
        wire(ts=future),  # 5 bad: future
        wire("task", tool_name=..., status=..., event_id="ok-6", outcome="failed"),  # 6 ok
        wire("teleport"),  # 7 bad
        wire(padding="x" * 600),  # 8 bad: oversized at max_bytes=512
        wire(event_id="ok-9"),  # 9 ok
    ]
    events, ok_at, rejections, bad_at = decode_batch(raws, max_bytes=512)
    assert ok_at == [0, 3, 4, 6, 9]
    assert [ev.event_id for ev in events] == ["ok-0", "ok-3", "ok-4", "ok-6", "ok-9"]
    assert [type(ev).__name__ for ev in events] == [
        "ToolCall",
        "LlmCall",
        "ToolCall",
        "Task",
        "ToolCall",
    ]
    assert bad_at == [1, 2, 5, 7, 8]
    assert [r.field for r in rejections] == [None, None, "$.ts", "$.type", None]
    assert rejections[0].reason == "empty message: Kafka record has no value"
    assert rejections[1].reason == "malformed JSON: Input data was truncated"
    assert " in the future " in rejections[2].reason
    assert rejections[3].reason.startswith("unknown event type 'teleport'")
    assert rejections[4].reason.startswith(f"oversized message: {len(raws[8])} bytes")  # type: ignore[arg-type]


def test_decode_batch_of_nothing() -> None:
    assert decode_batch([]) == ([], [], [], [])


def test_decode_batch_all_valid_large() -> None:
    raws = [wire(event_id=f"e{i}") for i in range(5000)]
    events, ok_at, rejections, bad_at = decode_batch(raws)
    assert ok_at == list(range(5000))
    assert [ev.event_id for ev in events] == [f"e{i}" for i in range(5000)]
    assert rejections == bad_at == []


def test_invalid_event_formats_its_message() -> None:
    exc = InvalidEvent("boom - at `$.x`", "id-1")
    assert str(exc) == "invalid event: event 'id-1': boom - at `$.x`"
    assert isinstance(exc, ValueError)
    assert str(InvalidEvent("boom")) == "invalid event: boom"


def test_constructing_with_naive_or_old_ts_fails() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({**dict_event(), "ts": "2026-01-05T09:00:00"}, schema.AgentEvent)
    with pytest.raises(ValueError, match="before 2000-01-01"):
        Task(
            event_id="t",
            schema_version=1,
            ts=datetime(1999, 1, 1, tzinfo=UTC),
            agent_id="a",
            outcome="started",
        )
    with pytest.raises(ValueError, match="unsupported schema_version 0"):
        Task(event_id="t", schema_version=0, ts=TS, agent_id="a", outcome="started")
    # A fixed offset other than UTC is fine.
    ev = Task(
        event_id="t",
        schema_version=1,
        ts=TS.astimezone(timezone(timedelta(hours=-5))),
        agent_id="a",
        outcome="started",
    )
    assert ev.ts == TS
