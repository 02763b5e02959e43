"""Deterministic synthetic agent traffic in the v1 event schema.

``generate`` yields a production-like stream: a dozen agents, each with a few agent and
prompt versions and a model mix, serve tenants in tasks of 3-12 steps (model calls,
retrievals, tool calls), sometimes escalate, get feedback or trip a guardrail, and end
completed, failed or abandoned. Many tasks run at once, so events of different tasks
interleave while each task's own events keep their order. A stream of N events is the
first N by event time, so without late events a shorter stream is a prefix of a longer one.

Everything random comes from one ``random.Random(seed)``: the same config gives the same
bytes, and nothing reads the wall clock for event times (``DEFAULT_START`` is fixed).

Incident scenarios hook in at one place, ``scenario_params``: the generator asks it for
the ``ScenarioParams`` (cost and latency multipliers, retrieval miss, tool error and
escalation probabilities, a new prompt version or data source) of an agent version and
tenant at an event time. ``pipeline.scenarios`` holds the catalogue: a scenario is a list of
``Incident`` records (its ground truth), and the params are compiled from exactly those
records, so what is injected and what is reported cannot disagree.

Incidents never shift the random stream: every draw steady traffic makes is made in the
same order whatever the params say (an escalation, hit or tool error that exists only
because of an incident draws its details from a second generator), so without late events
a scenario's stream equals the steady stream of its seed except for the injected changes
and the timing of the affected tasks.
"""

from __future__ import annotations

import heapq
import math
import random
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import lru_cache
from statistics import NormalDist
from typing import BinaryIO, Final, Generic, Literal, TypedDict, TypeVar

import msgspec
from msgspec.structs import replace as replace_struct

from pipeline import schema
from pipeline.schema import (
    AgentEvent,
    Escalation,
    Evaluation,
    Feedback,
    Guardrail,
    LlmCall,
    Retrieval,
    Task,
    ToolCall,
)

__all__ = [
    "AGENT_PROFILES",
    "DEFAULT_START",
    "MODELS",
    "STEADY",
    "UNKNOWN_MODEL",
    "AgentProfile",
    "ModelSpec",
    "ScenarioParams",
    "TrafficConfig",
    "expected_cost_usd",
    "generate",
    "generate_jsonl",
    "scenario_params",
    "tenant_weights",
]

DEFAULT_START: Final = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)

_T = TypeVar("_T")


# --------------------------------------------------------------------------------------
# Models and prices
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A model with its list prices (USD per million tokens) and speed.

    Prices match ``genai-prices`` for prompts under 200k tokens (the generator stays below):
    uncached input, cache-read input, output (reasoning tokens count as output).
    ``priced`` is False for a model no price table knows, whose calls never carry a cost.
    """

    name: str
    provider: str
    input_usd_per_mtok: float
    cached_input_usd_per_mtok: float
    output_usd_per_mtok: float
    ms_per_output_token: float
    max_output_tokens: int
    reasons: bool = False
    priced: bool = True


MODELS: Final[dict[str, ModelSpec]] = {
    m.name: m
    for m in (
        ModelSpec("gpt-4o", "openai", 2.50, 1.25, 10.00, 7.0, 16_384),
        ModelSpec("gpt-4o-mini", "openai", 0.15, 0.075, 0.60, 5.0, 16_384),
        ModelSpec("claude-3-5-haiku-latest", "anthropic", 0.80, 0.08, 4.00, 5.0, 8_192),
        ModelSpec("claude-sonnet-4-5", "anthropic", 3.00, 0.30, 15.00, 8.0, 64_000, True),
        ModelSpec("gemini-2.0-flash", "google", 0.10, 0.025, 0.40, 3.0, 8_192),
    )
}
UNKNOWN_MODEL: Final = ModelSpec("acme-llm-1", "acme", 0.0, 0.0, 0.0, 6.0, 4_096, priced=False)
UNKNOWN_MODEL_FRACTION: Final = 0.01
MAX_INPUT_TOKENS: Final = 150_000  # below the 200k long-context price tier


def expected_cost_usd(
    model: str, input_tokens: int, cached_input_tokens: int, output_tokens: int
) -> float | None:
    """The cost the generator writes for a call (``None`` for a model without prices)."""
    spec = MODELS.get(model)
    if spec is None:
        return None
    return _cost(spec, input_tokens, cached_input_tokens, output_tokens)


def _cost(spec: ModelSpec, inp: int, cached: int, out: int) -> float:
    usd = (
        (inp - cached) * spec.input_usd_per_mtok
        + cached * spec.cached_input_usd_per_mtok
        + out * spec.output_usd_per_mtok
    ) / 1e6
    return round(usd, 10)


# --------------------------------------------------------------------------------------
# Agents
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentProfile:
    """How one agent behaves.

    ``versions`` are ``(agent_version, traffic_weight, token_scale)``: newer versions take
    most traffic and may use more tokens. ``step_mix`` weighs llm_call, retrieval and
    tool_call steps; ``input_median``/``output_median`` are tokens of a first model call.
    """

    agent_id: str
    weight: float
    versions: tuple[tuple[str, float, float], ...]
    prompt_versions: tuple[tuple[str, float], ...]
    models: tuple[tuple[str, float], ...]
    step_mix: tuple[float, float, float]
    tools: tuple[str, ...]
    data_sources: tuple[str, ...]
    queries: tuple[str, ...]
    input_median: float
    output_median: float


AGENT_PROFILES: Final[tuple[AgentProfile, ...]] = (
    AgentProfile(
        "support-bot", 3.0,
        (("v3", 0.25, 1.0), ("v4", 0.75, 1.1)),
        (("p12", 0.6), ("p13", 0.4)),
        (("gpt-4o-mini", 0.7), ("claude-3-5-haiku-latest", 0.3)),
        (0.45, 0.35, 0.20),
        ("lookup_order", "refund_order", "update_ticket", "send_email"),
        ("kb-articles", "ticket-history"),
        ("reset password", "refund status", "cancel subscription", "shipping delay"),
        1_800, 220,
    ),
    AgentProfile(
        "research-agent", 1.5,
        (("v7", 1.0, 1.0),),
        (("p31", 0.5), ("p32", 0.5)),
        (("claude-sonnet-4-5", 0.6), ("gpt-4o", 0.4)),
        (0.40, 0.45, 0.15),
        ("web_search", "fetch_url", "summarize_pdf"),
        ("arxiv-index", "web-cache", "internal-wiki"),
        ("llm evaluation methods", "market size estimate", "competitor pricing"),
        6_000, 450,
    ),
    AgentProfile(
        "sql-copilot", 2.0,
        (("v2", 0.3, 1.0), ("v3", 0.7, 0.9)),
        (("p8", 1.0),),
        (("gpt-4o", 0.5), ("gpt-4o-mini", 0.5)),
        (0.45, 0.15, 0.40),
        ("run_sql", "describe_table", "explain_plan"),
        ("schema-catalog",),
        ("weekly revenue by region", "churned users", "top products"),
        3_000, 300,
    ),
    AgentProfile(
        "code-reviewer", 1.2,
        (("v1", 0.2, 1.0), ("v2", 0.8, 1.2)),
        (("p5", 0.5), ("p6", 0.5)),
        (("claude-sonnet-4-5", 0.8), ("gpt-4o", 0.2)),
        (0.55, 0.15, 0.30),
        ("git_diff", "run_tests", "post_comment"),
        ("repo-index",),
        ("null check", "race condition", "deprecated api"),
        8_000, 600,
    ),
    AgentProfile(
        "sales-assistant", 1.0,
        (("v5", 1.0, 1.0),),
        (("p20", 0.7), ("p21", 0.3)),
        (("gpt-4o-mini", 0.6), ("gemini-2.0-flash", 0.4)),
        (0.50, 0.25, 0.25),
        ("crm_lookup", "create_quote", "schedule_meeting"),
        ("product-catalog", "crm-notes"),
        ("enterprise pricing", "discount policy", "contract renewal"),
        1_500, 250,
    ),
    AgentProfile(
        "triage-agent", 1.8,
        (("v2", 0.5, 1.0), ("v3", 0.5, 1.0)),
        (("p4", 1.0),),
        (("gemini-2.0-flash", 0.7), ("gpt-4o-mini", 0.3)),
        (0.60, 0.20, 0.20),
        ("classify_ticket", "assign_queue"),
        ("routing-rules",),
        ("billing question", "bug report", "feature request"),
        900, 80,
    ),
    AgentProfile(
        "doc-writer", 0.8,
        (("v1", 1.0, 1.0),),
        (("p9", 0.5), ("p10", 0.5)),
        (("claude-sonnet-4-5", 0.5), ("gpt-4o", 0.5)),
        (0.65, 0.25, 0.10),
        ("render_markdown", "publish_page"),
        ("internal-wiki", "api-reference"),
        ("release notes", "api changelog", "onboarding guide"),
        4_000, 600,
    ),
    AgentProfile(
        "billing-agent", 1.0,
        (("v4", 0.6, 1.0), ("v5", 0.4, 1.05)),
        (("p15", 1.0),),
        (("gpt-4o-mini", 0.8), ("gpt-4o", 0.2)),
        (0.40, 0.20, 0.40),
        ("get_invoice", "apply_credit", "charge_card"),
        ("billing-policies",),
        ("double charge", "invoice copy", "vat number"),
        1_400, 180,
    ),
    AgentProfile(
        "onboarding-guide", 0.7,
        (("v2", 1.0, 1.0),),
        (("p3", 0.5), ("p4", 0.5)),
        (("claude-3-5-haiku-latest", 0.6), ("gemini-2.0-flash", 0.4)),
        (0.50, 0.35, 0.15),
        ("create_workspace", "invite_user"),
        ("kb-articles",),
        ("sso setup", "import data", "invite team"),
        1_200, 260,
    ),
    AgentProfile(
        "security-analyst", 0.6,
        (("v1", 0.4, 1.0), ("v2", 0.4, 1.1), ("v3", 0.2, 1.25)),
        (("p7", 1.0),),
        (("claude-sonnet-4-5", 0.7), ("gpt-4o", 0.3)),
        (0.45, 0.25, 0.30),
        ("query_siem", "lookup_ioc", "open_incident"),
        ("threat-intel", "siem-logs"),
        ("suspicious login", "malware hash", "phishing report"),
        7_000, 400,
    ),
    AgentProfile(
        "travel-planner", 0.6,
        (("v3", 1.0, 1.0),),
        (("p2", 1.0),),
        (("gpt-4o", 0.4), ("gemini-2.0-flash", 0.6)),
        (0.45, 0.20, 0.35),
        ("search_flights", "search_hotels", "book_trip"),
        ("travel-policy",),
        ("flight to berlin", "hotel near venue", "per diem rules"),
        2_000, 400,
    ),
    AgentProfile(
        "hr-helper", 0.5,
        (("v1", 0.5, 1.0), ("v2", 0.5, 0.95)),
        (("p1", 0.5), ("p2", 0.5)),
        (("claude-3-5-haiku-latest", 0.5), ("gpt-4o-mini", 0.5)),
        (0.50, 0.40, 0.10),
        ("lookup_employee", "request_leave"),
        ("hr-handbook",),
        ("parental leave", "expense policy", "holiday calendar"),
        1_100, 200,
    ),
)  # fmt: skip


def _profiles(n: int) -> tuple[AgentProfile, ...]:
    """The first ``n`` agents; beyond the catalogue, numbered clones (``support-bot-2``)."""
    base = AGENT_PROFILES
    out = list(base[:n])
    for i in range(len(base), n):
        src = base[i % len(base)]
        out.append(replace(src, agent_id=f"{src.agent_id}-{i // len(base) + 1}"))
    return tuple(out)


# --------------------------------------------------------------------------------------
# Scenarios: the single place where behaviour may change over time
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScenarioParams:
    """Behaviour knobs of one agent version and tenant at one moment.

    ``cost_multiplier`` scales the tokens of model calls (so cost stays consistent with the
    price table); ``latency_multiplier`` scales every step's latency and ``llm_latency``
    the latency of model calls, per model (``(model, multiplier)``, ``None`` = any model);
    the probabilities are per retrieval, per tool call and per task (escalation, drawn when
    the task starts). ``hallucination`` holds ``(model, failure probability)`` of the
    hallucination evaluator for tasks whose answer came from that model (``None`` = any;
    default ``HALLUCINATION_PROB``), ``tone_fail_prob`` the tone evaluator's failure
    probability, and ``negative_rating_factor`` scales the chance of a negative in-app rating. ``prompt_version`` replaces the prompt version of tasks starting now
    and ``data_source`` the data source of retrievals (a deploy, an index change).
    ``candidate_share`` below 1 makes that a rollout: only that share of the tasks starting
    now get these params (the candidate), the others stay ``STEADY``.
    """

    cost_multiplier: float = 1.0
    latency_multiplier: float = 1.0
    retrieval_miss_prob: float = 0.08
    tool_error_prob: float = 0.05
    escalation_prob: float = 0.06
    llm_latency: tuple[tuple[str | None, float], ...] = ()
    hallucination: tuple[tuple[str | None, float], ...] = ()
    tone_fail_prob: float = 0.06
    negative_rating_factor: float = 1.0
    prompt_version: str | None = None
    data_source: str | None = None
    candidate_share: float = 1.0
    # A new agent version deployed: tasks starting now carry it (as prompt_version above).
    agent_version: str | None = None


STEADY: Final = ScenarioParams()

ParamsFn = Callable[[str, str, str, float], ScenarioParams]
"""``(agent_id, agent_version, tenant_id, seconds_since_start) -> ScenarioParams``."""


def scenario_params(
    config: TrafficConfig,
    agent_id: str,
    agent_version: str,
    t: float,
    *,
    tenant_id: str = "",
) -> ScenarioParams:
    """Parameters of ``agent_id``/``agent_version`` (for ``tenant_id``) at ``t`` seconds.

    Every behaviour a scenario may alter is read through here, per task and per step, at
    the event time; ``config.scenario`` picks the scenario and the rest of the config sets
    when its incidents start (see ``pipeline.scenarios``).
    """
    return _params_fn(config)(agent_id, agent_version, tenant_id, t)


@lru_cache(maxsize=32)
def _params_fn(config: TrafficConfig) -> ParamsFn:
    from pipeline.scenarios import params_fn

    return params_fn(config)


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrafficConfig:
    """What to generate.

    ``rate_per_s`` is the average event-time rate (50,000 events at 50/s span ~1000 s).
    A ``late_fraction`` of events is written to the stream ``late_delay_s`` after its event
    time. ``missing_cost_fraction`` of priced model calls carry tokens but no ``cost_usd``;
    calls on the unknown model (~1 %) never carry one. ``scenario`` names an incident
    scenario of ``pipeline.scenarios`` (``steady``: none); a config whose agents lack the
    scenario's affected agent is rejected.
    """

    events: int
    seed: int = 0
    start: datetime = DEFAULT_START
    rate_per_s: float = 50.0
    agents: int = 12
    tenants: int = 8
    late_fraction: float = 0.0
    late_delay_s: float = 600.0
    missing_cost_fraction: float = 0.25
    scenario: str = "steady"

    def __post_init__(self) -> None:
        if self.events < 0:
            raise ValueError(f"events must be >= 0, got {self.events}")
        if self.start.tzinfo is None or self.start.utcoffset() is None:
            raise ValueError("start must be timezone-aware")
        if not self.rate_per_s > 0:
            raise ValueError(f"rate_per_s must be > 0, got {self.rate_per_s}")
        if self.agents < 1 or self.tenants < 1:
            raise ValueError("agents and tenants must be >= 1")
        for name in ("late_fraction", "missing_cost_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value}")
        if self.late_delay_s < 0:
            raise ValueError(f"late_delay_s must be >= 0, got {self.late_delay_s}")
        from pipeline.scenarios import check_config

        check_config(self)  # a known scenario whose incidents this config can carry


# --------------------------------------------------------------------------------------
# Task-level constants
# --------------------------------------------------------------------------------------

MIN_STEPS: Final = 3
MAX_STEPS: Final = 12
FEEDBACK_PROB: Final = 0.10
# Continuous evaluation of ended tasks (drawn from a generator of their own, see
# ``_Traffic.evaluations``): an LLM judge checks every answer for hallucination and a tenth
# for helpfulness; the tone of user-facing agents is judged on every task; and an in-app
# rating (1-5 stars) comes back for RATING_PROB of them.
HALLUCINATION_PROB: Final = 0.03
HELPFULNESS_SAMPLE: Final = 0.10
HELPFULNESS_FAIL_PROB: Final = 0.12
RATING_PROB: Final = 0.50
NEGATIVE_RATING_PROB: Final = {True: 0.10, False: 0.70}  # by "task completed"
USER_FACING: Final = frozenset(
    {"support-bot", "sales-assistant", "onboarding-guide", "travel-planner", "hr-helper"}
)
_EVAL_EVENTS_PER_ENDED_TASK: Final = 1 + HELPFULNESS_SAMPLE + RATING_PROB + 0.4  # ~40 % user-facing
GUARDRAIL_PROB: Final = 0.03
OPEN_PROB: Final = 0.05  # the task's end event never arrives
ABANDONED_PROB: Final = 0.05
FAILED_PROB: Final = 0.07  # plus FAILED_IF_TOOL_ERROR when a tool call failed: ~10 % overall
FAILED_IF_TOOL_ERROR: Final = 0.25
TOOL_TIMEOUT_MS: Final = 3_000.0
# Events per task on average, to turn the event rate into a task arrival rate.
_EVENTS_PER_TASK: Final = (
    1
    + (MIN_STEPS + MAX_STEPS) / 2
    + STEADY.escalation_prob
    + FEEDBACK_PROB
    + GUARDRAIL_PROB
    + (1 - OPEN_PROB) * (1 + _EVAL_EVENTS_PER_ENDED_TASK)
)

_LLM, _RETRIEVAL, _TOOL = 0, 1, 2
# The probabilities below which steady traffic draws an escalation's, a hit's (at or above)
# or a tool error's details: incidents keep those draws to keep the rng aligned.
_STEADY_ESCALATION: Final = STEADY.escalation_prob
_STEADY_MISS: Final = STEADY.retrieval_miss_prob
_STEADY_TOOL_ERROR: Final = STEADY.tool_error_prob


def tenant_weights(n: int) -> list[tuple[str, float]]:
    """The ``n`` tenants and their relative traffic (a few large, a long tail)."""
    return [(f"tenant-{i + 1:02d}", 1.0 / (i + 1) ** 0.8) for i in range(n)]


_TASK_ENVELOPE: Final = (
    "schema_version",
    "agent_id",
    "agent_version",
    "prompt_version",
    "tenant_id",
    "session_id",
    "task_id",
    "trace_id",
    "span_id",
)


def _no_draw() -> float:
    return 0.0


def _steady_params(agent_id: str, agent_version: str, tenant_id: str, t: float) -> ScenarioParams:
    return STEADY


def on_candidate(task_number: int, share: float) -> bool:
    """Whether task ``task_number`` of a rollout goes to the candidate.

    A multiplicative hash of the task number, not a random draw: the rng of steady traffic
    stays aligned, and the split is even over any run of tasks.
    """
    return ((task_number * 2654435761) % 4294967296) / 4294967296.0 < share


# Standard normal quantiles: z[int(random() * len(z))] is a normal draw at a tenth of the
# cost of random.gauss, tails clipped at 4 sigma (no absurd outliers either).
_Z: Final[tuple[float, ...]] = tuple(
    NormalDist().inv_cdf((i + 0.5) / 16_384) for i in range(16_384)
)
_NZ: Final = float(len(_Z))
_ERRORS: Final = (("timeout", 0.4), ("http_500", 0.3), ("validation", 0.2), ("rate_limited", 0.1))
_GUARD_ACTIONS: Final[tuple[tuple[schema.GuardrailAction, float], ...]] = (
    ("allow", 0.35),
    ("flag", 0.3),
    ("modify", 0.15),
    ("block", 0.2),
)
_GUARD_POLICIES: Final = ("pii-filter", "prompt-injection", "toxicity", "topic-restriction")
_ESCALATION_REASONS: Final = (
    ("user asked for a human", 0.4),
    ("low confidence", 0.3),
    ("repeated tool failure", 0.15),
    ("policy: refund above limit", 0.15),
)
_CORRECTIONS: Final = (
    "the order number was wrong",
    "answer cited an outdated policy",
    "query used the wrong table",
    "missing the last step",
)


class _Pick(Generic[_T]):
    """Weighted choice with one ``random()`` and a bisect (``rng.choices`` is 4x slower)."""

    __slots__ = ("_bounds", "items")

    def __init__(self, weighted: Sequence[tuple[_T, float]]) -> None:
        total = sum(w for _, w in weighted)
        acc = 0.0
        bounds: list[float] = []
        for _, w in weighted[:-1]:
            acc += w / total
            bounds.append(acc)
        self._bounds = bounds
        self.items = [item for item, _ in weighted]

    def __call__(self, rng: random.Random) -> _T:
        return self.items[bisect_right(self._bounds, rng.random())]


@dataclass(frozen=True)
class _Agent:
    """An ``AgentProfile`` with its choices precomputed."""

    profile: AgentProfile
    version: _Pick[tuple[str, float]]
    prompt: _Pick[str]
    model: _Pick[ModelSpec]
    step: _Pick[int]
    mu_in: float
    mu_out: float


def _agent(p: AgentProfile) -> _Agent:
    return _Agent(
        profile=p,
        version=_Pick([((v, scale), w) for v, w, scale in p.versions]),
        prompt=_Pick(p.prompt_versions),
        model=_Pick([(MODELS[m], w) for m, w in p.models]),
        step=_Pick(list(zip((_LLM, _RETRIEVAL, _TOOL), p.step_mix, strict=True))),
        mu_in=math.log(p.input_median),
        mu_out=math.log(p.output_median),
    )


# --------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------

_Planned = tuple[float, AgentEvent]  # (seconds since start, event)


class _Common(TypedDict):
    """Envelope fields every event of a task shares."""

    schema_version: Literal[1]
    agent_id: str
    agent_version: str
    prompt_version: str
    tenant_id: str
    session_id: str
    task_id: str
    trace_id: str


class _Traffic:
    """Plans whole tasks; ``generate`` merges their events by stream time.

    Every draw goes through ``self.rng``. ``plan_task`` decides a task's shape; the
    ``_llm_call``/``_retrieval``/``_tool_call`` methods draw one step each under the step's
    ``ScenarioParams``. Step events are ``msgspec.structs.replace`` copies of per-task
    templates that already hold the envelope (twice as fast as keyword construction, and
    the schema's ``__post_init__`` checks still run).

    ``self.aux`` serves the draws that exist only because of an incident (the details of
    an extra escalation, hit or tool error), so ``self.rng`` makes the same draws in the
    same order as in steady traffic (see the module docstring).
    """

    def __init__(self, config: TrafficConfig) -> None:
        from pipeline.scenarios import params_fn

        self.config = config
        self.rng = random.Random(config.seed)
        self.rand = self.rng.random
        self.aux = random.Random(f"agentstream-incidents-{config.seed}")
        # Evaluations and in-app ratings draw from their own generator: adding them left
        # every draw of the traffic they evaluate as it was.
        self.evals = random.Random(f"agentstream-evaluations-{config.seed}")
        self.params = params_fn(config)
        self.agents = _Pick([(_agent(p), p.weight) for p in _profiles(config.agents)])
        self.tenants = _Pick(tenant_weights(config.tenants))
        self.errors = _Pick(_ERRORS)
        self.guard_actions = _Pick(_GUARD_ACTIONS)
        self.escalation_reasons = _Pick(_ESCALATION_REASONS)
        self.sessions: dict[tuple[str, str], str] = {}
        self.prefix = f"{config.seed:x}"
        self.tasks = 0
        self.base = config.start.timestamp()
        self.tz = config.start.tzinfo
        # Prototypes for the per-task templates; every field is overwritten before use.
        at = config.start
        self.proto_llm = LlmCall(
            event_id="", schema_version=1, ts=at, agent_id="-", input_tokens=0, output_tokens=0
        )
        self.proto_retrieval = Retrieval(event_id="", schema_version=1, ts=at, agent_id="-", hits=0)
        self.proto_tool = ToolCall(
            event_id="", schema_version=1, ts=at, agent_id="-", tool_name="-", status="ok"
        )

    def ts(self, t: float) -> datetime:
        """The event time ``t`` seconds after the start (float seconds, no parsing)."""
        return datetime.fromtimestamp(self.base + t, self.tz)

    def span(self) -> str:
        """A W3C span id."""
        return f"{self.rng.getrandbits(64):016x}"

    def plan_task(self, t: float) -> list[_Planned]:
        """All events of one task starting at ``t`` seconds, in order, with their times."""
        rng = self.rng
        rand = self.rand
        ts = self.ts
        params = self.params

        agent = self.agents(rng)
        prof = agent.profile
        agent_id = prof.agent_id
        version, token_scale = agent.version(rng)
        tenant = self.tenants(rng)
        at_start = params(agent_id, version, tenant, t)
        if at_start.candidate_share < 1.0 and not on_candidate(
            self.tasks + 1, at_start.candidate_share
        ):
            at_start, params = STEADY, _steady_params  # this task stays on the baseline
        self.tasks += 1
        key = (agent_id, tenant)
        session = self.sessions.get(key)
        if session is None or rand() < 0.4:  # else the user's session goes on
            session = self.sessions[key] = f"sess-{self.prefix}-{self.tasks:07d}"
        common: _Common = {
            "schema_version": 1,
            "agent_id": agent_id,
            "agent_version": version,
            "prompt_version": agent.prompt(rng),
            "tenant_id": tenant,
            "session_id": session,
            "task_id": f"task-{self.prefix}-{self.tasks:07d}",
            "trace_id": f"{rng.getrandbits(128):032x}",
        }
        if at_start.prompt_version is not None:  # drawn all the same: the rng stays aligned
            common["prompt_version"] = at_start.prompt_version
        if at_start.agent_version is not None:
            common["agent_version"] = at_start.agent_version
        root = self.span()  # the task's own span: its start and end events share it

        n_steps = MIN_STEPS + int(rand() * (MAX_STEPS - MIN_STEPS + 1))
        kinds = [agent.step(rng) for _ in range(n_steps)]
        kinds[-1] = _LLM  # the final answer
        if rand() < 0.5:
            kinds[0] = _LLM  # plan first
        kinds.append(-1)
        u = rand()
        escalate = u < at_start.escalation_prob
        steady_escalates = u < _STEADY_ESCALATION  # steady traffic draws the details then
        guard_at = int(rand() * (n_steps + 1)) if rand() < GUARDRAIL_PROB else -1

        started = Task(event_id="", ts=ts(t), span_id=root, outcome="started", **common)
        out: list[_Planned] = [(t, started)]
        llm_t = replace_struct(self.proto_llm, **common)
        retrieval_t = replace_struct(self.proto_retrieval, **common)
        tool_t = replace_struct(self.proto_tool, **common)
        t += 0.002 + 0.02 * rand()
        tool_failed = blocked = False
        for i in range(n_steps + 1):
            if i == guard_at:  # before step i: on the input; after the last: on the answer
                action = self.guard_actions(rng)
                policy = _GUARD_POLICIES[int(rand() * len(_GUARD_POLICIES))]
                reason = None if action == "allow" else f"{policy} matched"
                guard = Guardrail(
                    event_id="",
                    ts=ts(t),
                    span_id=self.span(),
                    policy_id=policy,
                    action=action,
                    reason=reason,
                    **common,
                )
                out.append((t, guard))
                t += 0.001 + 0.01 * rand()
                if action == "block":
                    blocked = True
                    break
            if i == n_steps:
                break
            p = params(agent_id, version, tenant, t)
            kind = kinds[i]
            event: AgentEvent
            if kind == _LLM:
                event, latency = self._llm_call(
                    llm_t, agent, p, ts(t), token_scale, i, kinds[i + 1]
                )
            elif kind == _RETRIEVAL:
                event, latency = self._retrieval(retrieval_t, prof, p, ts(t))
            else:
                event, latency = self._tool_call(tool_t, prof, p, ts(t))
                tool_failed = tool_failed or event.status == "error"
            out.append((t, event))
            t += latency / 1000.0 + 0.005 + 0.05 * rand()

        if (escalate or steady_escalates) and not blocked:
            draw = rng if steady_escalates else self.aux
            span = f"{draw.getrandbits(64):016x}"
            reason = self.escalation_reasons(draw)
            target = "human" if draw.random() < 0.8 else "tier2-support"
            pause = 0.01 + 0.05 * draw.random()
            if escalate:  # else an incident prevented steady traffic's escalation
                escalation = Escalation(
                    event_id="", ts=ts(t), span_id=span, reason=reason, target=target, **common
                )
                out.append((t, escalation))
                t += pause

        r = rand()
        outcome: schema.TaskOutcome | None
        if r < OPEN_PROB:
            outcome = None
        elif blocked:
            outcome = "failed"
        elif r < OPEN_PROB + ABANDONED_PROB:
            outcome = "abandoned"
            t += 30.0 + 60.0 * rand()  # the agent's idle timeout
        elif r < OPEN_PROB + ABANDONED_PROB + FAILED_PROB + FAILED_IF_TOOL_ERROR * tool_failed:
            outcome = "failed"
        else:
            outcome = "completed"
        if outcome is not None:
            out.append((t, replace_struct(started, ts=ts(t), outcome=outcome)))

        if rand() < FEEDBACK_PROB:
            t += min(math.exp(2.7 + 0.8 * _Z[int(rand() * _NZ)]), 120.0)  # ~15 s later
            good = outcome == "completed"
            if rand() < 0.85:  # 4-5 stars after a completed task, 1-2 otherwise
                rating = float((4 if good else 1) + int(rand() * 2))
            else:
                rating = float(1 + int(rand() * 5))
            correction = None if good or rand() < 0.7 else _CORRECTIONS[int(rand() * 4)]
            feedback = Feedback(
                event_id="",
                ts=ts(t),
                span_id=self.span(),
                rating=rating,
                correction=correction,
                **common,
            )
            out.append((t, feedback))
        if outcome is not None:
            final = next((e.model for _, e in reversed(out) if isinstance(e, LlmCall)), None)
            at_end = params(agent_id, version, tenant, t)
            out += self.evaluations(started, final, outcome == "completed", t, at_end)
        return out

    def evaluations(
        self, task: Task, model: str | None, completed: bool, t: float, p: ScenarioParams
    ) -> list[_Planned]:
        """The evaluations of an ended task and its in-app rating, a few seconds after ``t``.

        Every draw is made whatever ``p`` says, so incidents never shift this generator.
        """
        rand = self.evals.random
        out: list[_Planned] = []
        fail_hallucination = HALLUCINATION_PROB
        for only, prob in p.hallucination:
            if only is None or only == model:
                fail_hallucination = prob
        checks = [("hallucination", fail_hallucination, True)]
        checks.append(("helpfulness", HELPFULNESS_FAIL_PROB, rand() < HELPFULNESS_SAMPLE))
        if task.agent_id in USER_FACING:
            checks.append(("tone", p.tone_fail_prob, True))
        common = {f: getattr(task, f) for f in _TASK_ENVELOPE}
        for evaluator, fail, wanted in checks:
            t += 0.5 + 1.5 * rand()  # an online judge, seconds after the answer
            passed = rand() >= fail
            score = 0.6 + 0.4 * rand() if passed else 0.6 * rand()
            if not wanted:
                continue
            label = (
                ("grounded" if passed else "hallucinated") if evaluator == "hallucination" else None
            )
            out.append(
                (
                    t,
                    Evaluation(
                        event_id="",
                        ts=self.ts(t),
                        model=model,
                        evaluator=evaluator,
                        score=round(score, 4),
                        label=label,
                        passed=passed,
                        **common,
                    ),
                )
            )
        u, stars = rand(), rand()
        if u < RATING_PROB:
            negative = u / RATING_PROB < NEGATIVE_RATING_PROB[completed] * p.negative_rating_factor
            rating = float(1 + int(stars * 2)) if negative else float(3 + int(stars * 3))
            t += 2.0 + 8.0 * rand()
            out.append((t, Feedback(event_id="", ts=self.ts(t), rating=rating, **common)))
        else:
            rand()
        return out

    def _llm_call(
        self,
        template: LlmCall,
        agent: _Agent,
        p: ScenarioParams,
        when: datetime,
        token_scale: float,
        step: int,
        next_kind: int,
    ) -> tuple[LlmCall, float]:
        """A model call at position ``step``: the context, hence input, grows per step."""
        rand = self.rand
        z = _Z
        spec = UNKNOWN_MODEL if rand() < UNKNOWN_MODEL_FRACTION else agent.model(self.rng)
        scale = token_scale * p.cost_multiplier
        inp = int(math.exp(agent.mu_in + 0.9 * z[int(rand() * _NZ)]) * scale * (1 + 0.35 * step))
        inp = min(max(inp, 20), MAX_INPUT_TOKENS)
        cached = 0 if step == 0 or rand() < 0.4 else int(inp * (0.3 + 0.6 * rand()))
        completion = max(1, int(math.exp(agent.mu_out + 0.7 * z[int(rand() * _NZ)]) * scale))
        if completion >= spec.max_output_tokens:
            completion, finish = spec.max_output_tokens, "length"
        elif next_kind == _TOOL:
            finish = "tool_calls"
        else:
            finish = "stop"
        reasoning = int(completion * (0.2 + 0.5 * rand())) if spec.reasons and rand() < 0.3 else 0
        priced = spec.priced and rand() >= self.config.missing_cost_fraction
        cost = _cost(spec, inp, cached, completion) if priced else None
        # time to first token (median 350 ms), then the output tokens
        ttft = math.exp(5.86 + 0.35 * z[int(rand() * _NZ)])
        latency = (ttft + completion * spec.ms_per_output_token) * p.latency_multiplier
        if p.llm_latency:
            for model, factor in p.llm_latency:
                if model is None or model == spec.name:
                    latency *= factor
        event = replace_struct(
            template,
            ts=when,
            span_id=f"{self.rng.getrandbits(64):016x}",
            model=spec.name,
            provider=spec.provider,
            input_tokens=inp,
            output_tokens=completion,
            cached_input_tokens=cached,
            reasoning_output_tokens=reasoning,
            cost_usd=cost,
            latency_ms=round(latency, 1),
            finish_reason=finish,
        )
        return event, latency

    def _retrieval(
        self, template: Retrieval, prof: AgentProfile, p: ScenarioParams, when: datetime
    ) -> tuple[Retrieval, float]:
        """A retrieval: a miss has no hits and no score."""
        rand = self.rand
        u = rand()
        miss = u < p.retrieval_miss_prob
        latency = min(math.exp(3.8 + 0.6 * _Z[int(rand() * _NZ)]), 3_000.0)
        latency *= p.latency_multiplier
        span = f"{self.rng.getrandbits(64):016x}"
        # Steady traffic draws hits and score for its hits, whatever this retrieval is.
        draw = rand if u >= _STEADY_MISS else self.aux.random if not miss else _no_draw
        hits = draw()
        source = prof.data_sources[int(rand() * len(prof.data_sources))]
        score = draw()
        event = replace_struct(
            template,
            ts=when,
            span_id=span,
            hits=0 if miss else 1 + int(hits * 10),
            data_source=source if p.data_source is None else p.data_source,
            top_score=None if miss else round(0.45 + 0.5 * score, 4),
            miss=miss,
            latency_ms=round(latency, 1),
            query=prof.queries[int(rand() * len(prof.queries))],
        )
        return event, latency

    def _tool_call(
        self, template: ToolCall, prof: AgentProfile, p: ScenarioParams, when: datetime
    ) -> tuple[ToolCall, float]:
        """A tool call; a timed-out one lasts the tool timeout."""
        rand = self.rand
        u = rand()
        failed = u < p.tool_error_prob
        if u < _STEADY_TOOL_ERROR:  # steady traffic draws the error type
            kind = self.errors(self.rng)
            error = kind if failed else None
        else:
            error = self.errors(self.aux) if failed else None
        if error == "timeout":
            latency = TOOL_TIMEOUT_MS * (1.0 + 0.02 * rand())
        else:
            latency = min(math.exp(4.8 + 0.9 * _Z[int(rand() * _NZ)]), TOOL_TIMEOUT_MS)
        latency *= p.latency_multiplier
        event = replace_struct(
            template,
            ts=when,
            span_id=f"{self.rng.getrandbits(64):016x}",
            tool_name=prof.tools[int(rand() * len(prof.tools))],
            status="error" if failed else "ok",
            error_type=error,
            latency_ms=round(latency, 1),
        )
        return event, latency


def generate(config: TrafficConfig) -> Iterator[AgentEvent]:
    """Yield exactly ``config.events`` valid events, deterministic for ``config.seed``.

    The events are the first ``config.events`` by event time of steady traffic: tasks
    arrive as a Poisson process sized so the stream averages ``rate_per_s`` once
    concurrency has built up (the first ~15 s run slower, as after a deploy), and tasks
    still running at the end are cut off there (besides the ~5 % that never end).

    They come in event-time order, except the ``late_fraction`` that is written
    ``late_delay_s`` after its event time (just before the first on-time event that is
    that much younger; late events still pending at the end close the stream).
    """
    total = config.events
    if total == 0:
        return
    traffic = _Traffic(config)
    rng = traffic.rng
    task_rate = config.rate_per_s / _EVENTS_PER_TASK
    late, delay = config.late_fraction, config.late_delay_s
    prefix = f"{traffic.prefix}-"
    from pipeline.scenarios import release_events

    # Rollout scenarios announce their release in the stream, at the rollout's start.
    releases = [(r.ts.timestamp() - traffic.base, r) for r in release_events(config)]

    planned: list[tuple[float, int, AgentEvent]] = []  # by event time
    held: list[tuple[float, int, AgentEvent]] = []  # late events, by write time
    push, pop = heapq.heappush, heapq.heappop
    seq = taken = emitted = 0
    next_arrival = 0.0
    while taken < total:
        if not planned or next_arrival <= planned[0][0]:
            for t, event in traffic.plan_task(next_arrival):
                push(planned, (t, seq, event))
                seq += 1
            next_arrival += rng.expovariate(task_rate)
            continue
        if releases and releases[0][0] <= planned[0][0]:
            release = releases.pop(0)[1]
            taken += 1
            release.event_id = f"{prefix}{emitted:09d}"
            emitted += 1
            yield release
            continue
        t, n, event = pop(planned)
        taken += 1
        if late and rng.random() < late:
            push(held, (t + delay, n, event))
            continue
        while held and held[0][0] <= t:
            due = pop(held)[2]
            due.event_id = f"{prefix}{emitted:09d}"
            emitted += 1
            yield due
        event.event_id = f"{prefix}{emitted:09d}"
        emitted += 1
        yield event
    while held:
        due = pop(held)[2]
        due.event_id = f"{prefix}{emitted:09d}"
        emitted += 1
        yield due


def generate_jsonl(config: TrafficConfig, out: BinaryIO, *, chunk: int = 4096) -> int:
    """Write ``generate(config)`` to ``out`` as JSON lines (``schema.encode`` form); count."""
    encode_lines = msgspec.json.Encoder().encode_lines
    batch: list[AgentEvent] = []
    n = 0
    for event in generate(config):
        batch.append(event)
        if len(batch) >= chunk:
            out.write(encode_lines(batch))
            n += len(batch)
            batch.clear()
    if batch:
        out.write(encode_lines(batch))
        n += len(batch)
    return n
