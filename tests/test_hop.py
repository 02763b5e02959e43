"""The repartition hop split by key: the same metrics from one aggregate shard or several.

A model of the two stages without Kafka: an ingest aggregator updated and drained batch by
batch, its partials split by ``streams.hop.messages`` over N partitions, one aggregate shard
per partition merging what it gets and keeping the levels it owns (``owned_metrics``). The
union over the shards must be exactly what one shard emits: every window, key and level once,
with the same values (late events included).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.generate import TrafficConfig, generate
from streams import hop
from streams.windows import WindowAggregator
from tests.test_windows import _tables

LATENESS_S = 120.0


@pytest.fixture(scope="module")
def batches() -> list[pa.Table]:
    config = TrafficConfig(
        events=12_000, seed=5, rate_per_s=4.0, late_fraction=0.02, late_delay_s=300.0
    )
    events = list(generate(config))
    return [_tables(events[at : at + 700], at) for at in range(0, len(events), 700)]


def _us(when: datetime) -> int:
    return int((when - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds() * 1_000_000)


def _through_the_hop(batches: Sequence[pa.Table], partitions: int) -> pa.Table:
    upstream = WindowAggregator(60, LATENESS_S)
    shards = [WindowAggregator(60, LATENESS_S) for _ in range(partitions)]
    emitted = []
    offset = 0
    for batch in batches:
        now = pc.max(batch["ts"]).as_py()
        upstream.update(batch, now=now)
        partial = upstream.drain()
        upstream.close_due(now=now)
        ranges = {0: (offset, offset + batch.num_rows)}
        offset += batch.num_rows
        sent = hop.messages(ranges, 1, {0: _us(now)}, partial, None, None, partitions)
        assert sorted({r for r, _ in sent}) == list(range(partitions))  # every one: its clock
        for r, payload in sent:
            message = hop.decode(payload)
            assert message.target == r
            if message.windows is not None:
                shards[r].merge(message.windows)
        for r, shard in enumerate(shards):
            emitted.append(hop.owned_metrics(shard.close_due(now=now), r, partitions))
    for r, shard in enumerate(shards):
        emitted.append(hop.owned_metrics(shard.flush_all(), r, partitions))
    return pa.concat_tables(emitted).sort_by("metric_id")


@pytest.mark.parametrize("partitions", [2, 3, 7])
def test_shards_emit_what_one_shard_emits(batches: list[pa.Table], partitions: int) -> None:
    one = _through_the_hop(batches, 1)
    split = _through_the_hop(batches, partitions)
    assert one.num_rows > 500 and pc.sum(one["late_events"]).as_py() > 0
    assert set(one["level"].to_pylist()) == {"key", "agent", "tenant"}
    assert pc.count_distinct(split["metric_id"]).as_py() == split.num_rows  # each row once
    assert split.equals(one)


def test_every_agent_and_tenant_has_one_owner() -> None:
    import polars as pl

    keys = pl.Series([f"agent-{i}" for i in range(200)] + [None])
    owners = hop.owners(keys, 5)
    assert owners.to_list() == [hop.partition_of(k, 5) for k in keys.to_list()]
    assert set(owners.to_list()) == set(range(5))  # 200 keys reach every partition
