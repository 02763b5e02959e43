"""The ``agentstream`` command line.

Every mistake a user can make (bad address, missing folder, bad SQL, invalid event) ends in a
one-line ``error: ...`` on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import asyncio
import functools
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import click
import msgspec

from pipeline import schema
from pipeline.config import ConfigError, Settings
from pipeline.kafka import BrokerUnavailable, committed_lag

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

    return (*USER_ERRORS, BrokerError, QueryError)


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
    help="Folder of the Parquet lake [env AGENTSTREAM_DATA_DIR; default ./agentstream-data]",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="agentstream")
def main() -> None:
    """agentstream: streaming analytics for AI agents in production."""


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
@click.option("--loglevel", default="info", show_default=True)
@friendly
def worker(
    broker: str | None,
    data_dir: Path | None,
    web_port: int | None,
    group_id: str | None,
    loglevel: str,
) -> None:
    """Consume agent events, land them as Parquet, route bad ones to the dead-letter topic."""
    from pipeline.broker import ensure_topics
    from streams.app import run

    settings = Settings.load(broker=broker, data_dir=data_dir, web_port=web_port, group_id=group_id)
    _ensure_topics(settings, ensure_topics)
    sys.exit(run(settings, loglevel=loglevel))


def _ensure_topics(settings: Settings, ensure: Callable[..., None]) -> None:
    try:
        ensure(
            settings.broker,
            {
                settings.events_topic: settings.partitions,
                settings.dlq_topic: settings.partitions,
                settings.metrics_topic: settings.partitions,
                settings.anomalies_topic: settings.partitions,
            },
            timeout=15,
        )
    except Exception as exc:
        from pipeline.kafka import unreachable

        raise unreachable(settings, exc) from None


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
    from pipeline.broker import ensure_topics

    settings = Settings.load(broker=broker, events_topic=topic)
    _ensure_topics(settings, ensure_topics)
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


@main.command()
@click.option("--events", "n_events", type=click.IntRange(min=0), required=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.File("wb"), default="-", help="Output file [default stdout]")
@friendly
def generate(n_events: int, seed: int, out: BinaryIO) -> None:
    """Write realistic synthetic agent traffic as JSONL, deterministic for a seed."""
    from pipeline.generate import TrafficConfig, generate_jsonl

    generate_jsonl(TrafficConfig(events=n_events, seed=seed), out)


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
    """Run a DuckDB QUERY over the lake (views: events, dead_letters, llm_calls, ...)."""
    from sinks.catalog import QueryError, connect

    settings = Settings.load(data_dir=data_dir)
    con = connect(settings.data_dir)
    import duckdb

    try:
        rel = con.sql(query)
        if rel is None:
            return
        click.echo(render(rel, fmt), nl=False)
    except duckdb.Error as exc:
        raise QueryError(str(exc).splitlines()[0]) from None


def render(rel: Any, fmt: str) -> str:
    """Format a DuckDB relation as a table, CSV or JSON (an array of objects)."""
    if fmt == "table":
        return _table(rel.columns, rel.fetchall())
    if fmt == "csv":
        import pyarrow.csv as pacsv

        buf = io.BytesIO()
        pacsv.write_csv(rel.fetch_arrow_table(), buf)
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
@friendly
def demo(
    broker: str | None,
    data_dir: Path | None,
    n_events: int,
    seed: int,
    broker_kind: str,
    timeout: float,
) -> None:
    """Broker, worker and generated traffic end to end, then a summary from DuckDB."""
    from pipeline.broker import LocalBroker, ensure_topics, free_port
    from pipeline.generate import TrafficConfig, generate

    local: LocalBroker | None = None
    if broker is None and "AGENTSTREAM_BROKER" not in os.environ:
        local = LocalBroker(broker_kind)  # type: ignore[arg-type]
        broker = local.start()
        click.echo(f"started {broker_kind} broker on {broker}", err=True)
    settings = Settings.load(
        broker=broker, data_dir=data_dir or Path("agentstream-demo"), web_port=free_port()
    )
    proc: subprocess.Popen[bytes] | None = None
    try:
        _ensure_topics(settings, ensure_topics)
        already, _ = asyncio.run(committed_lag(settings))
        proc = _spawn_worker(settings)
        lines = (
            (i, schema.encode(ev))
            for i, ev in enumerate(generate(TrafficConfig(events=n_events, seed=seed)))
        )
        with click.progressbar(length=n_events, label="publishing", file=sys.stderr) as bar:
            asyncio.run(_publish_lines(settings, lines, chunk=20_000, progress=bar.update))
        _wait_landed(settings, already + n_events, timeout, proc)
    finally:
        if proc is not None:
            _stop(proc)
        if local is not None:
            local.stop()
    click.echo(summary(settings.data_dir))


def _spawn_worker(settings: Settings) -> subprocess.Popen[bytes]:
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    log = open(Path(settings.data_dir) / "worker.log", "ab")  # noqa: SIM115
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "worker",
        "--broker",
        settings.broker,
        "--data-dir",
        str(settings.data_dir),
        "--web-port",
        str(settings.web_port),
    ]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_landed(
    settings: Settings, total: int, timeout: float, proc: subprocess.Popen[bytes]
) -> None:
    deadline = time.monotonic() + timeout
    with click.progressbar(length=total, label="landing   ", file=sys.stderr) as bar:
        done = 0
        while done < total:
            if proc.poll() is not None:
                raise BrokerUnavailable(
                    f"the worker exited with status {proc.returncode}; see "
                    f"{Path(settings.data_dir) / 'worker.log'}"
                )
            if time.monotonic() > deadline:
                raise BrokerUnavailable(f"gave up after {timeout:.0f} s: {done} of {total} landed")
            _, now = asyncio.run(committed_lag(settings))
            bar.update(now - done)
            done = now
            time.sleep(0.5)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def summary(data_dir: Path) -> str:
    """A short report of the lake: rows, dead letters and a per-agent-version KPI table."""
    from sinks.catalog import connect

    con = connect(data_dir)
    ((rows, distinct),) = con.sql(
        "SELECT count(*), count(DISTINCT event_id) FROM events"
    ).fetchall()
    ((dead,),) = con.sql("SELECT count(*) FROM dead_letters").fetchall()
    kpis = con.sql(
        """
        SELECT agent_id, agent_version,
               count(*) FILTER (type = 'task' AND outcome = 'completed') AS completed_tasks,
               round(sum(cost_usd) / nullif(count(*) FILTER (type = 'task' AND outcome = 'completed'), 0), 4)
                   AS cost_per_completed_task,
               round(count(*) FILTER (type = 'escalation')
                     / nullif(count(*) FILTER (type = 'task' AND outcome = 'started'), 0), 3)
                   AS escalation_rate,
               round(avg(CASE WHEN type = 'retrieval' THEN miss::INT END), 3) AS retrieval_miss_rate
        FROM events GROUP BY ALL ORDER BY agent_id, agent_version
        """
    )
    out = io.StringIO()
    out.write(f"events landed: {rows} ({distinct} distinct event_id), dead letters: {dead}\n")
    out.write(
        f'lake: {Path(data_dir).absolute()}  (query: agentstream sql --data-dir {data_dir} "...")\n'
    )
    out.write(render(kpis, "table"))
    return out.getvalue()


if __name__ == "__main__":
    main()
