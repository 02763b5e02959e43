"""DuckDB over the lake: the views users query, and the runner behind ``agentstream sql``.

Views read the Parquet files directly, so a query always sees everything landed so far and
needs no lock on anything the worker writes. The database file ``agentstream.duckdb`` in the
data directory holds the same views for the DuckDB CLI and notebooks; it is only ever opened
briefly to (re)create them, so DuckDB's one-writer rule never blocks the worker.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

import duckdb

from pipeline import schema
from sinks.parquet import LakeTable, ParquetLake, glob_of
from sinks.tables import DEAD_LETTERS_SCHEMA, EVENTS_SCHEMA
from streams.budgets import BUDGETS_SCHEMA
from streams.detect import ANOMALIES_SCHEMA
from streams.releases import VERDICTS_SCHEMA
from streams.windows import METRICS_SCHEMA

DB_FILE: Final = "agentstream.duckdb"

EVENTS: Final = LakeTable("events", EVENTS_SCHEMA, ("date", "type"), "ts", "kafka_offset")
DEAD_LETTERS: Final = LakeTable(
    "dead_letters", DEAD_LETTERS_SCHEMA, ("date",), "received_at", "offset"
)
METRICS: Final = LakeTable("metrics", METRICS_SCHEMA, ("date",), "window_start")
ANOMALIES: Final = LakeTable("anomalies", ANOMALIES_SCHEMA, ("date",), "window_start")
# Budget status: one row per budget and period, its file rewritten while the period is current.
BUDGETS: Final = LakeTable("budgets", BUDGETS_SCHEMA, ("date",), "period_start")
RELEASE_VERDICTS: Final = LakeTable("release_verdicts", VERDICTS_SCHEMA, ("date",), "window_start")
TABLES: list[LakeTable] = [EVENTS, DEAD_LETTERS, METRICS, ANOMALIES, BUDGETS, RELEASE_VERDICTS]

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


def _quote(path: Path | str) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _table_view(lake: ParquetLake, table: LakeTable) -> str:
    depth = "/".join("*" for _ in table.partition_by)
    glob = glob_of(lake.table_dir(table), f"{depth}/*.parquet")
    types = ", ".join(f"'{c}': {'DATE' if c == 'date' else 'VARCHAR'}" for c in table.partition_by)
    names = [f'"{n}"' for n in table.schema.names]
    if "date" in table.partition_by and "date" not in table.schema.names:
        names.append('"date"')
    return (
        f"CREATE OR REPLACE VIEW {table.name} AS SELECT {', '.join(names)} FROM read_parquet("
        f"{_quote(glob)}, hive_partitioning = true, hive_types = {{{types}}}, "
        "union_by_name = true)"
    )


def view_statements(lake: ParquetLake, con: duckdb.DuckDBPyConnection | None = None) -> list[str]:
    """SQL that defines every view over ``lake`` (one per table, one per event type).

    With ``con``, a table with no file yet (a lake written by an older version, or not
    prepared) gets an empty view of the right columns instead of failing to bind.
    """
    stmts = []
    for t in TABLES:
        if con is not None and not any(lake.table_dir(t).glob("**/*.parquet")):
            con.register(f"_empty_{t.name}", t.schema.empty_table())
            stmts.append(f"CREATE OR REPLACE VIEW {t.name} AS SELECT * FROM _empty_{t.name}")
        else:
            stmts.append(_table_view(lake, t))
    envelope = [n for n in EVENTS_SCHEMA.names if n in _envelope_names()]
    for cls in schema.EVENT_CLASSES:
        own = [f.name for f in _fields(cls) if f.name not in envelope]
        cols = ", ".join(
            f'"{n}"' for n in [*envelope, *own, "cost_estimated", "late"] if _keep(cls, n)
        )
        stmts.append(
            f'CREATE OR REPLACE VIEW {_PLURAL[cls.type_name]} AS SELECT {cols}, "date" '
            f"FROM events WHERE type = '{cls.type_name}'"
        )
    return stmts


def _keep(cls: type, name: str) -> bool:
    return name != "cost_estimated" or cls is schema.LlmCall


def _fields(cls: type) -> Iterable[Any]:
    return schema.msgspec.inspect.type_info(cls).fields  # type: ignore[attr-defined,no-any-return]


def _envelope_names() -> set[str]:
    return {f.name for f in _fields(schema.Envelope)} | {"type"}


def prepare(data_dir: Path) -> ParquetLake:
    """Make sure the lake folder exists with a seed file per table, so every view binds."""
    lake = ParquetLake(data_dir)
    for table in TABLES:
        lake.ensure_seed(table)
    return lake


def connect(data_dir: Path, *, analysis: bool | str = False) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with every view over ``data_dir``.

    ``analysis`` adds the analysis views and macros of ``sinks.analysis``: True for all, or
    the SQL about to run, to add them only if it names one (binding them costs time).
    """
    if not Path(data_dir).is_dir():
        raise QueryError(
            f"data directory {str(data_dir)!r} does not exist: run `agentstream worker "
            "--data-dir DIR` (or `agentstream demo`) first, or pass the right --data-dir"
        )
    from sinks.analysis import install_views

    lake = ParquetLake(data_dir)
    con = duckdb.connect(":memory:")
    try:
        for stmt in view_statements(lake, con):
            con.execute(stmt)
        if analysis:
            install_views(con, lake.root, only_for=None if analysis is True else analysis)
    except duckdb.Error as exc:
        raise QueryError(
            f"cannot read the lake in {data_dir}: {str(exc).splitlines()[0]}"
        ) from None
    return con


READ_STATEMENTS: Final = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


def read_only_query(data_dir: Path, sql: str) -> duckdb.DuckDBPyRelation | None:
    """Run a user's ``sql`` over the lake with no way to change anything.

    Only SELECT-like statements (SELECT, WITH, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN) are
    accepted, and the connection may read files under ``data_dir`` only, so a query can
    neither alter the lake nor read or write elsewhere.
    """
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(str(exc).splitlines()[0]) from None
    for stmt in statements:
        if stmt.type not in READ_STATEMENTS:
            raise QueryError(
                f"only queries are allowed here, not {stmt.type.name}: "
                f"{stmt.query.strip()[:60]!r} (the lake is opened read-only)"
            )
    con = connect(data_dir, analysis=sql)
    root = Path(data_dir).absolute()
    # The views read globs: a folder name with wildcard characters appears escaped in them.
    allowed = sorted({f"{root}/", glob_of(root, "")})
    con.execute(f"SET allowed_directories = [{', '.join(_quote(a) for a in allowed)}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    try:
        return con.sql(sql)
    except duckdb.Error as exc:
        raise QueryError(str(exc).splitlines()[0]) from None


def write_database(data_dir: Path) -> Path | None:
    """(Re)create ``agentstream.duckdb`` with the views; returns None if another process holds it."""
    from sinks.analysis import install_views

    path = Path(data_dir) / DB_FILE
    lake = prepare(data_dir)
    try:
        con = duckdb.connect(str(path))
    except duckdb.IOException:
        return None
    try:
        for stmt in view_statements(lake):
            # Absolute paths: the file must work from any current directory.
            con.execute(stmt)
        install_views(con, lake.root)
    finally:
        con.close()
    return path
