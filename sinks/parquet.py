"""Parquet landing: durable, replay-safe files in a hive layout that DuckDB prunes.

Layout: ``<data_dir>/<table>/date=YYYY-MM-DD/[type=T/]<topic>~<partition>~<first>~<last>.parquet``.
A file's name is the Kafka offset range its rows came from. Files are written to a hidden
temporary name, fsynced and renamed, and the worker commits offsets only after that. After a
crash the files of offsets that were landed but not committed are removed when the partition
is assigned again (``discard_uncommitted``), so the replay writes them once more and no row is
ever landed twice, whatever the new batch boundaries are.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

_NAME: Final = re.compile(
    r"^(?P<topic>[A-Za-z0-9._\-]+)~(?P<p>\d+)~(?P<first>\d+)~(?P<last>\d+)\.parquet$"
)
SEED_NAME: Final = "_schema.parquet"


@dataclass(frozen=True)
class LakeTable:
    """One landed table: its name, Arrow schema and hive partition columns."""

    name: str
    schema: pa.Schema
    partition_by: tuple[str, ...]
    time_column: str
    offset_column: str | None = None

    def file_schema(self) -> pa.Schema:
        """The schema inside each file: hive columns live in the path, not the file."""
        return pa.schema([f for f in self.schema if f.name not in self.partition_by])


@dataclass(frozen=True)
class LandedFile:
    """A file written by ``ParquetLake.land``."""

    path: Path
    rows: int


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, table: pa.Table) -> None:
    """Write ``table`` to ``path`` so readers see the whole file or nothing, and it is durable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        pq.write_table(table, fh, compression="zstd", row_group_size=128 * 1024)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class ParquetLake:
    """The landed tables under one data directory."""

    def __init__(self, root: Path) -> None:
        # Absolute, because view definitions stored in the DuckDB file must not depend on
        # the reader's working directory.
        self.root = Path(root).absolute()

    def table_dir(self, table: LakeTable) -> Path:
        """Folder of ``table``."""
        return self.root / table.name

    def ensure_seed(self, table: LakeTable) -> None:
        """Write a zero-row file with the table's schema, so its view binds before any data."""
        parts = "/".join(f"{c}={_seed_value(c)}" for c in table.partition_by)
        seed = self.table_dir(table) / parts / SEED_NAME
        if not seed.exists():
            write_atomic(seed, table.file_schema().empty_table())

    def land(
        self, table: LakeTable, rows: pa.Table, *, topic: str, partition: int, first: int, last: int
    ) -> list[LandedFile]:
        """Write rows that came from offsets ``first..last`` of ``topic``/``partition``.

        Rows are split by the table's partition columns; every part gets the same offset-range
        name, so landing the same range again overwrites instead of duplicating.
        """
        if rows.num_rows == 0:
            return []
        return self.write_named(
            table, rows, f"{topic}~{partition}~{first:019d}~{last:019d}.parquet"
        )

    def write_named(self, table: LakeTable, rows: pa.Table, name: str) -> list[LandedFile]:
        """Write ``rows`` split by the table's partition columns, each part as ``name``.

        Writing the same name again replaces the file, which is what makes landing idempotent.
        """
        frame = pl.from_arrow(rows)
        assert isinstance(frame, pl.DataFrame)
        if "date" in table.partition_by:
            frame = frame.with_columns(pl.col(table.time_column).dt.date().alias("date"))
        landed = []
        file_schema = table.file_schema()
        for key, part in frame.partition_by(list(table.partition_by), as_dict=True).items():
            folder = self.table_dir(table).joinpath(
                *(f"{c}={v}" for c, v in zip(table.partition_by, key, strict=True))
            )
            data = part.drop(list(table.partition_by)).to_arrow().cast(file_schema)
            write_atomic(folder / name, data)
            landed.append(LandedFile(folder / name, data.num_rows))
        return landed

    def files(self, table: LakeTable) -> Iterator[Path]:
        """Every landed data file of ``table`` (not the seed, not temporaries)."""
        depth = "/".join("*" for _ in table.partition_by)
        for path in self.table_dir(table).glob(f"{depth}/*~*.parquet"):
            if _NAME.match(path.name):
                yield path

    def discard_uncommitted(
        self, table: LakeTable, topic: str, partition: int, committed: int
    ) -> int:
        """Remove rows of ``topic``/``partition`` from offset ``committed`` on.

        Those rows were landed but their offsets were never committed: the consumer reads them
        again, and keeping them would count them twice. The worker commits only at file
        boundaries, so normally whole files go; a file that straddles ``committed`` (an
        operator reset the group's offsets) is rewritten without the rows to be replayed.
        Returns the number of files removed or rewritten.
        """
        removed = 0
        for path in list(self.files(table)):
            m = _NAME.match(path.name)
            assert m is not None
            if m["topic"] != topic or int(m["p"]) != partition or int(m["last"]) < committed:
                continue
            if int(m["first"]) < committed:
                assert table.offset_column is not None
                kept = pq.read_table(path)
                kept = kept.filter(pc.less(kept[table.offset_column], committed))
                if kept.num_rows:
                    write_atomic(
                        path.with_name(
                            f"{m['topic']}~{m['p']}~{m['first']}~{committed - 1:019d}.parquet"
                        ),
                        kept,
                    )
            path.unlink(missing_ok=True)
            removed += 1
        for tmp in self.table_dir(table).glob(f"**/.{topic}~{partition}~*.parquet.tmp"):
            tmp.unlink(missing_ok=True)
        return removed


def _seed_value(column: str) -> str:
    return "1970-01-01" if column == "date" else "_schema"
