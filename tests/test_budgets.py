"""Budgets: spec parsing, spend sums, the burn-rate forecast, snapshots, the lake view, and
the ``budget-burn`` scenario replayed through the hot path and the tracker."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline import schema
from pipeline.config import ConfigError, Settings
from pipeline.generate import TrafficConfig, generate
from pipeline.scenarios import budget_truth
from sinks.catalog import BUDGETS, EVENTS, connect, prepare
from sinks.tables import EVENTS_SCHEMA
from streams.budgets import (
    BUDGETS_SCHEMA,
    Budget,
    BudgetError,
    BudgetTracker,
    load_budgets,
    parse_budgets,
)
from streams.detect import ANOMALIES_SCHEMA
from streams.hotpath import BatchProcessor

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
FORM = "scope:id=amount/period, for example tenant:acme=50/day,agent:support-bot=1000/month"


# --- parsing ---------------------------------------------------------------------------


def test_parse_inline() -> None:
    assert parse_budgets(" tenant:acme=50/day, agent:support-bot=1_000.5/month,") == [
        Budget("tenant", "acme", 50.0, "day"),
        Budget("agent", "support-bot", 1000.5, "month"),
    ]
    assert parse_budgets("") == []
    assert Budget("tenant", "acme", 50.0, "day").spec == "tenant:acme=50/day"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tenant:acme", f"bad budget 'tenant:acme': expected {FORM}"),
        ("tenant:acme=50", f"bad budget 'tenant:acme=50': expected {FORM}"),
        ("team:acme=5/day", "bad budget 'team:acme=5/day': scope must be tenant or agent, got 'team'"),
        ("tenant:acme=5/week", "bad budget 'tenant:acme=5/week': period must be day or month, got 'week'"),
        ("tenant:acme=0/day", "bad budget 'tenant:acme=0/day': amount must be > 0, got 0"),
        (
            "user:u1=5/day",
            "bad budget 'user:u1=5/day': user budgets need a user_id on events, which schema v1 "
            "does not have yet; use tenant or agent",
        ),
        (
            "tenant:a=1/day,tenant:a=2/day",
            "budget tenant:a/day is given twice: one amount per scope, id and period",
        ),
    ],
)  # fmt: skip
def test_parse_errors_name_the_entry(text: str, message: str) -> None:
    with pytest.raises(BudgetError) as err:
        parse_budgets(text)
    assert str(err.value) == message


def test_budget_files(tmp_path: Path) -> None:
    toml = tmp_path / "b.toml"
    toml.write_text(
        '[[budgets]]\nscope = "tenant"\nid = "acme"\namount_usd = 50\nperiod = "day"\n'
        '[[budgets]]\nscope = "agent"\nid = "bot"\namount_usd = 7.5\nperiod = "month"\n'
    )
    expected = [Budget("tenant", "acme", 50.0, "day"), Budget("agent", "bot", 7.5, "month")]
    assert load_budgets(f"@{toml}") == expected
    js = tmp_path / "b.json"
    js.write_text(json.dumps({"budgets": [{"scope": "tenant", "id": "acme", "amount_usd": 50,
                                           "period": "day"}]}))  # fmt: skip
    assert load_budgets(f"@{js}") == expected[:1]
    js.write_text(json.dumps({"budgets": [{"scope": "tenant", "id": "acme", "amount_usd": "5",
                                           "period": "day"}]}))  # fmt: skip
    with pytest.raises(BudgetError) as err:
        load_budgets(f"@{js}")
    assert str(err.value) == f"bad budget #1 in {str(js)!r}: amount_usd must be a number, got '5'"
    with pytest.raises(BudgetError) as err:
        load_budgets(f"@{tmp_path}/missing.toml")
    assert str(err.value) == (
        f"cannot read budgets file {str(tmp_path / 'missing.toml')!r}: No such file or directory"
    )


def test_settings_field() -> None:
    s = Settings.load(env={"AGENTSTREAM_BUDGETS": "tenant:acme=50/day"})
    assert s.budgets == "tenant:acme=50/day"
    assert Settings.load(env={}).budgets == ""
    with pytest.raises(ConfigError) as err:
        Settings.load(env={"AGENTSTREAM_BUDGETS": "tenant:acme=fifty/day"})
    assert (
        str(err.value)
        == f"bad AGENTSTREAM_BUDGETS: bad budget 'tenant:acme=fifty/day': expected {FORM}"
    )


# --- hand-made batches ------------------------------------------------------------------


def events(rows: list[tuple[datetime, str, str, float | None]]) -> pa.Table:
    """An ``events`` table of (ts, tenant_id, agent_id, cost_usd) llm calls."""
    n = len(rows)
    cols: dict[str, list[object]] = {name: [None] * n for name in EVENTS_SCHEMA.names}
    cols.update(
        event_id=[f"e{i}" for i in range(n)],
        schema_version=[1] * n,
        type=["llm_call"] * n,
        ts=[r[0] for r in rows],
        tenant_id=[r[1] for r in rows],
        agent_id=[r[2] for r in rows],
        cost_usd=[r[3] for r in rows],
    )
    return pa.Table.from_pydict(cols, schema=EVENTS_SCHEMA)


def steady(start: datetime, minutes: int, usd_per_min: float, tenant: str = "acme") -> pa.Table:
    """One call a minute at ``:30`` costing ``usd_per_min``, plus a costless one."""
    rows: list[tuple[datetime, str, str, float | None]] = []
    for m in range(minutes):
        at = start + timedelta(minutes=m, seconds=30)
        rows += [(at, tenant, "bot", usd_per_min), (at, tenant, "bot", None)]
    return events(rows)


def test_projection_and_alert_before_exhaustion() -> None:
    # $1/min from 12:00: at 12:20, spent 20, rate 60/h, 11:40 h left -> projected 720.
    budget = Budget("tenant", "acme", 100.0, "day")
    tracker = BudgetTracker([budget], rate_window_s=600, min_calls=10)
    tracker.update(steady(T0, 20, 1.0))
    now = T0 + timedelta(minutes=20)
    rows = tracker.check(now, detected_at=now)
    (status,) = tracker.status().to_pylist()
    assert status["spent_usd"] == 20.0
    assert status["burn_rate_usd_per_h"] == status["burn_rate_low_usd_per_h"] == 60.0
    assert status["projected_usd"] == 20.0 + 60.0 * (11 * 60 + 40) / 60
    # 80 dollars left at $1/min: 80 minutes on.
    assert status["projected_exhausted_at"] == now + timedelta(minutes=80)
    assert status["alerted_at"] == now and status["exhausted_at"] is None
    assert rows.schema == ANOMALIES_SCHEMA
    (row,) = rows.to_pylist()
    assert {k: row[k] for k in ("kind", "level", "tenant_id", "agent_id", "measure", "detector",
                                "baseline", "observed", "severity", "window_start")} == {
        "kind": "budget_burn", "level": "tenant", "tenant_id": "acme", "agent_id": None,
        "measure": "spend_usd", "detector": "burn_rate", "baseline": 100.0,
        "observed": 720.0, "severity": "warning", "window_start": datetime(2026, 1, 5, tzinfo=UTC),
    }  # fmt: skip
    assert row["message"] == (
        "day budget tenant:acme=100/day of tenant acme will run out at 2026-01-05T13:40:00Z: "
        "spent $20.00 by 2026-01-05T12:20:00Z, burning $60.00/h (at least $60.00/h), "
        "projected $720.00 by "
        "2026-01-06T00:00:00Z (budget_burn, warning)."
    )
    # No second forecast alert in the period; the exhaustion raises the critical one.
    tracker.update(steady(now, 70, 1.0))
    later = now + timedelta(minutes=70)
    assert tracker.check(later, detected_at=later).num_rows == 0
    tracker.update(steady(later, 10, 1.0))
    end = later + timedelta(minutes=10)
    (crit,) = tracker.check(end, detected_at=end).to_pylist()
    assert (crit["detector"], crit["severity"], crit["observed"]) == (
        "budget_exhausted",
        "critical",
        100.0,
    )
    assert crit["condition_id"] == row["condition_id"] and crit["anomaly_id"] != row["anomaly_id"]
    assert tracker.check(end, detected_at=end).num_rows == 0


def test_uneven_minutes_lower_the_forecast_rate() -> None:
    # $2 every other minute: mean $1/min, s = sqrt(10/9), low = 1 - 2 sqrt(1/9) = 1/3 $/min.
    tracker = BudgetTracker(
        [Budget("tenant", "acme", 500.0, "day")], rate_window_s=600, min_calls=5
    )
    every_other = [
        (T0 + timedelta(minutes=m, seconds=30), "acme", "bot", 2.0) for m in range(0, 20, 2)
    ]
    tracker.update(events(every_other))
    now = T0 + timedelta(minutes=20)
    assert tracker.check(now, detected_at=now).num_rows == 0  # 20 + 20/h x 11.67 h < 500
    (status,) = tracker.status().to_pylist()
    assert status["burn_rate_usd_per_h"] == 60.0
    assert status["burn_rate_low_usd_per_h"] == pytest.approx(20.0, rel=1e-12)
    assert status["projected_usd"] == pytest.approx(20.0 + 20.0 * (11 + 40 / 60), rel=1e-12)


def test_minimum_evidence_and_steady_budgets() -> None:
    tracker = BudgetTracker([Budget("tenant", "acme", 2000.0, "day")], rate_window_s=600)
    # Only 5 minutes of spend: no forecast, however steep.
    tracker.update(steady(T0, 5, 50.0))
    now = T0 + timedelta(minutes=5)
    assert tracker.check(now, detected_at=now).num_rows == 0
    (status,) = tracker.status().to_pylist()
    assert (status["spent_usd"], status["projected_usd"], status["burn_rate_usd_per_h"]) == (
        250.0, None, None,
    )  # fmt: skip
    # Too few calls in the window (10 < 11): no forecast either, at $50 a call.
    quiet = BudgetTracker([Budget("tenant", "acme", 100.0, "day")], rate_window_s=600, min_calls=11)
    quiet.update(steady(T0, 30, 50.0))
    at = T0 + timedelta(minutes=30)
    assert quiet.check(at, detected_at=at).to_pylist()[0]["detector"] == "budget_exhausted"
    assert quiet.status().to_pylist()[0]["projected_usd"] is None
    # $1/min from noon projects $720 of $2000 all day long: never an alert.
    tracker = BudgetTracker(
        [Budget("tenant", "acme", 2000.0, "day")], rate_window_s=600, min_calls=10
    )
    for h in range(11):
        tracker.update(steady(T0 + timedelta(hours=h), 60, 1.0))
        at = T0 + timedelta(hours=h + 1)
        assert tracker.check(at, detected_at=at).num_rows == 0
        assert tracker.status().to_pylist()[0]["projected_usd"] == 720.0


def test_spend_per_scope_and_period_and_memory() -> None:
    budgets = parse_budgets("tenant:acme=1000/day,agent:bot=1000/month,tenant:other=5/day")
    tracker = BudgetTracker(budgets, rate_window_s=300, retention_s=3600)
    rows: list[tuple[datetime, str, str, float | None]] = [
        (datetime(2026, 1, 31, 23, 59, tzinfo=UTC), "acme", "bot", 1.25),
        (datetime(2026, 2, 1, 0, 0, 1, tzinfo=UTC), "acme", "bot", 2.5),
        (datetime(2026, 2, 1, 0, 0, 2, tzinfo=UTC), "acme", "other-bot", 4.0),
        (datetime(2026, 2, 1, 0, 0, 3, tzinfo=UTC), "nobody", "bot", 8.0),
    ]
    tracker.update(events(rows))
    now = datetime(2026, 2, 1, 0, 1, tzinfo=UTC)
    tracker.check(now, detected_at=now)
    spent = {(r["budget"], r["period_start"].isoformat()): r["spent_usd"]
             for r in tracker.status().to_pylist()}  # fmt: skip
    assert spent == {
        ("agent:bot=1000/month", "2026-01-01T00:00:00+00:00"): 1.25,
        ("agent:bot=1000/month", "2026-02-01T00:00:00+00:00"): 10.5,
        ("tenant:acme=1000/day", "2026-01-31T00:00:00+00:00"): 1.25,
        ("tenant:acme=1000/day", "2026-02-01T00:00:00+00:00"): 6.5,
    }
    # An hour after the day ended, it is dropped; its late events are ignored.
    later = datetime(2026, 2, 1, 1, 0, tzinfo=UTC)
    tracker.check(later, detected_at=later)
    tracker.update(events([(datetime(2026, 1, 31, 12, 0, tzinfo=UTC), "acme", "bot", 99.0)]))
    tracker.check(later, detected_at=later)
    assert sorted((r["budget"], str(r["period_start"].date()), r["spent_usd"])
                  for r in tracker.status().to_pylist()) == [
        ("agent:bot=1000/month", "2026-02-01", 10.5),
        ("tenant:acme=1000/day", "2026-02-01", 6.5),
    ]  # fmt: skip


def test_snapshot_restore_continues_exactly() -> None:
    budgets = [Budget("tenant", "acme", 300.0, "day")]
    batches = [steady(T0 + timedelta(minutes=10 * i), 10, 0.5 + 0.37 * i) for i in range(8)]
    whole, parts = BudgetTracker(budgets, min_calls=5), BudgetTracker(budgets, min_calls=5)
    out_whole, out_parts = [], []
    for i, batch in enumerate(batches):
        at = T0 + timedelta(minutes=10 * (i + 1))
        whole.update(batch)
        out_whole.append(whole.check(at, detected_at=at))
        parts.update(batch)
        out_parts.append(parts.check(at, detected_at=at))
        restored = BudgetTracker(budgets, min_calls=5)
        restored.restore(parts.snapshot())
        parts = restored
    assert pa.concat_tables(out_parts) == pa.concat_tables(out_whole)
    assert pa.concat_tables(out_whole).num_rows == 1  # the forecast alert, exactly once
    assert parts.snapshot() == whole.snapshot()
    # A budget no longer configured is forgotten on restore.
    other = BudgetTracker([Budget("tenant", "other", 1.0, "day")])
    other.restore(whole.snapshot())
    at = T0 + timedelta(hours=2)
    other.check(at, detected_at=at)
    assert other.status().num_rows == 0


# --- the lake view against DuckDB -------------------------------------------------------


def test_budgets_view_matches_duckdb(tmp_path: Path) -> None:
    config = TrafficConfig(events=30_000, seed=3, scenario="budget-burn")
    spec, _ = budget_truth(config)
    budgets = [*parse_budgets(spec), Budget("agent", "support-bot", 50.0, "month")]
    tracker = BudgetTracker(budgets)
    batch = replay_table(config)
    tracker.update(batch)
    now = max(batch.column("ts").to_pylist())
    tracker.check(now, detected_at=now)
    lake = prepare(tmp_path)
    lake.append(EVENTS.name, batch)
    lake.append(BUDGETS.name, tracker.status())
    lake.append(BUDGETS.name, tracker.status())  # replaces: one row per budget and period
    con = connect(tmp_path)
    got = con.sql(
        """
        SELECT b.budget, b.spent_usd, coalesce(sum(e.cost_usd), 0) AS recomputed, count(e.ts)
        FROM budgets b LEFT JOIN events e
          ON (CASE b.scope WHEN 'tenant' THEN e.tenant_id ELSE e.agent_id END) = b.scope_id
         AND e.ts >= b.period_start AND e.ts < b.period_end
        GROUP BY ALL ORDER BY b.budget
        """
    ).fetchall()
    assert len(got) == 9 and all(n > 0 for *_, n in got)
    for _, spent, recomputed, _ in got:
        assert spent == pytest.approx(recomputed, rel=1e-12)
    assert con.sql("DESCRIBE budgets").fetchall()[0][0] == BUDGETS_SCHEMA.names[0]


# --- the budget-burn scenario -----------------------------------------------------------

LATE_START = datetime(2026, 1, 5, 23, 0, tzinfo=UTC)  # D = 1 h of day left (see README)
EVENTS_N = 150_000
BATCH = 2_000  # ~40 s of event time: the tracker checks about as often as the worker flushes


@dataclass
class Record:
    """What ``BatchProcessor`` reads of a Kafka record."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int


def replay_table(config: TrafficConfig) -> pa.Table:
    """All of ``config``'s traffic as one validated, enriched ``events`` table."""
    return pa.concat_tables(table for table, _ in batches(config))


def batches(config: TrafficConfig) -> list[tuple[pa.Table, datetime]]:
    """The traffic as the worker would see it: JSON records through ``BatchProcessor``."""
    processor = BatchProcessor()
    out, chunk = [], []
    for i, ev in enumerate(generate(config)):
        chunk.append(Record("t", 0, i, None, schema.encode(ev), 0))
        if len(chunk) == BATCH:
            out.append(processor.process(chunk).events)
            chunk = []
    if chunk:
        out.append(processor.process(chunk).events)
    return [(t, max(t.column("ts").to_pylist())) for t in out]


@dataclass
class Burn:
    alerts: list[dict[str, object]]
    exhausted_at: dict[str, datetime]  # budget spec -> first event time spend reached it


def run_budgets(config: TrafficConfig, spec: str) -> Burn:
    """Replay ``config`` batch by batch through the tracker, checking at each batch's newest
    event time (what the worker's event clock reads), and find when each budget was really
    exhausted from the events."""
    budgets = parse_budgets(spec)
    tracker = BudgetTracker(budgets)
    alerts = []
    spend: dict[str, float] = {}
    exhausted: dict[str, datetime] = {}
    amounts = {b.id: b for b in budgets}
    for table, newest in batches(config):
        tracker.update(table)
        alerts += tracker.check(newest, detected_at=newest).to_pylist()
        rows = sorted(
            (r["ts"], r["tenant_id"], r["cost_usd"])
            for r in table.select(["ts", "tenant_id", "cost_usd"]).to_pylist()
            if r["cost_usd"] is not None
        )
        for ts, tenant, cost in rows:
            spend[tenant] = spend.get(tenant, 0.0) + cost
            b = amounts.get(tenant)
            if b is not None and spend[tenant] >= b.amount_usd and b.spec not in exhausted:
                exhausted[b.spec] = ts
    return Burn(alerts, exhausted)


SEEDS = [1, 2, 3, 4, 5]


@pytest.mark.parametrize("seed", SEEDS)
def test_budget_burn_alerts_before_the_budget_is_spent(seed: int) -> None:
    config = TrafficConfig(events=EVENTS_N, seed=seed, scenario="budget-burn", start=LATE_START)
    spec, (burn,) = budget_truth(config)
    got = run_budgets(config, spec)
    forecasts = [a for a in got.alerts if a["detector"] == "burn_rate"]
    (alert,) = forecasts
    assert alert["tenant_id"] == "tenant-03"
    (exhausted_spec,) = got.exhausted_at
    assert exhausted_spec.startswith("tenant:tenant-03=")
    exhausted = got.exhausted_at[exhausted_spec]
    alerted_at = alert["detected_at"]
    assert isinstance(alerted_at, datetime)
    assert burn.starts_at < alerted_at < exhausted
    lead = (exhausted - alerted_at).total_seconds() / 60
    print(f"seed {seed}: burn {burn.starts_at:%H:%M}, alert {alerted_at:%H:%M:%S}, "
          f"exhausted {exhausted:%H:%M:%S} (truth {burn.exhausts_at:%H:%M}), lead {lead:.1f} min")  # fmt: skip
    assert lead >= 5
    # The ground truth's nominal exhaustion is within a few minutes of the real one.
    assert abs((exhausted - burn.exhausts_at).total_seconds()) < 10 * 60
    critical = [a for a in got.alerts if a["detector"] == "budget_exhausted"]
    assert [a["tenant_id"] for a in critical] == ["tenant-03"]


@pytest.mark.parametrize("seed", SEEDS)
def test_steady_tenants_never_alert(seed: int) -> None:
    burn = TrafficConfig(events=EVENTS_N, seed=seed, scenario="budget-burn", start=LATE_START)
    config = TrafficConfig(events=EVENTS_N, seed=seed, start=LATE_START)
    spec, _ = budget_truth(burn)
    got = run_budgets(config, spec)
    assert got.alerts == [] and got.exhausted_at == {}


def test_default_start_alerts_hours_ahead() -> None:
    """At the default 09:00 start (what ``agentstream demo --scenario budget-burn`` runs), the
    forecast spans 14 hours: the burning tenant alerts within minutes, nobody else does."""
    config = TrafficConfig(events=200_000, seed=1, scenario="budget-burn")
    spec, (burn,) = budget_truth(config)
    got = run_budgets(config, spec)
    (alert,) = got.alerts
    assert (alert["tenant_id"], alert["detector"]) == ("tenant-03", "burn_rate")
    alerted_at = alert["detected_at"]
    assert isinstance(alerted_at, datetime)
    assert burn.starts_at < alerted_at < burn.starts_at + timedelta(minutes=12)
    assert got.exhausted_at == {}  # exhaustion would come at about 15:00, after the stream
