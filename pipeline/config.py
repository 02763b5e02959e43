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
ROLES: Final = ("all", "ingest", "aggregate")


class ConfigError(ValueError):
    """A setting a user gave is unusable; the message says which and what to do."""


class Secret:
    """A value that must never be printed: its repr and str are masked; ``reveal()`` gives it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself, for the one place that hands it to a client library."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


REDACTIONS: Final = ("email", "phone", "api_key")
SECURITY_PROTOCOLS: Final = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS: Final = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")

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


_DURATION: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNIT_S: Final = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def parse_duration(value: str, name: str) -> float:
    """Seconds in ``value`` ("90s", "30m", "12h", "1d", "0s"), else ``ConfigError``."""
    m = _DURATION.match(value)
    if m is None:
        raise ConfigError(
            f"bad {name} {value!r}: expected a number and a unit s, m, h or d (e.g. 1d, 12h)"
        )
    return float(m[1]) * _UNIT_S[m[2]]


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
    verdicts_topic: str = "agent-release-verdicts"
    partitions: int = 4
    # Partitions of the repartition topic (made when the topic is created; an existing topic
    # keeps its count): the aggregate state is split by agent and tenant over this many
    # shards, so this many workers at most share the aggregate stage. Each shard closes its
    # windows on its own, a fixed cost a flush: on 2 cores, 2 shards measured publish-to-
    # metrics p50 0.33 s with one worker against 1.28 s with 4 (bench, 2026-12-05).
    aggregate_partitions: int = 2
    group_id: str = "agentstream"
    # Which stages this worker runs: ingest (validate, land events, window partials), aggregate
    # (merge partials, close windows, detectors, judge, budgets), or all (both, one process).
    role: str = "all"
    # Hot path: a flush lands, publishes and commits everything fetched since the last one.
    flush_interval_s: float = 1.0
    flush_max_events: int = 100_000
    fetch_max_records: int = 20_000
    max_message_bytes: int = 1 << 20
    # Event-time windows.
    window: str = "1m"
    allowed_lateness_s: float = 60.0
    # Repeats of an event_id within this much event time go to the dead letters (0: off).
    dedupe_horizon_s: float = 600.0
    web_port: int = 6066
    web_host: str = "127.0.0.1"
    # Redaction of free text before landing: comma-separated email, phone, api_key, or none.
    redact: str = "email,phone,api_key"
    # Spend budgets: inline "tenant:acme=50/day,agent:bot=1000/month" or "@budgets.toml".
    budgets: str = ""
    # The lake's catalog: empty for the SQLite file in the data directory (one worker), or
    # postgres:DSN (several workers), e.g. "postgres:dbname=lake host=127.0.0.1".
    catalog: str = ""
    # Lake maintenance in the worker: a pass every so often (0: never; `agentstream lake
    # maintain` runs one by hand), keeping this much time travel, and raw events for this many
    # days (0: forever). A snapshot is expired only once replaced for lake_query_grace (the
    # longest a query on the lake may run), whatever the retention.
    maintain_interval_s: float = 300.0
    lake_retention: str = "1d"
    lake_query_grace: str = "1m"
    events_retention_days: int = 0
    # Alert rules: inline JSON or "@rules.toml" / "@rules.json" (see streams.rules).
    rules: str = ""
    # Windows of each key's history read from the lake to prime the detectors at a start
    # without a snapshot (0: start cold).
    warm_start_windows: int = 60
    # Kafka connection security (TLS and SASL PLAIN / SCRAM).
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "PLAIN"
    sasl_username: str | None = None
    sasl_password: Secret | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    # `agentstream ui`: required to listen beyond loopback; then every request must carry it.
    ui_token: Secret | None = None

    @property
    def window_seconds(self) -> int:
        """Window size in seconds (``window`` is one of 1m, 5m, 1h)."""
        return WINDOW_SIZES[self.window]

    @property
    def repartition_topic(self) -> str:
        """The internal topic from the ingest stage to the aggregate stage (one per group)."""
        return f"{self.group_id}-{self.events_topic}-repartition"

    @property
    def aggregate_group(self) -> str:
        """The consumer group of the aggregate stage on the repartition topic."""
        return f"{self.group_id}-aggregate"

    @property
    def redact_kinds(self) -> list[str]:
        """The redactions to apply (empty for ``none``)."""
        kinds = [k.strip() for k in self.redact.split(",") if k.strip()]
        return [] if kinds == ["none"] else kinds

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
        for what in ("events", "dlq", "metrics", "anomalies", "verdicts"):
            check_topic(getattr(self, f"{what}_topic"), what)
        if self.role not in ROLES:
            raise ConfigError(f"bad role {self.role!r}: choose one of {', '.join(ROLES)}")
        if self.window not in WINDOW_SIZES:
            raise ConfigError(
                f"bad window {self.window!r}: choose one of {', '.join(WINDOW_SIZES)}"
            )
        if self.security_protocol not in SECURITY_PROTOCOLS:
            raise ConfigError(
                f"bad security_protocol {self.security_protocol!r}: choose one of "
                + ", ".join(SECURITY_PROTOCOLS)
            )
        if self.sasl_mechanism not in SASL_MECHANISMS:
            raise ConfigError(
                f"bad sasl_mechanism {self.sasl_mechanism!r}: choose one of "
                + ", ".join(SASL_MECHANISMS)
            )
        if isinstance(self.sasl_password, str):
            object.__setattr__(self, "sasl_password", Secret(self.sasl_password))
        if isinstance(self.ui_token, str):
            object.__setattr__(self, "ui_token", Secret(self.ui_token))
        if self.ui_token is not None and not self.ui_token.reveal():
            object.__setattr__(self, "ui_token", None)  # set but empty: no token
        if self.security_protocol.startswith("SASL") and not (
            self.sasl_username and self.sasl_password
        ):
            raise ConfigError(
                f"security_protocol {self.security_protocol} needs AGENTSTREAM_SASL_USERNAME "
                "and AGENTSTREAM_SASL_PASSWORD"
            )
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"bad {name}: no such file {str(path)!r}")
        for kind in self.redact_kinds:
            if kind not in REDACTIONS:
                raise ConfigError(
                    f"bad redact {self.redact!r}: use a comma-separated list of "
                    f"{', '.join(REDACTIONS)}, or none"
                )
        if self.budgets:
            from streams.budgets import BudgetError, load_budgets  # the parser lives with them

            try:
                load_budgets(self.budgets)
            except BudgetError as exc:
                raise ConfigError(f"bad AGENTSTREAM_BUDGETS: {exc}") from None
        parse_duration(self.lake_retention, "lake_retention")
        parse_duration(self.lake_query_grace, "lake_query_grace")
        from sinks.lake import LakeError, catalog_spec

        try:
            catalog_spec(self.data_dir, self.catalog)
        except LakeError as exc:
            raise ConfigError(str(exc)) from None
        if self.rules:
            from streams.rules import RuleError, load_rules  # the parser lives with them

            try:
                load_rules(self.rules)
            except RuleError as exc:
                raise ConfigError(f"bad AGENTSTREAM_RULES: {exc}") from None
        if self.warm_start_windows < 0:
            raise ConfigError(f"bad warm_start_windows {self.warm_start_windows!r}: must be >= 0")
        for name in (
            "flush_interval_s",
            "allowed_lateness_s",
            "dedupe_horizon_s",
            "maintain_interval_s",
            "events_retention_days",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"bad {name} {getattr(self, name)!r}: must be >= 0")
        for name in (
            "partitions",
            "aggregate_partitions",
            "flush_max_events",
            "fetch_max_records",
            "max_message_bytes",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"bad {name} {getattr(self, name)!r}: must be >= 1")

    def to_env(self) -> dict[str, str]:
        """The ``AGENTSTREAM_*`` variables that make another process load these settings."""
        env = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                env[ENV_PREFIX + f.name.upper()] = (
                    value.reveal() if isinstance(value, Secret) else str(value)
                )
        return env

    def with_(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied and validated."""
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new


def _coerce(var: str, raw: str, annotation: Any) -> Any:
    kind = str(annotation).removesuffix(" | None")
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "Path":
            return Path(raw)
        if kind == "Secret":
            return Secret(raw)
    except ValueError:
        raise ConfigError(f"bad {var}={raw!r}: expected a number") from None
    return raw
