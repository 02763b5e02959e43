"""Spend budgets and burn-rate alerts: ``budget_burn`` rows for ``agent-anomalies``.

A ``Budget`` caps what one tenant or agent may spend per UTC calendar day or month.
``BudgetTracker.update`` folds whole ``events`` batches into per-minute spend (polars, no
per-event Python; events without ``cost_usd`` are ignored) and ``check`` forecasts, for each
budget's current period,

    projected = spent so far + burn rate (low) x time left in the period,

and raises one ``budget_burn`` alert (severity ``warning``) per budget and period as soon as
``projected >= amount`` while the budget is not yet spent, with the projected time of
crossing ``now + (amount - spent) / rate (low)``; a second one (``critical``) when it
actually is.

The burn rate is the mean spend per minute over the last ``rate_window_s`` (default 15) of
*complete* event-time minutes before ``now``; the forecast uses its lower confidence bound,
``mean - z * s / sqrt(k)`` over the ``k`` minutes (``s`` their standard deviation, minutes
without spend count as 0, ``z`` = 2). Why this estimator:

* a trailing window, not the average since the period began, so a burn that starts late in
  the period is seen within minutes instead of being diluted by the calm hours before it;
* whole minutes of event time only: the minute ``now`` falls in is still filling, and
  counting it would understate the rate (or, divided by its elapsed part, make it jumpy);
* minimum evidence: a budget alerts only once the window lies entirely inside the period and
  after the budget's first spend of the period, and holds at least ``min_calls`` (20)
  costed events, so the first minutes of a day, a fresh or quiet tenant, or a restart
  without state never extrapolate one expensive call over a whole day;
* the lower bound, because the forecast multiplies the rate by up to a whole day: in the
  generated traffic a small tenant's 15-minute mean runs up to 1.43x its long-run rate
  (expensive tasks cluster), which over a 15-hour horizon eats a 1.5x budget headroom. The
  bound keeps such stretches (their minutes are uneven) under the budget, while a burn, which
  raises every minute, still crosses within minutes. It is a heuristic bound: minutes are
  not independent (a task spans several), so it is not a calibrated 97.5 % one;
* 15 minutes: long enough that the bound is not dominated by a few calls, short enough that
  a burn shows within minutes. A longer window would be quieter and slower.

The tracker assumes the rest of the period continues at the recent rate (no daily or weekly
seasonality): a tenant that is busy by day and idle at night looks more expensive at noon
than it will be. Budgets should leave that headroom, or use ``month`` periods.

"Now" is always event time, passed in by the caller (the worker's event clock), never read
from the wall clock, so replaying the same events gives the same rows and ids. Memory: one
row per budget and minute of the rate window, one per budget and period; a period is dropped
``retention_s`` after it ends (late events for it are then ignored).
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Literal

import msgspec
import polars as pl
import pyarrow as pa

from sinks.contracts import BUDGETS_SCHEMA
from streams.detect import ANOMALIES_SCHEMA, _hash, _iso
from streams.windows import DIMENSIONS, _from_ipc, _from_us, _ipc, _merge, _to_us

__all__ = [
    "BUDGETS_SCHEMA",
    "Budget",
    "BudgetError",
    "BudgetTracker",
    "load_budgets",
    "parse_budgets",
]

Scope = Literal["tenant", "agent", "user"]
Period = Literal["day", "month"]

SCOPE_COLUMNS: Final[dict[str, str]] = {"tenant": "tenant_id", "agent": "agent_id"}
"""The events column a scope matches (``user`` waits for a ``user_id`` in the schema)."""
_LEVELS: Final[dict[str, str]] = {"tenant": "tenant", "agent": "agent"}
_MINUTE: Final = 60_000_000
_DAY: Final = 86_400 * 1_000_000
_TS: Final = pa.timestamp("us", tz="UTC")
FORM: Final = "scope:id=amount/period, for example tenant:acme=50/day,agent:support-bot=1000/month"


class BudgetError(ValueError):
    """A budget specification is unusable; the message names the entry and the expected form."""


class Budget(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A spend cap: ``amount_usd`` per UTC calendar ``period`` for one tenant or agent."""

    scope: Scope
    id: str
    amount_usd: float
    period: Period

    @property
    def key(self) -> str:
        """Identity across restarts and amount changes: ``scope:id/period``."""
        return f"{self.scope}:{self.id}/{self.period}"

    @property
    def spec(self) -> str:
        """The budget in the inline form ``scope:id=amount/period``."""
        return f"{self.scope}:{self.id}={self.amount_usd:.15g}/{self.period}"


_ENTRY: Final = re.compile(
    r"^(?P<scope>[a-z]+):(?P<id>[^=,\s]+)=\$?(?P<amount>[0-9][0-9_]*(?:\.[0-9]+)?)"
    r"/(?P<period>[a-z]+)$"
)


def parse_budgets(text: str) -> list[Budget]:
    """Budgets from the inline form ``scope:id=amount/period,...`` (see ``FORM``).

    ``scope`` is ``tenant`` or ``agent``, ``amount`` US dollars (> 0), ``period`` ``day`` or
    ``month``. Whitespace around entries is ignored; an empty text means no budgets.
    """
    budgets = []
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        m = _ENTRY.match(entry)
        if m is None:
            raise BudgetError(f"bad budget {entry!r}: expected {FORM}")
        budgets.append(
            _checked(entry, m["scope"], m["id"], float(m["amount"].replace("_", "")), m["period"])
        )
    return _unique(budgets)


def load_budgets(value: str) -> list[Budget]:
    """Budgets from a setting: the inline form, or ``@path`` to a ``.toml`` or ``.json`` file.

    A file holds a list of tables ``budgets = [{scope, id, amount_usd, period}, ...]`` (TOML:
    ``[[budgets]]`` sections; JSON: ``{"budgets": [...]}``).
    """
    if not value.startswith("@"):
        return parse_budgets(value)
    path = Path(value[1:])
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BudgetError(f"cannot read budgets file {str(path)!r}: {exc.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise BudgetError(f"budgets file {str(path)!r} is not valid: {exc}") from None
    entries = data.get("budgets") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise BudgetError(
            f"budgets file {str(path)!r}: expected a list 'budgets' of "
            "{scope, id, amount_usd, period} tables"
        )
    budgets = []
    for n, item in enumerate(entries, start=1):
        where = f"budget #{n} in {str(path)!r}"
        if not isinstance(item, dict) or set(item) != {"scope", "id", "amount_usd", "period"}:
            raise BudgetError(f"bad {where}: expected keys scope, id, amount_usd, period")
        amount = item["amount_usd"]
        if isinstance(amount, bool) or not isinstance(amount, int | float):
            raise BudgetError(f"bad {where}: amount_usd must be a number, got {amount!r}")
        budgets.append(
            _checked(where, str(item["scope"]), str(item["id"]), float(amount), item["period"])
        )
    return _unique(budgets)


def _checked(entry: str, scope: str, id_: str, amount: float, period: object) -> Budget:
    if scope == "user":
        raise BudgetError(
            f"bad budget {entry!r}: user budgets need a user_id on events, which schema v1 "
            "does not have yet; use tenant or agent"
        )
    if scope not in SCOPE_COLUMNS:
        raise BudgetError(f"bad budget {entry!r}: scope must be tenant or agent, got {scope!r}")
    if period not in ("day", "month"):
        raise BudgetError(f"bad budget {entry!r}: period must be day or month, got {period!r}")
    if not (math.isfinite(amount) and amount > 0):
        raise BudgetError(f"bad budget {entry!r}: amount must be > 0, got {amount:g}")
    if not id_:
        raise BudgetError(f"bad budget {entry!r}: empty id")
    return Budget(scope, id_, amount, period)  # type: ignore[arg-type]


def _unique(budgets: list[Budget]) -> list[Budget]:
    seen: set[str] = set()
    for b in budgets:
        if b.key in seen:
            raise BudgetError(f"budget {b.key} is given twice: one amount per scope, id and period")
        seen.add(b.key)
    return budgets


# --------------------------------------------------------------------------------------
# the budgets table
# --------------------------------------------------------------------------------------


_BUCKETS: Final = pl.Schema(
    {
        "budget": pl.String(),
        "period_start": pl.Int64(),
        "window_start": pl.Int64(),
        "cost_usd": pl.Float64(),
        "calls": pl.Int64(),
    }
)
_PERIODS: Final = pl.Schema(
    {
        "budget": pl.String(),
        "period_start": pl.Int64(),
        "period_end": pl.Int64(),
        "settled_usd": pl.Float64(),
        "first_us": pl.Int64(),
        "alerted_us": pl.Int64(),
        "exhausted_us": pl.Int64(),
    }
)


def _period_start(minute: pl.Expr, period: pl.Expr) -> pl.Expr:
    """Start (us) of the UTC day or month containing ``minute`` (us since the epoch)."""
    month = pl.from_epoch(minute, time_unit="us").dt.truncate("1mo").dt.epoch("us").cast(pl.Int64)
    return pl.when(period == "day").then((minute // _DAY) * _DAY).otherwise(month)


def _period_end(start: pl.Expr, period: pl.Expr) -> pl.Expr:
    """End (us) of the period starting at ``start``: the next day, or the next month's first
    (32 days on is always inside the next month)."""
    next_month = _period_start(start + 32 * _DAY, period)
    return pl.when(period == "day").then(start + _DAY).otherwise(next_month).alias("period_end")


class _Snapshot(msgspec.Struct, frozen=True):
    version: int
    horizon_us: int | None
    buckets: bytes
    periods: bytes


_SNAPSHOT_VERSION: Final = 1


@dataclass(frozen=True)
class _Alert:
    budget: Budget
    period_start: int
    period_end: int
    spent: float
    rate_per_s: float
    low_per_s: float
    projected: float
    crossing_us: int | None


def spend_rows(events: pa.Table) -> pa.Table:
    """The costed ``events`` summed per minute, agent and tenant, as ``update`` takes them:
    ``ts`` (the first event of the minute), ``agent_id``, ``tenant_id``, ``cost_usd``,
    ``calls``. What the ingest stage hands on to the budgets (``streams.hop``)."""
    frame = pl.from_arrow(events.select(["ts", "agent_id", "tenant_id", "cost_usd"]))
    assert isinstance(frame, pl.DataFrame)
    return (
        frame.filter(pl.col("cost_usd").is_not_null())
        .group_by(pl.col("ts").dt.truncate("1m").alias("_m"), "agent_id", "tenant_id")
        .agg(
            pl.col("ts").min(),
            pl.col("cost_usd").sum(),
            pl.len().cast(pl.Int64).alias("calls"),
        )
        .drop("_m")
        .sort("ts")
        .to_arrow()
    )


class BudgetTracker:
    """Spend per budget and period, and the burn-rate forecast that raises ``budget_burn``.

    ``rate_window_s`` is the trailing event-time span of the burn rate (whole minutes, at
    least two); ``z`` how many standard errors below its mean the forecast takes the rate;
    ``min_calls`` how many costed events that window must hold before a forecast
    (one expensive call of a quiet tenant is no rate); ``retention_s`` how long after its end
    a period is kept for late events. ``check`` loops over budgets (not events) in Python:
    about a microsecond per budget and period.
    """

    def __init__(
        self,
        budgets: Sequence[Budget],
        *,
        rate_window_s: int = 900,
        z: float = 2.0,
        min_calls: int = 20,
        retention_s: int = 3600,
    ) -> None:
        if rate_window_s < 120 or rate_window_s % 60:
            raise ValueError(f"rate_window_s must be whole minutes, got {rate_window_s}")
        self.budgets = list(_unique(list(budgets)))
        self.rate_window_s = rate_window_s
        self.min_calls = min_calls
        self.z = z
        self.retention_s = retention_s
        self._by_key = {b.key: b for b in self.budgets}
        self._specs = pl.DataFrame(
            {
                "budget": [b.key for b in self.budgets],
                "scope": [b.scope for b in self.budgets],
                "scope_id": [b.id for b in self.budgets],
                "period": [b.period for b in self.budgets],
                "amount_usd": [b.amount_usd for b in self.budgets],
            },
            schema={
                "budget": pl.String,
                "scope": pl.String,
                "scope_id": pl.String,
                "period": pl.String,
                "amount_usd": pl.Float64,
            },
        )
        self._buckets = _BUCKETS.to_frame()
        self._periods = _PERIODS.to_frame()
        # Periods ending at or before this event time are dropped, and late events for them
        # ignored: memory stays bounded by the periods in play.
        self._horizon: int | None = None
        self._status = BUDGETS_SCHEMA.empty_table()

    # ----------------------------------------------------------------------------------
    # spend
    # ----------------------------------------------------------------------------------

    def update(self, events: pa.Table) -> None:
        """Add the ``cost_usd`` of a batch of ``events`` rows to every budget it falls under.

        Events without a cost, of no budgeted tenant or agent, or older than the periods
        still held are ignored. Not idempotent: the same batch twice counts twice. Rows may
        be sums of several events (``streams.warmstart.spend_history``): a ``calls`` column
        then says how many.
        """
        if events.num_rows == 0 or not self.budgets:
            return
        columns = ["ts", "cost_usd", *sorted(set(SCOPE_COLUMNS.values()))]
        frame = pl.from_arrow(
            events.select([*columns, "calls"] if "calls" in events.column_names else columns)
        )
        assert isinstance(frame, pl.DataFrame)
        if "calls" not in frame.columns:
            frame = frame.with_columns(pl.lit(1, dtype=pl.Int64).alias("calls"))
        frame = frame.filter(pl.col("cost_usd").is_not_null()).with_columns(
            pl.col("ts").dt.epoch("us").alias("_us")
        )
        if frame.height == 0:
            return
        frame = frame.with_columns(((pl.col("_us") // _MINUTE) * _MINUTE).alias("window_start"))
        parts = []
        for scope, column in SCOPE_COLUMNS.items():
            specs = self._specs.filter(pl.col("scope") == scope)
            if specs.height == 0:
                continue
            per_minute = frame.group_by(column, "window_start").agg(
                pl.col("cost_usd").sum(),
                pl.col("calls").sum().cast(pl.Int64),
                pl.col("_us").min().alias("first_us"),
            )
            parts.append(
                per_minute.join(
                    specs.select("budget", "scope_id", "period"),
                    left_on=column,
                    right_on="scope_id",
                    how="inner",
                ).select("budget", "period", "window_start", "cost_usd", "calls", "first_us")
            )
        if not parts:
            return
        part = pl.concat(parts).with_columns(
            _period_start(pl.col("window_start"), pl.col("period")).alias("period_start")
        )
        part = part.with_columns(_period_end(pl.col("period_start"), pl.col("period")))
        if self._horizon is not None:
            part = part.filter(pl.col("period_end") > self._horizon)
        if part.height == 0:
            return
        keys = ["budget", "period_start", "window_start"]
        self._buckets = _merge(
            self._buckets,
            part.group_by(keys).agg(pl.col("cost_usd").sum(), pl.col("calls").sum()).sort(keys),
            keys,
        )
        seen = part.group_by("budget", "period_start").agg(
            pl.col("period_end").first(), pl.col("first_us").min()
        )
        periods = self._periods.join(seen, on=["budget", "period_start"], how="full", coalesce=True)
        self._periods = periods.select(
            "budget",
            "period_start",
            pl.coalesce("period_end", "period_end_right").alias("period_end"),
            pl.col("settled_usd").fill_null(0.0),
            pl.min_horizontal("first_us", "first_us_right").alias("first_us"),
            "alerted_us",
            "exhausted_us",
        )

    # ----------------------------------------------------------------------------------
    # forecast and alerts
    # ----------------------------------------------------------------------------------

    def check(self, now: datetime, detected_at: datetime) -> pa.Table:
        """Forecast every budget at event time ``now``; return new ``budget_burn`` rows.

        ``now`` is how far event time has got (the worker passes its event clock, a replay
        the newest event time); ``detected_at`` goes into the rows as is. Returns
        ``ANOMALIES_SCHEMA`` rows: at most one forecast alert (``warning``) and one
        exhaustion alert (``critical``) per budget and period, ever. Also refreshes
        ``status()`` and drops periods that ended ``retention_s`` before ``now``.
        """
        now_us = _to_us(now)
        detected_us = _to_us(detected_at)
        minute = (now_us // _MINUTE) * _MINUTE
        lo = minute - self.rate_window_s * 1_000_000
        k = self.rate_window_s // 60
        self._fold(lo)
        self._drop(minute - self.retention_s * 1_000_000)
        in_window = (pl.col("window_start") >= lo) & (pl.col("window_start") < minute)
        recent = self._buckets.group_by("budget", "period_start").agg(
            pl.col("cost_usd").sum().alias("recent_usd"),
            pl.col("cost_usd").filter(in_window).sum().alias("window_usd"),
            pl.col("cost_usd").filter(in_window).pow(2).sum().alias("window_sq"),
            pl.col("calls").filter(in_window).sum().alias("window_calls"),
        )
        state = (
            self._periods.join(self._specs, on="budget", how="inner")
            .join(recent, on=["budget", "period_start"], how="left")
            .with_columns(
                (pl.col("settled_usd") + pl.col("recent_usd").fill_null(0.0)).alias("spent"),
                (pl.col("window_usd").fill_null(0.0) / self.rate_window_s).alias("rate"),
                _low_rate(pl.col("window_usd"), pl.col("window_sq"), k, self.z).alias("low"),
                (
                    (pl.col("first_us") <= lo)
                    & (pl.col("window_calls").fill_null(0) >= self.min_calls)
                ).alias("_evidence"),
            )
            .sort("budget", "period_start")
        )
        alerts: list[tuple[str, _Alert]] = []
        rows: list[dict[str, Any]] = []
        alerted: dict[tuple[str, int], int] = {}
        exhausted: dict[tuple[str, int], int] = {}
        for r in state.iter_rows(named=True):
            budget = self._by_key[r["budget"]]
            start, end = r["period_start"], r["period_end"]
            spent, rate, low = r["spent"], r["rate"], r["low"]
            # Forecast only with a full rate window inside the period and the budget's spend,
            # holding at least min_calls costed events (module docstring: minimum evidence).
            forecast = start <= lo and now_us < end and r["_evidence"]
            projected = spent + low * (end - now_us) / 1e6 if forecast else None
            crossing = None
            if forecast and spent < budget.amount_usd and low > 0:
                at = now_us + math.ceil((budget.amount_usd - spent) / low * 1e6)
                crossing = at if at < end else None
            alert = _Alert(
                budget,
                start,
                end,
                spent,
                rate,
                low,
                spent if projected is None else projected,
                crossing,
            )
            alerted_us, exhausted_us = r["alerted_us"], r["exhausted_us"]
            if spent >= budget.amount_usd:
                if exhausted_us is None:
                    exhausted_us = exhausted[(budget.key, start)] = now_us
                    alerts.append(("budget_exhausted", alert))
            elif crossing is not None and alerted_us is None:
                alerted_us = alerted[(budget.key, start)] = now_us
                alerts.append(("burn_rate", alert))
            rows.append(
                {
                    "budget": budget.spec,
                    "scope": budget.scope,
                    "scope_id": budget.id,
                    "period": budget.period,
                    "period_start": start,
                    "period_end": end,
                    "amount_usd": budget.amount_usd,
                    "spent_usd": spent,
                    "burn_rate_usd_per_h": rate * 3600 if forecast else None,
                    "burn_rate_low_usd_per_h": low * 3600 if forecast else None,
                    "projected_usd": projected,
                    "projected_exhausted_at": crossing,
                    "alerted_at": alerted_us,
                    "exhausted_at": exhausted_us,
                    "as_of": now_us,
                }
            )
        self._mark("alerted_us", alerted)
        self._mark("exhausted_us", exhausted)
        self._status = pa.Table.from_pylist(rows, schema=BUDGETS_SCHEMA)
        return _anomalies(alerts, now_us, detected_us)

    def history_start(self, now: datetime | None) -> datetime | None:
        """Where the spend that matters at event time ``now`` starts: the start of the
        longest current period of any budget (for a warm start; None without budgets)."""
        if now is None or not self.budgets:
            return None
        starts = self._specs.select(
            _period_start(pl.lit(_to_us(now), dtype=pl.Int64), pl.col("period")).min()
        ).item()
        return _from_us(int(starts))

    def status(self) -> pa.Table:
        """``BUDGETS_SCHEMA`` rows of every budget and period held, as of the last ``check``."""
        return self._status

    def _fold(self, lo: int) -> None:
        """Move spend older than the rate window from the minute buckets into the periods."""
        old = pl.col("window_start") < lo
        settled = (
            self._buckets.filter(old)
            .group_by("budget", "period_start")
            .agg(pl.col("cost_usd").sum().alias("_add"))
        )
        if settled.height == 0:
            return
        self._buckets = self._buckets.filter(~old)
        self._periods = (
            self._periods.join(settled, on=["budget", "period_start"], how="left")
            .with_columns(pl.col("settled_usd") + pl.col("_add").fill_null(0.0))
            .drop("_add")
        )

    def _drop(self, horizon: int) -> None:
        """Forget periods that ended at or before ``horizon``; later events for them are
        ignored."""
        self._horizon = horizon if self._horizon is None else max(self._horizon, horizon)
        over = pl.col("period_end") <= self._horizon
        gone = self._periods.filter(over)
        if gone.height == 0:
            return
        self._periods = self._periods.filter(~over)
        self._buckets = self._buckets.join(
            gone.select("budget", "period_start"), on=["budget", "period_start"], how="anti"
        )

    def _mark(self, column: str, marks: dict[tuple[str, int], int]) -> None:
        if not marks:
            return
        update = pl.DataFrame(
            {
                "budget": [k for k, _ in marks],
                "period_start": [s for _, s in marks],
                "_mark": list(marks.values()),
            },
            schema={"budget": pl.String, "period_start": pl.Int64, "_mark": pl.Int64},
        )
        self._periods = (
            self._periods.join(update, on=["budget", "period_start"], how="left")
            .with_columns(pl.coalesce(column, "_mark").alias(column))
            .drop("_mark")
        )

    # ----------------------------------------------------------------------------------
    # persistence
    # ----------------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The spend and alert state (msgpack of zstd Arrow IPC tables)."""
        return msgspec.msgpack.encode(
            _Snapshot(
                version=_SNAPSHOT_VERSION,
                horizon_us=self._horizon,
                buckets=_ipc(self._buckets),
                periods=_ipc(self._periods),
            )
        )

    def restore(self, data: bytes) -> None:
        """Continue from a ``snapshot``; state of budgets no longer configured is dropped.

        A changed amount applies from now on (spend is kept per scope, id and period).
        """
        snap = msgspec.msgpack.decode(data, type=_Snapshot)
        if snap.version != _SNAPSHOT_VERSION:
            raise ValueError(f"unsupported budget snapshot version {snap.version}")
        known = pl.col("budget").is_in(list(self._by_key))
        self._horizon = snap.horizon_us
        self._buckets = _from_ipc(snap.buckets, _BUCKETS).filter(known)
        self._periods = _from_ipc(snap.periods, _PERIODS).filter(known)
        self._status = BUDGETS_SCHEMA.empty_table()


# --------------------------------------------------------------------------------------
# rows
# --------------------------------------------------------------------------------------


def _low_rate(total: pl.Expr, squares: pl.Expr, k: int, z: float) -> pl.Expr:
    """Lower bound (USD/s) of the mean minute spend over ``k`` minutes whose spends sum to
    ``total`` and their squares to ``squares`` (minutes without spend are zeros)."""
    total, squares = total.fill_null(0.0), squares.fill_null(0.0)
    mean = total / k
    var = ((squares - k * mean * mean) / (k - 1)).clip(lower_bound=0.0)
    return (mean - z * (var / k).sqrt()).clip(lower_bound=0.0) / 60


def _money(usd: float) -> str:
    return f"${usd:,.2f}"


def _anomalies(alerts: Iterable[tuple[str, _Alert]], now_us: int, detected_us: int) -> pa.Table:
    """``ANOMALIES_SCHEMA`` rows of kind ``budget_burn`` (see ``BudgetTracker.check``).

    ``condition_id`` is shared by a budget period's forecast and exhaustion rows;
    ``anomaly_id`` adds the detector, so each is published once and a replay gives the same
    ids. ``window_start``/``window_end`` are the period, ``baseline`` the amount,
    ``observed`` the projected spend (forecast) or the spend (exhausted), ``score`` their
    ratio.
    """
    rows: list[dict[str, Any]] = []
    for detector, a in alerts:
        b = a.budget
        condition_id = _hash(["budget", b.key, a.period_start])
        rate_h = f"{_money(a.rate_per_s * 3600)}/h (at least {_money(a.low_per_s * 3600)}/h)"
        head = f"{b.period} budget {b.spec} of {b.scope} {b.id}"
        if detector == "burn_rate":
            assert a.crossing_us is not None
            message = (
                f"{head} will run out at {_iso(a.crossing_us)}: spent {_money(a.spent)} by "
                f"{_iso(now_us)}, burning {rate_h}, projected {_money(a.projected)} by "
                f"{_iso(a.period_end)} (budget_burn, warning)."
            )
            severity, observed = "warning", a.projected
        else:
            message = (
                f"{head} is spent: {_money(a.spent)} of {_money(b.amount_usd)} by "
                f"{_iso(now_us)}, burning {rate_h}, period ends {_iso(a.period_end)} "
                "(budget_exhausted, critical)."
            )
            severity, observed = "critical", a.spent
        column = SCOPE_COLUMNS[b.scope]
        rows.append(
            {
                "anomaly_id": _hash([condition_id, "budget_burn", detector]),
                "condition_id": condition_id,
                "kind": "budget_burn",
                "detected_at": detected_us,
                "window_start": a.period_start,
                "window_end": a.period_end,
                "level": _LEVELS[b.scope],
                **{d: (b.id if d == column else None) for d in DIMENSIONS},
                "measure": "spend_usd",
                "detector": detector,
                "baseline": b.amount_usd,
                "observed": observed,
                "direction": "up",
                "severity": severity,
                "score": observed / b.amount_usd,
                "example_event_ids": [],
                "message": message,
            }
        )
    return pa.Table.from_pylist(rows, schema=ANOMALIES_SCHEMA)
