"""The one app factory: a faust application wired with agentstream's services and web pages."""

from __future__ import annotations

import logging
from typing import Any

import faust
import msgspec
from faust.web import Request, Response, View

from pipeline.config import ConfigError, Settings
from pipeline.kafka import ssl_context
from streams.aggregate import AggregateConsumer
from streams.ingest import IngestConsumer
from streams.stage import HEARTBEAT_MS
from streams.telemetry import WorkerTelemetry

log = logging.getLogger("agentstream.app")


class Worker:
    """The pieces of one running worker, for the CLI, tests and the benchmark."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.telemetry = WorkerTelemetry()
        self.ingest = (
            IngestConsumer(settings, self.telemetry) if settings.role in ("all", "ingest") else None
        )
        self.aggregate = (
            AggregateConsumer(settings, self.telemetry)
            if settings.role in ("all", "aggregate")
            else None
        )
        self.app = create_app(settings, self)

    @property
    def stages(self) -> list[IngestConsumer | AggregateConsumer]:
        return [c for c in (self.ingest, self.aggregate) if c is not None]


def create_app(settings: Settings, worker: Worker) -> faust.App:
    """Build the faust app: the stages as services, health and metrics pages."""
    app = faust.App(
        f"{settings.group_id}-app",
        broker=f"kafka://{settings.broker}",
        broker_credentials=faust_credentials(settings),
        store="memory://",
        # faust keeps its own small state here instead of in the working directory.
        datadir=str(settings.data_dir / ".faust"),
        autodiscover=False,
        web_port=settings.web_port,
        web_bind=settings.web_host,
        web_host=settings.web_host,
        topic_partitions=settings.partitions,
        topic_replication_factor=1,
        producer_acks=-1,
        # As the stages' consumers (streams.stage.HEARTBEAT_MS): the stages start once this
        # app's own group has settled, so a second process joining waited on it too.
        broker_heartbeat_interval=HEARTBEAT_MS / 1000,
    )
    # faust accepts an instance here too (it only instantiates classes).
    for stage in worker.stages:
        app.service(stage)  # type: ignore[arg-type]

    @app.page("/health")
    class Health(View):
        async def get(self, request: Request) -> Response:
            stages = worker.stages
            ok = all(c.healthy and c.last_error is None for c in stages)
            ingest, aggregate = worker.ingest, worker.aggregate
            body: dict[str, Any] = {
                "status": "ok" if ok else "degraded",
                "role": worker.settings.role,
                "events_landed": ingest.landed_events if ingest else 0,
                "dead_letters": ingest.dead_lettered if ingest else 0,
                "metrics_emitted": aggregate.metrics_emitted if aggregate else 0,
                "last_error": next((c.last_error for c in stages if c.last_error), None),
            }
            return self.bytes(
                msgspec.json.encode(body),
                content_type="application/json",
                status=200 if body["status"] == "ok" else 503,
            )

    @app.page("/metrics")
    class Metrics(View):
        async def get(self, request: Request) -> Response:
            return self.bytes(worker.telemetry.render(), content_type="text/plain")

    return app


def faust_credentials(settings: Settings) -> faust.auth.Credentials | None:
    """The same TLS / SASL settings as the aiokafka clients, in faust's terms."""
    context = ssl_context(settings)
    if settings.security_protocol.startswith("SASL"):
        assert settings.sasl_password is not None
        return faust.SASLCredentials(
            username=settings.sasl_username,
            password=settings.sasl_password.reveal(),
            ssl_context=context,
            mechanism=settings.sasl_mechanism,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None


def check_web_ports(settings: Settings, processes: int = 1) -> None:
    """Refuse to start, in one line, when a worker's web port (``/health``, ``/metrics``) is
    taken: faust would die on bind with a traceback, and a child of ``--processes`` would
    leave the others running short of a worker."""
    from pipeline.broker import port_taken

    for i in range(processes):
        port = settings.web_port + i
        taken = port_taken(port, settings.web_host)
        if taken is not None:
            also = f" (--processes {processes} uses ports from it up)" if processes > 1 else ""
            raise ConfigError(
                f"the web port {settings.web_host}:{port} is in use ({taken.strerror}): pass "
                f"a free --web-port or set AGENTSTREAM_WEB_PORT{also}"
            )


def run(settings: Settings, *, loglevel: str = "info") -> int:
    """Run a worker in the foreground until SIGINT/SIGTERM; returns the exit code."""
    worker = Worker(settings)
    fw = faust.Worker(worker.app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    try:
        fw.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def run_processes(settings: Settings, processes: int, *, loglevel: str = "info") -> int:
    """Run ``processes`` workers as child processes (web ports from ``settings.web_port``
    up) until SIGINT/SIGTERM, which is passed on to each; returns the worst exit code.

    They share the work as workers on several machines do (one consumer group per stage):
    one Python process uses one core, so this is how one machine's cores are used. A child
    that dies is not restarted: the others take its partitions over.
    """
    import os
    import signal
    import subprocess
    import sys
    import time

    from pipeline.procs import stop_group

    children = []
    for i in range(processes):
        env = {
            **os.environ,
            **settings.to_env(),
            "AGENTSTREAM_WEB_PORT": str(settings.web_port + i),
        }
        children.append(
            subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", "worker", "--loglevel", loglevel],
                env=env,
                start_new_session=True,
            )
        )
    stopping: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        stopping.append(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stopping and any(c.poll() is None for c in children):
            time.sleep(0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        stopped = [stop_group(c, 60) for c in children]
    codes = [int(c.returncode) if ok else 1 for c, ok in zip(children, stopped, strict=True)]
    return max(abs(code) for code in codes)
