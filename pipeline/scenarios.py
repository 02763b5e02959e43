"""Incident scenarios: known incidents at known times in otherwise steady traffic.

A scenario is a name, a one-line description and a rule that turns a ``TrafficConfig`` into
its ground truth, a list of ``Incident`` records. The generator's behaviour is compiled
from exactly those records (``params_fn``), so what is injected and what ``ground_truth``
reports cannot disagree. ``write_ground_truth`` stores them as JSON next to the data, for
tests and benchmarks to score detection against.

Every incident starts at ``incident_start(config)``: the middle of the nominal event-time
span (``events / rate_per_s``), floored to a whole minute (windows are epoch-aligned, so no
window mixes before and after); in a stream shorter than about two minutes, the exact
middle. At the default 50 ev/s, ``--events 200000`` (the recommended minimum for scoring
detection) spans ~67 minutes: 33 steady 1-minute windows, then 33 with the incident. The
tests use 120,000 (20 + 20 windows).

Per 1-minute window at the default 50 ev/s (about 3,000 events, 313 tasks in all; averages
of seed 1 over 200,000 events), the affected key gets:

=================== ============================== ====================== ===================
scenario            affected key                   measure, magnitude     per window
=================== ============================== ====================== ===================
cost-spike          support-bot v4                 cost_per_task x3       450 ev, 47 tasks,
                                                                          196 model calls
escalation-jump     support-bot (new prompt p14)   escalation_rate x5     605 ev, 63 tasks
                                                   (6 % -> 30 %)
retrieval-miss-rise support-bot (new data source   retrieval_miss_rate x5 605 ev,
                    ``support-kb-v2``)             (8 % -> 40 %)          133 retrievals
latency-regression  model gemini-2.0-flash, one    llm_latency_p95_ms x3  231 gemini calls:
                    incident per agent calling it:                        134, 37, 33, 26
                    triage-agent, sales-assistant,
                    travel-planner, onboarding-guide
cost-drift          sql-copilot v3                 cost_per_task, linear  288 ev, 30 tasks,
                                                   x1 -> x2.5 at the end  125 model calls
=================== ============================== ====================== ===================

Side effects, by design: 3x tokens also make those model calls slower (output time), and a
slower or more escalating task ends later. Everything before ``starts_at`` is byte for
byte the steady stream of the seed, and keys no incident names stay exactly the steady
traffic after it too (all but event ids; without late events, see ``pipeline.generate``).

Rollouts (``ROLLOUT_SCENARIOS``): at ``starts_at`` support-bot starts a release (a
``release`` event in the stream, ``release_events``): half its tasks (``traffic_share`` 0.5,
chosen by a hash of the task number) get prompt ``p14``, the candidate; ``p12`` is the
baseline (about 30 % of its tasks keep it, the rest keep ``p13``). Per window that is about
31 candidate and 19 baseline tasks at the default rate.

=================== ======================================== ===========================
scenario            candidate p14 against baseline p12        expected verdict
=================== ======================================== ===========================
good-rollout        tool errors 5 % -> 4 % (slightly better)   never ``regressed``
regressing-rollout  escalation rate 6 % -> 18 % (x3)           ``regressed`` on
                                                               ``escalation_rate``
=================== ======================================== ===========================

They are scored by release verdicts (``streams.releases``), not by drift detection, so
``DRIFT_SCENARIOS`` (what ``agentstream evaluate`` scores) leaves them out.

``budget-burn`` makes every agent serving tenant-03 use 6x the tokens per model call (a loop
re-sending its context): that tenant's spend rate rises about 4x, and its ground truth
carries day budgets for every tenant and when tenant-03's runs out (``budget_truth``); the
budget tracker scores it, not drift detection either.

Quality scenarios (``QUALITY_SCENARIOS``), on the evaluation events and in-app ratings the
generator adds to every ended task: ``hallucination-rise`` (support-bot's gpt-4o-mini answers
fail the hallucination evaluator 15 % of the time instead of 3 %: ~89 % over all its answers
instead of ~96 %, found at the agent level, ~50 judged answers a window), ``feedback-sours``
(support-bot's negative ratings x3: ~19 % -> ~36 % of its ratings, ~30 ratings a window)
and the rollout ``tone-regression`` (p14's tone pass rate 94 % -> 80 %, judged ``regressed``
on ``eval_tone_pass_rate``). The two drift ones are near the detectors' limit at that sample
size: found after 7 to 30 windows (README, "With evaluations in the traffic").

``steady`` is the control: no incident. Later scenarios add records
with other keys (``tenant_id`` is already honoured) and, where they need one, a new knob in
``ScenarioParams``; the registry and the ground-truth format stay as they are.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Final, Literal

import msgspec

from pipeline.generate import (
    AGENT_PROFILES,
    HALLUCINATION_PROB,
    STEADY,
    ParamsFn,
    ScenarioParams,
    TrafficConfig,
    _profiles,
    tenant_weights,
)
from pipeline.schema import Release

__all__ = [
    "DRIFT_SCENARIOS",
    "EARLY_SCENARIOS",
    "QUALITY_SCENARIOS",
    "ROLLOUT_SCENARIOS",
    "SCENARIOS",
    "SCENARIO_NAMES",
    "STARTUP_SCENARIOS",
    "BudgetBurn",
    "GroundTruth",
    "Incident",
    "Scenario",
    "budget_truth",
    "check_config",
    "ground_truth",
    "incident_start",
    "list_scenarios",
    "nominal_end",
    "params_fn",
    "read_ground_truth",
    "release_events",
    "write_ground_truth",
]

Measure = Literal[
    "cost_per_task",
    "cost_usd",
    "tokens_per_call",
    "escalation_rate",
    "retrieval_miss_rate",
    "tool_error_rate",
    "llm_latency_p95_ms",
    "task_success_rate",
    "eval_hallucination_pass_rate",
    "eval_tone_pass_rate",
    "feedback_negative_share",
]
"""Metric names as ``streams.windows`` computes them."""
Direction = Literal["up", "down"]


class Incident(msgspec.Struct, frozen=True, kw_only=True):
    """One injected incident: which measure of which key moves, from when, by how much.

    The key is ``agent_id`` plus, when set, ``agent_version``, ``model`` (model calls of
    that model only) and ``tenant_id``. ``prompt_version`` and ``data_source`` name what
    *appears* at ``starts_at`` (the new prompt of a deploy, the new retrieval index): from
    then on the key's tasks carry that prompt version, its retrievals that data source.

    ``magnitude`` (>= 1) is the factor on the measure's steady value: multiplied for
    ``direction="up"``, divided for ``"down"``. It applies in full from ``starts_at``, or,
    when ``ramp_until`` is set, grows linearly from 1 at ``starts_at`` to ``magnitude`` at
    ``ramp_until`` and stays there.

    A *rollout* sets ``release_id``: the incident then applies to ``traffic_share`` of the
    key's tasks only, which carry ``prompt_version`` (the candidate); ``baseline`` names the
    prompt version it is compared with, and ``expected_verdict`` what the release verdict on
    ``measure`` must be (``regressed``), or that no measure may be judged regressed
    (``never_regressed``).
    """

    kind: str
    measure: Measure
    starts_at: datetime
    agent_id: str
    agent_version: str | None = None
    prompt_version: str | None = None
    model: str | None = None
    tenant_id: str | None = None
    direction: Direction
    magnitude: float
    ramp_until: datetime | None = None
    data_source: str | None = None
    release_id: str | None = None
    baseline: str | None = None
    traffic_share: float | None = None
    expected_verdict: Literal["regressed", "never_regressed"] | None = None
    new_agent_version: str | None = None


class BudgetBurn(msgspec.Struct, frozen=True, kw_only=True):
    """A budget an incident makes run out early: its key, when the burn starts, and when the
    budget is exhausted at the nominal rates (``budget_truth``; the real stream's spend is
    noisier, so tests measure the actual time)."""

    budget: str
    starts_at: datetime
    exhausts_at: datetime


class GroundTruth(msgspec.Struct, frozen=True, kw_only=True):
    """What ``write_ground_truth`` stores: the scenario, the stream it belongs to, incidents.

    ``end`` is the nominal end of the stream (``start + events / rate_per_s``). ``budgets``
    is the budget configuration the scenario is meant to run with (``AGENTSTREAM_BUDGETS``
    form, empty for most scenarios) and ``burns`` the budgets its incidents exhaust early.
    """

    scenario: str
    description: str
    seed: int
    events: int
    rate_per_s: float
    start: datetime
    end: datetime
    incidents: list[Incident]
    budgets: str = ""
    burns: list[BudgetBurn] = []


@dataclass(frozen=True)
class Scenario:
    """A registered scenario: ``incidents`` builds its ground truth for a config.

    ``incidents`` raises ``ValueError`` when the config cannot carry them (say, the affected
    agent is not among ``config.agents``).
    """

    name: str
    description: str
    incidents: Callable[[TrafficConfig], list[Incident]]
    budgets: Callable[[TrafficConfig], tuple[str, list[BudgetBurn]]] | None = None


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------

START_FRACTION: Final = 0.5


def incident_start(config: TrafficConfig, fraction: float = START_FRACTION) -> datetime:
    """``fraction`` of the nominal span after ``config.start``, floored to a whole minute.

    A stream too short to keep a whole minute before that gets the exact point instead.
    """
    start = config.start.timestamp()
    at = start + fraction * config.events / config.rate_per_s
    floored = math.floor(at / 60.0) * 60.0
    return datetime.fromtimestamp(floored if floored > start else at, config.start.tzinfo)


def nominal_end(config: TrafficConfig) -> datetime:
    """``config.start`` plus ``events / rate_per_s``: about where the stream ends."""
    return config.start + timedelta(seconds=config.events / config.rate_per_s)


# --------------------------------------------------------------------------------------
# The catalogue
# --------------------------------------------------------------------------------------


def _require(config: TrafficConfig, scenario: str, agent_id: str, version: str | None) -> None:
    profiles = _profiles(config.agents)
    for p in profiles:
        if p.agent_id == agent_id:
            if version is not None and version not in {v for v, _, _ in p.versions}:
                raise ValueError(f"scenario {scenario!r}: agent {agent_id} has no {version}")
            return
    need = next(i for i, p in enumerate(AGENT_PROFILES) if p.agent_id == agent_id)
    raise ValueError(
        f"scenario {scenario!r} needs agent {agent_id}: use agents >= {need + 1}, "
        f"got {config.agents}"
    )


def _steady(config: TrafficConfig) -> list[Incident]:
    return []


def _cost_spike(config: TrafficConfig) -> list[Incident]:
    _require(config, "cost-spike", "support-bot", "v4")
    return [
        Incident(
            kind="cost-spike",
            measure="cost_per_task",
            starts_at=incident_start(config),
            agent_id="support-bot",
            agent_version="v4",
            direction="up",
            magnitude=3.0,
        )
    ]


def _escalation_jump(config: TrafficConfig) -> list[Incident]:
    _require(config, "escalation-jump", "support-bot", None)
    return [
        Incident(
            kind="escalation-jump",
            measure="escalation_rate",
            starts_at=incident_start(config),
            agent_id="support-bot",
            prompt_version="p14",
            direction="up",
            magnitude=5.0,
        )
    ]


def _retrieval_miss_rise(config: TrafficConfig) -> list[Incident]:
    _require(config, "retrieval-miss-rise", "support-bot", None)
    return [
        Incident(
            kind="retrieval-miss-rise",
            measure="retrieval_miss_rate",
            starts_at=incident_start(config),
            agent_id="support-bot",
            data_source="support-kb-v2",
            direction="up",
            magnitude=5.0,
        )
    ]


SLOW_MODEL: Final = "gemini-2.0-flash"


def _latency_regression(config: TrafficConfig) -> list[Incident]:
    at = incident_start(config)
    users = [p.agent_id for p in _profiles(config.agents) if SLOW_MODEL in dict(p.models)]
    if not users:
        raise ValueError(
            f"scenario 'latency-regression' needs an agent that calls {SLOW_MODEL}: "
            f"use agents >= 5, got {config.agents}"
        )
    return [
        Incident(
            kind="latency-regression",
            measure="llm_latency_p95_ms",
            starts_at=at,
            agent_id=agent_id,
            model=SLOW_MODEL,
            direction="up",
            magnitude=3.0,
        )
        for agent_id in users
    ]


def _cost_drift(config: TrafficConfig) -> list[Incident]:
    _require(config, "cost-drift", "sql-copilot", "v3")
    at = incident_start(config)
    return [
        Incident(
            kind="cost-drift",
            measure="cost_per_task",
            starts_at=at,
            agent_id="sql-copilot",
            agent_version="v3",
            direction="up",
            magnitude=2.5,
            ramp_until=max(nominal_end(config), at + timedelta(minutes=1)),
        )
    ]


# Budget burn. The generator's traffic spans about an hour of one UTC day (09:00 on, by
# default), so a day budget is only meaningful scaled to that traffic: every tenant gets
# BUDGET_HEADROOM x its nominal spend from the stream's start to the end of the day, the
# budget it would need if its traffic went on steadily until midnight. Steady tenants then
# project about 1 / BUDGET_HEADROOM of their budget (the forecast assumes exactly that).
# Spend is nominal: USD_PER_EVENT (the mean cost of an event of the 12 catalogue agents,
# estimated costs included, measured over seeds 1-5) x the tenant's share of the traffic;
# a tenant's real share varies by about +-17 % between seeds, which the headroom absorbs.
USD_PER_EVENT: Final = 0.0097
BUDGET_HEADROOM: Final = 1.5
BURN_TENANT: Final = "tenant-03"
BURN_TOKENS: Final = 6.0
# What BURN_TOKENS on every agent of the tenant does to its spend rate once tasks have
# caught up (measured 3.7-4.5 over seeds 1-5: inputs are capped at 150k tokens).
BURN_SPEND_FACTOR: Final = 4.0


def _budget_burn(config: TrafficConfig) -> list[Incident]:
    at = incident_start(config)
    return [
        Incident(
            kind="budget-burn",
            measure="cost_usd",
            starts_at=at,
            agent_id=p.agent_id,
            tenant_id=BURN_TENANT,
            direction="up",
            magnitude=BURN_TOKENS,
        )
        for p in _profiles(config.agents)
    ]


def _tenant_budgets(config: TrafficConfig) -> tuple[str, list[BudgetBurn]]:
    """Day budgets of every tenant (see above) and the burning tenant's expected exhaustion."""
    if config.agents != len(AGENT_PROFILES) or config.tenants < 3:
        raise ValueError(
            f"scenario 'budget-burn' is calibrated for {len(AGENT_PROFILES)} agents and at "
            f"least 3 tenants, got {config.agents} agents and {config.tenants} tenants"
        )
    start = config.start.astimezone(UTC)
    midnight = datetime.combine(start.date() + timedelta(days=1), time(), UTC)
    if nominal_end(config) > midnight:
        raise ValueError(
            "scenario 'budget-burn' needs a stream within one UTC day: it would run past "
            f"{midnight:%Y-%m-%d %H:%M}Z; use fewer events or an earlier start"
        )
    weights = tenant_weights(config.tenants)
    total = sum(w for _, w in weights)
    day_s = (midnight - start).total_seconds()
    specs, burns = [], []
    for tenant, w in weights:
        usd_per_s = config.rate_per_s * USD_PER_EVENT * w / total
        amount = round(BUDGET_HEADROOM * usd_per_s * day_s, 2)
        specs.append(f"tenant:{tenant}={amount:.15g}/day")
        if tenant == BURN_TENANT:
            at = incident_start(config)
            left = amount - usd_per_s * (at - config.start).total_seconds()
            burn_s = left / (usd_per_s * BURN_SPEND_FACTOR)
            burns.append(
                BudgetBurn(
                    budget=f"tenant:{tenant}/day",
                    starts_at=at,
                    exhausts_at=at + timedelta(seconds=round(burn_s)),
                )
            )
    return ",".join(specs), burns


ROLLOUT_SHARE: Final = 0.5


def _rollout(
    config: TrafficConfig,
    name: str,
    measure: Measure,
    direction: Direction,
    magnitude: float,
    *,
    regresses: bool | None = None,
) -> list[Incident]:
    """support-bot's p14 rollout; it ``regresses`` (default: when the measure goes up)."""
    regresses = direction == "up" if regresses is None else regresses
    _require(config, name, "support-bot", None)
    return [
        Incident(
            kind=name,
            measure=measure,
            starts_at=incident_start(config),
            agent_id="support-bot",
            prompt_version="p14",
            direction=direction,
            magnitude=magnitude,
            release_id=f"{name}-support-bot-p14",
            baseline="p12",
            traffic_share=ROLLOUT_SHARE,
            expected_verdict="regressed" if regresses else "never_regressed",
        )
    ]


def _good_rollout(config: TrafficConfig) -> list[Incident]:
    return _rollout(config, "good-rollout", "tool_error_rate", "down", 1.25)


def _regressing_rollout(config: TrafficConfig) -> list[Incident]:
    return _rollout(config, "regressing-rollout", "escalation_rate", "up", 3.0)


HALLUCINATING_MODEL: Final = "gpt-4o-mini"


def _hallucination_rise(config: TrafficConfig) -> list[Incident]:
    _require(config, "hallucination-rise", "support-bot", None)
    return [
        Incident(
            kind="hallucination-rise",
            measure="eval_hallucination_pass_rate",
            starts_at=incident_start(config),
            agent_id="support-bot",
            model=HALLUCINATING_MODEL,
            direction="down",
            magnitude=(1 - HALLUCINATION_PROB) / 0.85,
        )
    ]


def _tone_regression(config: TrafficConfig) -> list[Incident]:
    # tone pass rate 94 % -> 80 % on the candidate prompt
    return _rollout(
        config, "tone-regression", "eval_tone_pass_rate", "down", 0.94 / 0.80, regresses=True
    )


def _feedback_sours(config: TrafficConfig) -> list[Incident]:
    _require(config, "feedback-sours", "support-bot", None)
    return [
        Incident(
            kind="feedback-sours",
            measure="feedback_negative_share",
            starts_at=incident_start(config),
            agent_id="support-bot",
            direction="up",
            magnitude=3.0,
        )
    ]


# --------------------------------------------------------------------------------------
# Early incidents and a regressing new version (issue 17: detectors blind at start-up)
# --------------------------------------------------------------------------------------

EARLY_MINUTES: Final = (5, 10)
NEW_VERSION: Final = "v8"
NEW_VERSION_COST: Final = 6.0


def _minutes_in(config: TrafficConfig, minutes: int) -> datetime:
    """``minutes`` after ``config.start``, floored to a whole minute (windows are aligned)."""
    at = config.start.timestamp() + 60 * minutes
    return datetime.fromtimestamp(math.floor(at / 60.0) * 60.0, config.start.tzinfo)


def _early(
    build: Callable[[TrafficConfig], list[Incident]], minutes: int
) -> Callable[[TrafficConfig], list[Incident]]:
    """``build``'s incidents, starting ``minutes`` into the stream instead of mid-stream."""

    def incidents(config: TrafficConfig) -> list[Incident]:
        at = _minutes_in(config, minutes)
        return [msgspec.structs.replace(i, starts_at=at) for i in build(config)]

    return incidents


def _new_version_regresses(config: TrafficConfig) -> list[Incident]:
    _require(config, "new-version-regresses", "research-agent", None)
    return [
        Incident(
            kind="new-version-regresses",
            measure="cost_per_task",
            starts_at=incident_start(config),
            agent_id="research-agent",
            new_agent_version=NEW_VERSION,
            direction="up",
            magnitude=NEW_VERSION_COST,
        )
    ]


EARLY_SCENARIOS: Final[tuple[str, ...]] = tuple(
    f"early-{base}-{m}m" for m in EARLY_MINUTES for base in ("cost-spike", "escalation-jump")
)
"""Incidents 5 and 10 minutes after the stream starts: scored on a fresh worker with and
without lake history (``pipeline.evaluate``)."""


def _early_scenarios() -> list[Scenario]:
    out = []
    for m in EARLY_MINUTES:
        out.append(
            Scenario(
                f"early-cost-spike-{m}m",
                f"cost-spike {m} minutes after the stream starts (scored on a fresh worker)",
                _early(_cost_spike, m),
            )
        )
        out.append(
            Scenario(
                f"early-escalation-jump-{m}m",
                f"escalation-jump {m} minutes after the stream starts (scored on a fresh worker)",
                _early(_escalation_jump, m),
            )
        )
    out.append(
        Scenario(
            "new-version-regresses",
            f"research-agent deploys {NEW_VERSION} mid-stream (all its traffic), which sends "
            f"{NEW_VERSION_COST:g}x the tokens per model call (about 4x after the input cap): "
            "new keys far dearer than their predecessors",
            _new_version_regresses,
        )
    )
    return out


SCENARIOS: Final[dict[str, Scenario]] = {
    s.name: s
    for s in (
        Scenario("steady", "control: steady traffic, no incident", _steady),
        Scenario(
            "cost-spike",
            "support-bot v4 uses 3x the tokens per model call from mid-stream: cost per task x3",
            _cost_spike,
        ),
        Scenario(
            "escalation-jump",
            "support-bot deploys prompt p14 mid-stream: escalation rate 6% -> 30%",
            _escalation_jump,
        ),
        Scenario(
            "retrieval-miss-rise",
            "support-bot switches to index support-kb-v2 mid-stream: retrieval misses 8% -> 40%",
            _retrieval_miss_rise,
        ),
        Scenario(
            "latency-regression",
            f"{SLOW_MODEL} calls take 3x as long from mid-stream, in every agent that uses it",
            _latency_regression,
        ),
        Scenario(
            "cost-drift",
            "sql-copilot v3 cost per task climbs linearly from mid-stream to x2.5 at the end",
            _cost_drift,
        ),
        Scenario(
            "good-rollout",
            "support-bot rolls prompt p14 out to half its tasks mid-stream: tool errors 5% -> 4%",
            _good_rollout,
        ),
        Scenario(
            "regressing-rollout",
            "support-bot rolls prompt p14 out to half its tasks mid-stream: escalations 6% -> 18%",
            _regressing_rollout,
        ),
        Scenario(
            "budget-burn",
            f"every agent serving {BURN_TENANT} loops from mid-stream ({BURN_TOKENS:g}x the tokens "
            "per model call): the tenant's day budget burns out hours early",
            _budget_burn,
            _tenant_budgets,
        ),
        *_early_scenarios(),
        Scenario(
            "hallucination-rise",
            f"support-bot's {HALLUCINATING_MODEL} answers hallucinate more from mid-stream: the "
            "hallucination evaluator's pass rate 97% -> 85% on that route (~89% over all its answers)",
            _hallucination_rise,
        ),
        Scenario(
            "tone-regression",
            "support-bot rolls prompt p14 out to half its tasks mid-stream: tone evaluator pass "
            "rate 94% -> 80%",
            _tone_regression,
        ),
        Scenario(
            "feedback-sours",
            "support-bot's users turn on it from mid-stream: 3x the negative in-app ratings "
            "(~19% -> ~36% of its ratings at 1-2 stars)",
            _feedback_sours,
        ),
    )
}
SCENARIO_NAMES: Final[tuple[str, ...]] = tuple(SCENARIOS)
ROLLOUT_SCENARIOS: Final[tuple[str, ...]] = (
    "good-rollout",
    "regressing-rollout",
    "tone-regression",
)
STARTUP_SCENARIOS: Final[tuple[str, ...]] = (*EARLY_SCENARIOS, "new-version-regresses")
"""Blindness at start-up: scored by ``agentstream evaluate`` (early ones with and without
lake history), not part of ``DRIFT_SCENARIOS``, whose incidents a worker that has seen the
stream from its start must all find."""
DRIFT_SCENARIOS: Final[tuple[str, ...]] = tuple(
    n
    for n, s in SCENARIOS.items()
    if s.budgets is None and n not in ROLLOUT_SCENARIOS and n not in STARTUP_SCENARIOS
)
"""The scenarios drift detection is scored on: rollouts are judged by release verdicts, budget
scenarios by the budget tracker."""
QUALITY_SCENARIOS: Final[tuple[str, ...]] = (
    "hallucination-rise",
    "tone-regression",
    "feedback-sours",
)
"""The scenarios of evaluation scores and user feedback (drift and rollout alike)."""


def list_scenarios() -> list[tuple[str, str]]:
    """``(name, description)`` of every scenario, ``steady`` first."""
    return [(s.name, s.description) for s in SCENARIOS.values()]


def _scenario(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise ValueError(
            f"unknown scenario {name!r}: expected one of {', '.join(SCENARIO_NAMES)}"
        ) from None


def ground_truth(config: TrafficConfig) -> list[Incident]:
    """The incidents ``generate(config)`` injects (none for ``steady``); deterministic."""
    return _scenario(config.scenario).incidents(config)


def budget_truth(config: TrafficConfig) -> tuple[str, list[BudgetBurn]]:
    """The budgets (``AGENTSTREAM_BUDGETS`` form) ``config``'s scenario runs with, and the
    ones its incidents burn early; ``("", [])`` for a scenario without budgets."""
    scenario = _scenario(config.scenario)
    return ("", []) if scenario.budgets is None else scenario.budgets(config)


def check_config(config: TrafficConfig) -> None:
    """Raise ``ValueError`` unless the scenario is known and fits the config."""
    for incident in ground_truth(config):
        _Rule.of(incident, config.start.timestamp())  # an effect the generator can inject
    budget_truth(config)


def write_ground_truth(config: TrafficConfig, path: str | Path) -> GroundTruth:
    """Write the scenario and its incidents to ``path`` as indented JSON; return them."""
    budgets, burns = budget_truth(config)
    truth = GroundTruth(
        scenario=config.scenario,
        description=_scenario(config.scenario).description,
        seed=config.seed,
        events=config.events,
        rate_per_s=config.rate_per_s,
        start=config.start,
        end=nominal_end(config),
        incidents=ground_truth(config),
        budgets=budgets,
        burns=burns,
    )
    Path(path).write_bytes(msgspec.json.format(msgspec.json.encode(truth), indent=2) + b"\n")
    return truth


def read_ground_truth(path: str | Path) -> GroundTruth:
    """Read a file ``write_ground_truth`` wrote."""
    return msgspec.json.decode(Path(path).read_bytes(), type=GroundTruth)


def release_events(config: TrafficConfig) -> list[Release]:
    """The ``release`` events of the scenario's rollouts, in time order (``event_id`` blank)."""
    out = []
    for inc in ground_truth(config):
        if inc.release_id is None:
            continue
        assert inc.prompt_version is not None and inc.baseline is not None
        out.append(
            Release(
                event_id="",
                schema_version=1,
                ts=inc.starts_at,
                agent_id=inc.agent_id,
                tenant_id=inc.tenant_id,
                release_id=inc.release_id,
                dimension="prompt_version",
                candidate=inc.prompt_version,
                baseline=inc.baseline,
                traffic_share=inc.traffic_share or 1.0,
            )
        )
    return sorted(out, key=lambda r: r.ts)


# --------------------------------------------------------------------------------------
# Injection: incidents compiled into the generator's ScenarioParams
# --------------------------------------------------------------------------------------

_COST_MEASURES: Final = frozenset({"cost_per_task", "cost_usd", "tokens_per_call"})
_LATENCY: Final = "llm_latency_p95_ms"
_QUALITY: Final = frozenset(
    {"eval_hallucination_pass_rate", "eval_tone_pass_rate", "feedback_negative_share"}
)
_PER_MODEL: Final = frozenset({_LATENCY, "eval_hallucination_pass_rate"})
_RATE_KNOBS: Final = {
    "escalation_rate": "escalation_prob",
    "retrieval_miss_rate": "retrieval_miss_prob",
    "tool_error_rate": "tool_error_prob",
}


@dataclass(frozen=True, slots=True)
class _Rule:
    """One incident as seconds since ``config.start`` and an effect on ``ScenarioParams``."""

    incident: Incident
    start: float
    full: float  # when the full magnitude is reached (== start for a step)
    factor: float  # at full effect

    @classmethod
    def of(cls, incident: Incident, base: float) -> _Rule:
        measure, model = incident.measure, incident.model
        known = measure in _COST_MEASURES or measure in _RATE_KNOBS or measure in _QUALITY
        if not (known or measure == _LATENCY):
            raise ValueError(f"incident {incident.kind!r}: cannot inject {measure} yet")
        if model is not None and measure not in _PER_MODEL:
            raise ValueError(f"incident {incident.kind!r}: {measure} cannot be per model")
        if not incident.magnitude >= 1.0:
            raise ValueError(f"incident {incident.kind!r}: magnitude must be >= 1")
        share = incident.traffic_share
        if share is not None and not (0.0 < share <= 1.0 and incident.prompt_version):
            raise ValueError(
                f"incident {incident.kind!r}: a rollout needs a prompt_version and a "
                "traffic_share within (0, 1]"
            )
        start = incident.starts_at.timestamp() - base
        full = start if incident.ramp_until is None else incident.ramp_until.timestamp() - base
        if full < start:
            raise ValueError(f"incident {incident.kind!r}: ramp_until before starts_at")
        m = incident.magnitude
        return cls(incident, start, full, m if incident.direction == "up" else 1.0 / m)

    def at(self, t: float) -> float:
        """The factor on the measure at ``t`` seconds (``t >= start``)."""
        if t >= self.full:
            return self.factor
        return 1.0 + (self.factor - 1.0) * (t - self.start) / (self.full - self.start)

    def matches(self, agent_version: str, tenant_id: str) -> bool:
        inc = self.incident
        return (inc.agent_version is None or inc.agent_version == agent_version) and (
            inc.tenant_id is None or inc.tenant_id == tenant_id
        )

    def apply(self, p: ScenarioParams, t: float) -> ScenarioParams:
        inc = self.incident
        f = self.at(t)
        if inc.measure in _COST_MEASURES:
            p = replace(p, cost_multiplier=p.cost_multiplier * f)
        elif inc.measure in _RATE_KNOBS:
            knob = _RATE_KNOBS[inc.measure]
            p = replace(p, **{knob: min(1.0, getattr(p, knob) * f)})
        elif inc.measure == "eval_hallucination_pass_rate":  # a pass rate times f
            fail = 1.0 - (1.0 - HALLUCINATION_PROB) * f
            p = replace(p, hallucination=(*p.hallucination, (inc.model, fail)))
        elif inc.measure == "eval_tone_pass_rate":
            p = replace(p, tone_fail_prob=1.0 - (1.0 - p.tone_fail_prob) * f)
        elif inc.measure == "feedback_negative_share":
            p = replace(p, negative_rating_factor=p.negative_rating_factor * f)
        else:  # latency of the key's model calls (of one model if set)
            p = replace(p, llm_latency=(*p.llm_latency, (inc.model, f)))
        if inc.prompt_version is not None:
            p = replace(p, prompt_version=inc.prompt_version)
        if inc.data_source is not None:
            p = replace(p, data_source=inc.data_source)
        if inc.traffic_share is not None:
            p = replace(p, candidate_share=inc.traffic_share)
        if inc.new_agent_version is not None:
            p = replace(p, agent_version=inc.new_agent_version)
        return p


def _fold(rules: Sequence[_Rule], agent_version: str, tenant_id: str, t: float) -> ScenarioParams:
    p = STEADY
    for rule in rules:
        if rule.matches(agent_version, tenant_id):
            p = rule.apply(p, t)
    return p


def _always_steady(agent_id: str, agent_version: str, tenant_id: str, t: float) -> ScenarioParams:
    return STEADY


def params_fn(config: TrafficConfig) -> ParamsFn:
    """``(agent_id, agent_version, tenant_id, t) -> ScenarioParams`` for ``config``.

    ``t`` is seconds since ``config.start``. Keys no incident names, and every key before
    its incidents start, get ``STEADY``; results of step incidents are cached.
    """
    incidents = ground_truth(config)
    if not incidents:
        return _always_steady
    base = config.start.timestamp()
    by_agent: dict[str, list[_Rule]] = {}
    for incident in incidents:
        by_agent.setdefault(incident.agent_id, []).append(_Rule.of(incident, base))
    table: dict[str, tuple[list[float], list[_Rule], bool]] = {}
    for agent_id, rules in by_agent.items():
        rules.sort(key=lambda r: r.start)
        ramps = any(r.full > r.start for r in rules)
        table[agent_id] = ([r.start for r in rules], rules, ramps)
    cache: dict[tuple[str, str, str, int], ScenarioParams] = {}
    get = table.get

    def params(agent_id: str, agent_version: str, tenant_id: str, t: float) -> ScenarioParams:
        entry = get(agent_id)
        if entry is None:
            return STEADY
        starts, rules, ramps = entry
        k = bisect_right(starts, t)
        if k == 0:
            return STEADY
        if ramps:
            return _fold(rules[:k], agent_version, tenant_id, t)
        key = (agent_id, agent_version, tenant_id, k)
        p = cache.get(key)
        if p is None:
            p = cache[key] = _fold(rules[:k], agent_version, tenant_id, t)
        return p

    return params
