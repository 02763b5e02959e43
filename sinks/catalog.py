"""The one read path of the lake: DuckDB views over its DuckLake tables, and ``agentstream sql``.

``connect(data_dir)`` attaches the lake read-only as ``lake`` and defines one view per table
(``events``, ``metrics``, ...) and per event type (``llm_calls``, ...) in the connection's
own database, so queries name them without a prefix; a query sees the lake as of its last
whole commit and never blocks the worker. The table contracts (names, schemas, partitioning)
are ``TABLES`` here; the per-type views are stored in the lake's catalog too, so the DuckDB
CLI sees them after a plain ``ATTACH`` (README, "Lake").
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Final

import duckdb

from pipeline import schema
from sinks.contracts import (
    ANOMALIES,
    BUDGETS,
    DEAD_LETTERS,
    EVENTS,
    METRICS,
    RELEASE_VERDICTS,
    TABLES,
)
from sinks.lake import LakeError, LakeTable, LakeWriter, attach, lake_connection
from sinks.tables import EVENTS_SCHEMA

__all__ = [
    "ANOMALIES",
    "BUDGETS",
    "DEAD_LETTERS",
    "EVENTS",
    "METRICS",
    "RELEASE_VERDICTS",
    "TABLES",
    "QueryError",
    "connect",
    "prepare",
    "type_views",
]

_PLURAL: Final = {
    "llm_call": "llm_calls",
    "tool_call": "tool_calls",
    "retrieval": "retrievals",
    "escalation": "escalations",
    "task": "tasks",
    "feedback": "feedback",
    "evaluation": "evaluations",
    "guardrail": "guardrails",
    "release": "releases",
}


class QueryError(Exception):
    """A user's SQL failed; the message is DuckDB's first line."""


def register(table: LakeTable) -> None:
    """Add a landed table (later stages call this for metrics, anomalies, ...)."""
    if all(t.name != table.name for t in TABLES):
        TABLES.append(table)


def type_views() -> list[tuple[str, str]]:
    """(name, SELECT) of the view of each event type over ``events``."""
    envelope = [n for n in EVENTS_SCHEMA.names if n in _envelope_names()]
    views = []
    for cls in schema.EVENT_CLASSES:
        own = [f.name for f in _fields(cls) if f.name not in envelope]
        cols = ", ".join(
            f'"{n}"' for n in [*envelope, *own, "cost_estimated", "late"] if _keep(cls, n)
        )
        views.append(
            (
                _PLURAL[cls.type_name],
                f"SELECT {cols}, \"date\" FROM events WHERE type = '{cls.type_name}'",
            )
        )
    return views


def view_statements(con: duckdb.DuckDBPyConnection) -> list[str]:
    """SQL that defines every view over the lake attached to ``con`` as ``lake``.

    A table the lake does not have yet (a lake of an older version) gets an empty view of
    the right columns instead of failing to bind.
    """
    present = {
        r[0]
        for r in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = 'lake'"
        ).fetchall()
    }
    stmts = []
    for t in TABLES:
        if t.name in present:
            stmts.append(f"CREATE OR REPLACE VIEW {t.name} AS SELECT * FROM lake.{t.name}")
        else:
            con.register(f"_empty_{t.name}", t.schema.empty_table())
            stmts.append(
                f"CREATE OR REPLACE VIEW {t.name} AS SELECT *, NULL::DATE AS date "
                f"FROM _empty_{t.name}"
            )
    for name, select in type_views():
        stmts.append(f"CREATE OR REPLACE VIEW {name} AS {select}")
    return stmts


def _keep(cls: type, name: str) -> bool:
    return name != "cost_estimated" or cls is schema.LlmCall


def _fields(cls: type) -> Iterable[Any]:
    return schema.msgspec.inspect.type_info(cls).fields  # type: ignore[attr-defined,no-any-return]


def _envelope_names() -> set[str]:
    return {f.name for f in _fields(schema.Envelope)} | {"type"}


def prepare(data_dir: Path, catalog: str = "") -> LakeWriter:
    """A writer of the lake of ``data_dir``, with every table and view (created if missing).

    Workers started together (``docker compose up --scale worker=3``) race to create the
    tables; with the SQLite catalog the losers find it locked for a moment: they retry.
    """
    for attempt in range(8):
        try:
            return LakeWriter(data_dir, TABLES, type_views(), catalog)
        except LakeError as exc:
            if "locked" not in str(exc) or attempt == 7:
                raise
            time.sleep(random.uniform(0.2, 1.0) * (attempt + 1))
    raise AssertionError("unreachable")


def connect(
    data_dir: Path, *, then: Callable[[duckdb.DuckDBPyConnection], object] | None = None
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the lake of ``data_dir`` attached read-only as
    ``lake`` and every view over it.

    ``then`` runs on the connection once the views are in, under the same one-line errors
    (``sinks.analysis.connect`` adds its views and macros this way).
    """
    if not Path(data_dir).is_dir():
        raise QueryError(
            f"data directory {str(data_dir)!r} does not exist: run `agentstream worker "
            "--data-dir DIR` (or `agentstream demo`) first, or pass the right --data-dir"
        )
    con = lake_connection()
    try:
        attach(con, Path(data_dir), read_only=True)
        for stmt in view_statements(con):
            con.execute(stmt)
        if then is not None:
            then(con)
    except LakeError as exc:
        con.close()
        raise QueryError(str(exc)) from None
    except duckdb.Error as exc:
        con.close()
        raise QueryError(
            f"cannot read the lake in {data_dir}: {str(exc).splitlines()[0]}"
        ) from None
    return con
