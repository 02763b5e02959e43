"""Budget burn through the real broker: a worker configured with the scenario's budgets
alerts on the burning tenant before its budget is spent, and never on the steady ones."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from pathlib import Path

import msgspec
import pytest

from pipeline import schema
from pipeline.generate import TrafficConfig, generate
from pipeline.scenarios import budget_truth
from sinks.catalog import connect
from tests.helpers import consume_all, produce_raw, running_worker, unique_settings, wait_committed
from tests.test_budgets import LATE_START

pytestmark = pytest.mark.timeout(600)

EVENTS = 150_000
CHUNK = 5_000  # ~30 s of event time


def test_budget_burn_alerts_before_the_budget_is_spent(bootstrap: str, tmp_path: Path) -> None:
    config = TrafficConfig(events=EVENTS, seed=2, scenario="budget-burn", start=LATE_START)
    spec, (burn,) = budget_truth(config)
    events = list(generate(config))
    # Flushes about as often as a live stream's (the forecast is checked at each flush).
    settings = unique_settings(
        bootstrap,
        tmp_path / "lake",
        budgets=spec,
        flush_max_events=4_000,
        fetch_max_records=2_000,
    )
    # Published as a live stream is: in event-time order, a chunk at a time, the worker
    # keeping up, so its partitions advance together. (Read from a backlog, one partition can
    # run far ahead of the event clock, which is the slowest partition's: the spend counted
    # can pass the budget before the clock gives a forecast, and only the exhaustion alert
    # is raised. That is right for a replay, but not what this test is about.)
    values = [schema.encode(ev) for ev in events]
    keys = [(ev.task_id or ev.agent_id).encode() for ev in events]
    with running_worker(settings) as proc:
        for lo in range(0, EVENTS, CHUNK):
            produce_raw(settings, values[lo : lo + CHUNK], keys[lo : lo + CHUNK])
            wait_committed(settings, min(lo + CHUNK, EVENTS), proc, timeout=120)

    con = connect(settings.data_dir)
    rows = con.execute(
        "SELECT anomaly_id, tenant_id, detector, severity, baseline, message FROM anomalies "
        "WHERE kind = 'budget_burn' ORDER BY detector DESC"
    ).fetchall()
    # Exactly two alerts, both for the burning tenant: the forecast, then the exhaustion.
    assert [(r[1], r[2], r[3]) for r in rows] == [
        ("tenant-03", "burn_rate", "warning"),
        ("tenant-03", "budget_exhausted", "critical"),
    ], rows
    _, _, _, _, amount, message = rows[0]
    found = re.search(r"spent \$([\d,.]+) by (\S+),", message)
    assert found, message
    spent_then = float(found[1].replace(",", ""))
    as_of = datetime.fromisoformat(found[2].replace("Z", "+00:00"))
    # Independently, from the landed events. ``as_of`` is the tracker's clock: the slowest
    # partition's event time or, when every partition was read to its end (the worker keeps
    # up with each chunk), the newest event read, so a partition could still get events a
    # little older than it in the next chunk (seen in CI: $0.15 of them). Every chunk before
    # the one holding ``as_of`` had been read (the test waits for each), so the spend of
    # events more than a chunk's event time (~30 s) older than ``as_of`` is a lower bound,
    # the total an upper one; and the spend was below the amount: the alert came before the
    # budget was spent.
    day = LATE_START.replace(hour=0)
    spend_sql = (
        "SELECT sum(cost_usd) FROM events WHERE tenant_id = 'tenant-03' AND ts >= $1 AND ts <= $2"
    )
    upto = con.execute(spend_sql, [day, as_of - timedelta(seconds=60)]).fetchone()
    total = con.execute(spend_sql, [day, day + timedelta(days=1)]).fetchone()
    assert upto is not None and total is not None
    assert upto[0] - 0.01 <= spent_then < amount < total[0]
    exhausted = con.execute(
        "SELECT min(ts) FROM (SELECT ts, sum(cost_usd) OVER (ORDER BY ts, event_id) AS spent "
        "FROM events WHERE tenant_id = 'tenant-03' AND ts >= $1) WHERE spent >= $2",
        [day, amount],
    ).fetchone()
    assert exhausted is not None and exhausted[0] is not None
    lead = exhausted[0] - as_of
    print(f"burn from {burn.starts_at:%H:%M}, alert as of {as_of:%H:%M:%S} (spent "
          f"{spent_then:.2f} of {amount:.2f}), budget spent at {exhausted[0]:%H:%M:%S} by "
          f"event time")  # fmt: skip
    assert burn.starts_at < as_of and lead > timedelta(0)

    # Subscribers get both alerts on the anomalies topic, by id.
    landed = con.execute("SELECT count(*) FROM anomalies").fetchone()
    assert landed is not None
    records = consume_all(settings, settings.anomalies_topic, landed[0])
    burns = [r for r in records if msgspec.json.decode(r.value)["kind"] == "budget_burn"]
    assert sorted(r.key.decode() for r in burns) == sorted(r[0] for r in rows)
    # The budgets view shows every configured budget, with the spend the events add up to.
    status = con.execute(
        "SELECT scope_id, max(spent_usd) FROM budgets GROUP BY scope_id ORDER BY scope_id"
    ).fetchall()
    assert [s for s, _ in status] == sorted(b.split("=")[0].split(":")[1] for b in spec.split(","))
