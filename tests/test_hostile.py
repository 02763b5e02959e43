"""Hostile input, property-based, through the real broker and ONE long-running worker.

Hypothesis builds batches of messages: random bytes, truncated and deeply nested JSON, huge
strings and arrays (up to the worker's size limit and beyond it), wrong types, NaN and
Infinity literals, timestamps far in the past and the future, unknown schema versions and
event types, invalid UTF-8, empty and null records, repeated event ids, and valid events
mixed in. Each batch is published raw to the events topic; once the worker has committed it,
every message must be found exactly once, by its partition and offset: in ``events`` if
valid (the schema's own ``decode`` is the oracle), in ``dead_letters`` with the oracle's
reason if not, and a repeat of an event id landed just before in ``dead_letters`` as a
duplicate. The worker must keep running and its memory must stay bounded throughout.

Sizes: the test broker (and Kafka's default) take messages up to ~1 MiB, so the worker here
runs with ``max_message_bytes`` = 512 KiB: messages up to ~1 MB then cover both sides of the
worker's limit. The default limit's edges have tests of their own below.

Deterministic: ``derandomize=True`` and no example database. Shrinking is off: each example
costs a publish and a commit round trip (about a second), and a failing example is printed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from pipeline import schema
from pipeline.config import Settings
from sinks.catalog import connect
from tests.faults.support import (
    Figures,
    GiB,
    MiB,
    WorkerProcess,
    committed,
    committed_by_partition,
    report,
    wait_until,
)
from tests.helpers import produce_raw, scalar, unique_settings

pytestmark = pytest.mark.timeout(420)

LIMIT = 512 * 1024  # the property worker's max_message_bytes
MEMORY_BOUND = 1 * GiB
HUGE_MAX = 1_000_000  # bytes of filler in a huge message (the broker takes ~1 MiB)
NESTING_MAX = 400  # see test_deeply_nested_json_is_a_dead_letter for deeper
RECENT_S = 300  # a repeat of an id first seen this close to now is within the dedupe horizon

# --------------------------------------------------------------------------------------
# message specs: what hypothesis draws (small, printable), rendered to bytes at publish time
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rel:
    """A timestamp ``seconds`` from the wall clock when the batch is published."""

    seconds: int


@dataclass(frozen=True)
class Eid:
    """An event id, made unique per batch by a prefix at publish time."""

    text: str


NAN, INF = float("nan"), float("inf")

names = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12
) | st.sampled_from(["support-bot", "a", "x" * 256, "x" * 257, "é", "🤖", "a\x00b", "\u2028"])
ids = names.map(Eid)
recent = st.integers(-RECENT_S, 200).map(Rel)
special_ts = st.sampled_from(
    [
        "1970-01-01T00:00:00Z",
        "1999-12-31T23:59:59Z",
        "2000-01-01T00:00:00Z",
        "2000-01-01T00:30:00+01:00",
        "2000-01-01T00:00:00.000001Z",
        "2005-06-15T12:00:00-14:00",
        "9999-12-31T23:59:59Z",
        "2026-13-45T99:00:00Z",
        "2026-01-05T09:00:00",
        "",
        "now",
        Rel(600),
        Rel(-20 * 365 * 86400),
        1767600000,
        None,
    ]
)
wild_numbers = st.sampled_from(
    [-1, 0, -0.0, 1.5, 10**12, 10**12 + 1, 2**63, 10**30, 1e308, NAN, INF, -INF, 1e-300, "12"]
)
json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=20)
    | wild_numbers
)
json_any = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _type_fields(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    count = st.integers(0, 10**12)
    millis = st.floats(0, 7 * 86_400_000) | st.sampled_from([0, -0.0, 1e-300])
    text = st.text(max_size=40) | st.sampled_from(["mail bob@example.com", "call 555123456789"])
    if kind == "llm_call":
        inp = draw(count)
        return {
            "input_tokens": inp,
            "output_tokens": draw(count),
            "cached_input_tokens": draw(st.integers(0, inp)),
            "latency_ms": draw(millis),
            "model": draw(st.sampled_from(["gpt-4o", "claude-sonnet-4", "no-such-model"])),
            "provider": draw(st.sampled_from(["openai", "anthropic", "nobody"])),
            **({"cost_usd": draw(st.floats(0, 1e6))} if draw(st.booleans()) else {}),
        }
    if kind == "tool_call":
        return {
            "tool_name": draw(names),
            "status": draw(st.sampled_from(["ok", "error"])),
            "latency_ms": draw(millis),
        }
    if kind == "retrieval":
        return {
            "hits": draw(st.integers(0, 100)),
            "query": draw(text),
            "top_score": draw(st.floats(-1e9, 1e9)),
        }
    if kind == "escalation":
        return {"reason": draw(text)}
    if kind == "task":
        return {"outcome": draw(st.sampled_from(["started", "completed", "failed", "abandoned"]))}
    if kind == "release":
        return {
            "release_id": draw(names),
            "dimension": draw(st.sampled_from(["agent_version", "prompt_version", "model", "x"])),
            "candidate": draw(names),
            "baseline": draw(names),
            "traffic_share": draw(st.floats(-1, 2)),
        }
    if kind == "feedback":
        return {"rating": draw(st.floats(-1e9, 1e9)), "correction": draw(text)}
    if kind == "evaluation":
        return {
            "evaluator": draw(names),
            "score": draw(st.floats(-1e9, 1e9)),
            "label": draw(names),
            "passed": draw(st.booleans()),
            "evaluator_kind": draw(st.sampled_from(["llm_judge", "human", "heuristic"])),
            "scope": "trace",
            "trace_id": draw(names),
            "explanation": draw(text),
        }
    return {
        "policy_id": draw(names),
        "action": draw(st.sampled_from(["allow", "block", "modify", "flag"])),
        "reason": draw(text),
    }


@st.composite
def valid_event(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(schema.EVENT_TYPES))
    ev: dict[str, Any] = {
        "type": kind,
        "event_id": draw(ids),
        "schema_version": 1,
        "ts": draw(recent),
        "agent_id": draw(names),
    }
    for opt in ("agent_version", "prompt_version", "tenant_id", "task_id", "session_id"):
        if draw(st.booleans()):
            ev[opt] = draw(names)
    ev.update(_type_fields(draw, kind))
    if draw(st.integers(0, 4)) == 0:  # unknown fields are ignored (forward compatible)
        ev[draw(st.sampled_from(["future_field", "x", "attrs"]))] = draw(json_any)
    return ev


@st.composite
def mutated_event(draw: st.DrawFn) -> dict[str, Any]:
    ev = draw(valid_event())
    how = draw(st.sampled_from(["drop", "retype", "version", "type", "ts", "number", "dupkey"]))
    if how == "drop":
        ev.pop(draw(st.sampled_from(sorted(ev))))
    elif how == "retype":
        ev[draw(st.sampled_from(sorted(ev)))] = draw(json_any)
    elif how == "version":
        ev["schema_version"] = draw(
            st.sampled_from([0, 2, 9, -1, "1", 1.0, 1.5, None, True, 2**63])
        )
    elif how == "type":
        ev["type"] = draw(
            st.sampled_from(["teleport", "", "LLM_CALL", None, 7]) | st.text(max_size=10)
        )
    elif how == "ts":
        ev["ts"] = draw(special_ts)
    elif how == "number":
        numeric = [
            k for k, v in ev.items() if isinstance(v, int | float) and not isinstance(v, bool)
        ]
        ev[draw(st.sampled_from(numeric))] = draw(wild_numbers)
    else:
        ev["__dup__"] = draw(ids)  # rendered as a second "event_id" key in the same object
    return ev


Spec = tuple[Any, ...]

message = st.one_of(
    st.tuples(st.just("json"), valid_event()),
    st.tuples(st.just("json"), valid_event()),
    st.tuples(st.just("json"), mutated_event()),
    st.tuples(st.just("json"), mutated_event()),
    st.tuples(st.just("bytes"), st.binary(max_size=300)),
    st.tuples(st.just("truncated"), valid_event(), st.floats(0, 1, exclude_max=True)),
    st.tuples(
        st.just("bad_utf8"),
        valid_event(),
        st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]),
    ),
    st.tuples(
        st.just("nested"),
        st.integers(1, NESTING_MAX),
        st.sampled_from(["array", "object"]),
        st.booleans(),  # inside a valid event's unknown field, or the whole message
    ),
    st.tuples(
        st.just("literal"),
        st.sampled_from(
            [
                None,
                b"",
                b" ",
                b"null",
                b"0",
                b'"s"',
                b"[]",
                b"{}",
                b"\xef\xbb\xbf{}",
                b"NaN",
                b"Infinity",
                b"[1,2",
            ]
        ),
    ),
    st.tuples(st.just("repeat"), st.integers(0, 50)),
)
huge = st.tuples(
    st.just("huge"),
    valid_event(),
    st.sampled_from(["blob", "query", "event_id", "array"]),
    st.integers(0, HUGE_MAX),
    st.sampled_from(["x", "é", "🤖", "\x00", "\u2028"]),
)


@st.composite
def batches(draw: st.DrawFn) -> list[Spec]:
    small = draw(st.lists(message, min_size=5, max_size=40))
    big = draw(st.lists(huge, min_size=1, max_size=2))
    out = list(small)
    for item in big:  # interleaved
        out.insert(draw(st.integers(0, len(out))), item)
    keys = [draw(st.none() | st.binary(max_size=16)) for _ in out]
    return [(*spec, key) for spec, key in zip(out, keys, strict=True)]


# --------------------------------------------------------------------------------------
# rendering and the oracle
# --------------------------------------------------------------------------------------


@dataclass
class Message:
    value: bytes | None
    key: bytes | None
    valid: bool
    reason: str | None  # the oracle's rejection reason
    event_id: str | None = None
    ts: datetime | None = None
    partition: int = -1
    offset: int = -1


def _jsonable(value: Any, prefix: str, now: datetime) -> Any:
    if isinstance(value, Rel):
        return (now + timedelta(seconds=value.seconds)).isoformat().replace("+00:00", "Z")
    if isinstance(value, Eid):
        return prefix + value.text
    if isinstance(value, dict):
        return {k: _jsonable(v, prefix, now) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v, prefix, now) for v in value]
    return value


def _dumps(obj: dict[str, Any], prefix: str, now: datetime) -> bytes:
    data = _jsonable(obj, prefix, now)
    dup = data.pop("__dup__", None)
    text = json.dumps(data, ensure_ascii=False, allow_nan=True)  # NaN / Infinity literals
    if dup is not None:
        text = text[:-1] + (", " if len(text) > 2 else "") + f'"event_id": {json.dumps(dup)}}}'
    return text.encode()


def _nest(depth: int, kind: str) -> bytes:
    if kind == "array":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


def render(batch: list[Spec], prefix: str, now: datetime) -> list[Message]:
    out: list[Message] = []
    for spec in batch:
        kind, key = spec[0], spec[-1]
        value: bytes | None
        if kind == "json":
            value = _dumps(spec[1], prefix, now)
        elif kind == "bytes":
            value = spec[1]
        elif kind == "truncated":
            full = _dumps(spec[1], prefix, now)
            value = full[: int(len(full) * spec[2])]
        elif kind == "bad_utf8":
            full = _dumps(spec[1], prefix, now)
            at = full.index(b'"agent_id": "') + len(b'"agent_id": "')
            value = full[:at] + spec[2] + full[at:]
        elif kind == "nested":
            depth, shape, inside = spec[1:4]
            if inside:
                ev = _dumps(
                    {
                        "type": "task",
                        "event_id": Eid(f"deep{len(out)}"),
                        "schema_version": 1,
                        "ts": Rel(0),
                        "agent_id": "a",
                        "outcome": "started",
                    },
                    prefix,
                    now,
                )
                value = ev[:-1] + b', "deep": ' + _nest(depth, shape) + b"}"
            else:
                value = _nest(depth, shape)
        elif kind == "literal":
            value = spec[1]
        elif kind == "huge":
            ev, where, size, fill = spec[1:5]
            ev = dict(ev)
            if where == "array":
                ev["blob"] = [0] * (size // 3)  # "0, " per element
            else:
                per_char = len(json.dumps(fill, ensure_ascii=False).encode()) - 2
                filler = fill * max(1, size // per_char)
                if where == "event_id":
                    ev["event_id"] = Eid(filler)
                elif where == "query":
                    ev.update(type="retrieval", hits=0, query=filler)
                else:
                    ev["blob"] = filler
            value = _dumps(ev, prefix, now)
        elif kind == "repeat":
            originals = [m for m in out if m.valid]
            if not originals:
                continue
            original = originals[spec[1] % len(originals)]
            value, key = original.value, original.key  # a retry: same bytes, same key
        else:  # pragma: no cover
            raise AssertionError(kind)
        if value is None and key is None:
            key = b"tombstone"  # Kafka clients refuse a record with neither
        out.append(_judge(value, key))
    return out


def _judge(value: bytes | None, key: bytes | None) -> Message:
    if value is None:
        return Message(value, key, False, "empty message")
    got = schema.decode(value, max_bytes=LIMIT)
    if isinstance(got, schema.Rejection):
        return Message(value, key, False, got.reason)
    return Message(value, key, True, None, got.event_id, got.ts)


def id_groups(messages: list[Message]) -> dict[str, list[Message]]:
    """Valid messages by event id (a group of two or more holds repeats)."""
    groups: dict[str, list[Message]] = {}
    for m in messages:
        if m.valid and m.event_id is not None:
            groups.setdefault(m.event_id, []).append(m)
    return groups


# --------------------------------------------------------------------------------------
# the one worker
# --------------------------------------------------------------------------------------


@dataclass
class Hostile:
    settings: Settings
    worker: WorkerProcess
    batches: int = 0
    messages: int = 0
    valid: int = 0
    invalid: int = 0
    repeats: int = 0
    huge: int = 0
    rss_peak: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    finished: float = 0.0
    failures: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def hostile(bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    t0 = time.monotonic()
    tmp = tmp_path_factory.mktemp("hostile")
    s = unique_settings(bootstrap, tmp / "lake", max_message_bytes=LIMIT, flush_interval_s=0.2)
    worker = WorkerProcess(s, tmp / "worker.log").start()
    try:
        wait_until("worker ready", lambda: "consuming" in worker.log_text(), 120, alive=[worker])
        state = Hostile(s, worker)
        yield state
        worker.check_alive()
        health = worker.health()
        assert health is not None and health[0] == 200, health
        report(
            Figures(
                "hostile input (hypothesis)",
                messages=state.messages,
                faults=state.invalid,
                fault_kind="invalid messages",
                lost=0 if not state.failures else -1,
                duplicates=0 if not state.failures else -1,
                seconds=(state.finished or time.monotonic()) - t0,
                extra={
                    "batches": state.batches,
                    "valid": state.valid,
                    "repeated ids": state.repeats,
                    "huge (up to 1 MB)": state.huge,
                    "worker RSS peak MiB": state.rss_peak // MiB,
                    "kinds": dict(sorted(state.kinds.items())),
                },
            )
        )
        assert worker.terminate() == 0
    finally:
        if worker.alive():
            worker.kill()


def produce(settings: Settings, messages: list[Message]) -> None:
    """Publish raw, recording where each message went (partition, offset)."""

    async def go() -> None:
        prod = AIOKafkaProducer(
            bootstrap_servers=settings.broker, max_request_size=4 * MiB, acks="all", linger_ms=5
        )
        await prod.start()
        try:
            futs = [
                await prod.send(settings.events_topic, value=m.value, key=m.key) for m in messages
            ]
            for m, meta in zip(messages, await asyncio.gather(*futs), strict=True):
                m.partition, m.offset = meta.partition, meta.offset
        finally:
            await prod.stop()

    asyncio.run(go())


def check_batch(state: Hostile, messages: list[Message]) -> None:
    s, worker = state.settings, state.worker
    ends: dict[int, int] = {}
    for m in messages:
        ends[m.partition] = max(ends.get(m.partition, 0), m.offset + 1)
    wait_until(
        "the batch committed",
        lambda: all(committed_by_partition(s).get(p, 0) >= end for p, end in ends.items()),
        timeout=60,
        every=0.2,
        alive=[worker],
    )
    con = connect(s.data_dir)
    where = " OR ".join(
        f"(p = {p} AND o BETWEEN {min(m.offset for m in messages if m.partition == p)} AND {end - 1})"
        for p, end in ends.items()
    )
    landed = con.execute(
        f"SELECT p, o, event_id, type FROM (SELECT kafka_partition AS p, kafka_offset AS o, "
        f"event_id, type FROM events) WHERE {where}"
    ).fetchall()
    dead = con.execute(
        f'SELECT p, o, reason FROM (SELECT "partition" AS p, "offset" AS o, reason FROM '
        f"dead_letters WHERE topic = '{s.events_topic}') WHERE {where}"
    ).fetchall()
    in_events: dict[tuple[int, int], list[tuple[str, str]]] = {}
    for p, o, eid, typ in landed:
        in_events.setdefault((p, o), []).append((eid, typ))
    in_dead: dict[tuple[int, int], list[str]] = {}
    for p, o, reason in dead:
        in_dead.setdefault((p, o), []).append(reason)

    now = datetime.now(UTC)
    for m in messages:
        at = (m.partition, m.offset)
        ev, dl = in_events.get(at, []), in_dead.get(at, [])
        shown = (m.value[:120] if m.value is not None else None, m.reason)
        assert len(ev) + len(dl) == 1, f"{at}: {len(ev)} in events, {len(dl)} dead letters: {shown}"
        if not m.valid:
            assert dl, f"invalid message landed as an event: {shown}"
            assert dl[0], "dead letter without a reason"
            if "in the future" in (m.reason or ""):
                assert "in the future" in dl[0], (dl[0], shown)
            else:
                assert dl[0].startswith(m.reason or "?"), (dl[0], shown)
        elif ev:
            assert ev[0][0] == m.event_id, (ev, shown)
        else:  # a valid event is a dead letter only as a repeat of an id
            assert dl[0].startswith("duplicate event_id"), (dl, shown)
            assert len(id_groups(messages)[m.event_id or ""]) > 1, (dl, shown)
    # Repeats of an id: exactly one lands when they all are recent (within the de-duplication
    # horizon, whatever the order they are read in); otherwise at least one does.
    for eid, group in id_groups(messages).items():
        landed_n = sum(bool(in_events.get((m.partition, m.offset))) for m in group)
        recent = all(
            m.ts is not None and abs((m.ts - now).total_seconds()) <= RECENT_S for m in group
        )
        if recent:
            assert landed_n == 1, f"event id {eid!r} sent {len(group)}x landed {landed_n}x"
        else:
            assert landed_n >= 1, f"event id {eid!r} sent {len(group)}x never landed"


@settings(
    max_examples=30,
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
@given(batch=batches())
@example(
    batch=[
        ("literal", None, None),
        ("literal", b"", b"k"),
        ("bytes", b"\x00\xff\xfe", None),
        ("literal", b"NaN", None),
        ("nested", NESTING_MAX, "array", True, None),
        ("nested", NESTING_MAX, "object", False, None),
        (
            "huge",
            {
                "type": "task",
                "event_id": Eid("big"),
                "schema_version": 1,
                "ts": Rel(0),
                "agent_id": "a",
                "outcome": "started",
            },
            "blob",
            LIMIT - 300,
            "x",
            None,
        ),
        (
            "huge",
            {
                "type": "task",
                "event_id": Eid("too-big"),
                "schema_version": 1,
                "ts": Rel(0),
                "agent_id": "a",
                "outcome": "started",
            },
            "blob",
            HUGE_MAX,
            "é",
            None,
        ),
        (
            "json",
            {
                "type": "task",
                "event_id": Eid("same"),
                "schema_version": 1,
                "ts": Rel(-10),
                "agent_id": "a",
                "outcome": "started",
            },
            b"t1",
        ),
        ("repeat", 0, b"t1"),
        (
            "json",
            {
                "type": "task",
                "event_id": Eid("old"),
                "schema_version": 1,
                "ts": "2000-01-01T00:00:00Z",
                "agent_id": "a",
                "outcome": "failed",
            },
            b"t2",
        ),
        (
            "json",
            {
                "type": "task",
                "event_id": Eid("future"),
                "schema_version": 1,
                "ts": Rel(3600),
                "agent_id": "a",
                "outcome": "failed",
            },
            b"t2",
        ),
        (
            "json",
            {
                "type": "task",
                "event_id": Eid("v2"),
                "schema_version": 2,
                "ts": Rel(0),
                "agent_id": "a",
                "outcome": "failed",
            },
            b"t2",
        ),
        (
            "json",
            {
                "type": "llm_call",
                "event_id": Eid("nan"),
                "schema_version": 1,
                "ts": Rel(0),
                "agent_id": "a",
                "input_tokens": 1,
                "output_tokens": 1,
                "latency_ms": NAN,
            },
            None,
        ),
    ]
)
def test_hostile_messages_end_exactly_once(hostile: Hostile, batch: list[Spec]) -> None:
    now = datetime.now(UTC)
    prefix = f"h{hostile.batches}-"
    messages = render(batch, prefix, now)
    hostile.batches += 1
    for spec in batch:
        hostile.kinds[spec[0]] = hostile.kinds.get(spec[0], 0) + 1
    produce(hostile.settings, messages)
    hostile.messages += len(messages)
    hostile.valid += sum(m.valid for m in messages)
    hostile.invalid += sum(not m.valid for m in messages)
    hostile.repeats += sum(len(g) - 1 for g in id_groups(messages).values())
    hostile.huge += sum(len(m.value or b"") > 100_000 for m in messages)
    try:
        check_batch(hostile, messages)
    except AssertionError as exc:
        hostile.failures.append(str(exc)[:300])
        raise
    rss = hostile.worker.rss()
    hostile.rss_peak = max(hostile.rss_peak, rss)
    assert rss < MEMORY_BOUND, f"worker RSS {rss // MiB} MiB"
    hostile.finished = time.monotonic()


# --------------------------------------------------------------------------------------
# the edges, each with a worker of its own at the default settings
# --------------------------------------------------------------------------------------

TASK = (
    b'{"type":"task","event_id":"%s","schema_version":1,"ts":"2026-01-05T09:00:00Z",'
    b'"agent_id":"a","outcome":"started"'
)


def _padded(event_id: bytes, total: int) -> bytes:
    """A valid task event of exactly ``total`` bytes (an unknown field pads it)."""
    head = TASK % event_id + b',"pad":"'
    return head + b"x" * (total - len(head) - 2) + b'"}'


def _run_default_worker(
    bootstrap: str, tmp: Path, values: list[bytes], topic_max_bytes: int | None = None
) -> tuple[Settings, WorkerProcess, bool]:
    """Publish ``values`` (one key, so in order in one partition), run a default worker until
    they are all committed or 12 s passed; returns (settings, worker, all committed)."""
    s = unique_settings(bootstrap, tmp / "lake")
    if topic_max_bytes is not None:
        asyncio.run(_topic_max_bytes(s, topic_max_bytes))
    deadline = time.monotonic() + 30
    # One at a time: a topic config change reaches the partition leader a moment later, and
    # retrying a whole batch would publish the messages that did get through twice.
    for value in values:
        while True:
            try:
                produce_raw(s, [value], keys=[b"k"])
                break
            except MessageSizeTooLargeError:
                if topic_max_bytes is None or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    worker = WorkerProcess(s, tmp / "worker.log").start()
    wait_until("worker ready", lambda: "consuming" in worker.log_text(), 120, alive=[worker])
    try:
        wait_until("all committed", lambda: committed(s) >= len(values), 12, alive=[worker])
        done = True
    except AssertionError:
        done = False
    return s, worker, done


async def _topic_max_bytes(s: Settings, limit: int) -> None:
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = AIOKafkaAdminClient(bootstrap_servers=s.broker)
    await admin.start()
    try:
        await admin.alter_configs(
            [
                ConfigResource(
                    ConfigResourceType.TOPIC,
                    s.events_topic,
                    configs={"max.message.bytes": str(limit)},
                )
            ]
        )
    finally:
        await admin.close()


def test_messages_just_under_the_default_limit(bootstrap: str, tmp_path: Path) -> None:
    """Near 1 MiB with the default settings: a valid event lands, an invalid one is a dead
    letter (the dead-letter copy still fits the producer's and the broker's limits)."""
    big_valid = _padded(b"big-valid", 1_040_000)
    big_invalid = b'{"type":"task","pad":"' + b"x" * 1_039_000 + b'"}'
    s, worker, done = _run_default_worker(
        bootstrap, tmp_path, [TASK % b"first" + b"}", big_valid, big_invalid, TASK % b"last" + b"}"]
    )
    try:
        assert done, worker.log_tail()
        con = connect(s.data_dir)
        assert con.execute("SELECT event_id FROM events ORDER BY kafka_offset").fetchall() == [
            ("first",),
            ("big-valid",),
            ("last",),
        ]
        ((reason, size),) = con.execute(
            "SELECT reason, octet_length(raw) FROM dead_letters"
        ).fetchall()
        assert reason.startswith("missing required field") and size == len(big_invalid)
        assert worker.terminate() == 0
    finally:
        if worker.alive():
            worker.kill()


@pytest.mark.parametrize(
    ("size", "topic_max_bytes"),
    [(1_048_490, None), (1_536 * 1024, 4 * MiB)],
    ids=["default-topic-near-1MiB", "topic-allows-4MiB-oversized-1.5MiB"],
)
def test_a_dead_letter_too_big_to_republish_does_not_stall_the_pipeline(
    bootstrap: str, tmp_path: Path, size: int, topic_max_bytes: int | None
) -> None:
    poison = b'{"pad":"' + b"x" * (size - 10) + b'"}'
    assert len(poison) == size
    s, worker, done = _run_default_worker(
        bootstrap,
        tmp_path,
        [TASK % b"before" + b"}", poison, TASK % b"after" + b"}"],
        topic_max_bytes,
    )
    try:
        health = worker.health()
        assert done, f"stalled: {health}"
        assert scalar(s.data_dir, "SELECT count(*) FROM events") == 2
        assert scalar(s.data_dir, "SELECT count(*) FROM dead_letters") == 1
    finally:
        worker.kill()


def test_deeply_nested_json_is_a_dead_letter(bootstrap: str, tmp_path: Path) -> None:
    deep = TASK % b"deep" + b',"deep":' + b"[" * 2000 + b"]" * 2000 + b"}"
    s, worker, done = _run_default_worker(
        bootstrap, tmp_path, [TASK % b"before" + b"}", deep, TASK % b"after" + b"}"]
    )
    try:
        assert worker.alive(), worker.log_tail(15)
        assert done
        ((reason,),) = connect(s.data_dir).execute("SELECT reason FROM dead_letters").fetchall()
        assert reason
    finally:
        if worker.alive():
            worker.kill()
