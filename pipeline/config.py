"""Settings: every tunable of agentstream in one frozen dataclass, read from the environment once.

Precedence is command-line flag, then ``AGENTSTREAM_*`` environment variable, then the default
below. A bad value raises ``ConfigError`` naming the variable and the value, never a traceback.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

DEFAULT_BROKER: Final = "127.0.0.1:9092"
ENV_PREFIX: Final = "AGENTSTREAM_"
WINDOW_SIZES: Final = {"1m": 60, "5m": 300, "1h": 3600}


class ConfigError(ValueError):
    """A setting a user gave is unusable; the message says which and what to do."""


_HOSTPORT = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})$")
_TOPIC = re.compile(r"^[A-Za-z0-9._\-]{1,249}$")


def parse_brokers(value: str) -> str:
    """Normalise ``host:port`` / ``kafka://host:port`` (comma-separated) to a bootstrap string."""
    hosts = []
    for part in value.split(","):
        item = part.strip()
        item = item.removeprefix("kafka://").removeprefix("tcp://").rstrip("/")
        m = _HOSTPORT.match(item)
        if not m or not 0 < int(m.group(2)) < 65536:
            raise ConfigError(
                f"bad broker address {part.strip()!r}: expected host:port or kafka://host:port "
                "(for example 127.0.0.1:9092)"
            )
        hosts.append(item)
    if not hosts:
        raise ConfigError("no broker address given: pass --broker host:port")
    return ",".join(hosts)


def check_topic(name: str, what: str) -> str:
    """Return ``name`` if Kafka accepts it as a topic name, else raise ``ConfigError``."""
    if not _TOPIC.match(name) or name in {".", ".."}:
        raise ConfigError(
            f"bad {what} topic name {name!r}: use 1-249 characters of letters, digits, '.', '_', '-'"
        )
    return name


@dataclass(frozen=True)
class Settings:
    """Everything the worker, publisher and CLI need; build with ``Settings.load()``."""

    broker: str = DEFAULT_BROKER
    data_dir: Path = Path("agentstream-data")
    events_topic: str = "agent-events"
    dlq_topic: str = "agent-events-dlq"
    metrics_topic: str = "agent-metrics"
    anomalies_topic: str = "agent-anomalies"
    partitions: int = 4
    group_id: str = "agentstream"
    # Hot path: a flush lands, publishes and commits everything fetched since the last one.
    flush_interval_s: float = 1.0
    flush_max_events: int = 100_000
    fetch_max_records: int = 20_000
    max_message_bytes: int = 1 << 20
    # Event-time windows.
    window: str = "1m"
    allowed_lateness_s: float = 60.0
    web_port: int = 6066
    web_host: str = "127.0.0.1"

    @property
    def window_seconds(self) -> int:
        """Window size in seconds (``window`` is one of 1m, 5m, 1h)."""
        return WINDOW_SIZES[self.window]

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, overridden by ``AGENTSTREAM_<FIELD>`` variables, overridden by ``overrides``.

        ``None`` in overrides means "not given" so CLI options can pass straight through.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            var = ENV_PREFIX + f.name.upper()
            if overrides.get(f.name) is not None:
                values[f.name] = overrides[f.name]
            elif var in env:
                values[f.name] = _coerce(var, env[var], f.type)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise ``ConfigError`` on the first unusable value."""
        object.__setattr__(self, "broker", parse_brokers(self.broker))
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        for what in ("events", "dlq", "metrics", "anomalies"):
            check_topic(getattr(self, f"{what}_topic"), what)
        if self.window not in WINDOW_SIZES:
            raise ConfigError(
                f"bad window {self.window!r}: choose one of {', '.join(WINDOW_SIZES)}"
            )
        for name in ("flush_interval_s", "allowed_lateness_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"bad {name} {getattr(self, name)!r}: must be >= 0")
        for name in ("partitions", "flush_max_events", "fetch_max_records", "max_message_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"bad {name} {getattr(self, name)!r}: must be >= 1")

    def to_env(self) -> dict[str, str]:
        """The ``AGENTSTREAM_*`` variables that make another process load these settings."""
        return {
            ENV_PREFIX + f.name.upper(): str(getattr(self, f.name)) for f in dataclasses.fields(self)
        }

    def with_(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied and validated."""
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new


def _coerce(var: str, raw: str, annotation: Any) -> Any:
    kind = str(annotation)
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "Path":
            return Path(raw)
    except ValueError:
        raise ConfigError(f"bad {var}={raw!r}: expected a number") from None
    return raw
