"""Agent event schema, version 1: the one place that says what a valid event is.

Events travel as JSON objects. Every event shares an envelope (identity, event time, the
agent, prompt and model that produced it) and adds the fields of its ``type``. Names follow
the OpenTelemetry GenAI semantic conventions where those have a name (see ``OTEL_NAMES``);
concepts the conventions lack (cost, escalation, task outcome) live in ``agentstream.*``.

Validation is msgspec decoding into typed structs, about a microsecond per event, so the
worker validates whole batches without leaving the hot path. Every rejection names the field
and the problem, for example ``Expected `int`, got `str` - at `$.input_tokens```.
"""

from __future__ import annotations

import itertools
import operator
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Final, Literal

import msgspec
from msgspec import Meta

SCHEMA_VERSION: Final = 1
SUPPORTED_SCHEMA_VERSIONS: Final = frozenset({1})
MAX_EVENT_BYTES: Final = 1 << 20

# Event time must be plausible: data from before this or ahead of the wall clock is a producer
# bug (epoch zero, milliseconds read as seconds, a host clock that is off). An event from the
# future would also drag the event-time watermark forward and make everyone else's events late,
# so only a few minutes of clock skew are tolerated.
EARLIEST_TS: Final = datetime(2000, 1, 1, tzinfo=UTC)
MAX_FUTURE_SECONDS: Final = 300.0

Id = Annotated[str, Meta(min_length=1, max_length=256)]
Name = Annotated[str, Meta(min_length=1, max_length=256)]
Text = Annotated[str, Meta(max_length=16_384)]
Count = Annotated[int, Meta(ge=0, le=1_000_000_000_000)]
Millis = Annotated[float, Meta(ge=0, le=86_400_000 * 7)]
Usd = Annotated[float, Meta(ge=0, le=1_000_000)]
Score = Annotated[float, Meta(ge=-1e9, le=1e9)]
UtcTime = Annotated[datetime, Meta(tz=True)]

TaskOutcome = Literal["started", "completed", "failed", "abandoned"]
ToolStatus = Literal["ok", "error"]
GuardrailAction = Literal["allow", "block", "modify", "flag"]
# The version dimensions a release can change: exactly the metrics dimensions that name a
# version of what serves the agent's traffic (``streams.windows.DIMENSIONS``).
ReleaseDimension = Literal["agent_version", "prompt_version", "model"]
ReleaseStage = Literal["started", "ended"]
EvaluatorKind = Literal["llm_judge", "human", "heuristic", "benchmark"]
# What an evaluation judged: the envelope id of that name (task_id, session_id, trace_id or
# span_id) names the evaluated thing, so an evaluation joins the events it is about.
EvaluationScope = Literal["task", "session", "trace", "span"]
Share = Annotated[float, Meta(gt=0, le=1)]


# gc=False: events hold only scalars and strings, so they cannot be part of a reference cycle,
# and not tracking them spares the collector a pass over every decoded batch.
class Envelope(
    msgspec.Struct, kw_only=True, forbid_unknown_fields=False, tag_field="type", gc=False
):
    """Fields every event carries.

    ``ts`` is the event time (when it happened in the agent), RFC 3339 with an offset; it
    drives every window. ``event_id`` is the producer's id, unique per event and stable across
    retries, so duplicates can be recognised.
    """

    event_id: Id
    schema_version: int
    ts: UtcTime
    agent_id: Name
    agent_version: Name | None = None
    prompt_version: Name | None = None
    model: Name | None = None
    provider: Name | None = None
    tenant_id: Name | None = None
    session_id: Id | None = None
    task_id: Id | None = None
    trace_id: Id | None = None
    span_id: Id | None = None

    type_name: ClassVar[str]

    def __post_init__(self) -> None:
        if self.schema_version not in SUPPORTED_SCHEMA_VERSIONS:
            raise ValueError(
                f"unsupported schema_version {self.schema_version} "
                f"(this agentstream reads {sorted(SUPPORTED_SCHEMA_VERSIONS)}) - at `$.schema_version`"
            )
        if self.ts < EARLIEST_TS:
            raise ValueError(f"ts {self.ts.isoformat()} is before 2000-01-01 - at `$.ts`")


class LlmCall(Envelope, tag="llm_call"):
    """One model call: tokens in and out, what it cost, how long it took."""

    input_tokens: Count
    output_tokens: Count
    cached_input_tokens: Count = 0
    reasoning_output_tokens: Count = 0
    cost_usd: Usd | None = None
    latency_ms: Millis | None = None
    finish_reason: Name | None = None
    operation: Name = "chat"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cached_input_tokens > self.input_tokens:
            raise ValueError(
                f"cached_input_tokens {self.cached_input_tokens} exceeds input_tokens "
                f"{self.input_tokens} - at `$.cached_input_tokens`"
            )


class ToolCall(Envelope, tag="tool_call"):
    """One tool invocation and whether it worked."""

    tool_name: Name
    status: ToolStatus
    error_type: Name | None = None
    latency_ms: Millis | None = None


class Retrieval(Envelope, tag="retrieval"):
    """One retrieval from an index or data source. ``miss`` defaults to ``hits == 0``."""

    hits: Count
    data_source: Name | None = None
    top_score: Score | None = None
    miss: bool | None = None
    latency_ms: Millis | None = None
    query: Text | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.miss is None:
            self.miss = self.hits == 0


class Escalation(Envelope, tag="escalation"):
    """A hand-off from the agent to a human."""

    reason: Text | None = None
    target: Name = "human"


class Task(Envelope, tag="task"):
    """A task's life cycle: one event when it starts and one when it ends."""

    outcome: TaskOutcome


class Feedback(Envelope, tag="feedback"):
    """A user's rating or correction of the agent's work."""

    rating: Score | None = None
    correction: Text | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rating is None and self.correction is None:
            raise ValueError("feedback needs a rating or a correction - at `$.rating`")


class Evaluation(Envelope, tag="evaluation"):
    """The result of one evaluator on a task, session, trace or span of the agent's work.

    ``evaluator`` names what was judged (helpfulness, accuracy, compliance, tone,
    hallucination, prompt_adherence, or any other name); ``score`` and/or ``label`` are its
    result and ``passed`` its pass/fail decision (at least one of the three). ``evaluator_kind``
    says who judged. ``scope`` says which envelope id names the evaluated thing (it must be
    set). ``suite_id`` and ``case_id`` tie an offline regression suite's result to its case.
    The envelope's agent, prompt and model are those of the evaluated work, so evaluations
    fall into the same metrics keys as that work.
    """

    evaluator: Name
    score: Score | None = None
    label: Name | None = None
    passed: bool | None = None
    evaluator_kind: EvaluatorKind = "llm_judge"
    scope: EvaluationScope = "task"
    suite_id: Id | None = None
    case_id: Id | None = None
    explanation: Text | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.score is None and self.label is None and self.passed is None:
            raise ValueError("evaluation needs a score, a label or passed - at `$.score`")
        if getattr(self, f"{self.scope}_id") is None:
            raise ValueError(
                f"evaluation of scope {self.scope!r} needs {self.scope}_id (the evaluated "
                f"{self.scope}) - at `$.{self.scope}_id`"
            )


class Guardrail(Envelope, tag="guardrail"):
    """A guardrail decision on the agent's input or output."""

    policy_id: Name
    action: GuardrailAction
    reason: Text | None = None


class Release(Envelope, tag="release"):
    """A rollout: ``candidate`` starts (or stops) serving ``traffic_share`` of the agent's traffic.

    A control record, not agent activity: it is landed in ``events`` (view ``releases``) but
    counts in no KPI. The release is scoped by the envelope's ``agent_id`` (and ``tenant_id``
    when set); ``dimension`` says which version changes, ``baseline`` is the version the
    candidate replaces, and ``ts`` is when the stage begins. ``release_id`` ties the
    ``started`` and ``ended`` records of one rollout together.
    """

    release_id: Id
    dimension: ReleaseDimension
    candidate: Name
    baseline: Name
    traffic_share: Share = 1.0
    stage: ReleaseStage = "started"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.candidate == self.baseline:
            raise ValueError(
                f"candidate and baseline are both {self.candidate!r}: a release compares two "
                "versions - at `$.candidate`"
            )


AgentEvent = (
    LlmCall | ToolCall | Retrieval | Escalation | Task | Feedback | Evaluation | Guardrail | Release
)
EVENT_CLASSES: Final[tuple[type[Envelope], ...]] = (
    LlmCall,
    ToolCall,
    Retrieval,
    Escalation,
    Task,
    Feedback,
    Evaluation,
    Guardrail,
    Release,
)
EVENT_TYPES: Final[tuple[str, ...]] = tuple(
    str(msgspec.inspect.type_info(cls).tag)  # type: ignore[attr-defined]
    for cls in EVENT_CLASSES
)
for _cls, _name in zip(EVENT_CLASSES, EVENT_TYPES, strict=True):
    _cls.type_name = _name
# Types that describe what agents did: the ones KPIs are computed from. Control records
# (releases) travel with them, in order, but are not activity.
CONTROL_TYPES: Final[tuple[str, ...]] = ("release",)
ACTIVITY_TYPES: Final[tuple[str, ...]] = tuple(t for t in EVENT_TYPES if t not in CONTROL_TYPES)

# What each wire field means in OpenTelemetry GenAI terms; the README's table is this dict.
OTEL_NAMES: Final[dict[str, str]] = {
    "event_id": "agentstream.event.id",
    "schema_version": "agentstream.schema.version",
    "type": "gen_ai.operation.name (llm_call=chat, tool_call=execute_tool, retrieval=retrieval)",
    "ts": "span start time / event timestamp",
    "agent_id": "gen_ai.agent.id",
    "agent_version": "gen_ai.agent.version",
    "prompt_version": "gen_ai.prompt.name (version of the prompt template)",
    "model": "gen_ai.request.model",
    "provider": "gen_ai.provider.name",
    "tenant_id": "agentstream.tenant.id",
    "session_id": "gen_ai.conversation.id",
    "task_id": "agentstream.task.id",
    "trace_id": "trace_id (W3C trace context)",
    "span_id": "span_id (W3C trace context)",
    "input_tokens": "gen_ai.usage.input_tokens",
    "output_tokens": "gen_ai.usage.output_tokens",
    "cached_input_tokens": "gen_ai.usage.cache_read.input_tokens",
    "reasoning_output_tokens": "gen_ai.usage.reasoning.output_tokens",
    "cost_usd": "agentstream.cost.usd",
    "latency_ms": "gen_ai.client.operation.duration (in ms)",
    "finish_reason": "gen_ai.response.finish_reasons",
    "operation": "gen_ai.operation.name",
    "tool_name": "gen_ai.tool.name",
    "status": "agentstream.tool.status (error when error.type is set)",
    "error_type": "error.type",
    "data_source": "gen_ai.data_source.id",
    "hits": "agentstream.retrieval.hits (count of gen_ai.retrieval.documents)",
    "top_score": "agentstream.retrieval.top_score (max gen_ai.retrieval.documents score)",
    "miss": "agentstream.retrieval.miss",
    "query": "gen_ai.retrieval.query.text",
    "reason": "agentstream.escalation.reason / gen_ai.guardrail.result.reason",
    "target": "agentstream.escalation.target",
    "outcome": "agentstream.task.outcome",
    "rating": "agentstream.feedback.rating (a user's rating; 1-5, negative at 2 or less)",
    "correction": "agentstream.feedback.correction",
    "evaluator": "gen_ai.evaluation.name",
    "score": "gen_ai.evaluation.score.value",
    "label": "gen_ai.evaluation.score.label",
    "passed": "agentstream.evaluation.passed",
    "evaluator_kind": "agentstream.evaluation.evaluator.kind (llm_judge, human, heuristic, benchmark)",
    "scope": "agentstream.evaluation.scope (task, session, trace or span: what was evaluated)",
    "suite_id": "agentstream.evaluation.suite.id",
    "case_id": "agentstream.evaluation.case.id",
    "explanation": "gen_ai.evaluation.explanation",
    "policy_id": "gen_ai.guardrail.policy.id",
    "action": "gen_ai.guardrail.result.type",
    "release_id": "agentstream.release.id",
    "dimension": "agentstream.release.dimension (agent_version, prompt_version or model)",
    "candidate": "agentstream.release.candidate (the new version)",
    "baseline": "agentstream.release.baseline (the version it replaces)",
    "traffic_share": "agentstream.release.traffic_share (0 < share <= 1)",
    "stage": "agentstream.release.stage (started, ended)",
}


class Rejection(msgspec.Struct, frozen=True):
    """Why one message is not a valid event: ``reason`` is readable, ``field`` a JSON path."""

    reason: str
    field: str | None = None


_decoder = msgspec.json.Decoder(AgentEvent)
_encoder = msgspec.json.Encoder()


def _too_far_ahead(event: AgentEvent, horizon: float) -> Rejection | None:
    # Checked at decode time against a clock read once per batch (datetime.now() per event
    # would cost as much as the rest of validation), not in __post_init__, so that building
    # an event never depends on when the process started.
    ahead = event.ts.timestamp() - horizon
    if ahead <= 0:
        return None
    reason = (
        f"ts {event.ts.isoformat()} is {ahead + MAX_FUTURE_SECONDS:.0f} s in the future (more"
        f" than {MAX_FUTURE_SECONDS:.0f} s ahead of the pipeline's clock; check the agent host's"
        " clock) - at `$.ts`"
    )
    return Rejection(reason, "$.ts")


def _horizon() -> float:
    return datetime.now(UTC).timestamp() + MAX_FUTURE_SECONDS


def _field_of(message: str) -> str | None:
    marker = " - at `"
    at = message.rfind(marker)
    if at < 0:
        return None
    return message[at + len(marker) : -1] if message.endswith("`") else None


_KNOWN_TYPES = ", ".join(EVENT_TYPES)


def _not_utf8(raw: bytes) -> Rejection | None:
    """The project's own UTF-8 check: JSON is UTF-8, whatever a decoder says or raises.

    msgspec 0.22 raised ``UnicodeDecodeError`` for a bad byte inside a string and 0.23 a
    ``DecodeError`` with other words, and neither looks at bytes it skips (unknown fields):
    the reason and the position must not follow a dependency's choice.
    """
    if raw.isascii():
        return None
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        return Rejection(f"not UTF-8: invalid byte at position {bad.start}")
    return None


def _any_not_utf8(raws: Sequence[bytes]) -> bool:
    """Whether a message of ``raws`` is not UTF-8; ASCII messages (most) are passed in C."""
    return any(_not_utf8(raw) for raw in itertools.filterfalse(bytes.isascii, raws))


def _reason_of(exc: Exception) -> str:
    # msgspec's words are kept where they name the field and the problem well; the branches
    # below only reword them, and a wording they do not know passes through unchanged.
    text = str(exc)
    if isinstance(exc, msgspec.ValidationError):
        if text.startswith("Object missing required field `type`"):
            return f"missing event type: field `type` must be one of {_KNOWN_TYPES} - at `$.type`"
        if text.startswith("Invalid value") and "`$.type`" in text:
            bad = text.split(" - ")[0].removeprefix("Invalid value ")
            return f"unknown event type {bad}: expected one of {_KNOWN_TYPES} - at `$.type`"
        missing = re.match(r"Object missing required field `([^`]+)`( - at `([^`]+)`)?", text)
        if missing:
            where = (missing.group(3) or "$") + "." + missing.group(1)
            return f"missing required field `{missing.group(1)}` - at `{where}`"
        if text.startswith("Expected `object`") and " - at " not in text:
            return text + ": an event is one JSON object"
        return text
    return "malformed JSON: " + text


def decode(raw: bytes | str, *, max_bytes: int = MAX_EVENT_BYTES) -> AgentEvent | Rejection:
    """Decode and validate one JSON message; return the event or the reason it was rejected."""
    _, _, rejected, _ = result = decode_batch([raw], max_bytes=max_bytes)
    return rejected[0] if rejected else result[0][0]


def decode_batch(
    raws: Sequence[bytes | str | None], *, max_bytes: int = MAX_EVENT_BYTES
) -> tuple[list[AgentEvent], list[int], list[Rejection], list[int]]:
    """Validate a batch of messages.

    Returns ``(events, event_positions, rejections, rejection_positions)`` where positions
    index into ``raws``, so callers keep each outcome tied to its Kafka offset.

    A batch of ``bytes`` messages (or None) within the size limit, every fetch normally, is
    decoded by one C-level ``map`` of the decoder; a message it cannot decode is judged by
    ``_decode_one``, the per-message path every other batch takes, so the outcome and the
    reason of every message are the same on both paths. The clock check is one ``max`` over
    the batch, and per event only when some event is too far ahead.
    """
    horizon = _horizon()
    present = raws
    try:
        joined = b"".join(raws)  # type: ignore[arg-type]  # TypeError: a None or a str
    except TypeError:
        present = [raw for raw in raws if raw is not None]
        try:
            joined = b"".join(present)  # type: ignore[arg-type]  # TypeError: a str
        except TypeError:
            return _decode_each(raws, max_bytes, horizon)
    total = len(joined)
    if total > max_bytes and max(map(len, present)) > max_bytes:  # type: ignore[arg-type]
        return _decode_each(raws, max_bytes, horizon)
    if not joined.isascii() and _any_not_utf8(present):  # type: ignore[arg-type]
        return _decode_each(raws, max_bytes, horizon)
    events: list[AgentEvent] = []
    rejected: list[Rejection] = []
    bad_at: list[int] = []
    rest = iter(raws)
    while True:
        try:
            events.extend(map(_decoder.decode, rest))  # type: ignore[arg-type]
            break
        except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError, TypeError):
            # A None (TypeError) or a message that does not decode. extend keeps what it
            # decoded before the failing message, so that message is the next position;
            # ``rest`` resumes after it.
            at = len(events) + len(bad_at)
            outcome = _decode_one(raws[at], max_bytes)
            if isinstance(outcome, Rejection):
                rejected.append(outcome)
                bad_at.append(at)
            else:
                events.append(outcome)
    ok_at = _positions(len(raws), bad_at)
    if events and max(map(_TS, events)).timestamp() > horizon:
        return _check_clock_each(events, ok_at, rejected, bad_at, horizon)
    return events, ok_at, rejected, bad_at


_TS: Final = operator.attrgetter("ts")


def _positions(n: int, skip: list[int]) -> list[int]:
    """``0..n-1`` without the ascending positions ``skip``."""
    if not skip:
        return list(range(n))
    out: list[int] = []
    lo = 0
    for at in skip:
        out.extend(range(lo, at))
        lo = at + 1
    out.extend(range(lo, n))
    return out


def _check_clock_each(
    events: list[AgentEvent],
    ok_at: list[int],
    rejected: list[Rejection],
    bad_at: list[int],
    horizon: float,
) -> tuple[list[AgentEvent], list[int], list[Rejection], list[int]]:
    """Move the events too far ahead of ``horizon`` to the rejections, positions in order."""
    kept: list[AgentEvent] = []
    kept_at: list[int] = []
    late: list[tuple[int, Rejection]] = []
    for at, event in zip(ok_at, events, strict=True):
        ahead = _too_far_ahead(event, horizon)
        if ahead is None:
            kept.append(event)
            kept_at.append(at)
        else:
            late.append((at, ahead))
    merged = sorted([*zip(bad_at, rejected, strict=True), *late], key=operator.itemgetter(0))
    return kept, kept_at, [r for _, r in merged], [at for at, _ in merged]


def _decode_one(raw: bytes | str | None, max_bytes: int) -> AgentEvent | Rejection:
    """One message's event, or why it is rejected (everything but the clock check)."""
    if raw is None:
        return Rejection("empty message: Kafka record has no value")
    size = len(raw) if isinstance(raw, bytes) else len(raw.encode())
    if size > max_bytes:
        return Rejection(f"oversized message: {size} bytes exceeds the {max_bytes}-byte limit")
    if isinstance(raw, bytes) and (not_utf8 := _not_utf8(raw)) is not None:
        return not_utf8
    try:
        event: AgentEvent = _decoder.decode(raw)
    except (msgspec.MsgspecError, UnicodeDecodeError) as exc:
        return Rejection(reason := _reason_of(exc), _field_of(reason))
    except RecursionError:
        # msgspec recurses per nesting level: a hostile message must not stop the worker.
        return Rejection("malformed JSON: nested too deeply")
    return event


def _decode_each(
    raws: Sequence[bytes | str | None], max_bytes: int, horizon: float
) -> tuple[list[AgentEvent], list[int], list[Rejection], list[int]]:
    """``decode_batch`` one message at a time (batches with a None, a str or an oversized one)."""
    events: list[AgentEvent] = []
    ok_at: list[int] = []
    rejected: list[Rejection] = []
    bad_at: list[int] = []
    for i, raw in enumerate(raws):
        outcome = _decode_one(raw, max_bytes)
        if not isinstance(outcome, Rejection):
            late = _too_far_ahead(outcome, horizon)
            if late is None:
                events.append(outcome)
                ok_at.append(i)
                continue
            outcome = late
        rejected.append(outcome)
        bad_at.append(i)
    return events, ok_at, rejected, bad_at


def encode(event: AgentEvent) -> bytes:
    """Serialise an event to its JSON wire form (``type`` included)."""
    return _encoder.encode(event)


def from_dict(data: dict[str, Any]) -> AgentEvent:
    """Build an event from a dict (e.g. one parsed from JSONL); raises ``InvalidEvent``."""
    try:
        event: AgentEvent = msgspec.convert(data, AgentEvent)
    except msgspec.ValidationError as exc:
        raise InvalidEvent(_reason_of(exc), data.get("event_id")) from None
    return check_clock(event)


def check_clock(event: AgentEvent) -> AgentEvent:
    """Return ``event`` if its ``ts`` is at most 5 minutes ahead of now, else raise ``InvalidEvent``.

    Construction validates everything else; this is the one check that needs the clock.
    """
    ahead = _too_far_ahead(event, _horizon())
    if ahead is not None:
        raise InvalidEvent(ahead.reason, event.event_id)
    return event


class InvalidEvent(ValueError):
    """Raised by the publisher API for an event that would be dead-lettered."""

    def __init__(self, reason: str, event_id: object = None) -> None:
        where = f"event {event_id!r}: " if event_id else ""
        super().__init__(f"invalid event: {where}{reason}")
        self.reason = reason
        self.event_id = event_id


def iter_fields() -> Iterable[tuple[str, Any]]:
    """Every wire field of every event type with its annotation, envelope first, no repeats."""
    seen: set[str] = set()
    for cls in (Envelope, *EVENT_CLASSES):
        info = msgspec.inspect.type_info(cls)
        for f in info.fields:  # type: ignore[attr-defined]
            if f.name not in seen:
                seen.add(f.name)
                yield f.name, f.type
