"""Test helpers: unique names, a real worker process, raw Kafka access, DuckDB counts."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from pipeline.broker import free_port
from pipeline.config import Settings
from pipeline.generate import TrafficConfig, generate
from pipeline.kafka import committed_lag, ensure_pipeline_topics
from pipeline.procs import stop_group
from pipeline.schema import encode
from sinks.catalog import connect

REPO = Path(__file__).resolve().parent.parent


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive ports that were free a moment ago (the web ports
    of ``agentstream worker --processes count``)."""
    import socket

    for _ in range(100):
        first = free_port()
        socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
        try:
            for i, sock in enumerate(socks):
                sock.bind(("127.0.0.1", first + i))
            return first
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise AssertionError(f"no {count} consecutive free ports found")


def unique_settings(bootstrap: str, data_dir: Path, **changes: Any) -> Settings:
    """Settings with topics and group of their own, so tests sharing a broker never meet."""
    tag = uuid.uuid4().hex[:8]
    base = {
        "broker": bootstrap,
        "data_dir": data_dir,
        "events_topic": f"ev-{tag}",
        "dlq_topic": f"ev-{tag}-dlq",
        "metrics_topic": f"metrics-{tag}",
        "anomalies_topic": f"anomalies-{tag}",
        "verdicts_topic": f"verdicts-{tag}",
        "group_id": f"g-{tag}",
        "web_port": free_port(),
        "flush_interval_s": 0.3,
    }
    base.update(changes)
    settings = Settings.load(env={}, **base)
    ensure_pipeline_topics(settings)
    return settings


def worker_env(settings: Settings) -> dict[str, str]:
    """The environment that makes ``agentstream worker`` use ``settings``."""
    return {**os.environ, **settings.to_env(), "PYTHONPATH": str(REPO)}


@contextmanager
def running_worker(
    settings: Settings, log: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """An ``agentstream worker`` process; SIGTERM on exit (it must stop cleanly)."""
    log = log or Path(settings.data_dir).parent / f"worker-{settings.group_id}.log"
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "worker", "--loglevel", "info"],
            env=worker_env(settings),
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        if not stop_group(proc, 45):
            raise AssertionError(f"worker did not stop on SIGTERM; log: {log}")


def wait_committed(
    settings: Settings,
    total: int,
    proc: subprocess.Popen[bytes] | None = None,
    timeout: float = 120,
) -> None:
    """Block until the worker's group has committed ``total`` messages of the events topic."""
    deadline = time.monotonic() + timeout
    done = -1
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"worker exited with {proc.returncode}")
        _, done = asyncio.run(committed_lag(settings))
        if done >= total:
            return
        time.sleep(0.3)
    raise AssertionError(
        f"only {done} of {total} messages committed to Kafka after {timeout} s; the lake's "
        f"positions: {_lake_positions(settings)}"
    )


def _lake_positions(settings: Settings) -> object:
    """What the lake says was landed (per partition), to tell a landing that stopped from a
    Kafka commit that did not follow it."""
    try:
        return (
            connect(settings.data_dir)
            .execute(
                "SELECT partition, max(next_offset) FROM lake.kafka_offsets WHERE topic = $1 "
                "GROUP BY 1 ORDER BY 1",
                [settings.events_topic],
            )
            .fetchall()
        )
    except Exception as exc:  # a diagnosis only: the lake may not exist yet
        return f"unreadable ({exc})"


def produce_raw(
    settings: Settings,
    values: Sequence[bytes | None],
    keys: Sequence[bytes | None] | None = None,
    topic: str | None = None,
) -> None:
    """Send raw values (valid or not) straight to Kafka, bypassing the publisher's checks."""

    async def go() -> None:
        prod = AIOKafkaProducer(bootstrap_servers=settings.broker, max_request_size=8 << 20)
        await prod.start()
        try:
            futs = [
                await prod.send(
                    topic or settings.events_topic,
                    value=v,
                    key=(keys[i] if keys else None) or f"k{i}".encode(),
                )
                for i, v in enumerate(values)
            ]
            await asyncio.gather(*futs)
        finally:
            await prod.stop()

    asyncio.run(go())


def consume_all(settings: Settings, topic: str, expected: int, timeout: float = 30) -> list[Any]:
    """Read ``expected`` records of ``topic`` from the beginning (no group)."""

    async def go() -> list[Any]:
        cons = AIOKafkaConsumer(
            topic,
            bootstrap_servers=settings.broker,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await cons.start()
        out: list[Any] = []
        try:
            deadline = time.monotonic() + timeout
            while len(out) < expected and time.monotonic() < deadline:
                got = await cons.getmany(timeout_ms=500)
                for recs in got.values():
                    out.extend(recs)
        finally:
            await cons.stop()
        return out

    return asyncio.run(go())


def generated_values(n: int, seed: int = 1, **kwargs: Any) -> list[bytes]:
    """``n`` valid generated events as JSON bytes."""
    return [encode(ev) for ev in generate(TrafficConfig(events=n, seed=seed, **kwargs))]


def scalar(data_dir: Path, sql: str) -> Any:
    """The single value a query over the lake returns."""
    ((value,),) = connect(data_dir).sql(sql).fetchall()
    return value


def run_cli(
    *args: str, env: dict[str, str] | None = None, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """``agentstream ARGS`` in a subprocess; a bare environment unless ``env`` is given."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        env=env if env is not None else {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=check,
    )


def side_by_side(configs: dict[str, TrafficConfig]) -> list[Any]:
    """The streams of ``configs`` as one, in event-time order, each under agents of its own
    (``<name>/<agent>``, event ids alike) so their keys never meet in one worker; a last task
    five minutes after the newest event closes every window, as time passing would."""
    import msgspec

    from pipeline.schema import Task

    stream: list[Any] = []
    for name, config in configs.items():
        stream += [
            msgspec.structs.replace(
                ev, agent_id=f"{name}/{ev.agent_id}", event_id=f"{name}/{ev.event_id}"
            )
            for ev in generate(config)
        ]
    stream.sort(key=lambda ev: ev.ts)  # stable: each scenario keeps its order
    newest = stream[-1].ts
    stream.append(
        Task(
            event_id="sentinel",
            schema_version=1,
            ts=newest + timedelta(minutes=5),
            agent_id="sentinel",
            outcome="started",
        )
    )
    return stream


def land_all(settings: Settings, events: Sequence[Any], timeout: float = 240) -> None:
    """Publish ``events`` (ending with a sentinel), run a worker until they are committed and
    the window of the newest one before the sentinel is emitted."""
    from pipeline.publisher import Publisher

    async def publish() -> None:
        async with Publisher(settings) as pub:
            await pub.publish_many(events)

    asyncio.run(publish())
    last_window = events[-2].ts.replace(second=0, microsecond=0)
    with running_worker(settings) as proc:
        wait_committed(settings, len(events), proc, timeout=timeout)
        deadline = time.monotonic() + 60
        query = "SELECT count(*) FROM metrics WHERE window_start = $1"
        while connect(settings.data_dir).execute(query, [last_window]).fetchall() == [(0,)]:
            assert time.monotonic() < deadline, "the last windows were never emitted"
            time.sleep(0.5)
