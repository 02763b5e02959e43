"""The repartition hop between the ingest and aggregate stages: what one ingest flush hands on.

An ingest flush (``streams.ingest``) lands its events, then sends one ``HopMessage`` (in as many
chunks as the record size needs) to every partition of the internal repartition topic: the
flush's window partials (``streams.windows.WindowPartial``: counts, sums and latency
histograms per window and key, nothing per event), its spend per minute for the budgets, its
release records, and how far its event clock has got. Rows go to the partitions owning their
agent and their tenant (``split``: a stable hash of the id); the clocks go to every one. The
aggregate stage (``streams.aggregate``) merges them, and closes a window once every partition
of the events topic has reported a clock past it (the minimum over them, as a stream engine's
watermark).

Exactly once across the hop, without Kafka transactions (the embedded Tansu broker has none):

* a message's identity is the events offsets it covers, ``ranges`` (source partition ->
  [first, next)): the lake's positions make every offset range land in exactly one flush;
* the messages of a flush are stored in the lake (``hop_outbox``) in the flush's own
  transaction, then sent; a worker that dies between the two leaves them there, and the next
  owner of those partitions sends them again before anything of its own (``pending_outbox``);
* the aggregate stage applies a range once: it keeps, per source partition, the next offset
  it has applied (``HopProgress``), in the same lake transaction as its own output.
"""

from __future__ import annotations

import io
import json
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Final

import duckdb
import msgspec
import polars as pl
import pyarrow as pa

from streams.windows import WindowPartial

# Under Kafka's default 1 MiB record limit, with room for the envelope.
MAX_CHUNK_BYTES: Final = 700 * 1024
OUTBOX_TABLE: Final = "hop_outbox"


class HopMessage(msgspec.Struct, frozen=True):
    """One chunk of what an ingest flush hands on to one repartition partition."""

    ranges: dict[int, tuple[int, int]]  # source partition -> [first offset, next offset)
    sources: int  # partitions of the events topic (whose clocks a window waits for)
    # source partition -> how far its event time has got after the flush (us): the newest
    # event read from it, or the ingest's clock for a partition read to its end
    clocks: dict[int, int]
    chunk: int = 0
    chunks: int = 1
    windows: WindowPartial | None = None
    spend: bytes = b""  # zstd Arrow IPC: per-minute spend (budgets' ``update`` rows)
    releases: bytes = b""  # zstd Arrow IPC: the flush's ``release`` events
    target: int = 0  # the repartition partition it is for (the outbox sends it there again)

    def spend_table(self) -> pa.Table | None:
        return _arrow(self.spend)

    def release_table(self) -> pa.Table | None:
        return _arrow(self.releases)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(HopMessage)


def encode(message: HopMessage) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes) -> HopMessage:
    return _decoder.decode(data)


def ipc(table: pa.Table | pl.DataFrame | None) -> bytes:
    """zstd Arrow IPC of a table (empty bytes for none or no rows)."""
    if table is None:
        return b""
    frame = table if isinstance(table, pl.DataFrame) else pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    if frame.height == 0:
        return b""
    buf = io.BytesIO()
    frame.write_ipc(buf, compression="zstd")
    return buf.getvalue()


def _arrow(data: bytes) -> pa.Table | None:
    if not data:
        return None
    return pl.read_ipc(io.BytesIO(data)).to_arrow()


def partition_of(key: str | None, partitions: int) -> int:
    """The repartition partition that owns ``key`` (an agent or tenant id): a stable hash, the
    same in every process and Python version."""
    return zlib.crc32((key or "").encode()) % partitions


def owners(keys: pl.Series, partitions: int) -> pl.Series:
    """The partition owning each of ``keys``: one hash per distinct key, not per row."""
    table = {k: partition_of(k, partitions) for k in keys.unique().drop_nulls().to_list()}
    return keys.fill_null("").replace_strict(
        {**table, "": partition_of("", partitions)}, return_dtype=pl.Int32
    )


def split(frame: pl.DataFrame, partitions: int, *, by_tenant: bool = True) -> list[pl.DataFrame]:
    """The rows of ``frame`` each partition needs: those of the agents it owns (key and agent
    levels, their detectors, releases and budgets) and, ``by_tenant``, those of the tenants
    it owns (the tenant level and tenant budgets). A row of an agent and a tenant owned by
    two partitions goes to both; each keeps only the levels it owns (``owned_metrics``)."""
    if partitions == 1:
        return [frame]
    mine = owners(frame.get_column("agent_id"), partitions)
    tenant = owners(frame.get_column("tenant_id"), partitions) if by_tenant else mine
    return [frame.filter((mine == r) | (tenant == r)) for r in range(partitions)]


def owned_metrics(metrics: pa.Table, partition: int, partitions: int) -> pa.Table:
    """The ``metrics`` rows partition ``partition`` emits: key and agent levels of its agents,
    the tenant level of its tenants (every row of a window, key and level exactly once over
    the partitions)."""
    if partitions == 1 or metrics.num_rows == 0:
        return metrics
    frame = pl.from_arrow(metrics)
    assert isinstance(frame, pl.DataFrame)
    by = pl.when(pl.col("level") == "tenant").then(pl.col("tenant_id")).otherwise("agent_id")
    keys = frame.select(by.alias("_k")).get_column("_k")
    return metrics.filter(pa.array((owners(keys, partitions) == partition).to_arrow()))


def messages(
    ranges: dict[int, tuple[int, int]],
    sources: int,
    clocks: dict[int, int],
    windows: WindowPartial | None,
    spend: pa.Table | None,
    releases: pa.Table | None,
    partitions: int,
) -> list[tuple[int, bytes]]:
    """A flush's encoded messages, ``(repartition partition, chunk)``: every partition gets
    one (its rows, and the clocks every partition's windows close on)."""
    parts = _split_partial(windows, partitions)
    spends = _split_arrow(spend, partitions, by_tenant=True)
    released = _split_arrow(releases, partitions, by_tenant=False)
    return [
        (r, chunk)
        for r in range(partitions)
        for chunk in chunked(
            ranges, sources, clocks, parts[r], ipc(spends[r]), ipc(released[r]), target=r
        )
    ]


def _split_partial(part: WindowPartial | None, partitions: int) -> list[WindowPartial | None]:
    if part is None or partitions == 1:
        return [part] * partitions
    frames = [split(f, partitions) for f in part.frames()]
    # None for a partition with no rows: four empty Arrow streams still cost ~16 KB.
    return [
        WindowPartial(*(_frame_ipc(f[r]) for f in frames))
        if any(f[r].height for f in frames)
        else None
        for r in range(partitions)
    ]


def _split_arrow(
    table: pa.Table | None, partitions: int, *, by_tenant: bool
) -> list[pa.Table | pl.DataFrame | None]:
    if table is None or table.num_rows == 0 or partitions == 1:
        return [table] * partitions
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return list(split(frame, partitions, by_tenant=by_tenant))


def message_id(message: HopMessage) -> str:
    """A readable id of a message: its ranges and chunk."""
    spans = ",".join(f"{p}:{lo}-{hi}" for p, (lo, hi) in sorted(message.ranges.items()))
    return f"{spans}#{message.chunk + 1}/{message.chunks}"


def chunked(
    ranges: dict[int, tuple[int, int]],
    sources: int,
    clocks: dict[int, int],
    windows: WindowPartial | None,
    spend: bytes,
    releases: bytes,
    *,
    target: int = 0,
) -> list[bytes]:
    """The encoded chunks of one message, each under ``MAX_CHUNK_BYTES``.

    The window partial is split by rows when it is too large; spend and releases (small: one
    row per minute and scope, a few releases) ride with the first chunk.
    """
    parts: list[WindowPartial | None] = [windows]
    while True:
        sizes = [_size(p) for p in parts]
        if max(sizes) + len(spend) + len(releases) <= MAX_CHUNK_BYTES or not _splittable(parts):
            break
        parts = [half for p in parts for half in _halves(p)]
    out = []
    for i, part in enumerate(parts):
        out.append(
            encode(
                HopMessage(
                    ranges=ranges,
                    sources=sources,
                    clocks=clocks,
                    chunk=i,
                    chunks=len(parts),
                    windows=part,
                    spend=spend if i == 0 else b"",
                    releases=releases if i == 0 else b"",
                    target=target,
                )
            )
        )
    return out


def _size(part: WindowPartial | None) -> int:
    if part is None:
        return 0
    return len(part.agg) + len(part.tools) + len(part.guard) + len(part.sketch)


def _splittable(parts: Iterable[WindowPartial | None]) -> bool:
    return any(p is not None and max(f.height for f in p.frames()) > 1 for p in parts)


def _halves(part: WindowPartial | None) -> list[WindowPartial | None]:
    """``part`` as two partials, each holding about half of every table's rows.

    A key's rows may land in both halves: partials add, so that is harmless.
    """
    if part is None:
        return [None]
    frames = part.frames()
    halves: list[WindowPartial | None] = []
    for lo in (0, 1):
        sliced = [f.slice(0, f.height // 2) if lo == 0 else f.slice(f.height // 2) for f in frames]
        halves.append(WindowPartial(*(_frame_ipc(f) for f in sliced)))
    return halves


def _frame_ipc(frame: pl.DataFrame) -> bytes:
    buf = io.BytesIO()
    frame.write_ipc(buf, compression="zstd")
    return buf.getvalue()


def outbox(data_dir: Path) -> list[tuple[str, dict[int, tuple[int, int]], list[tuple[int, bytes]]]]:
    """Every row of the lake's hop outbox: writer, ranges, and ``(partition, chunk)`` pairs."""
    from sinks.catalog import QueryError, connect

    try:
        rows = connect(data_dir).execute(f"SELECT writer, ranges, payloads FROM {OUTBOX_TABLE}")
        got = rows.fetchall()
    except (QueryError, duckdb.Error):
        return []
    out = []
    for writer, ranges, payloads in got:
        spans = {int(p): (int(lo), int(hi)) for p, (lo, hi) in json.loads(ranges).items()}
        out.append((str(writer), spans, [(decode(b).target, bytes(b)) for b in payloads]))
    return out
