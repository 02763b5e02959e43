"""Alert rules users write: ``kind = 'rule'`` rows for ``anomalies`` / ``agent-anomalies``.

A rule names a metrics column (``measure``), a scope (dimension values, named like the
metrics columns, and a ``level``), a condition and how long it must hold::

    [[rules]]
    name = "support escalations"
    measure = "escalation_rate"
    agent_id = "support-bot"
    above = 0.2            # or below, change_above, change_below
    for_windows = 2
    min_samples = 20

``RuleEngine.observe`` takes the closed-window ``METRICS_SCHEMA`` rows of a flush (as the
detectors do) and evaluates every rule over them in polars: the rows of each rule's level
and scope, the value and its sample count, whether it breaches. The per-key state (how many
consecutive windows breached, the open condition, the key's own recent values) is a polars
frame joined with each window's rows, so no Python runs per metrics row; Python only builds
the few alert rows.

Conditions. ``above``/``below`` compare the value with a threshold; ``change_above`` /
``change_below`` with the key's own baseline, the median of its last ``baseline_windows``
(30) windows that did not breach, needing at least ``MIN_BASELINE`` (5) of them:
``change_above = 0.5`` fires at >= 1.5x the baseline, ``change_below = 0.3`` at <= 0.7x (a
baseline of 0 has no relative change: such a key never breaches until it has one). A
window whose value rests on fewer than ``min_samples`` samples (tasks for task rates and cost
per task, calls for tokens and latencies, ``events`` for other columns; see ``samples_of``)
or has no value is skipped: it neither breaches nor clears.

Once per condition, like the detectors: after ``for_windows`` consecutive breaching windows
one ``rule`` row opens a condition (id: rule, level, key, first window); it stays quiet for
``cooldown_windows`` (60), then is reported again if it still breaches; ``recover_windows``
(2) consecutive clear windows close it with a ``recovery`` row (``rule`` set too). Windows
are counted on the epoch-aligned window index, so a replay of the same metrics gives the
same rows and ids, in the worker and in ``agentstream backtest`` alike.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import msgspec
import polars as pl
import pyarrow as pa

from streams.detect import ANOMALIES_SCHEMA, DEFAULT_MEASURES, _hash, _iso, _to_us
from streams.windows import DIMENSIONS, METRICS_SCHEMA, ROLLUPS, _from_ipc, _ipc

__all__ = [
    "CONDITIONS",
    "Rule",
    "RuleEngine",
    "RuleError",
    "load_rules",
    "samples_of",
]

CONDITIONS: Final = ("above", "below", "change_above", "change_below")
SEVERITIES: Final = ("info", "warning", "critical")
MIN_BASELINE: Final = 5
_NUMERIC: Final = frozenset(
    f.name for f in METRICS_SCHEMA if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)
)
_SAMPLES: Final[dict[str, tuple[str, ...]]] = {
    **{m.column: m.samples for m in DEFAULT_MEASURES},
    "cost_per_completed_task": ("tasks_completed",),
    **{c: ("llm_calls",) for c in _NUMERIC if c.startswith("llm_latency_")},
    **{c: ("tool_calls",) for c in _NUMERIC if c.startswith("tool_latency_")},
    **{c: ("retrievals",) for c in _NUMERIC if c.startswith("retrieval_latency_")},
}
_FIELDS: Final = (
    "name",
    "measure",
    *DIMENSIONS,
    "level",
    *CONDITIONS,
    "for_windows",
    "min_samples",
    "severity",
    "message",
    "cooldown_windows",
    "recover_windows",
    "baseline_windows",
)
_TEMPLATE_KEYS: Final = (
    "name",
    "measure",
    "value",
    "threshold",
    "baseline",
    "key",
    "window_start",
    "severity",
    "for_windows",
    "level",
    *DIMENSIONS,
)


def samples_of(measure: str) -> tuple[str, ...]:
    """The metrics columns whose sum is the number of samples behind ``measure``."""
    return _SAMPLES.get(measure, ("events",))


class RuleError(ValueError):
    """A rule is unusable; the message names the rule, the field and what is expected."""


@dataclass(frozen=True)
class Rule:
    """One validated rule (see the module docstring); build with ``load_rules``."""

    name: str
    measure: str
    level: str
    scope: tuple[tuple[str, str], ...]
    condition: str
    threshold: float
    for_windows: int = 1
    min_samples: int = 0
    severity: str = "warning"
    message: str | None = None
    cooldown_windows: int = 60
    recover_windows: int = 2
    baseline_windows: int = 30

    @property
    def direction(self) -> str:
        return "up" if self.condition in ("above", "change_above") else "down"

    @property
    def relative(self) -> bool:
        return self.condition.startswith("change_")


# --------------------------------------------------------------------------------------
# loading and validation
# --------------------------------------------------------------------------------------


def load_rules(value: str) -> list[Rule]:
    """Rules from a setting: inline JSON, or ``@path`` to a ``.toml``, ``.json`` file.

    Both hold ``rules``, a list of tables (TOML ``[[rules]]``; JSON ``{"rules": [...]}`` or
    a bare list). Raises ``RuleError`` naming the first bad rule and field.
    """
    text = value.strip()
    if not text:
        return []
    where = "AGENTSTREAM_RULES"
    if text.startswith("@"):
        path = Path(text[1:])
        where = repr(str(path))
        try:
            body = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise RuleError(f"cannot read rules file {where}: {exc.strerror}") from None
        try:
            if path.suffix == ".json":
                data: Any = json.loads(body)
            elif path.suffix == ".toml":
                data = tomllib.loads(body)
            else:
                raise RuleError(f"rules file {where}: use a .toml or .json file")
        except (ValueError, tomllib.TOMLDecodeError) as exc:
            if isinstance(exc, RuleError):
                raise
            raise RuleError(f"rules file {where} is not valid: {exc}") from None
    else:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise RuleError(
                f"AGENTSTREAM_RULES is neither JSON nor @file: {exc} (use @rules.toml for a file)"
            ) from None
    entries = data.get("rules") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise RuleError(f"{where}: expected a list 'rules' of tables ([[rules]] in TOML)")
    rules = [_rule(item, n) for n, item in enumerate(entries, start=1)]
    seen: set[str] = set()
    for rule in rules:
        if rule.name in seen:
            raise RuleError(f"rule {rule.name!r}: name: given twice, names must be unique")
        seen.add(rule.name)
    return rules


def _rule(item: Any, n: int) -> Rule:
    if not isinstance(item, dict):
        raise RuleError(f"rule #{n}: expected a table of fields, got {item!r}")
    name = item.get("name")
    if not isinstance(name, str) or not name.strip():
        raise RuleError(f"rule #{n}: name: required, a non-empty string (got {name!r})")
    who = f"rule {name!r}"

    def bad(field: str, problem: str) -> RuleError:
        return RuleError(f"{who}: {field}: {problem}")

    unknown = sorted(set(item) - set(_FIELDS))
    if unknown:
        raise bad(unknown[0], f"unknown field; fields are {', '.join(_FIELDS)}")
    measure = item.get("measure")
    if not isinstance(measure, str) or measure not in _NUMERIC:
        raise bad("measure", f"{measure!r} is not a numeric metrics column (e.g. escalation_rate)")
    scope = []
    for d in DIMENSIONS:
        if d in item:
            v = item[d]
            if not isinstance(v, str) or not v:
                raise bad(d, f"expected a non-empty string, got {v!r}")
            scope.append((d, v))
    level = item.get("level")
    if level is None:
        named = {d for d, _ in scope}
        level = next(lv for lv in ("agent", "tenant", "key") if named <= set(ROLLUPS[lv]))
    elif level not in ROLLUPS:
        raise bad("level", f"{level!r}: choose one of {', '.join(ROLLUPS)}")
    missing = [d for d, _ in scope if d not in ROLLUPS[level]]
    if missing:
        raise bad("level", f"{level!r} rows have no {missing[0]}; use level = 'key'")
    given = [c for c in CONDITIONS if c in item]
    if len(given) != 1:
        raise bad(
            "above",
            f"give exactly one condition of {', '.join(CONDITIONS)} (got {given or 'none'})",
        )
    condition = given[0]
    threshold = item[condition]
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise bad(condition, f"expected a number, got {threshold!r}")
    threshold = float(threshold)
    if not math.isfinite(threshold):
        raise bad(condition, f"expected a finite number, got {threshold!r}")
    if condition.startswith("change_") and not threshold > 0:
        raise bad(condition, f"a relative change must be > 0 (0.5 = 50 %), got {threshold:g}")
    if condition == "change_below" and threshold >= 1:
        raise bad(condition, f"a fall must be below 1 (0.3 = -30 %), got {threshold:g}")
    counts = {}
    for field, default, least in (
        ("for_windows", 1, 1),
        ("min_samples", 0, 0),
        ("cooldown_windows", 60, 1),
        ("recover_windows", 2, 1),
        ("baseline_windows", 30, MIN_BASELINE),
    ):
        v = item.get(field, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise bad(field, f"expected a whole number >= {least}, got {v!r}")
        counts[field] = v
    severity = item.get("severity", "warning")
    if severity not in SEVERITIES:
        raise bad("severity", f"{severity!r}: choose one of {', '.join(SEVERITIES)}")
    message = item.get("message")
    if message is not None:
        if not isinstance(message, str) or not message.strip():
            raise bad("message", f"expected a non-empty string, got {message!r}")
        try:
            message.format_map(dict.fromkeys(_TEMPLATE_KEYS, "x"))
        except (KeyError, IndexError, ValueError, AttributeError) as exc:
            raise bad(
                "message",
                f"bad template ({type(exc).__name__}: {exc}); placeholders are "
                + ", ".join("{" + k + "}" for k in _TEMPLATE_KEYS),
            ) from None
    return Rule(
        name=name,
        measure=measure,
        level=level,
        scope=tuple(scope),
        condition=condition,
        threshold=threshold,
        severity=severity,
        message=message,
        **counts,
    )


# --------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------

_KEYS: Final = ["rule", "level", *DIMENSIONS]
_STATE: Final = pl.Schema(
    {
        "rule": pl.String(),
        "level": pl.String(),
        **{d: pl.String() for d in DIMENSIONS},
        "last_index": pl.Int64(),
        "streak": pl.Int64(),
        "calm": pl.Int64(),
        "cond": pl.String(),
        "start_us": pl.Int64(),
        "last_alert": pl.Int64(),
        "hist": pl.List(pl.Float64()),
    }
)
_SNAPSHOT_VERSION: Final = 1


class _Snapshot(msgspec.Struct, frozen=True):
    version: int
    state: bytes


class RuleEngine:
    """Evaluates ``rules`` over closed-window metrics; state snapshots with the worker's."""

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = list(rules)
        self._by_name = {r.name: r for r in self.rules}
        self._params = pl.DataFrame(
            {
                "rule": [r.name for r in self.rules],
                "_cond": [r.condition for r in self.rules],
                "_threshold": [r.threshold for r in self.rules],
                "_for": [r.for_windows for r in self.rules],
                "_cooldown": [r.cooldown_windows for r in self.rules],
                "_recover": [r.recover_windows for r in self.rules],
                "_keep": [r.baseline_windows for r in self.rules],
            },
            schema={
                "rule": pl.String,
                "_cond": pl.String,
                "_threshold": pl.Float64,
                "_for": pl.Int64,
                "_cooldown": pl.Int64,
                "_recover": pl.Int64,
                "_keep": pl.Int64,
            },
        )
        self._state = _STATE.to_frame()

    def open_conditions(self) -> int:
        """How many (rule, key) conditions are open."""
        return self._state.filter(pl.col("cond").is_not_null()).height

    # ----------------------------------------------------------------------------------

    def observe(self, metrics: pa.Table, detected_at: datetime) -> pa.Table:
        """Feed closed-window metrics rows; return the ``rule`` / ``recovery`` rows they raise.

        Windows are taken in ``window_start`` order; a window not newer than the last one
        seen for a rule and key is ignored (a replay never counts twice).
        """
        if not self.rules or metrics.num_rows == 0:
            return ANOMALIES_SCHEMA.empty_table()
        obs = self._observations(metrics)
        if obs.height == 0:
            return ANOMALIES_SCHEMA.empty_table()
        detected_us = _to_us(detected_at)
        out: list[dict[str, Any]] = []
        for (index,), part in obs.sort("_index").group_by(["_index"], maintain_order=True):
            out += self._step(int(index), part, detected_us)
        if not out:
            return ANOMALIES_SCHEMA.empty_table()
        return pa.Table.from_pylist(out, schema=ANOMALIES_SCHEMA)

    def _observations(self, metrics: pa.Table) -> pl.DataFrame:
        """One row per (rule, metrics row in its scope): value, samples, window index."""
        needed = {"level", "window_start", "window_end", *DIMENSIONS}
        for rule in self.rules:
            needed |= {rule.measure, *samples_of(rule.measure)}
        frame = pl.from_arrow(metrics.select(sorted(needed)))
        assert isinstance(frame, pl.DataFrame)
        frame = frame.with_columns(
            pl.col("window_start").dt.epoch("us").alias("_start"),
            pl.col("window_end").dt.epoch("us").alias("_end"),
        ).filter(pl.col("_end") > pl.col("_start"))
        parts = []
        for rule in self.rules:
            cond = pl.col("level") == rule.level
            for d, v in rule.scope:
                cond &= pl.col(d) == v
            samples = pl.sum_horizontal(pl.col(c).fill_null(0) for c in samples_of(rule.measure))
            value = pl.col(rule.measure).cast(pl.Float64)
            parts.append(
                frame.filter(cond)
                .select(
                    pl.lit(rule.name).alias("rule"),
                    "level",
                    *DIMENSIONS,
                    "_start",
                    "_end",
                    (pl.col("_start") // (pl.col("_end") - pl.col("_start"))).alias("_index"),
                    value.alias("_value"),
                    samples.cast(pl.Int64).alias("_n"),
                )
                .filter(
                    pl.col("_value").is_not_null()
                    & pl.col("_value").is_finite()
                    & (pl.col("_n") >= rule.min_samples)
                )
            )
        return pl.concat(parts)

    def _step(self, index: int, part: pl.DataFrame, detected_us: int) -> list[dict[str, Any]]:
        """One window: join its rows with the state, decide, emit, write the state back."""
        joined = (
            part.join(self._state, on=_KEYS, how="left", nulls_equal=True)
            .join(self._params, on="rule", how="left")
            .filter(pl.col("last_index").is_null() | (pl.col("last_index") < index))
        )
        if joined.height == 0:
            return []
        cond_kind = pl.col("_cond")
        baseline = (
            pl.when(pl.col("hist").list.len() >= MIN_BASELINE)
            .then(pl.col("hist").list.median())
            .otherwise(None)
        )
        value, threshold = pl.col("_value"), pl.col("_threshold")
        base = pl.col("_baseline")
        breach = (
            pl.when(cond_kind == "above")
            .then(value > threshold)
            .when(cond_kind == "below")
            .then(value < threshold)
            .when(cond_kind == "change_above")
            .then((base > 0) & (value >= base * (1 + threshold)))
            .otherwise((base > 0) & (value <= base * (1 - threshold)))
        )
        d = joined.with_columns(baseline.alias("_baseline")).with_columns(
            breach.fill_null(False).alias("_breach")
        )
        is_open = pl.col("cond").is_not_null()
        d = d.with_columns(
            pl.when(pl.col("_breach"))
            .then(pl.col("streak").fill_null(0) + 1)
            .otherwise(0)
            .alias("streak"),
            pl.when(pl.col("_breach"))
            .then(0)
            .otherwise(pl.col("calm").fill_null(0) + 1)
            .alias("calm"),
        ).with_columns(
            (~is_open & pl.col("_breach") & (pl.col("streak") >= pl.col("_for"))).alias("_opens"),
            (
                is_open
                & pl.col("_breach")
                & (pl.lit(index) - pl.col("last_alert") >= pl.col("_cooldown"))
            ).alias("_again"),
            (is_open & ~pl.col("_breach") & (pl.col("calm") >= pl.col("_recover"))).alias(
                "_closes"
            ),
        )
        # Python only for the rows that alert (few): their rows and new condition ids.
        out: list[dict[str, Any]] = []
        opened: list[dict[str, Any]] = []
        for row in d.filter(pl.col("_opens") | pl.col("_again") | pl.col("_closes")).iter_rows(
            named=True
        ):
            cid = row["cond"]
            if row["_opens"]:
                cid = _hash(["rule", row["rule"], row["level"], *_dims(row), row["_start"]])
                opened.append({**{k: row[k] for k in _KEYS}, "_new": cid})
            kind = "recovery" if row["_closes"] else "rule"
            out.append(self._row(row, cid, kind, detected_us))
        new = pl.DataFrame(opened, schema={**{k: pl.String for k in _KEYS}, "_new": pl.String})
        d = d.join(new, on=_KEYS, how="left", nulls_equal=True).with_columns(
            pl.when(pl.col("_opens"))
            .then(pl.col("_new"))
            .when(pl.col("_closes"))
            .then(None)
            .otherwise(pl.col("cond"))
            .alias("_cid")
        )
        learn = pl.col("_cid").is_null() & ~pl.col("_breach")
        hist = pl.col("hist").fill_null(pl.lit([], dtype=pl.List(pl.Float64)))
        updated = d.select(
            *_KEYS,
            pl.lit(index, dtype=pl.Int64).alias("last_index"),
            "streak",
            "calm",
            pl.col("_cid").alias("cond"),
            pl.when(pl.col("_opens"))
            .then(pl.col("_start"))
            .otherwise(pl.col("start_us"))
            .alias("start_us"),
            pl.when(pl.col("_opens") | pl.col("_again"))
            .then(pl.lit(index, dtype=pl.Int64))
            .otherwise(pl.col("last_alert"))
            .alias("last_alert"),
            pl.when(learn)
            .then(hist.list.concat(pl.concat_list(pl.col("_value"))))
            .otherwise(hist)
            .list.tail(pl.col("_keep"))
            .alias("hist"),
        )
        self._state = pl.concat(
            [self._state.join(updated, on=_KEYS, how="anti", nulls_equal=True), updated]
        )
        return out

    def _row(self, row: dict[str, Any], cid: str, kind: str, detected_us: int) -> dict[str, Any]:
        rule = self._by_name[row["rule"]]
        value, base = row["_value"], row["_baseline"]
        threshold = (
            rule.threshold
            if not rule.relative
            else base * (1 + rule.threshold if rule.direction == "up" else 1 - rule.threshold)
        )
        key = _describe(row)
        start = _iso(row["_start"])
        fmt = _formatter(rule.measure)
        if kind == "recovery":
            message = (
                f"{rule.measure} of {key} back within rule {rule.name!r} at {fmt(value)} for "
                f"{rule.recover_windows} windows; condition closed (window starting {start})."
            )
            severity = "info"
        else:
            op = {"above": ">", "below": "<", "change_above": ">=", "change_below": "<="}
            what = (
                f"{fmt(value)} {op[rule.condition]} {fmt(threshold)}"
                if not rule.relative
                else f"{fmt(value)} against a baseline of {fmt(base)} "
                f"(x{value / base:.2f}, rule: {'+' if rule.direction == 'up' else '-'}"
                f"{rule.threshold:.0%})"
            )
            default = (
                f"{rule.measure} of {key} is {what} for {row['streak']} window"
                f"{'s' if row['streak'] != 1 else ''}, in the window starting {start} "
                f"(rule {rule.name!r}, {rule.severity})."
            )
            message = default
            if rule.message is not None:
                fields = {
                    "name": rule.name,
                    "measure": rule.measure,
                    "value": fmt(value),
                    "threshold": fmt(threshold),
                    "baseline": fmt(base) if base is not None else "n/a",
                    "key": key,
                    "window_start": start,
                    "severity": rule.severity,
                    "for_windows": rule.for_windows,
                    "level": row["level"],
                    **{dim: row[dim] for dim in DIMENSIONS},
                }
                message = rule.message.format_map(fields)
            severity = rule.severity
        reference = base if base is not None else threshold
        return {
            "anomaly_id": _hash([cid, kind, row["_start"]]),
            "condition_id": cid,
            "kind": kind,
            "detected_at": detected_us,
            "window_start": row["_start"],
            "window_end": row["_end"],
            "level": row["level"],
            **{dim: row[dim] for dim in DIMENSIONS},
            "measure": rule.measure,
            "detector": "rule",
            "baseline": reference,
            "observed": value,
            "direction": rule.direction,
            "severity": severity,
            "score": value / threshold if threshold else value,
            "example_event_ids": [],
            "message": message,
            "rule": rule.name,
        }

    # ----------------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The per-key state (msgpack of a zstd Arrow IPC frame)."""
        return msgspec.msgpack.encode(_Snapshot(_SNAPSHOT_VERSION, _ipc(self._state)))

    def restore(self, data: bytes) -> None:
        """Continue from a ``snapshot``; state of rules no longer configured is dropped."""
        snap = msgspec.msgpack.decode(data, type=_Snapshot)
        if snap.version != _SNAPSHOT_VERSION:
            raise ValueError(f"unsupported rules snapshot version {snap.version}")
        self._state = _from_ipc(snap.state, _STATE).filter(
            pl.col("rule").is_in(list(self._by_name))
        )


def _dims(row: dict[str, Any]) -> list[str | None]:
    return [row[d] for d in DIMENSIONS]


def _describe(row: dict[str, Any]) -> str:
    parts = [f"{d.removesuffix('_id')} {row[d]}" for d in DIMENSIONS if row[d] is not None]
    return " ".join(parts) if parts else row["level"]


def _formatter(measure: str) -> Any:
    def fmt(v: float) -> str:
        if measure.endswith("_rate"):
            return f"{v:.1%}"
        if measure.endswith("_ms"):
            return f"{v:,.0f} ms"
        if measure.startswith("cost"):
            return f"${v:.4g}"
        return f"{v:,.4g}"

    return fmt
