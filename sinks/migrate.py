"""``agentstream lake import OLD_DIR``: bring a lake of Parquet folders (agentstream before the
DuckLake landing) into the lake of a data directory, exactly once.

The old layout is ``<table>/date=YYYY-MM-DD/[type=T/]<name>.parquet``; events and dead-letter
files are named ``<topic>~<partition>~<first>~<last>.parquet`` by the Kafka offsets they
hold. Each file is imported in one transaction with a row in ``imported_files`` naming it
(path relative to OLD_DIR, size): running the import again skips what is there. The Kafka
positions are raised to the offsets after the imported files, so a worker pointed at the new
lake reads on from where the old one stopped instead of landing those records again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pyarrow as pa
import pyarrow.parquet as pq

from sinks.lake import ALIAS, POSITIONS, LakeError, LakeTable, LakeWriter, transaction

IMPORTED: Final = "imported_files"
_OFFSETS: Final = re.compile(
    r"^(?P<topic>[A-Za-z0-9._\-]+)~(?P<p>\d+)~(?P<first>\d+)~(?P<last>\d+)\.parquet$"
)


@dataclass
class Imported:
    files: int = 0
    skipped: int = 0
    rows: int = 0


def import_lake(writer: LakeWriter, old: Path, tables: list[LakeTable]) -> Imported:
    """Import every data file of the old lake ``old`` into ``writer``'s lake."""
    old = Path(old).absolute()
    if not old.is_dir() or not any((old / t.name).is_dir() for t in tables):
        raise LakeError(
            f"{old} is not a lake of Parquet folders (no {', '.join(t.name for t in tables)} "
            "folder in it)"
        )
    con = writer.con
    con.execute(
        f"CREATE TABLE IF NOT EXISTS {ALIAS}.{IMPORTED} (path VARCHAR, bytes BIGINT, "
        "rows BIGINT, imported_at TIMESTAMPTZ)"
    )
    done = {r[0] for r in con.execute(f"SELECT path FROM {ALIAS}.{IMPORTED}").fetchall()}
    out = Imported()
    for table in tables:
        for path in sorted((old / table.name).glob("**/*.parquet")):
            rel = str(path.relative_to(old))
            if path.name.startswith(".") or path.name == "_schema.parquet":
                continue
            if rel in done:
                out.skipped += 1
                continue
            rows = _read(path, table)
            with transaction(con, writer.spec):
                if rows.num_rows:
                    writer.insert(table, rows)
                con.execute(
                    f"INSERT INTO {ALIAS}.{IMPORTED} VALUES (?, ?, ?, now())",
                    [rel, path.stat().st_size, rows.num_rows],
                )
                m = _OFFSETS.match(path.name)
                if m is not None and table.name in ("events", "dead_letters"):
                    _raise_position(writer, m["topic"], int(m["p"]), int(m["last"]) + 1)
            out.files += 1
            out.rows += rows.num_rows
    return out


def _read(path: Path, table: LakeTable) -> pa.Table:
    """The rows of an old file, with the table's columns (hive columns come from the path)."""
    rows = pq.read_table(path, partitioning=None)
    parts = dict(p.split("=", 1) for p in path.parent.parts if "=" in p)
    columns = []
    for f in table.schema:
        if f.name in rows.column_names:
            columns.append(rows[f.name].cast(f.type))
        elif f.name in parts and f.name != "date":
            columns.append(pa.array([parts[f.name]] * rows.num_rows, f.type))
        else:
            columns.append(pa.nulls(rows.num_rows, f.type))
    return pa.Table.from_arrays(columns, schema=table.schema)


def _raise_position(writer: LakeWriter, topic: str, partition: int, offset: int) -> None:
    con = writer.con
    row = con.execute(
        f"SELECT max(next_offset) FROM {ALIAS}.{POSITIONS} WHERE topic = ? AND partition = ?",
        [topic, partition],
    ).fetchone()
    if row is None or row[0] is None:
        con.execute(
            f"INSERT INTO {ALIAS}.{POSITIONS} VALUES (?, ?, ?, 'import', now())",
            [topic, partition, offset],
        )
    elif row[0] < offset:
        con.execute(
            f"UPDATE {ALIAS}.{POSITIONS} SET next_offset = ?, updated_at = now() "
            "WHERE topic = ? AND partition = ?",
            [offset, topic, partition],
        )
