"""The aggregate stage: window partials in; metrics, anomalies, verdicts and budgets out.

The ingest stage (``streams.ingest``, any number of workers) hands each flush's window
partials, spend and release records on through the repartition topic (``streams.hop``). This
stage owns the state that needs all of a key: it merges the partials into the open windows,
closes a window once every partition of the events topic has reported an event clock past
it (the minimum over them), and runs the drift detectors, alert rules, release judge and
budget tracker on the closed windows. One flush of a repartition partition: (1) its messages
applied once each (``Shard.apply``: per source partition, the next offset applied), due
windows closed and judged, (2) metrics, anomalies and verdicts acknowledged by the broker,
(3) the shard's state saved (``streams.state``), (4) one lake transaction: the rows, the next
offset of the repartition partition and the snapshot's number, (5) the offset committed to
Kafka too. The state moves with its partition: a new owner (after a rebalance or the owner's
death) reads the lake's position and restores the snapshot the lake names, so every partial
counts once and every window closes once, whichever worker owns it.

The state is split by key over the repartition topic's partitions (``aggregate_partitions``,
default 2), like a stream engine's tasks: a partition's shard owns the key and agent levels,
detectors, releases and agent budgets of the agents hashed to it, and the tenant level and
tenant budgets of the tenants hashed to it (``streams.hop.split``). Each shard is the same
computation whichever worker runs it, so the answers depend on the number of partitions,
never on the number of workers; up to that many workers share the stage.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pyarrow as pa
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord
from mode import Service

from pipeline.config import Settings
from pipeline.kafka import Headers, send_batches, start_producer
from sinks.catalog import (
    ANOMALIES,
    BUDGETS,
    METRICS,
    RELEASE_VERDICTS,
    QueryError,
    connect,
    prepare,
)
from sinks.lake import Fenced, Flush
from streams import hop
from streams.budgets import BudgetTracker, load_budgets
from streams.detect import ANOMALIES_SCHEMA, DriftDetector, anomaly_records
from streams.explain import explain
from streams.releases import JudgeConfig, ReleaseJudge, verdict_records
from streams.rules import RuleEngine, load_rules
from streams.stage import (
    KafkaCommits,
    Stopwatch,
    group_consumer,
    pause_after_failure,
    stop_stage,
)
from streams.state import SnapshotStore
from streams.telemetry import WorkerTelemetry
from streams.warmstart import history_lookup, metrics_history
from streams.windows import DIMENSIONS, METRICS_SCHEMA, WindowAggregator, metric_records

log = logging.getLogger("agentstream.aggregate")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
BUDGET_STATUS_EVERY_S = 10.0
# Hop messages applied in one flush at most. A flush's tables (metrics rows, derived records)
# grow with the messages it takes: behind a backlog, taking all that waited made each flush
# bigger than the last (a 10M-event backlog peaked at 3.9 GB). In backlog each message is an
# ingest flush's partials (~4,000 metrics rows at 50 events/s of event time).
HOP_MESSAGES_PER_FLUSH = 8
# A flush that closes nothing (clocks and partials only) lands its shards' positions at most
# this often: every shard a commit per ingest flush made the catalog's lock the bottleneck
# with several workers. Until then the messages stay applied in memory and are kept, so a
# failed or lost flush applies them again from the last landed state.
QUIET_LAND_EVERY_S = 5.0
# Live (event time within LIVE_WITHIN of the wall clock), what waits here is landed at most
# FLUSH_GAP_S after the previous flush, so a window closes as soon as the last clock past it
# arrives rather than up to ``flush_interval_s`` later (the ingest stage batches already: a
# hop message is a whole flush's partials). Replaying a backlog, nobody waits on a window,
# and fewer, larger transactions leave the lake's commits to the landing.
FLUSH_GAP_S = 0.2
LIVE_WITHIN = timedelta(minutes=5)


class ShardState(msgspec.Struct, frozen=True):
    """What a snapshot of one repartition partition's state holds."""

    windows: bytes
    detector: bytes
    budgets: bytes
    releases: bytes
    rules: bytes
    progress: dict[int, int]  # source partition -> next events offset applied
    chunks: dict[str, list[int]]  # a message being applied chunk by chunk: chunks applied
    clocks: dict[int, int]  # source partition -> event clock reported (us)
    sources: int
    partition: int = 0  # which shard of how many: what it owns (``streams.hop.split``)
    partitions: int = 1


class Shard:
    """The aggregate state of one repartition partition: windows, detectors, rules, releases,
    budgets, and what it has applied of every source partition."""

    def __init__(self, settings: Settings, partition: int = 0, partitions: int = 1) -> None:
        self.settings = settings
        self.partition = partition
        self.partitions = partitions
        self.windows = WindowAggregator(settings.window_seconds, settings.allowed_lateness_s)
        self.detector = DriftDetector()
        self.budgets = BudgetTracker(
            [
                b
                for b in load_budgets(settings.budgets)
                if hop.partition_of(b.id, partitions) == partition
            ]
        )
        self.judge = ReleaseJudge(self._judge_config())
        self.rules = RuleEngine(load_rules(settings.rules))
        self.progress: dict[int, int] = {}
        self.chunks: dict[str, list[int]] = {}
        self.clocks: dict[int, int] = {}
        self.sources = 0

    def _judge_config(self) -> JudgeConfig:
        # The judge keeps latency histograms per window: they must be the metrics' windows.
        return JudgeConfig(window_s=self.settings.window_seconds)

    def snapshot(self) -> bytes:
        return msgspec.msgpack.encode(
            ShardState(
                self.windows.snapshot(),
                self.detector.snapshot(),
                self.budgets.snapshot(),
                self.judge.snapshot(),
                self.rules.snapshot(),
                dict(self.progress),
                {k: list(v) for k, v in self.chunks.items()},
                dict(self.clocks),
                self.sources,
                self.partition,
                self.partitions,
            )
        )

    @classmethod
    def restore(cls, settings: Settings, data: bytes) -> Shard:
        state = msgspec.msgpack.decode(data, type=ShardState)
        shard = cls(settings, state.partition, state.partitions)
        shard.windows = WindowAggregator.restore(state.windows)
        try:
            shard.detector = DriftDetector.restore(state.detector)
        except ValueError as exc:
            # A snapshot of another version (an upgrade): fresh detectors, primed from the
            # lake, instead of a worker that cannot start.
            log.warning("detector state not restored (%s): priming new detectors", exc)
            shard.prime(rules=False)
        if state.budgets:
            shard.budgets.restore(state.budgets)
        shard.judge = ReleaseJudge.restore(state.releases, shard._judge_config())
        if state.rules:
            shard.rules.restore(state.rules)
        shard.progress = dict(state.progress)
        shard.chunks = {k: list(v) for k, v in state.chunks.items()}
        shard.clocks = dict(state.clocks)
        shard.sources = state.sources
        return shard

    def prime(self, *, rules: bool, history: Callable[[], pa.Table | None] | None = None) -> None:
        """Feed the last windows of the keys it owns in the lake to the detectors (and rules);
        ``history`` reads them (one read shared by every shard of a start)."""
        read = history() if history is not None else warm_start_history(self.settings)
        if read is None:
            return
        mine = hop.owned_metrics(read, self.partition, self.partitions)
        if mine.num_rows:
            newest = mine["window_end"][-1].as_py()
            # What these windows raised was published when they closed (same ids): drop it.
            self.detector.observe(mine, detected_at=newest)
            if rules:
                self.rules.observe(mine, detected_at=newest)
            log.info(
                "warm start: %d metrics rows from the lake up to %s primed %d keys",
                mine.num_rows,
                newest.isoformat(),
                self.detector.tracked_keys(),
            )

    # ----------------------------------------------------------------------------------
    # applying the hop's messages
    # ----------------------------------------------------------------------------------

    def apply(self, message: hop.HopMessage) -> bool:
        """Apply one message unless it was applied before; returns whether it was applied.

        A message covers events offsets ``[first, next)`` of source partitions; the ranges of
        landed flushes never overlap (the lake's positions), so a message whose every range
        ends at or below the progress of its partitions is a repeat (sent again from the
        outbox, or by a producer's retry).
        """
        if message.ranges:
            if all(self.progress.get(p, -1) >= nxt for p, (_, nxt) in message.ranges.items()):
                return False
            key = ",".join(f"{p}:{lo}-{nxt}" for p, (lo, nxt) in sorted(message.ranges.items()))
            done = self.chunks.setdefault(key, [])
            if message.chunk in done:
                return False
            done.append(message.chunk)
            self._fold(message)
            if len(done) < message.chunks:
                return True  # the clock waits for the message's last chunk
            del self.chunks[key]
            for p, (_, nxt) in message.ranges.items():
                self.progress[p] = max(self.progress.get(p, nxt), nxt)
        self.sources = max(self.sources, message.sources)
        for p, clock in message.clocks.items():
            self.clocks[p] = max(self.clocks.get(p, clock), clock)  # event time only moves on
        return True

    def _fold(self, message: hop.HopMessage) -> None:
        releases = message.release_table()
        if releases is not None:
            # Releases before their windows' latencies, which the judge keeps per release.
            self.judge.register(releases)
        if message.windows is not None:
            self.windows.merge(message.windows)
            if self.judge.releases():
                self.judge.add_latency_counts(message.windows.latency_counts())
        spend = message.spend_table()
        if spend is not None and self.budgets.budgets:
            self.budgets.update(spend)

    def clock(self) -> datetime | None:
        """How far event time has got over every source partition: the minimum of what their
        ingest workers reported (None until each has reported).

        A partition's report is at most its stream time, or the clock its worker reported
        for it once caught up, and its later events are judged late on that
        (``streams.lateness``), so a window closed here is closed for every ingest worker
        too: none hands on a partial for it later (``WindowAggregator.merge`` would count one
        as late; it can happen after a takeover, as the lake keeps a partition's stream time
        but not a clock reported beyond it). Within one worker, partitions read to their end
        follow its clock (``IngestConsumer._clocks``); across workers, a quiet one holds
        windows back until its clock, which moves on with the wall clock, passes them.
        """
        if not self.sources or any(p not in self.clocks for p in range(self.sources)):
            return None
        return _EPOCH + min(self.clocks[p] for p in range(self.sources)) * _US

    # ----------------------------------------------------------------------------------
    # closing windows
    # ----------------------------------------------------------------------------------

    def close(self, telemetry: WorkerTelemetry) -> tuple[pa.Table, pa.Table, pa.Table, pa.Table]:
        """Close the due windows and judge them: metrics, anomalies (release regressions
        included), ``budget_burn`` anomalies, release verdicts."""
        now = self.clock()
        empty = ANOMALIES_SCHEMA.empty_table()
        if now is None:
            return METRICS_SCHEMA.empty_table(), empty, empty, _no_verdicts()
        metrics = hop.owned_metrics(
            self.windows.close_due(now=now), self.partition, self.partitions
        )
        detected_at = datetime.now(UTC)
        anomalies = pa.concat_tables(
            [
                self.detector.observe(metrics, detected_at=detected_at),
                self.rules.observe(metrics, detected_at=detected_at),
            ]
        )
        verdicts, regressions = self.judge.observe(metrics, detected_at=detected_at)
        if regressions.num_rows:
            anomalies = pa.concat_tables([anomalies, regressions])
        if anomalies.num_rows:
            history = history_lookup(self.settings.data_dir, metrics)
            anomalies = explain(anomalies, metrics, history)
            anomalies = _with_examples(self.settings, anomalies)
            telemetry.anomalies.inc(anomalies.num_rows)
        burns = empty
        if self.budgets.budgets:
            # Event time, like the windows: a replay forecasts and alerts exactly as before.
            burns = self.budgets.check(now, detected_at)
            telemetry.anomalies.inc(burns.num_rows)
        return metrics, anomalies, burns, verdicts


def warm_start_history(settings: Settings) -> pa.Table | None:
    """The last ``warm_start_windows`` windows of every key in the lake (None: start cold)."""
    if settings.warm_start_windows <= 0:
        return None
    try:
        return metrics_history(settings.data_dir, settings.warm_start_windows)
    except QueryError as exc:
        log.warning("warm start skipped, the lake's metrics are unreadable: %s", exc)
        return None


def _no_verdicts() -> pa.Table:
    from streams.releases import VERDICTS_SCHEMA

    return VERDICTS_SCHEMA.empty_table()


def _with_examples(settings: Settings, anomalies: pa.Table) -> pa.Table:
    """Fill ``example_event_ids`` with a few landed events of each anomaly's window and key.

    Anomalies are rare, so this reads the events of those windows from the lake (the ingest
    stage landed them before handing their partials on).
    """
    con = connect(settings.data_dir)
    examples = []
    for row in anomalies.select(["window_start", "window_end", *DIMENSIONS]).to_pylist():
        where = " AND ".join(f"{d} = ${d}" for d in DIMENSIONS if row[d] is not None)
        params = {d: row[d] for d in DIMENSIONS if row[d] is not None}
        sql = (
            "SELECT event_id FROM events WHERE ts >= $start AND ts < $end "
            "AND {where} ORDER BY ts LIMIT 5"
        ).format(where=where or "true")
        got = con.execute(sql, {**params, "start": row["window_start"], "end": row["window_end"]})
        examples.append([r[0] for r in got.fetchall()])
    index = anomalies.schema.get_field_index("example_event_ids")
    return anomalies.set_column(
        index, anomalies.schema.field(index), pa.array(examples, pa.list_(pa.string()))
    ).cast(anomalies.schema)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: AggregateConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        await self.owner.flush(land=True)
        await self.owner.release(revoked)

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        await self.owner.recover(assigned)


class AggregateConsumer(Service):
    """Consumes the repartition topic, owns the shards of the partitions it is given, lands
    and publishes what closes; runs inside the faust worker."""

    def __init__(self, settings: Settings, telemetry: WorkerTelemetry, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.telemetry = telemetry
        self.lake = prepare(settings.data_dir, settings.catalog)
        self.snapshots = SnapshotStore(settings.data_dir / ".state", settings.aggregate_group)
        self.shards: dict[int, Shard] = {}
        self._saved: dict[int, bytes] = {}  # each shard as of its last commit
        self._offsets: dict[int, int] = {}  # each partition's next offset, as landed
        self._kafka = KafkaCommits(settings.repartition_topic)  # landed, not in Kafka yet
        self._pending: dict[int, list[ConsumerRecord[bytes, bytes]]] = {}
        # Applied to a shard since its last landing (QUIET_LAND_EVERY_S), kept for a retry.
        self._unlanded: dict[int, list[ConsumerRecord[bytes, bytes]]] = {}
        self._landed_at: dict[int, float] = {}
        self._seeks: dict[int, int] = {}
        self._next: dict[int, int] = {}  # the next offset to queue, per partition
        self._gap: dict[int, int] = {}
        self._lock = asyncio.Lock()
        self._flush_lock = asyncio.Lock()
        self._flush_task: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._last_flush = time.monotonic()
        self._budgets_landed: dict[int, float] = {}  # per partition, when last landed
        self._partitions = 1  # of the repartition topic
        self._conflicts = 0
        self.healthy = False
        self.last_error: str | None = None
        self.metrics_emitted = 0
        self.applied = 0

    async def on_start(self) -> None:
        s = self.settings
        self._producer = await start_producer(s, linger_ms=5)
        self._consumer = group_consumer(s, s.aggregate_group, s.repartition_topic, _Rebalance(self))
        await self._consumer.start()
        self.healthy = True
        log.info("aggregating %s as group %s", s.repartition_topic, s.aggregate_group)

    async def on_stop(self) -> None:
        await stop_stage(
            self._flush_task, lambda: self.flush(land=True), self._consumer, self._producer
        )

    async def release(self, revoked: Sequence[TopicPartition]) -> None:
        """Forget the shards of ``revoked`` partitions: their new owner restores them."""
        async with self._flush_lock, self._lock:
            for tp in revoked:
                self.shards.pop(tp.partition, None)
                self._saved.pop(tp.partition, None)
                self._offsets.pop(tp.partition, None)
                self._pending.pop(tp.partition, None)
                self._unlanded.pop(tp.partition, None)

    def _shard(
        self,
        r: int,
        position: int,
        landed: bool,
        checkpoints: dict[str, int],
        history: Callable[[], pa.Table | None],
    ) -> tuple[Shard, bytes]:
        """Partition ``r``'s state at ``position``, restored or new, and its snapshot."""
        saved = self.snapshots.load({r: position}, checkpoints)
        if saved is not None:
            shard = Shard.restore(self.settings, saved)
            log.info(
                "partition %d: state restored at offset %d: %d open windows, %d keys watched",
                r,
                position,
                shard.windows.open_windows(),
                shard.detector.tracked_keys(),
            )
        else:
            if landed:
                log.warning(
                    "partition %d: no snapshot at the landed offset %d: windows open at "
                    "the last stop start empty",
                    r,
                    position,
                )
            shard = Shard(self.settings, r, self._partitions)
            shard.prime(rules=True, history=history)
        return shard, shard.snapshot()

    async def recover(self, assigned: Sequence[TopicPartition]) -> None:
        """Resume assigned partitions from the lake's positions and the snapshots it names."""
        async with self._flush_lock:
            await self._recover(assigned)

    async def _recover(self, assigned: Sequence[TopicPartition]) -> None:
        assert self._consumer is not None
        s = self.settings
        loop = asyncio.get_running_loop()
        stored = await loop.run_in_executor(None, self.lake.positions, s.repartition_topic)
        new = [tp for tp in assigned if tp.partition not in stored]
        first = {tp.partition: 0 for tp in new}
        if new:
            beginning = await self._consumer.beginning_offsets(new)
            first = {tp.partition: beginning[tp] for tp in new}
            await loop.run_in_executor(
                None, self.lake.claim, s.repartition_topic, first, s.aggregate_group
            )
        log.info(
            "aggregating partitions %s of %s",
            ",".join(str(tp.partition) for tp in sorted(assigned)) or "none",
            s.repartition_topic,
        )
        # Kafka's offsets (lag monitoring) may be behind the lake's after a refused commit.
        await self._kafka.commit(
            self._consumer,
            {tp.partition: stored[tp.partition] for tp in assigned if tp.partition in stored},
        )
        checkpoints = await loop.run_in_executor(None, self.lake.checkpoints)
        self._partitions = len(self._consumer.partitions_for_topic(s.repartition_topic) or [0])
        read: list[pa.Table | None] = []

        def history() -> pa.Table | None:
            if not read:
                read.append(warm_start_history(s))
            return read[0]

        for tp in assigned:
            r = tp.partition
            position = stored.get(r, first.get(r, 0))
            # In a thread: restoring or priming reads the lake and decodes the state, which
            # would hold up the ingest stage's fetches on this event loop.
            # Landed: a flush of this partition committed (a claim stores the beginning).
            landed = r in stored and position > 0
            shard, state = await loop.run_in_executor(
                None, self._shard, r, position, landed, checkpoints, history
            )
            async with self._lock:
                self.shards[r] = shard
                self._saved[r] = state
                self._offsets[r] = position
                self._pending[r] = []
                self._unlanded[r] = []
                self._landed_at[r] = time.monotonic()
                self._next[r] = position
                self._consumer.seek(tp, position)
                self._seeks[r] = self._seeks.get(r, 0) + 1

    @Service.task
    async def _consume(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        s = self.settings
        while not self.should_stop:
            seeks = dict(self._seeks)
            fetched = await consumer.getmany(timeout_ms=200, max_records=5000)
            async with self._lock:
                for tp, records in fetched.items():
                    self._take(consumer, tp, records, stale=self._seeks != seeks)
            waiting = sum(len(v) for v in self._pending.values())
            gap = FLUSH_GAP_S if self._live() else s.flush_interval_s
            due = waiting and (waiting >= 2000 or time.monotonic() - self._last_flush >= gap)
            flushing = self._flush_task is not None and not self._flush_task.done()
            # A commit to Kafka refused (a rebalance) is tried again by an idle flush too.
            idle = self._kafka.owed and time.monotonic() - self._last_flush >= s.flush_interval_s
            # Quiet rounds applied and not landed: landed after a while even with no new ones.
            now = time.monotonic()
            held = any(
                self._unlanded.get(r) and now - self._landed_at.get(r, 0.0) >= QUIET_LAND_EVERY_S
                for r in self.shards
            )
            if (due or idle or held) and not flushing:
                self._flush_task = asyncio.create_task(self.flush(land=held))

    def _live(self) -> bool:
        """Whether event time is near the wall clock in some partition owned here."""
        horizon = datetime.now(UTC) - LIVE_WITHIN
        return any(
            (c := shard.clock()) is not None and c >= horizon for shard in self.shards.values()
        )

    def _take(
        self,
        consumer: AIOKafkaConsumer,
        tp: TopicPartition,
        records: list[ConsumerRecord[bytes, bytes]],
        *,
        stale: bool,
    ) -> None:
        """Queue fetched ``records`` that continue where this worker reads on.

        The repartition topic's offsets have no gaps (no transactions, no compaction), so a
        fetch that does not start at the next offset expected was made before a seek (on
        assignment, or after a fenced flush) or skips records dropped as such: the partition
        is read again from the offset expected. A fetch racing a seek is dropped whole.
        """
        r = tp.partition
        if r not in self.shards:
            return
        nxt = self._next[r]
        fresh = [rec for rec in records if rec.offset >= nxt]
        if stale or (fresh and fresh[0].offset > nxt and self._gap.get(r) != nxt):
            self._gap[r] = nxt  # a real gap (none expected) is accepted the second time
            consumer.seek(tp, nxt)
            self._seeks[r] = self._seeks.get(r, 0) + 1
            return
        if fresh:
            self._pending[r].extend(fresh)
            self._next[r] = fresh[-1].offset + 1

    async def flush(self, *, land: bool = False) -> None:
        """Apply and close what every partition has waiting, and land it: one lake
        transaction for all the shards (a commit per shard would multiply the catalog's
        commits by the shards a worker owns), at most ``HOP_MESSAGES_PER_FLUSH`` messages a
        partition a round. A round that closes nothing lands only every
        ``QUIET_LAND_EVERY_S``.

        ``land`` (a rebalance, a stop, quiet rounds held long enough): land what was applied
        and not landed, in one transaction, and take nothing new: the messages fetched stay
        here for the next flush, or in Kafka for whoever reads the partitions next.
        (Draining them made every round of a backlog a commit, ``HOP_MESSAGES_PER_FLUSH``
        messages each, whenever quiet rounds had been held 5 s: seen in a CI run, three
        workers' commits 1-2 s each, one starved of the catalog's lock for 40 s.)"""
        async with self._flush_lock:
            self._last_flush = time.monotonic()
            while True:
                async with self._lock:
                    batches = {}
                    for r in sorted(self.shards) if not land else ():
                        waiting = self._pending.get(r, [])
                        if waiting:
                            batches[r] = waiting[:HOP_MESSAGES_PER_FLUSH]
                            self._pending[r] = waiting[HOP_MESSAGES_PER_FLUSH:]
                held = [r for r in self.shards if self._unlanded.get(r)]
                if not batches and not (land and held):
                    break
                if not await self._attempt(batches, land):
                    async with self._lock:
                        # Kept for the next attempt, ahead of what came since: the shards are
                        # back at their last landed state, so what they applied since goes too.
                        for r in set(batches) | set(held):
                            if r in self.shards:
                                again = self._unlanded.get(r, []) + batches.get(r, [])
                                self._pending[r] = again + self._pending[r]
                                self._unlanded[r] = []
                    break
                if not batches:
                    break
            assert self._consumer is not None
            await self._kafka.commit(self._consumer, {})

    async def _attempt(
        self, batches: dict[int, list[ConsumerRecord[bytes, bytes]]], land: bool
    ) -> bool:
        started = time.perf_counter()
        try:
            await self._flush(batches, land)
        except Fenced as exc:
            # Another worker owns one of these partitions now and landed it; the others
            # landed nothing either: all of them read on from the lake.
            log.error("aggregate flush not landed: %s", exc)
            self.last_error = str(exc)
            assert self._consumer is not None
            topic = self.settings.repartition_topic
            mine = {r for r in self.shards if r in batches or self._unlanded.get(r)}
            await self._recover([TopicPartition(topic, r) for r in sorted(mine)])
            return True
        except Exception as exc:
            # Nothing was committed: back to the last landing, the retry applies it all again.
            for r in self.shards:
                if (r in batches or self._unlanded.get(r)) and r in self._saved:
                    self.shards[r] = Shard.restore(self.settings, self._saved[r])
            self._conflicts += 1
            self.last_error = await pause_after_failure(
                exc, self._conflicts, self.telemetry, "aggregate flush", self.lake.label
            )
            return False
        self._conflicts = 0
        self.last_error = None
        self.telemetry.batch_seconds.observe(time.perf_counter() - started)
        return True

    async def _flush(
        self, batches: dict[int, list[ConsumerRecord[bytes, bytes]]], land: bool
    ) -> None:
        assert self._consumer is not None and self._producer is not None
        s = self.settings
        loop = asyncio.get_running_loop()
        steps = Stopwatch()

        def fold() -> tuple[int, list[tuple[pa.Table, pa.Table, pa.Table, pa.Table]]]:
            applied, closed = 0, []
            for r, batch in batches.items():
                shard = self.shards[r]
                applied += sum(shard.apply(hop.decode(record.value)) for record in batch)
                closed.append(shard.close(self.telemetry))
            return applied, closed

        applied, closed = await loop.run_in_executor(None, fold)
        self.applied += applied
        metrics = pa.concat_tables([METRICS_SCHEMA.empty_table(), *(c[0] for c in closed)])
        alerts = pa.concat_tables(
            [ANOMALIES_SCHEMA.empty_table(), *(t for c in closed for t in (c[1], c[2]))]
        )
        verdicts = pa.concat_tables([_no_verdicts(), *(c[3] for c in closed)])
        now = time.monotonic()
        statuses, budgeted = [], []
        for r, (_, anomalies, burns, _) in zip(batches, closed, strict=True):
            shard = self.shards[r]
            due = now - self._budgets_landed.get(r, 0.0) >= BUDGET_STATUS_EVERY_S
            if shard.budgets.budgets and (anomalies.num_rows or burns.num_rows or due):
                statuses.append(shard.budgets.status())
                budgeted.append(r)
        quiet = not (metrics.num_rows or alerts.num_rows or verdicts.num_rows or statuses)
        if (
            quiet
            and not land
            and all(now - self._landed_at.get(r, 0.0) < QUIET_LAND_EVERY_S for r in batches)
        ):
            for r, batch in batches.items():
                self._unlanded.setdefault(r, []).extend(batch)
            return
        # Land every shard holding applied messages, this round's and earlier quiet ones'.
        records = {
            r: self._unlanded.get(r, []) + batches.get(r, [])
            for r in self.shards
            if r in batches or self._unlanded.get(r)
        }
        shards = {r: self.shards[r] for r in records}
        steps.lap("aggregate")
        await self._publish(metrics, alerts, verdicts)
        steps.lap("publish")
        nxt = {r: recs[-1].offset + 1 for r, recs in records.items()}

        def save() -> tuple[dict[int, bytes], dict[str, int]]:
            states = {r: shard.snapshot() for r, shard in shards.items()}
            seqs = {
                f"hop{r}": self.snapshots.save(state, {r: nxt[r]}, f"hop{r}")
                for r, state in states.items()
            }
            return states, seqs

        states, seqs = await loop.run_in_executor(None, save)
        steps.lap("snapshot")
        rows = {
            METRICS.name: metrics,
            ANOMALIES.name: alerts,
            RELEASE_VERDICTS.name: verdicts,
        }
        if statuses:
            # The budgets' status is a running figure: landed every few seconds, and with alerts.
            rows[BUDGETS.name] = pa.concat_tables(statuses)
        flush = Flush(
            rows=rows,
            positions={(s.repartition_topic, r): (self._offsets[r], nxt[r]) for r in records},
            checkpoints=seqs,
            group_id=s.aggregate_group,
        )
        await loop.run_in_executor(None, self.lake.commit, flush, self.telemetry.lake_conflicts.inc)
        steps.lap("land")
        for r in records:
            await loop.run_in_executor(None, self.snapshots.committed, f"hop{r}", seqs[f"hop{r}"])
            self._offsets[r] = nxt[r]
            self._saved[r] = states[r]
            self._unlanded[r] = []
            self._landed_at[r] = now
        self._budgets_landed.update({r: now for r in budgeted})
        await self._kafka.commit(self._consumer, nxt)
        self.metrics_emitted += metrics.num_rows
        self.telemetry.metrics_emitted.inc(metrics.num_rows)
        clocks = [c for shard in shards.values() if (c := shard.clock()) is not None]
        log.info(
            "aggregate flush: %d hop messages (%d applied), %d metrics rows, %d anomalies, "
            "%d verdicts, partitions %s, event clock %s; %s",
            sum(len(b) for b in records.values()),
            applied,
            metrics.num_rows,
            alerts.num_rows,
            verdicts.num_rows,
            ",".join(f"{r}@{n}" for r, n in sorted(nxt.items())),
            min(clocks).isoformat() if clocks else "not yet",
            steps,
        )

    async def _publish(self, metrics: pa.Table, anomalies: pa.Table, verdicts: pa.Table) -> None:
        """Send derived records to their topics (one record batch per partition); wait for
        the broker. At least once: a retried flush sends the same records (same ids)."""
        assert self._producer is not None
        s = self.settings

        def encode() -> list[tuple[str, list[tuple[bytes, bytes]]]]:
            return [
                (s.metrics_topic, metric_records(metrics)),
                (s.anomalies_topic, anomaly_records(anomalies)),
                (s.verdicts_topic, verdict_records(verdicts)),
            ]

        # In a thread: tens of thousands of JSON records behind a backlog would hold up the
        # ingest stage's fetches on this event loop for seconds.
        encoded = await asyncio.get_running_loop().run_in_executor(None, encode)
        derived = [(topic, _unkeyed(records)) for topic, records in encoded]
        sends = [
            f for topic, out in derived for f in await send_batches(self._producer, topic, out)
        ]
        if sends:
            await asyncio.gather(*sends)


def _unkeyed(records: list[tuple[bytes, bytes]]) -> Iterator[tuple[bytes, bytes, Headers]]:
    """``(key, value)`` records of a derived topic as ``send_batches`` takes them (no headers)."""
    return ((key, value, []) for key, value in records)
