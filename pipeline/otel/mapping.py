"""Which span becomes which event, and where each field comes from: the one mapping table.

The GenAI semantic conventions are still "development" stability and three vocabularies are
in use (OpenTelemetry GenAI with its deprecated names, OpenInference, OpenLLMetry), so every
name agentstream reads is listed here, and the README's tables are ``readme_tables()``
(a test keeps them equal).

A span's event type is decided by the first rule that matches (the order Langfuse uses):
``agentstream.event.type``, ``openinference.span.kind``, ``gen_ai.operation.name``,
``traceloop.span.kind``, then the presence of a tool name or of a model name. A span that no
rule matches (HTTP, database, framework plumbing) is skipped and counted, never an error.

Tokens come from model-call spans only: an agent span is a task whatever totals it carries,
so rolled-up usage is never counted twice. An agent span is a task only when no agent span
above it is in the same export (a sub-agent is part of its parent's task). Agent identity,
tenant, task, session and prompt version are looked up on the span, then on its ancestors in
the same export, then on the resource.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Final

import msgspec

from pipeline import schema
from pipeline.otel.decode import LogRecord, Span, Wanted

# --- event types -----------------------------------------------------------------------------

# openinference.span.kind -> event type (None: known, not agent work of its own).
OPENINFERENCE_KINDS: Final[dict[str, str | None]] = {
    "LLM": "llm_call",
    "EMBEDDING": "llm_call",
    "TOOL": "tool_call",
    "RETRIEVER": "retrieval",
    "AGENT": "task",
    "GUARDRAIL": "guardrail",
    "CHAIN": None,
    "RERANKER": None,
    "EVALUATOR": None,
    "PROMPT": None,
    "UNKNOWN": None,
}
# gen_ai.operation.name -> event type.
OPERATIONS: Final[dict[str, str | None]] = {
    "chat": "llm_call",
    "text_completion": "llm_call",
    "generate_content": "llm_call",
    "embeddings": "llm_call",
    "execute_tool": "tool_call",
    "retrieval": "retrieval",
    "search_memory": "retrieval",
    "invoke_agent": "task",
    "invoke_workflow": "task",
    "apply_guardrail": "guardrail",
    "create_agent": None,
    "plan": None,
}
# traceloop.span.kind (OpenLLMetry) -> event type; its model calls carry only gen_ai.* names.
TRACELOOP_KINDS: Final[dict[str, str | None]] = {
    "workflow": "task",
    "agent": "task",
    "tool": "tool_call",
    "task": None,
}
# AgentOps-style and explicit types: agentstream.event.type takes any activity type.
EXPLICIT_TYPE: Final = "agentstream.event.type"
# Feedback and evaluation results arrive as log records, not spans.
EXPLICIT_TYPES: Final[tuple[str, ...]] = tuple(
    t for t in schema.ACTIVITY_TYPES if t not in ("feedback", "evaluation")
)

# --- fields: attribute names, first one present wins ------------------------------------------

# Envelope fields looked up on the span, its ancestors in the export, then the resource.
CONTEXT: Final[dict[str, tuple[str, ...]]] = {
    "agent_id": ("gen_ai.agent.id", "gen_ai.agent.name", "service.name"),
    "agent_version": ("gen_ai.agent.version", "service.version"),
    "prompt_version": (
        "agentstream.prompt.version",
        "gen_ai.prompt.name",
        "llm.prompt_template.version",
        "traceloop.prompt.version",
    ),
    "tenant_id": ("agentstream.tenant.id",),
    "session_id": (
        "gen_ai.conversation.id",
        "session.id",
        "traceloop.association.properties.session_id",
    ),
    "task_id": ("agentstream.task.id",),
}
# Fields read from the span itself.
FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "model": ("gen_ai.request.model", "gen_ai.response.model", "llm.model_name"),
    "provider": ("gen_ai.provider.name", "gen_ai.system", "llm.provider", "llm.system"),
    "input_tokens": (
        "gen_ai.usage.input_tokens",
        "gen_ai.usage.prompt_tokens",
        "llm.token_count.prompt",
        "llm.usage.prompt_tokens",
    ),
    "output_tokens": (
        "gen_ai.usage.output_tokens",
        "gen_ai.usage.completion_tokens",
        "llm.token_count.completion",
        "llm.usage.completion_tokens",
    ),
    "cached_input_tokens": (
        "gen_ai.usage.cache_read.input_tokens",
        "gen_ai.usage.cache_read_input_tokens",
        "llm.token_count.prompt_details.cache_read",
    ),
    "reasoning_output_tokens": (
        "gen_ai.usage.reasoning.output_tokens",
        "llm.token_count.completion_details.reasoning",
    ),
    "cost_usd": ("agentstream.cost.usd", "llm.cost.total", "gen_ai.usage.cost"),
    "finish_reason": ("gen_ai.response.finish_reasons", "llm.finish_reason"),
    "operation": ("gen_ai.operation.name",),
    "tool_name": ("gen_ai.tool.name", "tool.name", "traceloop.entity.name"),
    "error_type": ("error.type", "exception.type"),
    "data_source": ("gen_ai.data_source.id", "agentstream.retrieval.data_source"),
    "hits": ("agentstream.retrieval.hits",),
    "top_score": ("agentstream.retrieval.top_score",),
    "miss": ("agentstream.retrieval.miss",),
    "query": ("gen_ai.retrieval.query.text", "agentstream.retrieval.query", "input.value"),
    "outcome": ("agentstream.task.outcome",),
    "reason (escalation)": ("agentstream.escalation.reason",),
    "target": ("agentstream.escalation.target",),
    "policy_id": (
        "gen_ai.guardrail.policy.id",
        "gen_ai.guardrail.name",
        "agentstream.guardrail.policy.id",
    ),
    "action": ("gen_ai.guardrail.result.type", "agentstream.guardrail.action"),
    "reason (guardrail)": ("gen_ai.guardrail.result.reason",),
}
# Evaluation results: log records named gen_ai.evaluation.result, parented to the span they
# evaluate (or naming it in gen_ai.response.id) -> evaluation events.
EVALUATION_EVENT: Final = "gen_ai.evaluation.result"
EVALUATION: Final[dict[str, tuple[str, ...]]] = {
    "evaluator": ("gen_ai.evaluation.name",),
    "score": ("gen_ai.evaluation.score.value",),
    "label": ("gen_ai.evaluation.score.label",),
    "passed": ("agentstream.evaluation.passed",),
    "evaluator_kind": ("agentstream.evaluation.evaluator.kind",),
    "scope": ("agentstream.evaluation.scope",),
    "suite_id": ("agentstream.evaluation.suite.id",),
    "case_id": ("agentstream.evaluation.case.id",),
    "explanation": ("gen_ai.evaluation.explanation",),
}
# The conventions have no pass/fail attribute; a label that says pass or fail decides it when
# agentstream.evaluation.passed is absent (other labels, such as "relevant", decide nothing).
LABEL_PASSED: Final[dict[str, bool]] = {
    "pass": True, "passed": True, "correct": True, "true": True,
    "fail": False, "failed": False, "incorrect": False, "false": False,
}  # fmt: skip
# A user's rating or correction: a log record named agentstream.feedback, or any log record
# (an evaluation result included) that carries one of these -> a feedback event.
FEEDBACK_EVENT: Final = "agentstream.feedback"
FEEDBACK: Final[dict[str, tuple[str, ...]]] = {
    "rating": ("agentstream.feedback.rating",),
    "correction": ("agentstream.feedback.correction",),
}
# gen_ai.guardrail.result.type values (and common synonyms) -> the schema's actions.
GUARDRAIL_ACTIONS: Final[dict[str, str]] = {
    "allow": "allow", "allowed": "allow", "pass": "allow", "passed": "allow",
    "block": "block", "blocked": "block", "deny": "block", "denied": "block",
    "modify": "modify", "modified": "modify", "redact": "modify", "redacted": "modify",
    "flag": "flag", "flagged": "flag", "warn": "flag",
}  # fmt: skip

# Fields that are computed, not read from one attribute.
DERIVED: Final[dict[str, str]] = {
    "event_id": "`otel:<trace id>:<span id>` (`:started` / `:ended` for a task), so a resent span lands once",
    "ts": "span start (a task's end: span end; a log record: its time)",
    "trace_id, span_id": "the span's ids, hex",
    "latency_ms": "span end - span start",
    "status": "`error` when the span's status is ERROR or `error.type` is set, else `ok`",
    "outcome (fallback)": "`failed` when the span's status is ERROR, else `completed`",
    "hits, top_score (fallback)": "count and best score of `gen_ai.retrieval.documents` (a list or its JSON) or OpenInference's `retrieval.documents.N.document.score`",
    "task_id (fallback)": "the trace id: the trace's root span is the task",
    "cost_usd (fallback)": "priced by the worker from model and tokens (genai-prices)",
}
_TEXT_LIMIT: Final = 16_384  # schema.Text: free text is cut to fit, never rejected for length
_DOC_INDEX_PREFIX: Final = "retrieval.documents."  # OpenInference: retrieval.documents.N.document.*


class Mapped(msgspec.Struct):
    """Events built from one export, and what happened to the rest of it.

    ``origins[i]`` is the index of the span (or record) that event ``i`` came from, so a
    rejection found later by validation counts against its span. ``rejected`` holds
    ``(index, reason)`` of items refused before validation.
    """

    events: list[dict[str, Any]]
    origins: list[int]
    rejected: list[tuple[int, str]]
    skipped: int
    total: int


def classify(attrs: dict[str, Any], found: dict[str, Any] | None = None) -> str | None:
    """The event type of a span with these attributes, or None when it is not agent work.

    ``found`` is ``pick(attrs)`` when the caller has it already."""
    explicit = attrs.get(EXPLICIT_TYPE)
    if explicit in EXPLICIT_TYPES:
        return str(explicit)
    for key, table in (
        ("openinference.span.kind", OPENINFERENCE_KINDS),
        ("gen_ai.operation.name", OPERATIONS),
        ("traceloop.span.kind", TRACELOOP_KINDS),
    ):
        value = attrs.get(key)
        if isinstance(value, str):
            kind = table.get(value.upper() if table is OPENINFERENCE_KINDS else value, "")
            if kind != "":
                return kind
    if _first(attrs, FIELDS["tool_name"][:2]) is not None:
        return "tool_call"
    if (pick(attrs) if found is None else found).get("model") is not None:
        return "llm_call"
    return None


def _first(attrs: dict[str, Any], names: Sequence[str]) -> Any:
    for name in names:
        value = attrs.get(name)
        if value is not None:
            return value
    return None


def _ts(ns: int) -> datetime:
    try:
        return datetime.fromtimestamp(ns / 1e9, UTC)
    except (OverflowError, OSError, ValueError):
        return datetime.fromtimestamp(0, UTC)  # rejected by validation as before 2000


def _count(value: Any) -> Any:
    """Token counts as ints; integral floats and digit strings are accepted, the rest is
    passed on for validation to reject with the field's name."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return value


def _number(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else msgspec.json.encode(value).decode()
    return text[:_TEXT_LIMIT]


def _name(value: Any) -> Any:
    if type(value) is str:
        return value
    if isinstance(value, list):
        value = value[0] if value else None
    return value if value is None or isinstance(value, str) else str(value)


# attribute name -> (field, rank): one pass over a span's attributes finds every field.
_INDEX: Final[dict[str, tuple[str, int]]] = {
    name: (field, rank)
    for field, names in {**CONTEXT, **FIELDS}.items()
    for rank, name in enumerate(names)
}
_CONTEXT_FIELDS: Final = frozenset(CONTEXT)
# Every span attribute the mapping reads: the decoder converts only these.
SPAN_ATTRIBUTES: Final[Wanted] = (
    frozenset(
        {
            *_INDEX,
            EXPLICIT_TYPE,
            "openinference.span.kind",
            "gen_ai.operation.name",
            "traceloop.span.kind",
            "gen_ai.retrieval.documents",
        }
    ),
    (_DOC_INDEX_PREFIX,),
)


def pick(attrs: dict[str, Any]) -> dict[str, Any]:
    """``{field: value}`` of every field ``attrs`` names, the first listed name winning."""
    found: dict[str, Any] = {}
    ranks: dict[str, int] = {}  # only fields found under a name other than the first
    for key, value in attrs.items():
        hit = _INDEX.get(key)
        if hit is None or value is None:
            continue
        field, rank = hit
        if field not in found:
            found[field] = value
            if rank:
                ranks[field] = rank
        elif rank < ranks.get(field, 0):
            found[field] = value
            ranks[field] = rank
    return found


def _own(found: dict[str, Any]) -> dict[str, Any]:
    if found.keys().isdisjoint(_CONTEXT_FIELDS):
        return _NOTHING
    return {k: v for k, v in found.items() if k in _CONTEXT_FIELDS}


_NOTHING: Final[dict[str, Any]] = {}


class _Context:
    """Envelope values per span: the span's own, else its nearest ancestor's in the export,
    else the resource's. Memoised per span id; a parent cycle (hostile input) ends the walk.
    Spans that share a context share one envelope dict."""

    def __init__(self, spans: Sequence[Span], picks: Sequence[dict[str, Any]]) -> None:
        self._by_id = {s.span_id: i for i, s in enumerate(spans) if s.span_id}
        self._spans = spans
        self._picks = picks
        self._memo: dict[str, dict[str, Any]] = {}
        self._resources: dict[int, dict[str, Any]] = {}
        self._envelopes: dict[int, dict[str, Any]] = {}

    def _resource(self, resource: dict[str, Any]) -> dict[str, Any]:
        got = self._resources.get(id(resource))
        if got is None:
            got = self._resources[id(resource)] = _own(pick(resource))
        return got

    def _of(self, at: int) -> dict[str, Any]:
        span = self._spans[at]
        if span.span_id in self._memo:
            return self._memo[span.span_id]
        chain: list[int] = []
        seen: set[str] = set()
        node: int | None = at
        base: dict[str, Any] | None = None
        while node is not None:
            sid = self._spans[node].span_id
            if sid in seen:
                break
            if sid in self._memo:
                base = self._memo[sid]
                break
            seen.add(sid)
            chain.append(node)
            parent = self._spans[node].parent_id
            node = self._by_id.get(parent) if parent else None
        if base is None:
            base = self._resource(self._spans[chain[-1]].resource)
        for i in reversed(chain):
            own = _own(self._picks[i])
            ctx = {**base, **own} if own else base
            if self._spans[i].span_id:
                self._memo[self._spans[i].span_id] = ctx
            base = ctx
        return base

    def envelope(self, at: int) -> dict[str, Any]:
        """The envelope fields but ids (shared: copy before changing)."""
        ctx = self._of(at)
        env = self._envelopes.get(id(ctx))
        if env is None:
            env = self._envelopes[id(ctx)] = _envelope(ctx)
        return env

    def has_agent_ancestor(self, span: Span, agent_ids: set[str]) -> bool:
        seen = {span.span_id}
        parent = span.parent_id
        while parent and parent not in seen:
            if parent in agent_ids:
                return True
            seen.add(parent)
            node = self._by_id.get(parent)
            parent = self._spans[node].parent_id if node is not None else ""
        return False


def _envelope(ctx: dict[str, Any]) -> dict[str, Any]:
    env = {
        "schema_version": schema.SCHEMA_VERSION,
        "agent_id": _name(ctx.get("agent_id")) or "unknown",
    }
    for field in ("agent_version", "prompt_version", "tenant_id", "session_id", "task_id"):
        value = _name(ctx.get(field))
        if value is not None:
            env[field] = value
    return env


def _with_ids(env: dict[str, Any], trace_id: str, span_id: str) -> dict[str, Any]:
    base = {**env, "trace_id": trace_id or None, "span_id": span_id or None}
    if "task_id" not in env:
        # The task is the trace (its root span) unless the agent names one.
        base["task_id"] = trace_id or None
    return base


def _latency_ms(span: Span) -> float | None:
    if span.start_ns and span.end_ns >= span.start_ns:
        return (span.end_ns - span.start_ns) / 1e6
    return None


def _documents(attrs: dict[str, Any]) -> tuple[int | None, float | None]:
    """(count, best score) of the retrieved documents, GenAI or OpenInference style."""
    docs = attrs.get("gen_ai.retrieval.documents")
    if isinstance(docs, str):
        try:
            docs = msgspec.json.decode(docs)
        except msgspec.DecodeError:
            docs = None
    scores: list[float] = []
    if isinstance(docs, list):
        for doc in docs:
            score = doc.get("score") if isinstance(doc, dict) else None
            if isinstance(score, int | float) and not isinstance(score, bool):
                scores.append(float(score))
        return len(docs), max(scores) if scores else None
    indexes: set[str] = set()
    for key, value in attrs.items():
        if key.startswith(_DOC_INDEX_PREFIX):
            index, _, rest = key[len(_DOC_INDEX_PREFIX) :].partition(".")
            indexes.add(index)
            if rest == "document.score" and isinstance(value, int | float):
                scores.append(float(value))
    if indexes:
        return len(indexes), max(scores) if scores else None
    return None, None


def _put(event: dict[str, Any], field: str, value: Any) -> None:
    if value is not None:
        event[field] = value


def _llm_call(span: Span, f: dict[str, Any], event: dict[str, Any]) -> None:
    event["input_tokens"] = _count(f.get("input_tokens", 0))
    event["output_tokens"] = _count(f.get("output_tokens", 0))
    event["cached_input_tokens"] = _count(f.get("cached_input_tokens", 0))
    event["reasoning_output_tokens"] = _count(f.get("reasoning_output_tokens", 0))
    _put(event, "cost_usd", _number(f.get("cost_usd")))
    _put(event, "latency_ms", _latency_ms(span))
    _put(event, "finish_reason", _name(f.get("finish_reason")))
    operation = f.get("operation")
    if operation is None and span.attrs.get("openinference.span.kind") == "EMBEDDING":
        operation = "embeddings"
    event["operation"] = _name(operation) or "chat"


def _tool_call(span: Span, f: dict[str, Any], event: dict[str, Any]) -> None:
    error_type = _name(f.get("error_type")) or span.exception_type
    event["tool_name"] = _name(f.get("tool_name")) or span.name or "unknown"
    event["status"] = "error" if span.error or error_type else "ok"
    _put(event, "error_type", error_type)
    _put(event, "latency_ms", _latency_ms(span))


def _retrieval(span: Span, f: dict[str, Any], event: dict[str, Any]) -> None:
    hits, top = f.get("hits"), f.get("top_score")
    if hits is None or top is None:
        count, best = _documents(span.attrs)
        hits = count or 0 if hits is None else hits
        top = best if top is None else top
    event["hits"] = _count(hits)
    _put(event, "top_score", _number(top))
    _put(event, "miss", f.get("miss"))
    _put(event, "data_source", _name(f.get("data_source")))
    _put(event, "query", _text(f.get("query")))
    _put(event, "latency_ms", _latency_ms(span))


def _guardrail(span: Span, f: dict[str, Any], event: dict[str, Any]) -> None:
    action = f.get("action")
    if action is None:
        action = "block" if span.error else "allow"
    event["policy_id"] = _name(f.get("policy_id")) or span.name or "unknown"
    event["action"] = GUARDRAIL_ACTIONS.get(str(action).lower(), action)
    _put(event, "reason", _text(f.get("reason (guardrail)")))


def _escalation(span: Span, f: dict[str, Any], event: dict[str, Any]) -> None:
    _put(event, "reason", _text(f.get("reason (escalation)")))
    event["target"] = _name(f.get("target")) or "human"


_BUILDERS: Final[dict[str, Callable[[Span, dict[str, Any], dict[str, Any]], None]]] = {
    "llm_call": _llm_call,
    "tool_call": _tool_call,
    "retrieval": _retrieval,
    "guardrail": _guardrail,
    "escalation": _escalation,
}
_TASK_ENDS: Final = frozenset({"completed", "failed", "abandoned"})


def _task_events(span: Span, f: dict[str, Any], base: dict[str, Any]) -> list[dict[str, Any]]:
    """A task span is two events: started at its start, its outcome at its end."""
    outcome = f.get("outcome")
    if outcome not in _TASK_ENDS:
        outcome = "failed" if span.error else "completed"
    started = {**base, "type": "task", "outcome": "started", "ts": _ts(span.start_ns)}
    started["event_id"] = f"{base['event_id']}:started"
    ended = {**base, "type": "task", "outcome": outcome, "ts": _ts(span.end_ns or span.start_ns)}
    ended["event_id"] = f"{base['event_id']}:ended"
    return [started, ended]


def map_spans(spans: Sequence[Span]) -> Mapped:
    """Events for every span that is agent work; the rest skipped or rejected (with why)."""
    picks = [pick(s.attrs) for s in spans]
    kinds = [classify(s.attrs, f) for s, f in zip(spans, picks, strict=True)]
    ctx = _Context(spans, picks)
    agents = {s.span_id for s, k in zip(spans, kinds, strict=True) if k == "task" and s.span_id}
    events: list[dict[str, Any]] = []
    origins: list[int] = []
    rejected: list[tuple[int, str]] = []
    skipped = 0
    for i, span in enumerate(spans):
        kind = kinds[i]
        if kind is None:
            skipped += 1
            continue
        if not span.trace_id or not span.span_id:
            rejected.append((i, "span without a valid trace_id and span_id"))
            continue
        if kind == "task" and agents and ctx.has_agent_ancestor(span, agents):
            skipped += 1  # a sub-agent: part of the task of the agent above it
            continue
        f = picks[i]
        base = _with_ids(ctx.envelope(i), span.trace_id, span.span_id)
        base["event_id"] = f"otel:{span.trace_id}:{span.span_id}"
        _put(base, "model", _name(f.get("model")))
        _put(base, "provider", _name(f.get("provider")))
        if kind == "task":
            new = _task_events(span, f, base)
            events.extend(new)
            origins.extend((i, i))
        else:
            base["type"] = kind
            base["ts"] = _ts(span.start_ns)
            _BUILDERS[kind](span, f, base)
            events.append(base)
            origins.append(i)
    return Mapped(events, origins, rejected, skipped, len(spans))


def _has_result(attrs: dict[str, Any]) -> bool:
    return any(_first(attrs, EVALUATION[k]) is not None for k in ("score", "label", "passed"))


def _is_feedback(record: LogRecord) -> bool:
    return record.event_name == FEEDBACK_EVENT or any(
        name in record.attrs for names in FEEDBACK.values() for name in names
    )


def feedback_event(record: LogRecord, base: dict[str, Any]) -> dict[str, Any]:
    """A user's rating (1-5) and/or correction of the agent's answer."""
    event = {**base, "type": "feedback"}
    _put(event, "rating", _number(_first(record.attrs, FEEDBACK["rating"])))
    _put(event, "correction", _text(_first(record.attrs, FEEDBACK["correction"])))
    return event


def evaluation_event(record: LogRecord, base: dict[str, Any]) -> dict[str, Any]:
    """An evaluation result: the evaluator, its score, label and pass/fail, and what it judged.

    The conventions parent the record to the evaluated span, so without an explicit
    ``agentstream.evaluation.scope`` the scope is the most precise id the record carries: its
    span, else its trace, else the task or session named by attributes."""
    a = record.attrs
    event = {**base, "type": "evaluation"}
    _put(event, "evaluator", _name(_first(a, EVALUATION["evaluator"])))
    _put(event, "score", _number(_first(a, EVALUATION["score"])))
    label = _name(_first(a, EVALUATION["label"]))
    _put(event, "label", label)
    passed = _first(a, EVALUATION["passed"])
    if passed is None and isinstance(label, str):
        passed = LABEL_PASSED.get(label.strip().lower())
    _put(event, "passed", passed)
    _put(event, "evaluator_kind", _name(_first(a, EVALUATION["evaluator_kind"])))
    scope = _name(_first(a, EVALUATION["scope"]))
    if scope is None:
        ids = ("span", "trace", "task", "session")
        scope = next((s for s in ids if event.get(f"{s}_id")), "task")
    event["scope"] = scope
    for field in ("suite_id", "case_id"):
        _put(event, field, _name(_first(a, EVALUATION[field])))
    _put(event, "explanation", _text(_first(a, EVALUATION["explanation"])))
    return event


def _record_id(record: LogRecord, found: dict[str, Any]) -> str:
    if record.trace_id and record.span_id:
        name = _name(_first(record.attrs, EVALUATION["evaluator"]) or found.get("policy_id"))
        return f"otel:{record.trace_id}:{record.span_id}:{record.event_name}:{name or ''}"
    # No ids: the record's content names it, so a resent record is still a repeat.
    digest = hashlib.blake2b(
        msgspec.json.encode([record.time_ns, record.event_name, record.attrs, record.resource]),
        digest_size=16,
    ).hexdigest()
    return f"otel:log:{digest}"


def map_logs(records: Sequence[LogRecord]) -> Mapped:
    """Feedback, evaluation results and guardrail results become events; the rest skipped.

    An evaluator that failed (``error.type`` and no result) produced nothing to count: skipped."""
    events: list[dict[str, Any]] = []
    origins: list[int] = []
    resources: dict[int, dict[str, Any]] = {}
    skipped = 0
    for i, record in enumerate(records):
        f = pick(record.attrs)
        feedback = _is_feedback(record)
        evaluation = not feedback and record.event_name == EVALUATION_EVENT
        is_guardrail = record.event_name.startswith("gen_ai.guardrail") or "policy_id" in f
        failed = evaluation and "error_type" in f and not _has_result(record.attrs)
        if failed or not (feedback or evaluation or is_guardrail):
            skipped += 1
            continue
        res = resources.get(id(record.resource))
        if res is None:
            res = resources[id(record.resource)] = _own(pick(record.resource))
        base = _with_ids(_envelope({**res, **_own(f)}), record.trace_id, record.span_id)
        base["event_id"] = _record_id(record, f)
        base["ts"] = _ts(record.time_ns)
        if feedback or evaluation:
            # The judged work's model and provider: its evaluations fall into its metrics keys.
            _put(base, "model", _name(f.get("model")))
            _put(base, "provider", _name(f.get("provider")))
            events.append((feedback_event if feedback else evaluation_event)(record, base))
        else:
            span = Span(
                record.trace_id, record.span_id, "", "", 0, 0, False, record.attrs, record.resource
            )
            base["type"] = "guardrail"
            _guardrail(span, f, base)
            events.append(base)
        origins.append(i)
    return Mapped(events, origins, [], skipped, len(records))


# --- the README's tables ------------------------------------------------------------------


def _rows(table: dict[str, str | None]) -> Iterable[str]:
    for key, value in table.items():
        yield f"`{key}` -> {f'`{value}`' if value else 'skipped'}"


def readme_tables() -> str:
    """The README's mapping section tables, generated from the dicts above."""
    out = ["| rule (first match wins) | event type |", "| --- | --- |"]
    out.append(f"| `{EXPLICIT_TYPE}` | that type ({', '.join(EXPLICIT_TYPES)}) |")
    for attr, table in (
        ("openinference.span.kind", OPENINFERENCE_KINDS),
        ("gen_ai.operation.name", OPERATIONS),
        ("traceloop.span.kind", TRACELOOP_KINDS),
    ):
        out.append(f"| `{attr}` | {', '.join(_rows(table))} |")
    out.append(
        f"| a tool name ({', '.join(f'`{n}`' for n in FIELDS['tool_name'][:2])}) | `tool_call` |"
    )
    out.append(f"| a model name ({', '.join(f'`{n}`' for n in FIELDS['model'])}) | `llm_call` |")
    out.append("| anything else (HTTP, database, plumbing) | skipped and counted |")
    out.append(
        f"| log record `{FEEDBACK_EVENT}`, or any log record with"
        f" {', '.join(f'`{n}`' for names in FEEDBACK.values() for n in names)} | `feedback` |"
    )
    labels = "; ".join(
        f"{', '.join(f'`{k}`' for k, v in LABEL_PASSED.items() if v is want)} -> {word}"
        for want, word in ((True, "passed"), (False, "failed"))
    )
    out.append(
        f"| log record `{EVALUATION_EVENT}` | `evaluation` (pass/fail, when not given: from the"
        f" label, {labels}; scope, when not given: `span` when the record has a span id, else"
        " `trace`, `task`, `session`; an evaluator that failed, with `error.type` and no"
        " result: skipped) |"
    )
    out.append("| log record `gen_ai.guardrail.*` or with a guardrail policy id | `guardrail` |")
    out += ["", "| event field | attributes, first present wins |", "| --- | --- |"]
    for field, how in DERIVED.items():
        out.append(f"| `{field}` | {how} |")
    for field, names in {
        **CONTEXT,
        **FIELDS,
        **{f"evaluation {k}": v for k, v in EVALUATION.items()},
        **{f"feedback {k}": v for k, v in FEEDBACK.items()},
    }.items():
        out.append(f"| `{field}` | {', '.join(f'`{n}`' for n in names)} |")
    return "\n".join(out) + "\n"
