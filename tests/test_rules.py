"""Alert rules: the file format and its validation, and the engine's once-per-condition rows."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pyarrow as pa
import pytest
from hypothesis import given, settings

from pipeline.config import ConfigError, Settings
from streams.detect import ANOMALIES_SCHEMA
from streams.rules import Rule, RuleEngine, RuleError, load_rules
from streams.windows import METRICS_SCHEMA
from tests.helpers import REPO, run_cli

ISSUE_FORM = """
[[rules]]
name = "support escalations"     # required, unique
measure = "escalation_rate"      # any numeric metrics column
agent_id = "support-bot"         # optional scope keys, named like the metrics columns:
                                 # agent_id, agent_version, prompt_version, model, tenant_id, level
above = 0.2                      # or below = ...; (or a relative change, your documented key)
for_windows = 2                  # consecutive windows, default 1
min_samples = 20                 # optional; severity = "warning" optional
"""

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def test_the_issue_form_loads_from_toml_and_the_same_keys_from_json(tmp_path: Path) -> None:
    toml = tmp_path / "rules.toml"
    toml.write_text(ISSUE_FORM)
    (rule,) = load_rules(f"@{toml}")
    assert rule == Rule(
        name="support escalations",
        measure="escalation_rate",
        level="agent",
        scope=(("agent_id", "support-bot"),),
        condition="above",
        threshold=0.2,
        for_windows=2,
        min_samples=20,
    )
    as_json = tmp_path / "rules.json"
    item = {
        "name": "support escalations",
        "measure": "escalation_rate",
        "agent_id": "support-bot",
        "above": 0.2,
        "for_windows": 2,
        "min_samples": 20,
    }
    as_json.write_text(json.dumps({"rules": [item]}))
    assert load_rules(f"@{as_json}") == [rule]
    assert load_rules(json.dumps([item])) == [rule]  # inline


def test_default_level_follows_the_scope() -> None:
    def level(**scope: str) -> str:
        item = {"name": "r", "measure": "cost_usd", "above": 1, **scope}
        return load_rules(json.dumps([item]))[0].level

    assert level() == "agent"
    assert level(agent_id="a") == "agent"
    assert level(tenant_id="t") == "tenant"
    assert level(agent_id="a", model="m") == "key"
    assert level(agent_id="a", tenant_id="t") == "key"


GOOD: dict[str, Any] = {"name": "r1", "measure": "escalation_rate", "above": 0.2}


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        ({"name": ""}, "name", "required"),
        ({"measure": "nope"}, "measure", "not a numeric metrics column"),
        ({"measure": "agent_id"}, "measure", "not a numeric metrics column"),
        ({"measure": 3}, "measure", "not a numeric metrics column"),
        ({"agent_id": ""}, "agent_id", "non-empty string"),
        ({"model": 4}, "model", "non-empty string"),
        ({"level": "galaxy"}, "level", "choose one of key, agent, tenant"),
        ({"level": "tenant", "agent_id": "a"}, "level", "have no agent_id"),
        ({"above": "high"}, "above", "expected a number"),
        ({"above": True}, "above", "expected a number"),
        ({"above": float("nan")}, "above", "finite"),
        ({"below": 0.1}, "above", "exactly one condition"),
        ({"above": None, "change_above": 0}, "change_above", "must be > 0"),
        ({"above": None, "change_below": 1.5}, "change_below", "below 1"),
        ({"for_windows": 0}, "for_windows", "whole number >= 1"),
        ({"for_windows": 1.5}, "for_windows", "whole number >= 1"),
        ({"min_samples": -1}, "min_samples", "whole number >= 0"),
        ({"cooldown_windows": 0}, "cooldown_windows", "whole number >= 1"),
        ({"recover_windows": "2"}, "recover_windows", "whole number >= 1"),
        ({"baseline_windows": 2}, "baseline_windows", "whole number >= 5"),
        ({"severity": "panic"}, "severity", "choose one of info, warning, critical"),
        ({"message": ""}, "message", "non-empty string"),
        ({"message": "{nope} went up"}, "message", "placeholders are"),
        ({"message": "{value"}, "message", "bad template"),
        ({"threshold": 3}, "threshold", "unknown field"),
    ],
)
def test_every_bad_field_is_named_with_its_rule(
    change: dict[str, Any], field: str, problem: str
) -> None:
    item = {**GOOD, **change}
    item = {k: v for k, v in item.items() if v is not None}
    with pytest.raises(RuleError) as err:
        load_rules(json.dumps([item]))
    text = str(err.value)
    who = "rule #1" if field == "name" else "rule 'r1'"
    assert text.startswith(f"{who}: {field}: "), text
    assert problem in text, text


def test_file_level_mistakes(tmp_path: Path) -> None:
    with pytest.raises(RuleError, match="cannot read rules file"):
        load_rules(f"@{tmp_path / 'missing.toml'}")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[rules]\nname = 1")
    with pytest.raises(RuleError, match="is not valid"):
        load_rules(f"@{bad}")
    yaml = tmp_path / "rules.yaml"
    yaml.write_text("rules: []")
    with pytest.raises(RuleError, match=r"use a \.toml or \.json file"):
        load_rules(f"@{yaml}")
    with pytest.raises(RuleError, match="neither JSON nor @file"):
        load_rules("name=x")
    with pytest.raises(RuleError, match="expected a list 'rules'"):
        load_rules('{"rules": 3}')
    with pytest.raises(RuleError, match="rule 'a': name: given twice"):
        load_rules(json.dumps([{**GOOD, "name": "a"}, {**GOOD, "name": "a"}]))


def test_the_setting_is_checked_at_load_and_the_cli_prints_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"bad AGENTSTREAM_RULES: rule 'r1': for_windows: "):
        Settings.load(env={"AGENTSTREAM_RULES": json.dumps([{**GOOD, "for_windows": 0}])})
    bad = tmp_path / "rules.toml"
    bad.write_text('[[rules]]\nname = "cost"\nmeasure = "cost_per_tusk"\nabove = 2\n')
    proc = run_cli(
        "worker",
        "--data-dir",
        str(tmp_path),
        env={"AGENTSTREAM_RULES": f"@{bad}", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: bad AGENTSTREAM_RULES: rule 'cost': measure: 'cost_per_tusk' is not a numeric "
        "metrics column (e.g. escalation_rate)"
    ]


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(
                st.sampled_from([*GOOD, "above", "below", "for_windows", "level", "x"])
                | st.text(max_size=4),
                inner,
                max_size=5,
            )
        ),
        max_leaves=12,
    )
)
def test_hostile_rules_give_a_rule_error_or_rules(data: Any) -> None:
    try:
        text = json.dumps({"rules": data} if not isinstance(data, dict) else data)
    except ValueError:
        return  # NaN keys and the like json cannot write
    try:
        rules = load_rules(text)
    except RuleError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert all(isinstance(r, Rule) for r in rules)


# --------------------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------------------


def _window(i: int, **values: Any) -> pa.Table:
    row: dict[str, Any] = dict.fromkeys(METRICS_SCHEMA.names)
    row.update(
        metric_id=f"m{i}",
        level="agent",
        window_start=T0 + timedelta(minutes=i),
        window_end=T0 + timedelta(minutes=i + 1),
        agent_id="support-bot",
        events=500,
        tasks_started=50,
        tool_errors_by_tool=[],
        guardrail_by_action=[],
    )
    row.update(values)
    return pa.Table.from_pylist([row], schema=METRICS_SCHEMA)


def _run(engine: RuleEngine, windows: list[pa.Table]) -> list[tuple[int, str, str]]:
    out = []
    for i, w in enumerate(windows):
        rows = engine.observe(w, detected_at=T0)
        assert rows.schema == ANOMALIES_SCHEMA
        out += [(i, r["kind"], r["anomaly_id"]) for r in rows.to_pylist()]
    return out


ESCALATIONS = [0.05] * 5 + [0.3] * 4 + [0.05] * 4 + [0.3] * 1 + [0.05] * 2


def test_a_rule_fires_once_after_for_windows_and_recovers() -> None:
    (rule,) = load_rules(json.dumps([{**GOOD, "agent_id": "support-bot", "for_windows": 2}]))
    engine = RuleEngine([rule])
    got = _run(engine, [_window(i, escalation_rate=v) for i, v in enumerate(ESCALATIONS)])
    # Breaches at 5-8: opens at 6 (2nd window), quiet while it lasts, closes after 2 clear
    # windows (10); the single breach at 13 is shorter than for_windows: nothing.
    assert [(i, kind) for i, kind, _ in got] == [(6, "rule"), (10, "recovery")]
    again = RuleEngine([rule])
    assert _run(again, [_window(i, escalation_rate=v) for i, v in enumerate(ESCALATIONS)]) == got


def test_rows_are_filled_like_the_detectors_and_the_template_is_used() -> None:
    (rule,) = load_rules(
        json.dumps(
            [
                {
                    **GOOD,
                    "agent_id": "support-bot",
                    "severity": "critical",
                    "message": "{name}: {measure} of {key} at {value} (limit {threshold})",
                }
            ]
        )
    )
    engine = RuleEngine([rule])
    for i in range(3):
        engine.observe(_window(i, escalation_rate=0.05), detected_at=T0)
    (row,) = engine.observe(_window(3, escalation_rate=0.31), detected_at=T0).to_pylist()
    assert row["kind"] == "rule" and row["rule"] == "r1" and row["detector"] == "rule"
    assert row["level"] == "agent" and row["agent_id"] == "support-bot"
    assert row["measure"] == "escalation_rate" and row["direction"] == "up"
    assert row["severity"] == "critical"
    assert row["observed"] == pytest.approx(0.31)
    assert row["baseline"] == pytest.approx(0.2)  # fewer than 5 windows of history: the threshold
    assert row["message"] == "r1: escalation_rate of agent support-bot at 31.0% (limit 20.0%)"


def test_min_samples_skips_thin_windows_and_other_keys_are_out_of_scope() -> None:
    (rule,) = load_rules(json.dumps([{**GOOD, "agent_id": "support-bot", "min_samples": 20}]))
    engine = RuleEngine([rule])
    thin = _window(0, escalation_rate=0.9, tasks_started=5)
    other = _window(1, escalation_rate=0.9, agent_id="sql-copilot")
    tenant = _window(2, escalation_rate=0.9, level="tenant", agent_id=None, tenant_id="t")
    assert _run(engine, [thin, other, tenant]) == []
    assert [k for _, k, _ in _run(engine, [_window(3, escalation_rate=0.9)])] == ["rule"]


def test_relative_change_against_the_keys_own_baseline() -> None:
    (rule,) = load_rules(
        json.dumps([{"name": "cost x1.5", "measure": "cost_per_task", "change_above": 0.5}])
    )
    engine = RuleEngine([rule])
    costs = [1.0, 1.1, 0.9, 1.0, 1.05, 1.0, 1.4, 1.6, 1.7, 1.0, 1.0]
    got = _run(engine, [_window(i, cost_per_task=c) for i, c in enumerate(costs)])
    # Baseline: median of the normal windows (1.0); 1.4 < 1.5 is not a breach, 1.6 is.
    assert [(i, k) for i, k, _ in got] == [(7, "rule"), (10, "recovery")]
    engine2 = RuleEngine([rule])
    (row,) = engine2.observe(
        pa.concat_tables([_window(i, cost_per_task=c) for i, c in enumerate(costs[:8])]),
        detected_at=T0,
    ).to_pylist()
    assert row["baseline"] == pytest.approx(1.0) and row["observed"] == pytest.approx(1.6)
    assert "against a baseline of $1" in row["message"]


def test_cooldown_reports_a_long_condition_again() -> None:
    (rule,) = load_rules(json.dumps([{**GOOD, "cooldown_windows": 3}]))
    engine = RuleEngine([rule])
    got = _run(engine, [_window(i, escalation_rate=0.5) for i in range(8)])
    assert [i for i, _, _ in got] == [0, 3, 6]
    assert len({cid for _, _, cid in got}) == 3  # one id per (condition, window)


def test_replayed_windows_count_once_and_state_survives_a_snapshot() -> None:
    (rule,) = load_rules(json.dumps([{**GOOD, "for_windows": 3}]))
    windows = [_window(i, escalation_rate=v) for i, v in enumerate(ESCALATIONS)]
    whole = _run(RuleEngine([rule]), windows)
    first = RuleEngine([rule])
    part = _run(first, windows[:6])
    assert _run(first, windows[:6]) == []  # the same windows again: ignored
    resumed = RuleEngine([rule])
    resumed.restore(first.snapshot())
    rest = [(i + 6, k, a) for i, k, a in _run(resumed, windows[6:])]
    assert part + rest == whole
    # A rule removed from the configuration loses its state; others keep theirs.
    other = RuleEngine(load_rules(json.dumps([{**GOOD, "name": "other"}])))
    other.restore(first.snapshot())
    assert other.open_conditions() == 0


def test_a_zero_baseline_has_no_relative_change() -> None:
    (rule,) = load_rules(
        json.dumps([{"name": "esc x2", "measure": "escalation_rate", "change_above": 1.0}])
    )
    engine = RuleEngine([rule])
    rates = [0.0] * 6 + [0.3]
    assert _run(engine, [_window(i, escalation_rate=v) for i, v in enumerate(rates)]) == []
