"""Publishing agent events to Kafka, for agent runtimes and ``agentstream publish``.

Every event is validated before it leaves the process, so a bad event raises ``InvalidEvent``
at the call site instead of ending up in the dead-letter topic. Events are keyed by task (or
session, or agent) so one task's events land in one partition and keep their order. Bulk
publishing builds Kafka record batches per partition directly, which is several times faster
than one ``send`` per event.

    async with Publisher(Settings.load()) as pub:
        await pub.publish({"type": "task", "event_id": "e1", ...})

    with SyncPublisher(Settings.load()) as pub:
        pub.publish_many(events)
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Iterable, Sequence
from concurrent.futures import Future
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TypeVar

from aiokafka.errors import KafkaError

from pipeline import schema
from pipeline.config import Settings
from pipeline.kafka import send_batches, start_producer, unreachable

T = TypeVar("T")
Event = schema.AgentEvent | dict[str, Any]


def event_key(event: schema.AgentEvent) -> bytes:
    """The partitioning key: task, else session, else agent, so related events stay in order."""
    return (event.task_id or event.session_id or event.agent_id).encode()


def release_event(
    *,
    agent_id: str,
    dimension: str,
    candidate: str,
    baseline: str,
    traffic_share: float = 1.0,
    stage: str = "started",
    release_id: str | None = None,
    tenant_id: str | None = None,
    ts: datetime | None = None,
) -> schema.Release:
    """A validated ``release`` event; raises ``InvalidEvent`` naming the bad field.

    ``release_id`` defaults to ``agent[/tenant]:dimension:baseline->candidate``, so the
    ``started`` and ``ended`` records of one rollout share it; ``ts`` defaults to now. The
    ``event_id`` is derived from the release id, stage and share: a retried announcement
    is a repeat the worker recognises, a new share (a ramp) is not.
    """
    scope = agent_id if tenant_id is None else f"{agent_id}/{tenant_id}"
    rid = release_id or f"{scope}:{dimension}:{baseline}->{candidate}"
    data = {
        "type": "release",
        "event_id": f"release:{rid}:{stage}:{traffic_share:g}",
        "schema_version": schema.SCHEMA_VERSION,
        "ts": (ts or datetime.now(UTC)).isoformat(),
        "agent_id": agent_id,
        "tenant_id": tenant_id,
        "release_id": rid,
        "dimension": dimension,
        "candidate": candidate,
        "baseline": baseline,
        "traffic_share": traffic_share,
        "stage": stage,
    }
    event = schema.from_dict(data)
    assert isinstance(event, schema.Release)
    return event


def _validated(event: Event) -> schema.AgentEvent:
    return schema.from_dict(event) if isinstance(event, dict) else schema.check_clock(event)


class Publisher:
    """Async publisher of validated agent events."""

    def __init__(
        self, settings: Settings, *, topic: str | None = None, linger_ms: int = 10
    ) -> None:
        self.settings = settings
        self.topic = topic or settings.events_topic
        self._linger_ms = linger_ms
        self._producer: Any = None
        self.published = 0

    async def start(self) -> None:
        """Connect to the broker; raises ``BrokerUnavailable`` with what to do if it cannot."""
        self._producer = await start_producer(self.settings, linger_ms=self._linger_ms)

    async def stop(self) -> None:
        """Deliver what is buffered, then disconnect."""
        if self._producer is not None:
            await self._producer.stop()

    async def __aenter__(self) -> Publisher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def publish(self, event: Event) -> None:
        """Validate and send one event; returns once the broker has acknowledged it."""
        ev = _validated(event)
        fut = await self._producer.send(self.topic, schema.encode(ev), key=event_key(ev))
        await fut
        self.published += 1

    async def publish_many(self, events: Iterable[Event]) -> int:
        """Validate and send many events in per-partition batches; returns how many were sent.

        All events are validated first, so an invalid one raises before anything is sent.
        """
        encoded = [(event_key(ev), schema.encode(ev)) for ev in map(_validated, events)]
        return await self.publish_raw(encoded)

    async def publish_release(
        self,
        *,
        agent_id: str,
        dimension: str,
        candidate: str,
        baseline: str,
        traffic_share: float = 1.0,
        stage: str = "started",
        release_id: str | None = None,
        tenant_id: str | None = None,
        ts: datetime | None = None,
    ) -> schema.Release:
        """Announce that ``candidate`` starts (or stops) serving part of an agent's traffic.

        Builds and validates a ``release`` event (see ``release_event``) and publishes it on
        the events topic, so the worker compares the candidate with ``baseline`` from ``ts``
        on. Returns the event; raises ``InvalidEvent`` for a bad value.
        """
        event = release_event(
            agent_id=agent_id,
            dimension=dimension,
            candidate=candidate,
            baseline=baseline,
            traffic_share=traffic_share,
            stage=stage,
            release_id=release_id,
            tenant_id=tenant_id,
            ts=ts,
        )
        await self.publish(event)
        return event

    async def publish_raw(self, records: Sequence[tuple[bytes, bytes]]) -> int:
        """Send already validated ``(key, JSON value)`` pairs in per-partition batches."""
        if not records:
            return 0
        pending = await send_batches(self._producer, self.topic, ((k, v, []) for k, v in records))
        try:
            await asyncio.gather(*pending)
        except KafkaError as exc:
            raise unreachable(self.settings, exc) from None
        self.published += len(records)
        return len(records)


class SyncPublisher:
    """Blocking wrapper around ``Publisher`` for synchronous agent code.

    Runs an event loop on a background thread; safe to share between threads.
    """

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        try:
            self._pub: Publisher = self._run(self._make(settings, kwargs))
        except BaseException:
            self._stop_loop()
            raise

    async def _make(self, settings: Settings, kwargs: dict[str, Any]) -> Publisher:
        pub = Publisher(settings, **kwargs)
        await pub.start()
        return pub

    def _run(self, coro: Awaitable[T]) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        return fut.result()

    def publish(self, event: Event) -> None:
        """Validate and send one event, waiting for the broker's acknowledgement."""
        self._run(self._pub.publish(event))

    def publish_many(self, events: Iterable[Event]) -> int:
        """Validate and send many events in batches; returns how many were sent."""
        return self._run(self._pub.publish_many(list(events)))

    def publish_release(self, **release: Any) -> schema.Release:
        """``Publisher.publish_release``, blocking until the broker has acknowledged it."""
        return self._run(self._pub.publish_release(**release))

    def close(self) -> None:
        """Deliver buffered events and stop the background loop."""
        try:
            self._run(self._pub.stop())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> SyncPublisher:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
