"""Tests for the synthetic traffic generator (``pipeline.generate``)."""

from __future__ import annotations

import hashlib
import io
import math
import os
import subprocess
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from itertools import pairwise
from pathlib import Path

import pytest

from pipeline import generate as gen
from pipeline import schema
from pipeline.generate import TrafficConfig

N = 20_000
SEED = 11
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Sample:
    """One generated stream: its JSON lines and the events decode_batch made of them."""

    lines: list[bytes]
    events: list[schema.AgentEvent]


def _sample(config: TrafficConfig) -> Sample:
    buf = io.BytesIO()
    assert gen.generate_jsonl(config, buf) == config.events
    lines = buf.getvalue().splitlines()
    events, _, rejected, _ = schema.decode_batch(lines)
    assert rejected == []
    return Sample(lines, events)


@pytest.fixture(scope="module")
def sample() -> Sample:
    return _sample(TrafficConfig(events=N, seed=SEED))


def _within(observed: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    """``observed`` successes out of ``n`` are within ``sigmas`` binomial sd of ``n * p``."""
    return abs(observed - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


# --- determinism, count, validity -----------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_bytes() -> None:
    def jsonl(seed: int) -> bytes:
        buf = io.BytesIO()
        gen.generate_jsonl(TrafficConfig(events=3_000, seed=seed), buf)
        return buf.getvalue()

    assert jsonl(5) == jsonl(5)
    assert jsonl(5) != jsonl(6)


def test_deterministic_across_processes() -> None:
    """No hash-seed, wall-clock or global-random dependence: another process, same bytes."""
    script = (
        "import hashlib, io;"
        "from pipeline.generate import TrafficConfig, generate_jsonl;"
        "b = io.BytesIO(); generate_jsonl(TrafficConfig(events=2000, seed=3), b);"
        "print(hashlib.sha256(b.getvalue()).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    buf = io.BytesIO()
    gen.generate_jsonl(TrafficConfig(events=2000, seed=3), buf)
    assert out.stdout.strip() == hashlib.sha256(buf.getvalue()).hexdigest()


@pytest.mark.parametrize("n", [0, 1, 2, 13, 1_000])
def test_exact_count(n: int) -> None:
    config = TrafficConfig(events=n, seed=1)
    assert sum(1 for _ in gen.generate(config)) == n
    buf = io.BytesIO()
    assert gen.generate_jsonl(config, buf, chunk=7) == n
    assert buf.getvalue().count(b"\n") == n


def test_every_event_validates_and_round_trips(sample: Sample) -> None:
    # The fixture decoded all N lines with decode_batch and zero rejections.
    assert len(sample.events) == N
    # Without late events a shorter stream is a prefix of a longer one, so 5,000 suffice.
    originals = list(gen.generate(TrafficConfig(events=5_000, seed=SEED)))
    assert sample.events[:5_000] == originals  # decode(encode(e)) == e, field for field
    assert [schema.encode(e) for e in originals] == sample.lines[:5_000]  # jsonl = encode
    assert [schema.decode(line) for line in sample.lines[:100]] == originals[:100]


def test_event_ids_unique_and_seeded(sample: Sample) -> None:
    ids = [e.event_id for e in sample.events]
    assert len(set(ids)) == N
    assert ids[0] == f"{SEED:x}-000000000"
    other = next(gen.generate(TrafficConfig(events=1, seed=SEED + 1)))
    assert other.event_id not in set(ids)


def test_times_are_aware_and_start_at_default(sample: Sample) -> None:
    assert all(e.ts.tzinfo is not None for e in sample.events)
    assert sample.events[0].ts == gen.DEFAULT_START


def test_custom_start_with_offset() -> None:
    start = datetime(2025, 6, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    events = list(gen.generate(TrafficConfig(events=500, seed=2, start=start)))
    assert events[0].ts == start
    assert all(e.ts.utcoffset() == timedelta(hours=2) for e in events)


# --- ordering -----------------------------------------------------------------------------


def test_stream_is_in_event_time_order_without_late_events(sample: Sample) -> None:
    ts = [e.ts for e in sample.events]
    assert ts == sorted(ts)


def test_each_task_starts_first_and_keeps_its_order(sample: Sample) -> None:
    tasks: dict[str, list[schema.AgentEvent]] = defaultdict(list)
    for e in sample.events:
        assert e.task_id is not None and e.trace_id is not None and e.span_id is not None
        tasks[e.task_id].append(e)
    assert len(tasks) > 1_000
    for events in tasks.values():
        first = events[0]
        assert isinstance(first, schema.Task) and first.outcome == "started"
        assert all(e.ts >= prev.ts for prev, e in pairwise(events))
        assert len({(e.session_id, e.trace_id, e.agent_id, e.agent_version) for e in events}) == 1
        ends = [e for e in events[1:] if isinstance(e, schema.Task)]
        assert len(ends) <= 1 and all(e.outcome != "started" for e in ends)
        if ends:
            assert ends[0].span_id == first.span_id
            after = events[events.index(ends[0]) + 1 :]
            assert all(isinstance(e, schema.Feedback | schema.Evaluation) for e in after)


def test_tasks_interleave(sample: Sample) -> None:
    window = sample.events[5_000:5_200]
    assert len({e.task_id for e in window}) > 20
    switches = sum(a.task_id != b.task_id for a, b in pairwise(window))
    assert switches > 100


@pytest.mark.parametrize(("rate", "rel"), [(50.0, 0.08), (500.0, 0.15)])
def test_event_time_rate(sample: Sample, rate: float, rel: float) -> None:
    if rate == 50.0:  # the default
        events = sample.events
    else:
        events = list(gen.generate(TrafficConfig(events=N, seed=SEED, rate_per_s=rate)))
    start = events[0].ts

    def elapsed(i: int) -> float:
        return (events[i].ts - start).total_seconds()

    # The bulk runs at the configured rate (40 s at 500/s still feel the ramp-up) ...
    assert elapsed(9 * N // 10) - elapsed(N // 10) == pytest.approx(0.8 * N / rate, rel=rel)
    # ... after a ramp-up of ~15 s (a task lasts seconds: concurrency builds up); the
    # stream is the first N events by event time, so it ends without a drain tail.
    # (evaluations and ratings of the first tasks come seconds after they end: +5 s)
    assert elapsed(N // 10) <= 0.1 * N / rate + 15
    assert N / rate * 0.95 <= elapsed(N - 1) <= N / rate * 1.08 + 10


def test_tasks_running_at_the_end_are_cut(sample: Sample) -> None:
    tail = {e.task_id for e in sample.events[-200:]}
    ended = {
        e.task_id for e in sample.events if isinstance(e, schema.Task) and e.outcome != "started"
    }
    assert tail - ended  # some tasks are still in flight when the stream stops


def test_late_fraction_writes_events_late() -> None:
    delay, fraction = 60.0, 0.1
    config = TrafficConfig(events=N, seed=SEED, late_fraction=fraction, late_delay_s=delay)
    events = list(gen.generate(config))
    assert len(events) == N
    assert len({e.event_id for e in events}) == N
    head = events[0].ts
    late = 0
    for e in events:
        lag = (head - e.ts).total_seconds()
        if lag > 0:
            late += 1
            assert lag <= delay + 1.0  # written at most the delay after its event time
        head = max(head, e.ts)
    assert _within(late, N, fraction)
    assert {type(e).type_name for e in events} == set(schema.ACTIVITY_TYPES)


def test_late_events_longer_than_the_stream() -> None:
    """A delay longer than the whole stream still delivers the late events, at the end."""
    config = TrafficConfig(events=5_000, seed=2, late_fraction=0.2)  # 100 s, delay 600 s
    events = list(gen.generate(config))
    ts = [e.ts for e in events]
    n_late = sum(1 for a, b in pairwise(ts) if b < a)
    assert n_late >= 1
    split = next(i for i in range(1, len(ts)) if ts[i] < ts[i - 1])
    assert ts[:split] == sorted(ts[:split])
    assert ts[split:] == sorted(ts[split:])  # the held events, in write order
    assert _within(len(ts) - split, 5_000, 0.2)


# --- distributions ------------------------------------------------------------------------


def test_all_event_types_present(sample: Sample) -> None:
    counts = Counter(e.type_name for e in sample.events)
    assert set(counts) == set(schema.ACTIVITY_TYPES)
    assert counts["llm_call"] > counts["retrieval"] > counts["escalation"]


def test_missing_cost_fraction(sample: Sample) -> None:
    llm = [e for e in sample.events if isinstance(e, schema.LlmCall)]
    no_cost = sum(e.cost_usd is None for e in llm)
    p = gen.UNKNOWN_MODEL_FRACTION + (1 - gen.UNKNOWN_MODEL_FRACTION) * 0.25
    assert _within(no_cost, len(llm), p)
    unknown = [e for e in llm if e.model == gen.UNKNOWN_MODEL.name]
    assert _within(len(unknown), len(llm), gen.UNKNOWN_MODEL_FRACTION)
    assert all(e.cost_usd is None and e.provider == "acme" for e in unknown)


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_missing_cost_extremes(fraction: float) -> None:
    config = TrafficConfig(events=3_000, seed=4, missing_cost_fraction=fraction)
    llm = [e for e in gen.generate(config) if isinstance(e, schema.LlmCall)]
    priced = [e for e in llm if e.model in gen.MODELS]
    assert priced
    assert all((e.cost_usd is None) == (fraction == 1.0) for e in priced)


def test_llm_calls_are_consistent(sample: Sample) -> None:
    llm = [e for e in sample.events if isinstance(e, schema.LlmCall)]
    providers = {m.name: m.provider for m in gen.MODELS.values()}
    providers[gen.UNKNOWN_MODEL.name] = gen.UNKNOWN_MODEL.provider
    for e in llm:
        assert e.model is not None and providers[e.model] == e.provider
        assert 0 <= e.cached_input_tokens <= e.input_tokens <= gen.MAX_INPUT_TOKENS
        assert 0 <= e.reasoning_output_tokens <= e.output_tokens
        assert e.latency_ms is not None and 100 < e.latency_ms < 600_000
        if e.cost_usd is not None:
            expected = gen.expected_cost_usd(
                e.model, e.input_tokens, e.cached_input_tokens, e.output_tokens
            )
            assert e.cost_usd == expected
    inputs = sorted(e.input_tokens for e in llm)
    outputs = sorted(e.output_tokens for e in llm)
    assert inputs[len(inputs) // 10] >= 100 and inputs[9 * len(inputs) // 10] >= 10_000
    assert outputs[len(outputs) // 2] < inputs[len(inputs) // 2]
    latencies = sorted(e.latency_ms or 0.0 for e in llm)
    assert latencies[len(latencies) // 20] >= 300 and latencies[len(latencies) // 2] <= 5_000
    assert {e.model for e in llm} == set(gen.MODELS) | {gen.UNKNOWN_MODEL.name}


def test_prices_match_genai_prices() -> None:
    genai_prices = pytest.importorskip("genai_prices")
    for spec in gen.MODELS.values():
        usage = genai_prices.Usage(input_tokens=12_000, cache_read_tokens=5_000, output_tokens=700)
        price = genai_prices.calc_price(usage, model_ref=spec.name, provider_id=spec.provider)
        ours = gen.expected_cost_usd(spec.name, 12_000, 5_000, 700)
        assert ours == pytest.approx(float(price.total_price), rel=1e-9)
    assert gen.expected_cost_usd(gen.UNKNOWN_MODEL.name, 10, 0, 10) is None


def test_retrievals_and_tools(sample: Sample) -> None:
    retrievals = [e for e in sample.events if isinstance(e, schema.Retrieval)]
    misses = sum(bool(e.miss) for e in retrievals)
    assert _within(misses, len(retrievals), gen.STEADY.retrieval_miss_prob)
    assert all(e.miss == (e.hits == 0) == (e.top_score is None) for e in retrievals)
    assert all(e.latency_ms is not None and e.latency_ms < 3_000 for e in retrievals)
    median = sorted(e.latency_ms or 0.0 for e in retrievals)[len(retrievals) // 2]
    assert 10 <= median <= 300

    tools = [e for e in sample.events if isinstance(e, schema.ToolCall)]
    errors = [e for e in tools if e.status == "error"]
    assert _within(len(errors), len(tools), gen.STEADY.tool_error_prob)
    assert all((e.status == "error") == (e.error_type is not None) for e in tools)
    assert {e.error_type for e in errors} >= {"timeout", "http_500", "validation"}
    median = sorted(e.latency_ms or 0.0 for e in tools)[len(tools) // 2]
    assert 20 <= median <= 2_000


def test_task_level_rates(sample: Sample) -> None:
    # Tasks that started early enough to be over (idle timeout, feedback) by the end.
    cutoff = sample.events[-1].ts - timedelta(seconds=200)
    started = {
        e.task_id
        for e in sample.events
        if isinstance(e, schema.Task) and e.outcome == "started" and e.ts < cutoff
    }
    n = len(started)
    assert n > 800
    events = [e for e in sample.events if e.task_id in started]
    tasks = [e for e in events if isinstance(e, schema.Task)]
    by_task: dict[str | None, Counter[str]] = defaultdict(Counter)
    for e in events:
        by_task[e.task_id][e.type_name] += 1
    # feedback: the occasional review (10 %) or the in-app rating of an ended task (50 %)
    rated = 1 - (1 - gen.FEEDBACK_PROB) * (1 - gen.RATING_PROB * (1 - gen.OPEN_PROB))
    for kind, p in [("escalation", 0.06), ("feedback", rated), ("guardrail", 0.03)]:
        assert _within(sum(c[kind] > 0 for c in by_task.values()), n, p, sigmas=5), kind
    ended = {e.task_id for e in tasks if e.outcome != "started"}
    evaluations = [e for e in events if isinstance(e, schema.Evaluation)]
    hallucination = [e for e in evaluations if e.evaluator == "hallucination"]
    assert sorted(e.task_id for e in hallucination) == sorted(ended)  # every ended task once
    assert _within(sum(e.passed is True for e in hallucination), len(ended), 0.97)
    tone = [e for e in evaluations if e.evaluator == "tone"]
    assert {e.agent_id for e in tone} == gen.USER_FACING
    assert _within(sum(e.passed is True for e in tone), len(tone), 0.94)
    helpful = [e for e in evaluations if e.evaluator == "helpfulness"]
    assert _within(len(helpful), len(ended), gen.HELPFULNESS_SAMPLE)
    assert all(e.scope == "task" and e.evaluator_kind == "llm_judge" for e in evaluations)
    assert all((e.score >= 0.6) == e.passed for e in evaluations if e.score is not None)
    steps = [c["llm_call"] + c["retrieval"] + c["tool_call"] for c in by_task.values()]
    assert max(steps) <= gen.MAX_STEPS
    outcomes = Counter(e.outcome for e in tasks if e.outcome != "started")
    assert 0.76 * n <= outcomes["completed"] <= 0.84 * n
    assert 0.08 * n <= outcomes["failed"] <= 0.12 * n
    assert 0.04 * n <= outcomes["abandoned"] <= 0.06 * n
    assert _within(n - sum(outcomes.values()), n, gen.OPEN_PROB)  # a few tasks never end
    actions = {e.action for e in sample.events if isinstance(e, schema.Guardrail)}
    assert actions == {"allow", "block", "modify", "flag"}


def test_agents_tenants_versions(sample: Sample) -> None:
    agents = Counter(e.agent_id for e in sample.events)
    assert set(agents) == {p.agent_id for p in gen.AGENT_PROFILES}
    assert {e.tenant_id for e in sample.events} == {f"tenant-{i:02d}" for i in range(1, 9)}
    versions = {(e.agent_id, e.agent_version) for e in sample.events}
    assert any(a == "support-bot" and v == "v4" for a, v in versions)
    assert all(e.prompt_version and e.prompt_version.startswith("p") for e in sample.events)
    sessions = Counter(e.session_id for e in sample.events if isinstance(e, schema.Task))
    assert max(sessions.values()) > 2  # sessions span several tasks

    small = list(gen.generate(TrafficConfig(events=2_000, seed=1, agents=2, tenants=3)))
    assert {e.agent_id for e in small} <= {"support-bot", "research-agent"}
    assert {e.tenant_id for e in small} <= {"tenant-01", "tenant-02", "tenant-03"}
    many = list(gen.generate(TrafficConfig(events=3_000, seed=1, agents=30)))
    assert "support-bot-2" in {e.agent_id for e in many}


# --- config and scenario hook ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"events": -1},
        {"events": 1, "rate_per_s": 0.0},
        {"events": 1, "agents": 0},
        {"events": 1, "tenants": 0},
        {"events": 1, "late_fraction": 1.5},
        {"events": 1, "missing_cost_fraction": -0.1},
        {"events": 1, "late_delay_s": -1.0},
        {"events": 1, "start": datetime(2026, 1, 5)},  # noqa: DTZ001 - naive on purpose
        {"events": 1, "scenario": "nope"},
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        TrafficConfig(**kwargs)  # type: ignore[arg-type]


def test_scenario_hook() -> None:
    config = TrafficConfig(events=1)
    assert config.scenario == "steady"
    assert gen.scenario_params(config, "support-bot", "v4", 123.0) == gen.STEADY
    assert gen.STEADY.escalation_prob == 0.06
    assert gen.STEADY.retrieval_miss_prob == 0.08
    assert gen.DEFAULT_START.isoformat() == "2026-01-05T09:00:00+00:00"


# Digests of the steady stream as the generator wrote it once evaluations and in-app ratings
# joined it (issue 18; before: ca5d0d86... and 2c8c0240..., with the same draws for the rest):
# scenarios must not change a single byte of it (nor may anything else, by accident).
STEADY_DIGESTS = {
    "events=20000,seed=11": "d583792f968d5b10cf9e28303b6feafc87b5b9b5c046eacfed2f7bd4cbf05684",
    "late,30 agents,3 tenants": "cdfde47c11ea795c77a4c7ba339398c95b7480154ef199efa77d8b8dc45071b0",
}


def test_steady_output_is_frozen(sample: Sample) -> None:
    digest = hashlib.sha256(b"".join(line + b"\n" for line in sample.lines)).hexdigest()
    assert digest == STEADY_DIGESTS["events=20000,seed=11"]
    config = TrafficConfig(
        events=10_000, seed=3, late_fraction=0.1, agents=30, tenants=3, missing_cost_fraction=0.5
    )
    buf = io.BytesIO()
    gen.generate_jsonl(config, buf)
    assert hashlib.sha256(buf.getvalue()).hexdigest() == STEADY_DIGESTS["late,30 agents,3 tenants"]
