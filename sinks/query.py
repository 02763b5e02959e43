"""The user's SQL over the lake (``agentstream sql``): queries only, files of the lake only."""

from __future__ import annotations

from pathlib import Path
from typing import Final

import duckdb

from sinks.analysis import connect, sql_string
from sinks.catalog import QueryError
from sinks.lake import data_path

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
    con = connect(data_dir, only_for=sql)
    root = Path(data_dir).absolute()
    allowed = sorted({f"{root}/", f"{data_path(root)}/"})
    con.execute(f"SET allowed_directories = [{', '.join(sql_string(a) for a in allowed)}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    try:
        return con.sql(sql)
    except duckdb.Error as exc:
        raise QueryError(str(exc).splitlines()[0]) from None
