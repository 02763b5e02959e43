"""The lake: DuckLake tables under the data directory, and the one transaction of a flush.

DuckLake (spec 1.0) keeps the tables' metadata in a catalog database and their rows in
Parquet files under ``<data_dir>/lake/``. A flush commits the rows of every table and the
Kafka position of every partition it covers in one catalog transaction: readers see whole
flushes or nothing, and a crash before the commit lands nothing, so a replay from the
stored positions lands every record exactly once without file naming tricks.

Catalogs: a SQLite file ``<data_dir>/lake.sqlite`` by default (one writer process, any
number of readers: it runs in WAL mode, so readers never block the writer), or PostgreSQL
(``AGENTSTREAM_CATALOG=postgres:dbname=... host=...``) for several writers. A lake on
PostgreSQL leaves its connection string (no password: use ``PGPASSWORD`` or ``.pgpass``) in
``<data_dir>/lake.catalog`` so that readers need only the data directory.

Positions are one row per (topic, partition) in ``kafka_offsets``, updated in the flush's
transaction where it still holds the offset the writer started from: a second writer of the
same partition (a zombie after a rebalance) then either finds the row moved on or conflicts
at commit, and lands nothing.
"""

from __future__ import annotations

import importlib
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import duckdb
import pyarrow as pa

from sinks import datafiles

log = logging.getLogger("agentstream.lake")

CATALOG_FILE: Final = "lake.sqlite"
CATALOG_POINTER: Final = "lake.catalog"
DATA_FOLDER: Final = "lake"
ALIAS: Final = "lake"
POSITIONS: Final = "kafka_offsets"
CHECKPOINTS: Final = "worker_state"
INFO: Final = "agentstream_lake"
# agentstream's own layout version of the lake (tables and their meaning), kept in the catalog.
LAYOUT_VERSION: Final = 1
_EXTENSIONS: Final = {"sqlite": "sqlite_scanner", "postgres": "postgres_scanner"}
# A table's rows in a flush up to this many are inserted through DuckDB, which keeps them in
# the catalog (DuckLake's default data_inlining_row_limit) instead of writing a tiny file;
# more are written as Parquet by sinks.datafiles.
INLINE_ROWS: Final = 10
# Attempts of one commit refused by another writer's (LakeWriter.commit); then the caller's.
COMMIT_ATTEMPTS: Final = 5
# Claims of a partition's first position made before giving up (see ``LakeWriter.claim``).
CLAIM_ATTEMPTS: Final = 3


class LakeError(Exception):
    """The lake cannot be opened or used as asked; the message is one line saying why."""


class Fenced(LakeError):
    """Another writer moved a partition's position on: this flush must not land."""


@dataclass(frozen=True)
class LakeTable:
    """One lake table: its name, Arrow schema, and the column whose UTC date partitions it.

    ``replace_by``: columns identifying a row that is rewritten while it is current (the
    budgets' status); landing such a row replaces the one with the same key.
    """

    name: str
    schema: pa.Schema
    time_column: str
    replace_by: tuple[str, ...] = ()


@dataclass
class Flush:
    """What one flush commits: rows per table, Kafka positions, the worker state's number."""

    rows: dict[str, pa.Table] = field(default_factory=dict)
    # (topic, partition) -> (the offset the writer expects stored, the next offset to store)
    positions: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)
    # lineage -> sequence number of the state snapshots saved for this flush
    checkpoints: dict[str, int] = field(default_factory=dict)
    group_id: str = ""


# What a refused commit says: DuckLake's conflict check, and SQLite's own text for SQLITE_BUSY
# (another process holds the catalog's write lock). DuckDB has no error code for either, and
# its class (TransactionException) is also what a commit raises when the catalog is
# unreachable, so the class narrows and the text decides; tests/test_lake.py and
# tests/test_lake_postgres.py provoke each case for real, so a change of wording fails them.
_CONFLICT_MARKS: Final = ("Transaction conflict", "database is locked")


def is_lake_error(exc: BaseException) -> bool:
    """Whether ``exc`` came from DuckDB or the lake (its catalog, its files), not from Kafka."""
    return isinstance(exc, (duckdb.Error, LakeError))


def is_conflict(exc: BaseException) -> bool:
    """Whether ``exc`` is a commit refused because another one came first (DuckLake's
    conflict, or with the SQLite catalog another process holding its write lock): nothing
    landed and an immediate retry lands on top of the other commit."""
    return isinstance(exc, duckdb.TransactionException) and any(
        mark in str(exc) for mark in _CONFLICT_MARKS
    )


def catalog_spec(data_dir: Path, catalog: str = "") -> str:
    """The DuckLake catalog of ``data_dir``: ``sqlite:<file>`` or ``postgres:<dsn>``.

    ``catalog`` is the setting (empty: the SQLite file in the data directory, or what
    ``lake.catalog`` there names).
    """
    root = Path(data_dir).absolute()
    if not catalog:
        pointer = root / CATALOG_POINTER
        if pointer.is_file() and not (root / CATALOG_FILE).exists():
            catalog = pointer.read_text().strip()
        else:
            return f"sqlite:{root / CATALOG_FILE}"
    kind, sep, rest = catalog.partition(":")
    if not sep or kind not in ("sqlite", "postgres") or not rest.strip():
        raise LakeError(
            f"bad catalog {catalog!r}: use sqlite:FILE or postgres:DSN "
            "(e.g. postgres:dbname=lake host=127.0.0.1), or leave it empty for "
            f"{CATALOG_FILE} in the data directory"
        )
    if kind == "sqlite":
        return f"sqlite:{Path(rest).absolute()}"
    return catalog


def holds_lake(data_dir: Path) -> bool:
    """Whether ``data_dir`` holds a lake already: a catalog file or pointer, or the Parquet
    folders of an older agentstream."""
    root = Path(data_dir)
    return any((root / name).exists() for name in (CATALOG_FILE, CATALOG_POINTER, "events"))


def data_path(data_dir: Path) -> Path:
    """Where the lake's Parquet files live."""
    return Path(data_dir).absolute() / DATA_FOLDER


_INSTALL_LOCK = threading.Lock()


def lake_connection() -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection that can load the lake's extensions quickly.

    Checking an extension's signature costs ~0.4 s a file and a connection, at every
    ``connect()``. The files come from the pinned ``duckdb-extension-*`` packages (installed
    by the package manager, hashes in uv.lock), so the check is skipped; no user statement
    can load an extension (``agentstream sql`` accepts queries only).
    """
    return duckdb.connect(":memory:", config={"allow_unsigned_extensions": True})


def load_extensions(con: duckdb.DuckDBPyConnection, kind: str) -> None:
    """Load DuckLake and the catalog's extension from their Python packages (no download).

    ``duckdb-extension-*`` ship the extension files; the first use installs them into
    DuckDB's extension folder (where the DuckDB CLI of the same version finds them too).
    """
    for name in (kind, "ducklake"):
        loaded = _EXTENSIONS.get(name, name)
        try:
            con.execute(f"LOAD {loaded}")
            continue
        except duckdb.Error:
            pass
        with _INSTALL_LOCK:
            try:
                module = importlib.import_module(f"duckdb_extension_{name}")
            except ImportError:
                raise LakeError(
                    f"the DuckDB extension {name!r} is not installed: pip install "
                    f"duckdb-extension-{name}=={duckdb.__version__}"
                ) from None
            files = Path(str(module.__path__[0])) / "extensions" / f"v{duckdb.__version__}"
            path = files / f"{name}.duckdb_extension"
            if not path.is_file():
                raise LakeError(
                    f"duckdb-extension-{name} does not match DuckDB {duckdb.__version__}: "
                    f"install duckdb-extension-{name}=={duckdb.__version__}"
                )
            con.execute(f"FORCE INSTALL '{path}'")
            con.execute(f"LOAD {loaded}")


def _one_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def attach(
    con: duckdb.DuckDBPyConnection,
    data_dir: Path,
    catalog: str = "",
    *,
    read_only: bool,
    create: bool = False,
) -> str:
    """Attach the lake of ``data_dir`` to ``con`` as ``lake``; returns the catalog spec.

    Without ``create``, a data directory with no lake is an error naming what to do.
    """
    root = Path(data_dir).absolute()
    spec = catalog_spec(root, catalog)
    kind = spec.split(":", 1)[0]
    if kind == "sqlite" and not create and not Path(spec.split(":", 1)[1]).is_file():
        hint = (
            "it holds Parquet folders of an older agentstream: run `agentstream lake import "
            f"{root} --data-dir {root}`"
            if (root / "events").is_dir()
            else "run `agentstream worker --data-dir DIR` (or `agentstream demo`) first"
        )
        raise LakeError(f"{root} is not an agentstream lake (no {CATALOG_FILE}): {hint}")
    load_extensions(con, kind)
    # The data path is always the data directory's own folder, so a lake can be moved or
    # copied as a whole (DuckLake keeps file paths relative to it).
    options = [f"DATA_PATH '{_sql_text(str(data_path(root)))}/'", "OVERRIDE_DATA_PATH true"]
    if read_only:
        options.append("READ_ONLY")
    if not create:
        options.append("CREATE_IF_NOT_EXISTS false")
    try:
        con.execute(f"ATTACH '{_sql_text('ducklake:' + spec)}' AS {ALIAS} ({', '.join(options)})")
    except duckdb.Error as exc:
        msg = _one_line(exc)
        if "version" in msg.lower() and ("newer" in msg.lower() or "unsupported" in msg.lower()):
            raise LakeError(
                f"the lake catalog in {root} was written by a newer DuckLake ({msg}): upgrade "
                "agentstream to read it"
            ) from None
        raise LakeError(f"cannot open the lake catalog {_safe(spec)}: {msg}") from None
    if not create:
        _check_layout(con, root)
    return spec


def _check_layout(con: duckdb.DuckDBPyConnection, root: Path) -> None:
    try:
        row = con.execute(f"SELECT max(layout) FROM {ALIAS}.{INFO}").fetchone()
    except duckdb.Error:
        return
    if row is not None and row[0] is not None and int(row[0]) > LAYOUT_VERSION:
        raise LakeError(
            f"the lake in {root} has layout version {row[0]}, newer than this agentstream's "
            f"{LAYOUT_VERSION}: upgrade agentstream to read it"
        )


def _safe(spec: str) -> str:
    """``spec`` without a password."""
    return " ".join(p for p in spec.split() if not p.lower().startswith("password="))


def catalog_label(spec: str) -> str:
    """``spec`` for people: which database holds the catalog (no password)."""
    kind, _, rest = spec.partition(":")
    return f"PostgreSQL catalog {_safe(rest)}" if kind == "postgres" else f"SQLite catalog {rest}"


def _sql_text(text: str) -> str:
    return text.replace("'", "''")


# Commits of one process go one at a time: with the SQLite catalog a second concurrent
# committer fails with "database is locked", and maintenance shares the worker's process.
_COMMIT_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_LOCK = threading.Lock()


def commit_lock(spec: str) -> threading.Lock:
    with _LOCKS_LOCK:
        return _COMMIT_LOCKS.setdefault(spec, threading.Lock())


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection, spec: str) -> Iterator[None]:
    """One catalog transaction on ``con``, serialised with this process's other commits."""
    with commit_lock(spec):
        con.execute("BEGIN")
        try:
            yield
            con.execute("COMMIT")
        except BaseException:
            with suppress(duckdb.Error):  # a failed COMMIT already ended the transaction
                con.execute("ROLLBACK")
            raise


class LakeWriter:
    """The writing side of one process: creates the tables, commits flushes, reads positions."""

    def __init__(
        self,
        data_dir: Path,
        tables: Sequence[LakeTable],
        views: Sequence[tuple[str, str]] = (),
        catalog: str = "",
    ) -> None:
        self.root = Path(data_dir).absolute()
        self.tables = {t.name: t for t in tables}
        self.root.mkdir(parents=True, exist_ok=True)
        data_path(self.root).mkdir(exist_ok=True)
        # A DuckDB connection is not safe to use from two threads at once, and the worker
        # calls a writer from its event loop and its executor threads (a position read while
        # a flush's transaction is open would also run inside that transaction): every use
        # of ``con`` holds this lock, taken before the process's commit lock.
        self._use = threading.RLock()
        self._catalog = catalog
        self.con, self.spec = self._open()
        if self.spec.startswith("sqlite:"):
            _wal(Path(self.spec.split(":", 1)[1]))
        else:
            (self.root / CATALOG_POINTER).write_text(_safe(self.spec) + "\n")
        self.label = catalog_label(self.spec)
        self._prepare(views)

    def _open(self) -> tuple[duckdb.DuckDBPyConnection, str]:
        con = lake_connection()
        # Dates of the partitions are UTC dates, whatever the machine's zone.
        con.execute("SET TimeZone = 'UTC'")
        for attempt in range(5):
            try:
                return con, attach(con, self.root, self._catalog, read_only=False, create=True)
            except LakeError:
                # Two writers creating a new catalog at once: the loser retries and finds it.
                if attempt == 4:
                    con.close()
                    raise
                time.sleep(0.5 + attempt)
        raise AssertionError("unreachable")

    def _reopen(self) -> None:
        """A fresh connection after a failed transaction. The failed one is not used again:
        DuckLake's state after a refused or broken COMMIT is its own business (a worker that
        went on with the same connection after a conflict crashed in the extension, twice
        with three workers on one lake). If the catalog cannot be reached, the old one stays
        and the next flush tries again."""
        try:
            con, _ = self._open()
        except (LakeError, duckdb.Error):
            return
        with suppress(duckdb.Error):
            self.con.close()
        self.con = con

    def _prepare(self, views: Sequence[tuple[str, str]]) -> None:
        """Create missing tables and columns, the position tables, and the views."""
        if self._up_to_date(views):
            return  # a restart: nothing to create (DDL commits would cost the start-up)
        for attempt in range(3):
            try:
                with transaction(self.con, self.spec):
                    self._create(views)
                # Tables whose rows are replaced (``replace_by``) by several writers at once
                # (the hop outbox: one row per ingest process) need the same.
                replaced = [t.name for t in self.tables.values() if t.replace_by]
                with transaction(self.con, self.spec):
                    for name in (POSITIONS, CHECKPOINTS, *replaced):
                        # Rows in files, not inlined in the catalog: DuckLake finds update
                        # conflicts per data file, but per table for inlined rows. Each
                        # writer's rows then sit in files of their own, so writers of other
                        # partitions do not conflict.
                        self.con.execute(
                            f"CALL {ALIAS}.set_option('data_inlining_row_limit', 0, "
                            f"table_name => '{name}')"
                        )
                return
            except duckdb.Error as exc:
                # Two writers starting at once race to create the tables: the loser retries.
                if attempt == 2:
                    raise LakeError(f"cannot create the lake tables: {_one_line(exc)}") from None

    def _up_to_date(self, views: Sequence[tuple[str, str]]) -> bool:
        """Whether every table, column and view is there already."""
        columns = {
            (r[0], r[1])
            for r in self.con.execute(
                "SELECT table_name, column_name FROM duckdb_columns() WHERE database_name = ?",
                [ALIAS],
            ).fetchall()
        }
        wanted = {(t.name, f.name) for t in self.tables.values() for f in t.schema}
        wanted |= {(POSITIONS, "next_offset"), (CHECKPOINTS, "seq"), (INFO, "layout")}
        wanted |= {(name, "event_id") for name, _ in views}
        return wanted <= columns

    def _create(self, views: Sequence[tuple[str, str]]) -> None:
        con = self.con
        existing = {
            r[0]: r[1]
            for r in con.execute(
                "SELECT table_name, list(column_name) FROM duckdb_columns() "
                f"WHERE database_name = '{ALIAS}' GROUP BY table_name"
            ).fetchall()
        }
        for t in self.tables.values():
            con.register("_empty", t.schema.empty_table())
            if t.name not in existing:
                con.execute(
                    f"CREATE TABLE {ALIAS}.{t.name} AS SELECT *, NULL::DATE AS date "
                    "FROM _empty LIMIT 0"
                )
                con.execute(f"ALTER TABLE {ALIAS}.{t.name} SET PARTITIONED BY (date)")
            else:
                for f in t.schema:
                    if f.name not in existing[t.name]:
                        typ = con.sql(f'SELECT "{f.name}" FROM _empty').types[0]
                        con.execute(f'ALTER TABLE {ALIAS}.{t.name} ADD COLUMN "{f.name}" {typ}')
            con.unregister("_empty")
        if POSITIONS not in existing:
            con.execute(
                f"CREATE TABLE {ALIAS}.{POSITIONS} (topic VARCHAR, partition INTEGER, "
                "next_offset BIGINT, group_id VARCHAR, updated_at TIMESTAMPTZ)"
            )
        if CHECKPOINTS not in existing:
            con.execute(
                f"CREATE TABLE {ALIAS}.{CHECKPOINTS} (lineage VARCHAR, seq BIGINT, "
                "group_id VARCHAR, updated_at TIMESTAMPTZ)"
            )

        for name, sql in views:
            con.execute(f"CREATE OR REPLACE VIEW {ALIAS}.{name} AS {sql}")
        if INFO not in existing:
            con.execute(f"CREATE TABLE {ALIAS}.{INFO} (layout INTEGER, created_at TIMESTAMPTZ)")
            con.execute(f"INSERT INTO {ALIAS}.{INFO} VALUES ({LAYOUT_VERSION}, now())")
        con.execute(f"CALL {ALIAS}.set_option('parquet_compression', 'zstd')")

    def positions(self, topic: str) -> dict[int, int]:
        """The stored next offset of every partition of ``topic``."""
        with self._use:
            rows = self.con.execute(
                f"SELECT partition, max(next_offset) FROM {ALIAS}.{POSITIONS} WHERE topic = ? "
                "GROUP BY partition",
                [topic],
            ).fetchall()
        return {int(p): int(o) for p, o in rows}

    def claim(self, topic: str, partitions: dict[int, int], group_id: str) -> None:
        """Store a first position for partitions that have none (so flushes only update).

        Checked by reading the positions back: a claim committed at the same moment as
        another worker's was seen to leave no row (two ingest processes of one parent,
        assigned together; CI, 2026-12-05), and a partition without a row fences every
        flush of it for good. Such a claim is made again; raises ``LakeError`` if the rows
        are still missing after ``CLAIM_ATTEMPTS``.
        """
        for _ in range(CLAIM_ATTEMPTS):
            known = set(self.positions(topic))
            new = {p: o for p, o in partitions.items() if p not in known}
            if not new:
                return
            self._insert_claims(topic, new, group_id)
        raise LakeError(
            f"partitions {sorted(new)} of {topic} have no position in the lake after "
            f"{CLAIM_ATTEMPTS} claims: check the catalog ({self.label})"
        )

    def _insert_claims(self, topic: str, new: dict[int, int], group_id: str) -> None:
        claims = _values("c(topic, part, first, grp)", "VARCHAR INTEGER BIGINT VARCHAR", len(new))
        params = [
            x for part, offset in sorted(new.items()) for x in (topic, part, offset, group_id)
        ]
        with self._use, transaction(self.con, self.spec):
            # Another worker may have claimed one since ``positions`` (workers starting
            # together): its row stands. Claims in flight at the same moment can still both
            # land (equal rows, moved together by flushes); a claim that lands after the
            # other's first flush leaves a row below the partition's position, which nothing
            # reads (the position is the highest row). One statement for all partitions
            # (see ``_move_positions``).
            self.con.execute(
                f"INSERT INTO {ALIAS}.{POSITIONS} SELECT c.topic, c.part, c.first, c.grp, now() "
                f"FROM {claims} WHERE NOT EXISTS (SELECT 1 FROM {ALIAS}.{POSITIONS} AS k "
                "WHERE k.topic = c.topic AND k.partition = c.part)",
                params,
            )

    def checkpoints(self) -> dict[str, int]:
        """The window-state snapshot each lineage committed last."""
        with self._use:
            rows = self.con.execute(
                f"SELECT lineage, max(seq) FROM {ALIAS}.{CHECKPOINTS} GROUP BY lineage"
            ).fetchall()
        return {str(lineage): int(seq) for lineage, seq in rows}

    def commit(self, flush: Flush, on_conflict: Callable[[], object] | None = None) -> None:
        """Land ``flush`` in one transaction, or nothing of it.

        Tables of more than ``INLINE_ROWS`` rows are written as Parquet files by
        ``sinks.datafiles`` first (in parallel, outside the transaction and its lock), then
        registered in the transaction; smaller ones are inserted, and DuckLake keeps their
        rows in the catalog until maintenance flushes them to a file.

        A commit refused because another writer committed first (``is_conflict``) is tried
        again with the same files, up to ``COMMIT_ATTEMPTS`` times (``on_conflict`` is called
        each time): the caller would otherwise compute and write the whole flush again (with
        two processes on one lake, a conflict in one flush of four did that).

        Raises ``Fenced`` (nothing landed) if a position is no longer the one expected.
        """
        tables = {name: self.tables[name] for name in flush.rows}
        big = [
            name
            for name, rows in flush.rows.items()
            if rows.num_rows > INLINE_ROWS and _dates_known(rows, tables[name].time_column)
        ]
        files = dict(zip(big, self._write(flush, big), strict=True))
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            with self._use:
                try:
                    self._land(flush, tables, files)
                    return
                except BaseException as exc:
                    self._reopen()
                    if not (is_conflict(exc) and attempt < COMMIT_ATTEMPTS):
                        self._discard_unlanded(files)
                        raise
            log.info("lake commit conflicted with another writer's; retrying")
            if on_conflict is not None:
                on_conflict()
            time.sleep(random.uniform(0.02, 0.15))  # not in step with the other writer

    def _land(
        self, flush: Flush, tables: dict[str, LakeTable], files: dict[str, list[Path]]
    ) -> None:
        con = self.con
        with transaction(con, self.spec):
            self._move_positions(flush)
            for name, rows in flush.rows.items():
                if name in files:
                    self._register(tables[name], rows, files[name])
                elif rows.num_rows:
                    self.insert(tables[name], rows)
            for lineage, seq in sorted(flush.checkpoints.items()):
                done = con.execute(
                    f"UPDATE {ALIAS}.{CHECKPOINTS} SET seq = ?, updated_at = now() "
                    "WHERE lineage = ?",
                    [seq, lineage],
                ).fetchone()
                if done is None or done[0] == 0:
                    con.execute(
                        f"INSERT INTO {ALIAS}.{CHECKPOINTS} VALUES (?, ?, ?, now())",
                        [lineage, seq, flush.group_id],
                    )

    def _move_positions(self, flush: Flush) -> None:
        """Move every partition of ``flush`` from its expected offset to its next one, or
        raise ``Fenced``.

        One check and one UPDATE for all partitions: each statement on a DuckLake table reads
        the table through the catalog (~20 ms here), and an UPDATE a partition cost 0.1 s a
        flush for 4 partitions and half a second for 24. A writer that lands the same
        partition between the check and the COMMIT deletes the same rows: DuckLake refuses
        the later commit as a conflict, and its retry finds the partition moved (fenced).
        """
        if not flush.positions:
            return
        moves = sorted(flush.positions.items())
        params = [x for (t, p), (e, n) in moves for x in (t, p, e, n, flush.group_id)]
        moving = _values(
            "m(topic, part, expected, nxt, grp)",
            "VARCHAR INTEGER BIGINT BIGINT VARCHAR",
            len(moves),
        )
        found = {
            (str(t), int(p))
            for t, p in self.con.execute(
                f"SELECT DISTINCT k.topic, k.partition FROM {ALIAS}.{POSITIONS} AS k, {moving} "
                "WHERE k.topic = m.topic AND k.partition = m.part AND k.next_offset = m.expected",
                params,
            ).fetchall()
        }
        # Workers starting together may both claim a new partition (two rows, equal
        # offsets): they move together, so one or more rows a partition is the expected case.
        for (topic, part), (expected, _) in moves:
            if (topic, part) not in found:
                raise Fenced(
                    f"partition {topic}/{part} is no longer at offset {expected} in the "
                    "lake: another writer landed it"
                )
        self.con.execute(
            f"UPDATE {ALIAS}.{POSITIONS} AS k SET next_offset = m.nxt, group_id = m.grp, "
            f"updated_at = now() FROM {moving} WHERE k.topic = m.topic "
            "AND k.partition = m.part AND k.next_offset = m.expected",
            params,
        )

    def _discard_unlanded(self, files: dict[str, list[Path]]) -> None:
        """After a failed transaction: remove its files that the catalog does not list.

        Asking the catalog, not reading the error: a COMMIT that failed may still have landed
        (the connection lost after it). If the catalog cannot tell (unreachable), the files
        stay, and maintenance deletes them as orphans unless they are in the lake.
        """
        if not any(files.values()):
            return
        try:
            listed = {
                Path(str(r[0])).name
                for name in files
                for r in self.con.execute(
                    f"SELECT data_file FROM ducklake_list_files('{ALIAS}', ?)", [name]
                ).fetchall()
            }
        except duckdb.Error:
            return
        datafiles.discard(p for paths in files.values() for p in paths if p.name not in listed)

    def _write(self, flush: Flush, names: Sequence[str]) -> list[list[Path]]:
        """The Parquet files of tables ``names`` of ``flush``, written side by side."""
        folder = data_path(self.root)
        jobs = []
        for name in names:
            table = self.tables[name]
            rows = datafiles.dated(
                datafiles.conform(flush.rows[name], table.schema), table.time_column
            )
            jobs.append((datafiles.table_folder(folder, name), rows))
        return datafiles.write(jobs)

    def _register(self, table: LakeTable, rows: pa.Table, files: Sequence[Path]) -> None:
        """Make ``files`` (``rows`` written by ``_write``) part of ``table`` in this
        transaction, replacing the rows they supersede."""
        if table.replace_by:
            self._delete_replaced(table, rows)
        paths = ", ".join(f"'{_sql_text(str(p))}'" for p in files)
        # allow_missing: like INSERT BY NAME, columns the lake has and this writer does not
        # know (added by a newer agentstream) read as null.
        self.con.execute(
            f"CALL ducklake_add_data_files('{ALIAS}', '{table.name}', [{paths}], "
            "allow_missing => true)"
        )

    def append(self, name: str, rows: pa.Table) -> None:
        """Land ``rows`` in table ``name``, in a transaction of their own."""
        self.commit(Flush(rows={name: rows}))

    def insert(self, table: LakeTable, rows: pa.Table) -> None:
        con = self.con
        if table.replace_by:
            self._delete_replaced(table, rows)
        con.register("_rows", rows)
        try:
            con.execute(
                f"INSERT INTO {ALIAS}.{table.name} BY NAME SELECT *, "
                f'CAST("{table.time_column}" AS DATE) AS date FROM _rows'
            )
        finally:
            con.unregister("_rows")

    def _delete_replaced(self, table: LakeTable, rows: pa.Table) -> None:
        """Delete the rows of ``table`` that have the key (``replace_by``) of one of ``rows``."""
        keys = ", ".join(f'"{k}"' for k in table.replace_by)
        self.con.register("_replacing", rows.select(list(table.replace_by)))
        try:
            self.con.execute(
                f"DELETE FROM {ALIAS}.{table.name} WHERE ({keys}) IN "
                f"(SELECT ({keys}) FROM _replacing)"
            )
        finally:
            self.con.unregister("_replacing")

    def close(self) -> None:
        with self._use:
            self.con.close()


def _values(alias: str, types: str, rows: int) -> str:
    """A ``VALUES`` list of ``rows`` rows of typed parameters, named ``alias(columns)``.

    Typed: DuckDB cannot infer a parameter's type inside ``VALUES``.
    """
    row = "(" + ", ".join(f"?::{t}" for t in types.split()) + ")"
    return f"(VALUES {', '.join(row for _ in range(rows))}) AS {alias}"


def _dates_known(rows: pa.Table, time_column: str) -> bool:
    """Whether every row has the time its partition comes from (else DuckDB places them)."""
    return time_column in rows.column_names and rows[time_column].null_count == 0


def _wal(path: Path) -> None:
    """Put the SQLite catalog in WAL mode: readers then never block a commit (persistent)."""
    with sqlite3.connect(path, timeout=30) as db:
        db.execute("PRAGMA journal_mode=WAL")
    db.close()
