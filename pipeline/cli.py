"""The ``agentstream`` command line.

Every mistake a user can make (bad address, missing folder, bad SQL, invalid event) ends in a
one-line ``error: ...`` on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

import click
import msgspec

from pipeline import schema
from pipeline.config import ROLES, ConfigError, Settings
from pipeline.kafka import BrokerUnavailable, committed_lag, ensure_pipeline_topics

if TYPE_CHECKING:
    from pipeline.generate import TrafficConfig

F = TypeVar("F", bound=Callable[..., Any])

USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    BrokerUnavailable,
    schema.InvalidEvent,
    FileNotFoundError,
    IsADirectoryError,
    PermissionError,
)


def _user_errors() -> tuple[type[BaseException], ...]:
    from pipeline.broker import BrokerError
    from sinks.catalog import QueryError
    from sinks.lake import LakeError

    return (*USER_ERRORS, BrokerError, QueryError, LakeError)


def friendly(fn: F) -> F:
    """Turn user mistakes into one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _user_errors() as exc:
            text = str(exc)
            if isinstance(exc, OSError) and exc.filename is not None:
                text = f"{exc.strerror}: {exc.filename}"
            click.echo(f"error: {text}", err=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


broker_option = click.option(
    "--broker",
    default=None,
    metavar="URL",
    help="Kafka bootstrap host:port or kafka://host:port [env AGENTSTREAM_BROKER; default 127.0.0.1:9092]",
)
data_dir_option = click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder of the lake [env AGENTSTREAM_DATA_DIR; default ./agentstream-data]",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="agentstream")
def main() -> None:
    """agentstream: streaming analytics for AI agents in production."""
    # Commands report connection trouble themselves, in one line; aiokafka's own retry
    # warnings would only repeat it. The worker configures logging through faust.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


@main.command()
@click.option(
    "--kind",
    type=click.Choice(["kafka", "tansu"]),
    default="kafka",
    show_default=True,
    help="Apache Kafka (jars fetched from Maven Central, needs Java 17+) or embedded Tansu",
)
@click.option("--port", type=int, default=9092, show_default=True)
@click.option(
    "--data-dir",
    "broker_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Broker log folder (kafka keeps data here across restarts)",
)
@friendly
def broker(kind: str, port: int, broker_dir: Path | None) -> None:
    """Run a local single-node broker on 127.0.0.1 in the foreground."""
    from pipeline.broker import LocalBroker

    sys.exit(LocalBroker(kind, port=port, data_dir=broker_dir).run_foreground())  # type: ignore[arg-type]


@main.command()
@broker_option
@data_dir_option
@click.option("--web-port", type=int, default=None, help="Health and /metrics port [default 6066]")
@click.option("--group", "group_id", default=None, help="Consumer group [default agentstream]")
@click.option(
    "--role",
    type=click.Choice(ROLES),
    default=None,
    help="Stages to run: ingest (land events, hand window partials on), aggregate (windows, "
    "detectors, releases, budgets) or all [env AGENTSTREAM_ROLE; default all]",
)
@click.option(
    "--processes",
    type=click.IntRange(min=1, max=64),
    default=1,
    show_default=True,
    help="Worker processes to run on this machine (web ports from --web-port up)",
)
@click.option("--loglevel", default="info", show_default=True)
@friendly
def worker(
    broker: str | None,
    data_dir: Path | None,
    web_port: int | None,
    group_id: str | None,
    role: str | None,
    processes: int,
    loglevel: str,
) -> None:
    """Consume agent events, land them in the lake, route bad ones to the dead-letter topic,
    and compute windows, alerts, verdicts and budgets; any number of workers share the work."""
    from streams.app import check_web_ports, run, run_processes

    settings = Settings.load(
        broker=broker, data_dir=data_dir, web_port=web_port, group_id=group_id, role=role
    )
    check_web_ports(settings, processes)
    ensure_pipeline_topics(settings)
    if processes > 1:
        sys.exit(run_processes(settings, processes, loglevel=loglevel))
    sys.exit(run(settings, loglevel=loglevel))


@main.command()
@broker_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on")
@click.option("--port", type=click.IntRange(0, 65535), default=4318, show_default=True)
@click.option(
    "--kafka-topic",
    default="otlp_spans",
    show_default=True,
    help="Topic the OpenTelemetry Collector's Kafka exporter writes (otlp_proto or otlp_json)",
)
@click.option(
    "--kafka-logs-topic",
    default="otlp_logs",
    show_default=True,
    help="Topic of the Collector's log records (evaluation and guardrail results)",
)
@click.option("--no-kafka", is_flag=True, help="Do not read the Collector's Kafka topics")
@click.option(
    "--max-body-mib",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Largest request body accepted, compressed or not (413 above)",
)
@friendly
def otlp(
    broker: str | None,
    host: str,
    port: int,
    kafka_topic: str,
    kafka_logs_topic: str,
    no_kafka: bool,
    max_body_mib: int,
) -> None:
    """Receive OpenTelemetry traces and logs (OTLP/HTTP, protobuf or JSON) as agent events.

    POST /v1/traces and /v1/logs; spans of agent work (model calls, tools, retrievals,
    guardrails, agent invocations) become events on the events topic, acknowledged once Kafka
    has them. Also reads the Collector's Kafka topics (traces, logs) unless --no-kafka.
    """
    from pipeline.config import check_topic
    from pipeline.otel.service import serve

    settings = Settings.load(broker=broker)
    topic = None if no_kafka else check_topic(kafka_topic, "--kafka-topic")
    logs = None if no_kafka else check_topic(kafka_logs_topic, "--kafka-logs-topic")
    # The Collector's topics too, so the source can join its group before the first export.
    extra = {t: settings.partitions for t in (topic, logs) if t}
    ensure_pipeline_topics(settings, extra=extra)
    asyncio.run(
        serve(settings, host, port, topic, max_body_bytes=max_body_mib << 20, kafka_logs_topic=logs)
    )


def _read_lines(source: BinaryIO) -> Iterator[tuple[int, bytes]]:
    for n, line in enumerate(source, start=1):
        line = line.strip()
        if line:
            yield n, line


@main.command()
@broker_option
@click.option("--topic", default=None, help="Events topic [default agent-events]")
@click.argument("source", type=click.File("rb"))
@friendly
def publish(broker: str | None, topic: str | None, source: BinaryIO) -> None:
    """Validate JSONL events from SOURCE (a file, or - for stdin) and publish them.

    Invalid lines are reported with their line number and not sent; the exit status is 1 if
    any line was refused.
    """

    settings = Settings.load(broker=broker, events_topic=topic)
    ensure_pipeline_topics(settings)
    sent, refused = asyncio.run(_publish_lines(settings, _read_lines(source)))
    click.echo(
        f"published {sent} events to {settings.events_topic}"
        + (f", refused {refused} invalid lines" if refused else ""),
        err=True,
    )
    if refused:
        sys.exit(1)


async def _publish_lines(
    settings: Settings,
    lines: Iterator[tuple[int, bytes]],
    chunk: int = 50_000,
    progress: Callable[[int], None] | None = None,
) -> tuple[int, int]:
    from pipeline.publisher import Publisher, event_key

    sent = refused = 0
    async with Publisher(settings) as pub:
        while True:
            block = [item for _, item in zip(range(chunk), lines, strict=False)]
            if not block:
                break
            events, ok_at, rejections, bad_at = schema.decode_batch([raw for _, raw in block])
            for i, rej in zip(bad_at, rejections, strict=True):
                click.echo(f"line {block[i][0]}: {rej.reason}", err=True)
            refused += len(rejections)
            sent += await pub.publish_raw(
                [(event_key(ev), block[i][1]) for ev, i in zip(events, ok_at, strict=True)]
            )
            if progress:
                progress(len(block))
    return sent, refused


def _list_scenarios(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from pipeline.scenarios import list_scenarios

    scenarios = list_scenarios()
    width = max(len(name) for name, _ in scenarios)
    for name, description in scenarios:
        click.echo(f"{name:<{width}}  {description}")
    ctx.exit()


def _traffic(n_events: int, seed: int, scenario: str) -> TrafficConfig:
    """The TrafficConfig, or a one-line error for an unknown or unusable scenario."""
    from pipeline.generate import TrafficConfig

    try:
        return TrafficConfig(events=n_events, seed=seed, scenario=scenario)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


scenario_option = click.option(
    "--scenario",
    default="steady",
    show_default=True,
    metavar="NAME",
    help="Inject a known incident at mid-stream (see --list-scenarios)",
)


@main.command()
@click.option("--events", "n_events", type=click.IntRange(min=0), required=True)
@click.option("--seed", type=int, default=0, show_default=True)
@scenario_option
@click.option(
    "--truth",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    default=None,
    metavar="FILE",
    help="Also write the scenario's ground truth (its incidents) to FILE as JSON",
)
@click.option(
    "--list-scenarios",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_list_scenarios,
    help="List the scenarios and exit",
)
@click.option("--out", type=click.File("wb"), default="-", help="Output file [default stdout]")
@friendly
def generate(n_events: int, seed: int, scenario: str, truth: Path | None, out: BinaryIO) -> None:
    """Write realistic synthetic agent traffic as JSONL, deterministic for a seed."""
    from pipeline.generate import generate_jsonl
    from pipeline.scenarios import write_ground_truth

    config = _traffic(n_events, seed, scenario)
    if truth is not None:
        write_ground_truth(config, truth)
    generate_jsonl(config, out)


@main.command()
@data_dir_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
)
@click.argument("query")
@friendly
def sql(data_dir: Path | None, fmt: str, query: str) -> None:
    """Run a read-only DuckDB QUERY over the lake.

    Views: events, dead_letters, metrics, anomalies, one per event type (llm_calls, ...), and
    the analysis views (cost_by_version_day, quality_by_version, task_funnel, ...).
    """
    import duckdb

    from sinks.catalog import QueryError
    from sinks.query import read_only_query

    settings = Settings.load(data_dir=data_dir)
    rel = read_only_query(settings.data_dir, query)
    if rel is None:
        return
    try:
        click.echo(render(rel, fmt), nl=False)
    except duckdb.Error as exc:
        raise QueryError(str(exc).splitlines()[0]) from None


@main.command()
@data_dir_option
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("report.html"),
    show_default=True,
)
@friendly
def report(data_dir: Path | None, out: Path) -> None:
    """Render the lake's key plots and tables into one self-contained HTML file."""
    from pipeline.report import render_report

    settings = Settings.load(data_dir=data_dir)
    click.echo(f"report: {render_report(settings.data_dir, out)}")


@main.command()
@data_dir_option
@broker_option
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; any other than loopback needs AGENTSTREAM_UI_TOKEN",
)
@click.option("--port", type=click.IntRange(0, 65535), default=8686, show_default=True)
@click.option("--no-live", is_flag=True, help="Do not follow the derived topics (no broker needed)")
@friendly
def ui(data_dir: Path | None, broker: str | None, host: str, port: int, no_live: bool) -> None:
    """Serve the live web page over the lake: overview, cost, alerts, releases, budgets,
    quality, sessions and dead letters, updated as the worker publishes."""
    from pipeline.ui.server import check_binding, serve

    settings = Settings.load(broker=broker, data_dir=data_dir)
    token = settings.ui_token.reveal() if settings.ui_token is not None else None
    check_binding(host, token)  # before reading anything
    where = "no live updates" if no_live else f"live from {settings.broker}"

    def ready(url: str) -> None:
        click.echo(f"agentstream ui: {url} (lake {settings.data_dir}, {where})", err=True)

    serve(settings.data_dir, None if no_live else settings, host, port, token, ready)


def render(rel: Any, fmt: str) -> str:
    """Format a DuckDB relation as a table, CSV or JSON (an array of objects)."""
    if fmt == "table":
        return _table(rel.columns, rel.fetchall())
    if fmt == "csv":
        import pyarrow as pa
        import pyarrow.csv as pacsv

        from sinks.catalog import QueryError

        buf = io.BytesIO()
        try:
            pacsv.write_csv(rel.to_arrow_table(), buf)
        except pa.ArrowInvalid as exc:
            raise QueryError(
                f"CSV cannot hold this result ({str(exc).splitlines()[0]}): use --format json, "
                "or unnest / cast the list and struct columns"
            ) from None
        return buf.getvalue().decode()
    cols = rel.columns
    rows = [dict(zip(cols, row, strict=True)) for row in rel.fetchall()]
    return msgspec.json.format(msgspec.json.encode(rows), indent=2).decode() + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _table(columns: list[str], rows: list[tuple[Any, ...]]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()
    out = [line, "  ".join("-" * w for w in widths)]
    for r in cells:
        out.append("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out) + "\n"


@main.command()
@click.option(
    "--seeds",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Seeds per scenario (1..K)",
)
@click.option(
    "--events",
    "n_events",
    type=click.IntRange(min=10_000),
    default=200_000,
    show_default=True,
    help="Events per scenario run",
)
@click.option(
    "--scenario",
    "scenarios",
    multiple=True,
    metavar="NAME",
    help="Only these scenarios (repeatable) [default: all but budget-burn]",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object")
@friendly
def evaluate(seeds: int, n_events: int, scenarios: tuple[str, ...], as_json: bool) -> None:
    """Score drift detection: precision, recall and delay over every scenario and seed.

    Replays each scenario's events through the worker's windows and detectors in-process
    (no broker: detection does not depend on delivery) and compares with the ground truth.
    """
    from pipeline.evaluate import by_scenario
    from pipeline.evaluate import evaluate as run
    from pipeline.scenarios import DRIFT_SCENARIOS, STARTUP_SCENARIOS

    # Rollout scenarios are judged by release verdicts, not drift detection.
    scored = (*DRIFT_SCENARIOS, *STARTUP_SCENARIOS)
    unknown = [s for s in scenarios if s not in scored]
    if unknown:
        raise ConfigError(f"unknown scenario {unknown[0]!r}: expected one of {', '.join(scored)}")
    result = run(range(1, seeds + 1), n_events, scenarios or scored)
    if as_json:
        click.echo(
            msgspec.json.encode({**result.as_dict(), "scenarios": by_scenario(result)}).decode()
        )
        return
    for r in result.runs:
        delays = ", ".join(f"{d:g}" for d in r.delays_windows) or "-"
        click.echo(
            f"{r.scenario:<20} seed {r.seed}: {r.detected}/{r.incidents} incidents detected, "
            f"{r.alerts} alerts ({len(r.false_alerts)} false), delay {delays} windows"
        )
        for alert in r.false_alerts:
            click.echo(f"    false alert: {alert}")
    click.echo("")
    for row in by_scenario(result):
        median = row["median_delay_windows"]
        click.echo(
            f"{row['scenario']:<36} found {row['detected']}/{row['incidents']}  "
            f"precision {row['precision']:.3f}  recall {row['recall']:.3f}  median delay "
            + ("-" if median is None else f"{median:g}")
            + f"  false alerts {row['false_alerts']}"
        )
    delay = result.median_delay_windows
    click.echo(
        f"precision {result.precision:.3f}  recall {result.recall:.3f}  median delay "
        + ("-" if delay is None else f"{delay:g} windows")
    )


@main.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> None:
    """Benchmark against a real Kafka broker: ceiling, naive faust, agentstream (see --help).

    `agentstream bench --otlp [--spans N]` measures the OTLP receiver instead (bench/otlp.py).
    """
    if "--otlp" in args:
        from bench.otlp import main as run_otlp

        sys.exit(run_otlp([a for a in args if a != "--otlp"]))
    from bench.run import main as run_bench

    sys.exit(run_bench(list(args)))


@main.group()
def release() -> None:
    """Announce rollouts (start, end) and ask whether one may be promoted (gate)."""


def _announce_options(fn: F) -> F:
    options = [
        broker_option,
        click.option("--agent", "agent_id", required=True, help="The agent_id the release is for"),
        click.option("--tenant", "tenant_id", default=None, help="Only this tenant's traffic"),
        click.option(
            "--dimension",
            type=click.Choice(["agent_version", "prompt_version", "model"]),
            required=True,
            help="Which version changes",
        ),
        click.option("--candidate", required=True, help="The new version"),
        click.option("--baseline", required=True, help="The version it replaces"),
        click.option(
            "--share",
            type=float,
            default=1.0,
            show_default=True,
            help="Share of the agent's traffic the candidate serves, 0 < share <= 1",
        ),
        click.option(
            "--id", "release_id", default=None, help="Release id [default: from the above]"
        ),
        click.option(
            "--at",
            "at",
            default=None,
            metavar="TIME",
            help="When the stage begins, RFC 3339 with an offset [default: now]",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return friendly(fn)


@release.command("start")
@_announce_options
def release_start(**announce: Any) -> None:
    """Announce that a version starts serving part of an agent's traffic.

    The worker then compares the candidate with the baseline on every closed window and
    publishes verdicts (view release_verdicts, `agentstream tail verdicts`).
    """
    _announce("started", **announce)


@release.command("end")
@_announce_options
def release_end(**announce: Any) -> None:
    """Announce that a rollout ends: windows after it are not judged."""
    _announce("ended", **announce)


def _announce(
    stage: str,
    broker: str | None,
    agent_id: str,
    tenant_id: str | None,
    dimension: str,
    candidate: str,
    baseline: str,
    share: float,
    release_id: str | None,
    at: str | None,
) -> None:
    from pipeline.publisher import Publisher, release_event

    when = _time_option("at", at)
    event = release_event(
        agent_id=agent_id,
        dimension=dimension,
        candidate=candidate,
        baseline=baseline,
        traffic_share=share,
        stage=stage,
        release_id=release_id,
        tenant_id=tenant_id,
        ts=when,
    )
    settings = Settings.load(broker=broker)
    ensure_pipeline_topics(settings)

    async def send() -> None:
        async with Publisher(settings) as pub:
            await pub.publish(event)

    asyncio.run(send())
    click.echo(
        f"release {event.release_id} {event.stage} at {event.ts.isoformat()}: {agent_id} "
        f"{dimension} {candidate} (baseline {baseline}) on {share:.0%} of its traffic"
    )


@release.command("gate")
@data_dir_option
@click.option("--id", "release_id", required=True, help="The release to decide on")
@click.option("--json", "as_json", is_flag=True, help="Print the decision and verdicts as JSON")
@friendly
def release_gate(data_dir: Path | None, release_id: str, as_json: bool) -> None:
    """Promote or roll back? Exit 0: promote (every measure decided, none regressed);
    1: roll back (a measure regressed); 3: wait (measures still running); 2: usage error.

    For deploy pipelines and rollout controllers: call it after each analysis interval.
    """
    from pipeline.gate import gate

    settings = Settings.load(data_dir=data_dir)
    result = gate(settings.data_dir, release_id)
    if as_json:
        click.echo(msgspec.json.encode(result.as_dict()).decode())
    else:
        columns = [
            "measure",
            "verdict",
            "candidate_value",
            "baseline_value",
            "effect",
            "confidence",
        ]
        columns += ["candidate_samples", "baseline_samples"]
        click.echo(
            _table(columns, [tuple(m[c] for c in columns) for m in result.measures]), nl=False
        )
        click.echo(f"{result.decision}: release {release_id} {result.reason}")
    sys.exit(result.exit_code)


TAIL_TOPICS = {
    "metrics": "metrics_topic",
    "anomalies": "anomalies_topic",
    "verdicts": "verdicts_topic",
    "dead-letters": "dlq_topic",
}


@main.command()
@broker_option
@click.argument("stream", type=click.Choice(list(TAIL_TOPICS)))
@click.option("--from-beginning", is_flag=True, help="Start at the oldest record, not the newest")
@click.option("--json", "as_json", is_flag=True, help="Print each record's JSON as it is")
@click.option(
    "--max",
    "max_records",
    type=click.IntRange(min=1),
    default=None,
    help="Exit after this many records",
)
@friendly
def tail(
    broker: str | None, stream: str, from_beginning: bool, as_json: bool, max_records: int | None
) -> None:
    """Follow the metrics, anomalies, release verdicts or dead-letters topic; print each record.

    Records are JSON; any Kafka client can read the same topics (for example
    `kcat -C -b 127.0.0.1:9092 -t agent-metrics`).
    """
    settings = Settings.load(broker=broker)
    topic = getattr(settings, TAIL_TOPICS[stream])
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_tail(settings, topic, stream, from_beginning, as_json, max_records))


async def _tail(
    settings: Settings,
    topic: str,
    stream: str,
    from_beginning: bool,
    as_json: bool,
    max_records: int | None,
) -> None:
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.errors import KafkaConnectionError

    from pipeline.kafka import client_kwargs, unreachable

    consumer = AIOKafkaConsumer(**client_kwargs(settings), enable_auto_commit=False)
    try:
        await consumer.start()
    except KafkaConnectionError as exc:
        await consumer.stop()
        raise unreachable(settings, exc) from None
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        if not parts:
            await consumer.topics()
            parts = consumer.partitions_for_topic(topic) or set()
        if not parts:
            raise ConfigError(
                f"topic {topic!r} does not exist yet: start `agentstream worker` first"
            )
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        if from_beginning:
            await consumer.seek_to_beginning(*tps)
        else:
            await consumer.seek_to_end(*tps)
        seen = 0
        while max_records is None or seen < max_records:
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                for r in records:
                    click.echo(
                        r.value.decode("utf-8", "replace") if as_json else describe(stream, r)
                    )
                    seen += 1
                    if max_records is not None and seen >= max_records:
                        return
    finally:
        await consumer.stop()


def describe(stream: str, record: Any) -> str:
    """One readable line for a record of the metrics, anomalies or dead-letters topic."""
    if stream == "dead-letters":
        reason = dict(record.headers).get("agentstream.reason", b"?").decode("utf-8", "replace")
        raw = (record.value or b"")[:80].decode("utf-8", "replace")
        return f"p{record.partition}@{record.offset}  {reason}  {raw!r}"
    data = msgspec.json.decode(record.value)
    if stream == "verdicts":
        effect = data.get("effect")
        shown = "-" if effect is None else f"{effect:+.3f}"
        if effect is not None and data.get("effect_scale") == "relative":
            shown = f"{effect:+.1%}"
        return (
            f"{data['window_end']} {data['verdict'].upper():<13} {data['release_id']} "
            f"{data['measure']}: {data['candidate_version']} vs {data['baseline_version']} "
            f"effect={shown} confidence={data['confidence']:.3f} "
            f"n={data['candidate_samples']}/{data['baseline_samples']}"
        )
    key = "/".join(
        str(data.get(k) or "*")
        for k in ("agent_id", "agent_version", "prompt_version", "model", "tenant_id")
    )
    if stream == "metrics":

        def num(name: str, fmt: str) -> str:
            value = data.get(name)
            return "-" if value is None else format(value, fmt)

        return (
            f"{data['window_start']} {data['level']:<6} {key}  events={data['events']} "
            f"cost=${num('cost_usd', '.4f')} cost/completed=${num('cost_per_completed_task', '.4f')} "
            f"escalation={num('escalation_rate', '.3f')} retrieval_miss={num('retrieval_miss_rate', '.3f')} "
            f"tool_errors={num('tool_error_rate', '.3f')} llm_p95={num('llm_latency_p95_ms', '.0f')}ms "
            f"late={data['late_events']}"
        )
    line = (
        f"{data.get('detected_at')} {data.get('severity', '?').upper():<8} {data.get('kind')} "
        f"{data.get('measure')} {data.get('direction', '')} {key}  observed={data.get('observed')} "
        f"baseline={data.get('baseline')} detector={data.get('detector')}"
    )
    if data.get("rule"):
        line += f" rule={data['rule']!r}"
    if data.get("explanation"):
        line += f"  why: {data['explanation']}"
    return line


def _time_option(name: str, value: str | None) -> Any:
    """An RFC 3339 time given to ``--<name>``, or ConfigError."""
    from datetime import datetime

    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"bad --{name} {value!r}: expected RFC 3339, e.g. 2026-11-26T14:00:00Z"
        ) from None
    if when.tzinfo is None:
        raise ConfigError(f"bad --{name} {value!r}: give a UTC offset, e.g. {value}Z")
    return when


@main.command()
@data_dir_option
@click.option(
    "--rules",
    "rules_file",
    type=click.Path(path_type=Path),
    default=None,
    help="Rules file (.toml or .json) [default: AGENTSTREAM_RULES]",
)
@click.option(
    "--from", "since", default=None, metavar="TIME", help="First window to report (RFC 3339)"
)
@click.option("--to", "until", default=None, metavar="TIME", help="Replay windows before this time")
@click.option("--no-detectors", is_flag=True, help="Rules only, without the drift detectors")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per alert")
@friendly
def backtest(
    data_dir: Path | None,
    rules_file: Path | None,
    since: str | None,
    until: str | None,
    no_detectors: bool,
    as_json: bool,
) -> None:
    """Replay the lake's metrics through the rules and detectors; print what would have fired.

    Nothing is published or landed. Windows before --from prime the detectors as the live
    worker's history did; the same metrics give the same alert ids as the live worker.
    """
    from streams.backtest import backtest as run
    from streams.rules import RuleError, load_rules

    settings = Settings.load(data_dir=data_dir)
    start, end = _time_option("from", since), _time_option("to", until)
    if start is not None and end is not None and start >= end:
        raise ConfigError(f"bad --from {since!r}: it must be before --to {until!r}")
    try:
        rules = load_rules(f"@{rules_file}" if rules_file is not None else settings.rules)
    except RuleError as exc:
        raise ConfigError(f"bad rules: {exc}") from None
    found = run(settings.data_dir, rules, since=start, until=end, detectors=not no_detectors)
    rows = found.to_pylist()
    if as_json:
        for row in rows:
            click.echo(msgspec.json.encode(row).decode())
        return
    for row in rows:
        what = f"rule {row['rule']!r}" if row["rule"] else row["detector"]
        key = "/".join(
            str(row[k] or "*")
            for k in ("agent_id", "agent_version", "prompt_version", "model", "tenant_id")
        )
        click.echo(
            f"{row['window_start']:%Y-%m-%dT%H:%M:%SZ} {row['severity'].upper():<8} "
            f"{row['kind']:<8} {what:<20} {row['level']:<6} {key} {row['measure']} "
            f"observed={row['observed']:.4g} baseline={row['baseline']:.4g} id={row['anomaly_id']}"
        )
        click.echo(f"    {row['message']}")
        if row["explanation"]:
            click.echo(f"    why: {row['explanation']}")
    fired = sum(1 for r in rows if r["kind"] != "recovery")
    click.echo(
        f"{fired} alert{'s' if fired != 1 else ''}, {len(rows) - fired} "
        f"recover{'ies' if len(rows) - fired != 1 else 'y'} ({len(rules)} rules"
        f"{'' if no_detectors else ' and the detectors'})"
    )


@main.command()
@broker_option
@data_dir_option
@click.option("--webhook", required=True, metavar="URL", help="http(s) URL to POST each alert to")
@click.option(
    "--min-severity",
    type=click.Choice(["info", "warning", "critical"]),
    default="warning",
    show_default=True,
    help="Post alerts of at least this severity",
)
@click.option("--group", default="agentstream-notify", show_default=True, help="Consumer group")
@click.option("--from-beginning", is_flag=True, help="A new group starts at the oldest alert")
@click.option(
    "--max",
    "max_posts",
    type=click.IntRange(min=1),
    default=None,
    help="Exit after this many posts",
)
@friendly
def notify(
    broker: str | None,
    data_dir: Path | None,
    webhook: str,
    min_severity: str,
    group: str,
    from_beginning: bool,
    max_posts: int | None,
) -> None:
    """Follow the anomalies topic and POST each alert to a webhook (Slack-compatible JSON).

    Retries with backoff until the endpoint accepts; each alert id is posted at most once,
    across restarts (the posted ids are kept in <data dir>/.notify/<group>.posted).
    """
    from pipeline.notify import Notifier, check_webhook

    check_webhook(webhook)
    settings = Settings.load(broker=broker, data_dir=data_dir)
    notifier = Notifier(
        settings, webhook, min_severity=min_severity, group=group, from_beginning=from_beginning
    )
    logging.getLogger("agentstream.notify").setLevel(logging.INFO)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(notifier.run(max_posts))


@main.command()
@broker_option
@data_dir_option
@click.option("--events", "n_events", type=click.IntRange(min=1), default=20_000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--broker-kind",
    type=click.Choice(["tansu", "kafka"]),
    default="tansu",
    show_default=True,
    help="Embedded broker to start when --broker is not given",
)
@click.option("--timeout", type=float, default=600, show_default=True)
@scenario_option
@click.option(
    "--lateness",
    type=float,
    default=10.0,
    show_default=True,
    help="Allowed lateness in seconds (short, so the last window closes soon after the end)",
)
@friendly
def demo(
    broker: str | None,
    data_dir: Path | None,
    n_events: int,
    seed: int,
    broker_kind: str,
    timeout: float,
    scenario: str,
    lateness: float,
) -> None:
    """Broker, worker and generated traffic end to end, then a summary from DuckDB.

    Waits until every event has landed and every window has closed (about one window plus
    the lateness after the last event), then prints KPIs from the `metrics` view.
    """
    from pipeline.broker import LocalBroker, free_port
    from pipeline.generate import generate
    from pipeline.scenarios import write_ground_truth

    config = _traffic(n_events, seed, scenario)  # before starting anything
    data_dir = data_dir or Path("agentstream-demo")
    from sinks.lake import holds_lake

    if holds_lake(data_dir):
        raise ConfigError(
            f"{data_dir} already holds a lake: pass another --data-dir or remove it "
            "(the demo's embedded broker starts empty, so its offsets would not match)"
        )
    local: LocalBroker | None = None
    if broker is None and "AGENTSTREAM_BROKER" not in os.environ:
        local = LocalBroker(broker_kind)  # type: ignore[arg-type]
        broker = local.start()
        click.echo(f"started {broker_kind} broker on {broker}", err=True)
    from pipeline.scenarios import budget_truth

    # A scenario about budgets runs with its budgets, or it would show no burn-rate alert.
    budgets = budget_truth(config)[0] or os.environ.get("AGENTSTREAM_BUDGETS", "")
    settings = Settings.load(
        broker=broker,
        data_dir=data_dir,
        # A port of its own unless one is set: demos side by side must not share 6066.
        web_port=None if "AGENTSTREAM_WEB_PORT" in os.environ else free_port(),
        allowed_lateness_s=lateness,
        budgets=budgets,
    )
    proc: subprocess.Popen[bytes] | None = None
    try:
        ensure_pipeline_topics(settings)
        already, _ = asyncio.run(committed_lag(settings))
        proc, log_from = _spawn_worker(settings)
        truth = Path(settings.data_dir) / "ground_truth.json"
        write_ground_truth(config, truth)
        click.echo(f"scenario {scenario}: ground truth in {truth}", err=True)
        lines = ((i, schema.encode(ev)) for i, ev in enumerate(generate(config)))
        with click.progressbar(length=n_events, label="publishing", file=sys.stderr) as bar:
            asyncio.run(_publish_lines(settings, lines, chunk=20_000, progress=bar.update))
        for attempt in range(3):
            try:
                _wait_landed(settings, already + n_events, timeout, proc, log_from)
                break
            except _WebPortLost:
                if attempt == 2:
                    raise
                # The port was free when picked and taken before the worker bound it (demos
                # side by side): another pick. The new worker resumes from the lake.
                settings = settings.with_(web_port=free_port())
                click.echo(f"web port taken: worker restarted on {settings.web_port}", err=True)
                proc, log_from = _spawn_worker(settings)
        _wait_windows(settings, time.monotonic() + timeout, proc)
    finally:
        if proc is not None:
            _stop(proc)
        if local is not None:
            local.stop()
    click.echo(summary(settings.data_dir))
    click.echo(scenario_summary(settings.data_dir, scenario))
    from pipeline.report import render_report

    click.echo(f"report: {render_report(settings.data_dir, settings.data_dir / 'report.html')}")


class _WebPortLost(BrokerUnavailable):
    """The demo's worker died because its web port was taken."""


# The worker's own start check, or faust's bind failing after it (the port taken in between).
_WEB_PORT_LOST = re.compile(r"the web port \S+ is in use|Errno 98|[Aa]ddress already in use")


def _spawn_worker(settings: Settings) -> tuple[subprocess.Popen[bytes], int]:
    """The demo's worker, and where its lines start in ``worker.log`` (appended to)."""
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    log = open(Path(settings.data_dir) / "worker.log", "ab")  # noqa: SIM115
    cmd = [sys.executable, "-m", "pipeline.cli", "worker"]
    env = {**os.environ, **settings.to_env()}
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
    )
    return proc, log.tell()


def _wait_landed(
    settings: Settings, total: int, timeout: float, proc: subprocess.Popen[bytes], log_from: int
) -> None:
    deadline = time.monotonic() + timeout
    with click.progressbar(length=total, label="landing   ", file=sys.stderr) as bar:
        done = 0
        while done < total:
            if proc.poll() is not None:
                log = Path(settings.data_dir) / "worker.log"
                with log.open("rb") as fh:
                    fh.seek(log_from)  # this worker's lines only
                    said = fh.read().decode(errors="replace")
                if _WEB_PORT_LOST.search(said):
                    raise _WebPortLost(
                        f"the worker's web port {settings.web_port} was taken; see {log}"
                    )
                raise BrokerUnavailable(
                    f"the worker exited with status {proc.returncode}; see {log}"
                )
            if time.monotonic() > deadline:
                raise BrokerUnavailable(f"gave up after {timeout:.0f} s: {done} of {total} landed")
            _, now = asyncio.run(committed_lag(settings))
            bar.update(now - done)
            done = now
            time.sleep(0.5)


@main.group()
def lake() -> None:
    """Lake maintenance, status and import (the DuckLake tables under the data dir)."""


@lake.command()
@data_dir_option
@click.option("--retention", default=None, help="Time travel kept, e.g. 1d, 12h [default 1d]")
@friendly
def maintain(data_dir: Path | None, retention: str | None) -> None:
    """Merge small files, expire old snapshots, delete unused files: one pass now."""
    from sinks.maintenance import maintain_configured

    settings = Settings.load(data_dir=data_dir)
    if retention:
        settings = settings.with_(lake_retention=retention)
    done = maintain_configured(settings)
    click.echo(f"maintained {settings.data_dir}: {done.summary()}")


@lake.command()
@data_dir_option
@friendly
def status(data_dir: Path | None) -> None:
    """Tables (rows, files, bytes), snapshots and the stored Kafka positions."""
    from sinks.maintenance import status as lake_status

    settings = Settings.load(data_dir=data_dir)
    click.echo(lake_status(settings.data_dir, settings.catalog))


@lake.command(
    name="bench",
    context_settings={"ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def lake_bench(args: tuple[str, ...]) -> None:
    """Build a lake through the real worker and time the dashboard queries (--help)."""
    from bench.lake import main as bench_main

    sys.exit(bench_main(list(args)))


@lake.command(name="import")
@data_dir_option
@click.argument("old_dir", type=click.Path(path_type=Path))
@friendly
def import_(data_dir: Path | None, old_dir: Path) -> None:
    """Bring a lake of Parquet folders (older agentstream) into the lake, exactly once."""
    from sinks.catalog import TABLES, prepare
    from sinks.migrate import import_lake

    settings = Settings.load(data_dir=data_dir)
    writer = prepare(settings.data_dir, settings.catalog)
    try:
        done = import_lake(writer, old_dir, TABLES)
    finally:
        writer.close()
    click.echo(
        f"imported {done.files} files ({done.rows} rows) from {old_dir} into "
        f"{settings.data_dir}; {done.skipped} already imported"
    )


# Control records (a release announcement) are landed but count in no window.
_UNCOUNTED = f"""
    SELECT (SELECT count(*) FROM events
            WHERE type NOT IN ({", ".join(f"'{t}'" for t in schema.CONTROL_TYPES)}))
         - (SELECT coalesce(sum(events + late_events), 0) FROM metrics WHERE level = 'key')
"""


def _wait_windows(settings: Settings, deadline: float, proc: subprocess.Popen[bytes]) -> None:
    from sinks.catalog import connect

    wait = settings.window_seconds + settings.allowed_lateness_s
    click.echo(f"closing the last windows (up to {wait:.0f} s after the last event)...", err=True)
    while True:
        ((left,),) = connect(settings.data_dir).sql(_UNCOUNTED).fetchall()
        if left == 0:
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            click.echo(f"warning: {left} events are not in a closed window yet", err=True)
            return
        time.sleep(1.0)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    from pipeline.procs import stop_group

    stop_group(proc, 30)


KPI_SQL = """
    SELECT agent_id, agent_version,
           sum(tasks_completed) AS completed_tasks,
           round(sum(cost_usd) / nullif(sum(tasks_completed), 0), 4) AS cost_per_completed_task,
           round(sum(escalations) / nullif(sum(tasks_started), 0), 3) AS escalation_rate,
           round(sum(retrieval_misses) / nullif(sum(retrievals), 0), 3) AS retrieval_miss_rate,
           round(max(llm_latency_p95_ms)) AS worst_llm_p95_ms
    FROM metrics WHERE level = 'key'
    GROUP BY ALL ORDER BY agent_id, agent_version
"""


def summary(data_dir: Path) -> str:
    """A short report of the lake: rows, dead letters, and KPIs per agent version from `metrics`."""
    from sinks.catalog import connect

    con = connect(data_dir)
    ((rows, distinct, late),) = con.sql(
        "SELECT count(*), count(DISTINCT event_id), count(*) FILTER (late) FROM events"
    ).fetchall()
    ((dead,),) = con.sql("SELECT count(*) FROM dead_letters").fetchall()
    ((windows, first, last),) = con.sql(
        "SELECT count(DISTINCT window_start), min(window_start), max(window_end) FROM metrics"
    ).fetchall()
    out = io.StringIO()
    out.write(
        f"events landed: {rows} ({distinct} distinct event_id, {late} late), dead letters: {dead}\n"
    )
    out.write(f"closed windows: {windows} ({first} to {last})\n")
    out.write(f"lake: {Path(data_dir).absolute()}\n")
    out.write(f'query: agentstream sql --data-dir {data_dir} "SELECT * FROM metrics LIMIT 5"\n\n')
    out.write("KPIs per agent version, from the metrics view:\n")
    out.write(render(con.sql(KPI_SQL), "table"))
    alerts = con.sql(
        "SELECT window_start, severity, kind, message FROM anomalies "
        "WHERE kind <> 'recovery' ORDER BY window_start LIMIT 20"
    ).fetchall()
    out.write(f"\nanomalies: {len(alerts)}" + (" (first 20)" if len(alerts) == 20 else "") + "\n")
    for window_start, severity, kind, message in alerts:
        out.write(f"  {window_start:%Y-%m-%d %H:%M} {severity.upper():<8} {kind:<8} {message}\n")
    return out.getvalue()


def scenario_summary(data_dir: Path, scenario: str) -> str:
    """What the scenario is about and what the pipeline made of it, from the lake."""
    from pipeline.scenarios import ROLLOUT_SCENARIOS, SCENARIOS
    from sinks.analysis import connect  # release_summary is an analysis view

    con = connect(data_dir)
    out = io.StringIO()
    out.write(f"scenario {scenario}: {SCENARIOS[scenario].description}\n")
    if SCENARIOS[scenario].budgets is not None:
        out.write("budgets (from the budgets view):\n")
        out.write(render(con.sql(_BUDGETS_SQL), "table"))
        alerts = con.sql(
            "SELECT severity, message FROM anomalies WHERE kind = 'budget_burn' "
            "ORDER BY detected_at"
        ).fetchall()
        out.write(f"budget alerts: {len(alerts)}\n")
        for severity, message in alerts:
            out.write(f"  {severity.upper():<8} {message}\n")
    elif scenario in ROLLOUT_SCENARIOS:
        out.write("release verdicts (from the release_summary view):\n")
        out.write(render(con.sql(_RELEASES_SQL), "table"))
    return out.getvalue()


_BUDGETS_SQL = """
    SELECT budget, round(spent_usd, 2) AS spent_usd, round(projected_usd, 2) AS projected_usd,
           projected_exhausted_at, alerted_at, exhausted_at
    FROM budgets ORDER BY (alerted_at IS NULL), budget
"""
_RELEASES_SQL = """
    SELECT release_id, measure, verdict, windows FROM release_summary ORDER BY release_id, measure
"""


if __name__ == "__main__":
    main()
