"""Shared pytest fixtures for agentstream."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from pipeline.broker import LocalBroker

# --- broker fixtures (pipeline/broker.py) --------------------------------------------------


@dataclass(frozen=True)
class ExternalBroker:
    """A broker someone else runs, named by ``AGENTSTREAM_TEST_BROKER=host:port``."""

    bootstrap: str


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[LocalBroker | ExternalBroker]:
    """One real Apache Kafka broker for the whole test session, on a free loopback port.

    Set ``AGENTSTREAM_TEST_BROKER=host:port`` to test against a broker that is already
    running instead; it is then neither started nor stopped here.
    """
    external = os.environ.get("AGENTSTREAM_TEST_BROKER", "").strip()
    if external:
        yield ExternalBroker(bootstrap=external)
        return
    broker = LocalBroker("kafka")
    # The first run on a machine also fetches Kafka's jars with Maven; start()'s timeout
    # covers only the broker coming up.
    broker.start(timeout=120)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def bootstrap(kafka_broker: LocalBroker | ExternalBroker) -> str:
    """Bootstrap servers of the session broker, ``"host:port"``."""
    return kafka_broker.bootstrap
