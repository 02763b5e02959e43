"""docker-compose.yml, Dockerfile and .dockerignore: checked as files, then run as processes.

No Docker engine runs where these tests run, so the compose topology is proved the other way
round: each agentstream service's command and environment are taken from the compose file,
container addresses are mapped to local ones, and the command runs as a local process
against the session's real Apache Kafka broker. The kafka service's own configuration is
turned into a server.properties the way the apache/kafka image does it, and a broker is
booted from it.
"""

from __future__ import annotations

import base64
import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.broker import KAFKA_VERSION, ensure_topics, fetch_kafka, free_port
from pipeline.config import ENV_PREFIX, Settings
from pipeline.generate import TrafficConfig, generate_jsonl

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# Names the compose file uses for things that are different outside a container.
COMPOSE_BROKER = "kafka:9092"
COMPOSE_DATA = "/data"
COMPOSE_WEB_PORT = "6066"
CLI = [sys.executable, "-m", "pipeline.cli"]
IMAGE_ENTRYPOINT = ["agentstream"]
# What a container may wait on with `condition: service_healthy`.
HEALTHY = "service_healthy"


# --------------------------------------------------------------------------------------
# Reading the compose file
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    svcs = compose.get("services")
    assert isinstance(svcs, dict) and svcs, "docker-compose.yml has no services"
    return svcs


def _argv(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def _env(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) for item in env)
        return {k: v for k, v in pairs}
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _full_command(service: Mapping[str, Any]) -> list[str]:
    """Entrypoint plus command as the container runs them (image ENTRYPOINT by default)."""
    entry = _argv(service["entrypoint"]) if "entrypoint" in service else IMAGE_ENTRYPOINT
    return entry + _argv(service.get("command"))


def _is_pipeline(service: Mapping[str, Any]) -> bool:
    return "build" in service


def _invocations(argv: list[str]) -> Iterator[list[str]]:
    """Every ``agentstream ...`` command line in argv, including inside ``sh -c`` scripts."""
    if argv[:1] == ["agentstream"]:
        yield argv[1:]
    elif argv[:2] == ["sh", "-c"]:
        for part in re.split(r"\|\||&&|[|;]", argv[2]):
            words = shlex.split(part)
            if words[:1] == ["agentstream"]:
                yield words[1:]


def _depends(service: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: {"condition": "service_started"} for name in deps}
    return {name: spec or {} for name, spec in deps.items()}


def _volume_targets(service: Mapping[str, Any]) -> list[str]:
    """Container paths of the service's volumes and bind mounts."""
    out = []
    for entry in service.get("volumes") or []:
        out.append(entry["target"] if isinstance(entry, dict) else str(entry).split(":")[1])
    return out


def _seconds(duration: str | int | float) -> float:
    """A compose duration (``45s``, ``1m30s``, ``500ms``) in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def _port_mappings(service: Mapping[str, Any]) -> list[tuple[str | None, int | None, int]]:
    """(host ip, host port, container port) of each published port."""
    out: list[tuple[str | None, int | None, int]] = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            host_port = entry.get("published")
            out.append(
                (entry.get("host_ip"), int(host_port) if host_port else None, int(entry["target"]))
            )
            continue
        text = str(entry).split("/", 1)[0]
        parts = text.rsplit(":", 2)
        # A host port range ("6066-6069") is given as its first port.
        if len(parts) == 3:
            out.append((parts[0].strip("[]"), int(parts[1].split("-")[0]), int(parts[2])))
        elif len(parts) == 2:
            out.append((None, int(parts[0].split("-")[0]), int(parts[1])))
        else:
            out.append((None, None, int(parts[0])))
    return out


# --------------------------------------------------------------------------------------
# Structure
# --------------------------------------------------------------------------------------


def test_compose_spec_has_no_version_key(compose: dict[str, Any]) -> None:
    assert "version" not in compose, "the compose spec has no version key; drop it"


def test_service_healthy_dependencies_have_healthchecks(
    services: dict[str, dict[str, Any]],
) -> None:
    waited_on = 0
    for name, svc in services.items():
        for dep, spec in _depends(svc).items():
            assert dep in services, f"{name} depends on unknown service {dep!r}"
            if spec.get("condition") == HEALTHY:
                waited_on += 1
                check = services[dep].get("healthcheck") or {}
                assert check.get("test") and not check.get("disable"), (
                    f"{name} waits for {dep} to be healthy, but {dep} has no healthcheck"
                )
    assert waited_on, "no service waits for the broker to be healthy"


def test_built_services_have_their_dockerfile(services: dict[str, dict[str, Any]]) -> None:
    built = {name: svc for name, svc in services.items() if "build" in svc}
    assert "worker" in built
    for name, svc in built.items():
        build = svc["build"]
        context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
        dockerfile = (
            "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        )
        assert (context / dockerfile).is_file(), f"{name}: {context / dockerfile} does not exist"


def test_published_ports_bind_to_loopback(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        for host_ip, _, container_port in _port_mappings(svc):
            assert host_ip == "127.0.0.1", (
                f"{name} publishes {container_port} on {host_ip or 'every interface'}; "
                "bind it to 127.0.0.1"
            )


def test_kafka_image_is_kafka_4(services: dict[str, dict[str, Any]]) -> None:
    image = services["kafka"]["image"]
    match = re.fullmatch(r"apache/kafka:(\d+)\.(\d+)\.(\d+)", image)
    assert match, f"kafka image {image!r} is not a pinned apache/kafka:X.Y.Z"
    assert match.group(1) == "4", f"{image}: agentstream needs Kafka 4.x (KRaft)"
    assert match.group(1) == KAFKA_VERSION.split(".")[0], "tests run another Kafka major"


def _listeners(value: str) -> dict[str, tuple[str, int]]:
    out = {}
    for item in value.split(","):
        name, _, rest = item.strip().partition("://")
        host, _, port = rest.rpartition(":")
        out[name] = (host, int(port))
    return out


def test_kafka_listeners_fit_together(services: dict[str, dict[str, Any]]) -> None:
    kafka = services["kafka"]
    env = _env(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node = env["KAFKA_NODE_ID"]
    listeners = _listeners(env["KAFKA_LISTENERS"])
    advertised = _listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    protocols = dict(p.split(":") for p in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]

    assert set(listeners) <= set(protocols), "a listener has no security protocol"
    assert controller in listeners and controller not in advertised
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] in advertised
    assert set(advertised) <= set(listeners)
    voter = env["KAFKA_CONTROLLER_QUORUM_VOTERS"]
    assert voter == f"{node}@kafka:{listeners[controller][1]}", voter
    assert len(base64.urlsafe_b64decode(env["CLUSTER_ID"] + "==")) == 16, "bad CLUSTER_ID"

    # Containers reach the broker at the address the pipeline services are given ...
    inside = [a for name, a in advertised.items() if f"{a[0]}:{a[1]}" == COMPOSE_BROKER]
    assert inside, f"no advertised listener is {COMPOSE_BROKER}"
    # ... and the host through a published port whose advertised address is that port.
    published = {cport: (ip, hport) for ip, hport, cport in _port_mappings(kafka)}
    host_side = [(n, a) for n, a in advertised.items() if a[0] in ("127.0.0.1", "localhost")]
    assert host_side, "no listener is advertised to the host"
    for name, (_, port) in host_side:
        cport = listeners[name][1]
        assert cport in published, f"listener {name} (:{cport}) is not published"
        assert published[cport][1] == port, f"{name} advertises :{port}, published elsewhere"

    for key, value in env.items():
        if key.endswith("REPLICATION_FACTOR") or key.endswith("MIN_ISR"):
            assert value == "1", f"{key}={value} on a one-node cluster"
    assert env["KAFKA_LOG_DIRS"] in _volume_targets(kafka), (
        "the broker's log dir is not on a volume"
    )
    test = kafka["healthcheck"]["test"]
    assert "/opt/kafka/bin/kafka-broker-api-versions.sh" in test
    probe = test[test.index("--bootstrap-server") + 1]
    assert int(probe.rpartition(":")[2]) in {p for _, p in listeners.values()}


def test_worker_web_port_health_and_signals(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    env = _env(worker)
    assert env.get("AGENTSTREAM_WEB_HOST") == "0.0.0.0", "health page must listen beyond lo"
    port = int(env.get("AGENTSTREAM_WEB_PORT", Settings.web_port))
    assert [cport for _, _, cport in _port_mappings(worker)] == [port]
    test = " ".join(_argv(worker["healthcheck"]["test"]))
    assert f"http://127.0.0.1:{port}/health" in test
    assert "curl" not in test and "wget" not in test, "python:3.11-slim has neither"
    assert _depends(worker)["kafka"]["condition"] == HEALTHY
    assert worker.get("restart") == "unless-stopped"
    assert COMPOSE_DATA in _volume_targets(worker), "the lake is not on a volume"
    # docker compose stop sends SIGTERM, then SIGKILL after the grace period (10 s by
    # default); the worker needs time to land what it holds.
    assert _seconds(worker.get("stop_grace_period", "10s")) >= 30


def test_worker_scales_out(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    """``docker compose up --scale worker=3``: replicas need host ports of their own, no fixed
    container name, and one shared lake (the stages split the work: README, "Scale out")."""
    worker = services["worker"]
    assert "container_name" not in worker, "a fixed container name cannot be scaled"
    (entry,) = worker["ports"]
    host = str(entry).split("/", 1)[0].rsplit(":", 2)[1]
    first, _, last = host.partition("-")
    assert last and int(last) - int(first) + 1 >= 3, f"{entry}: 3 replicas need 3 host ports"
    (data,) = [v for v in worker["volumes"] if str(v).split(":")[1] == COMPOSE_DATA]
    named = set(compose["volumes"])
    assert str(data).split(":")[0] in named, f"{data}: replicas must share a named volume"
    assert "--role" not in _argv(worker["command"]), "each replica runs every stage"


@cache
def _cli_options(subcommand: str) -> frozenset[str]:
    out = subprocess.run(
        [*CLI, subcommand, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, f"agentstream {subcommand} --help failed:\n{out.stderr}"
    return frozenset(re.findall(r"^\s+(?:-\w, )?(--[a-z0-9][a-z0-9-]*)", out.stdout, re.M))


def test_commands_use_real_cli_options(services: dict[str, dict[str, Any]]) -> None:
    checked = 0
    for name, svc in services.items():
        if not _is_pipeline(svc):
            continue
        for args in _invocations(_full_command(svc)):
            assert args, f"{name}: bare `agentstream`"
            sub, rest = args[0], args[1:]
            options = _cli_options(sub)
            for word in rest:
                if word.startswith("--"):
                    opt = word.split("=", 1)[0]
                    assert opt in options, f"{name}: `agentstream {sub}` has no {opt}"
            checked += 1
    assert checked >= 2, "expected the worker and the demo-traffic commands"


def test_environment_names_real_settings(services: dict[str, dict[str, Any]]) -> None:
    known = {ENV_PREFIX + f.name.upper() for f in fields(Settings) if f.name != "extra"}
    for name, svc in services.items():
        for key in _env(svc):
            if key.startswith(ENV_PREFIX):
                assert key in known, f"{name}: {key} is not a setting ({sorted(known)})"


def test_dockerfile_and_dockerignore() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    stages = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert stages and all(s == "python:3.11-slim" for s in stages), stages
    # The image installs the lock, runtime dependencies only, with the Makefile's uv.
    assert re.search(r"^RUN uv sync --locked --no-dev --no-editable", text, re.M)
    assert re.search(r"^COPY pyproject.toml uv.lock ", text, re.M)
    (uv,) = re.findall(r"pip install uv==(\S+)", text)
    assert f"UV_VERSION := {uv}\n" in (ROOT / "Makefile").read_text(encoding="utf-8")
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "image runs as root"
    (entry,) = re.findall(r"^ENTRYPOINT\s+(.+)$", text, re.M)
    assert json.loads(entry) == IMAGE_ENTRYPOINT

    # Everything `pip install .` reads must survive .dockerignore.
    ignored = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    packages = [p.replace(".", "/") for p in project["tool"]["setuptools"]["packages"]]
    needed = ["pyproject.toml", *packages]
    for path in needed:
        assert (ROOT / path).exists()
        hits = [p for p in ignored if fnmatch.fnmatch(path, p.lstrip("/"))]
        assert not hits, f".dockerignore drops {path} ({hits})"


def _bind_sources(service: Mapping[str, Any]) -> dict[str, str]:
    """Host path -> container path of the service's bind mounts (``./...:/...``)."""
    out = {}
    for entry in service.get("volumes") or []:
        source, target = str(entry).split(":")[:2]
        if source.startswith((".", "/")):
            out[source] = target
    return out


def _exposed_metric_names() -> set[str]:
    """Every sample name the worker's /metrics can show (counters with _total, histograms
    with _bucket/_sum/_count)."""
    from streams.telemetry import WorkerTelemetry

    names = set()
    for metric in WorkerTelemetry().registry.collect():
        suffixes = {
            "counter": ("_total", "_created"),
            "histogram": ("_bucket", "_sum", "_count", "_created"),
        }.get(metric.type, ("",))
        names.update(metric.name + s for s in suffixes)
    return names


def test_prometheus_scrapes_the_worker(services: dict[str, dict[str, Any]]) -> None:
    prom = services["prometheus"]
    binds = _bind_sources(prom)
    ((source, target),) = [(s, d) for s, d in binds.items() if d.endswith("prometheus.yml")]
    assert f"--config.file={target}" in _argv(prom["command"])
    config = ROOT / source
    assert config.is_file(), config
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    port = _env(services["worker"]).get("AGENTSTREAM_WEB_PORT", str(Settings.web_port))
    (job,) = data["scrape_configs"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"worker:{port}"]


def test_grafana_dashboard_is_provisioned_and_names_real_metrics(
    services: dict[str, dict[str, Any]],
) -> None:
    grafana = services["grafana"]
    binds = _bind_sources(grafana)
    for src in binds:
        assert (ROOT / src).exists(), f"grafana mounts {src}, which does not exist"
    provisioning = next(ROOT / s for s, d in binds.items() if d == "/etc/grafana/provisioning")
    dashboards_dir = next(d for s, d in binds.items() if d != "/etc/grafana/provisioning")
    (source,) = yaml.safe_load(
        (provisioning / "datasources" / "prometheus.yml").read_text(encoding="utf-8")
    )["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load(
        (provisioning / "dashboards" / "agentstream.yml").read_text(encoding="utf-8")
    )["providers"]
    assert provider["options"]["path"] == dashboards_dir
    host_dir = next(ROOT / s for s, d in binds.items() if d == dashboards_dir)
    (path,) = host_dir.glob("*.json")
    dashboard = json.loads(path.read_text(encoding="utf-8"))
    exposed = _exposed_metric_names()
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"]]
    assert len(exprs) >= 10
    used = {n for e in exprs for n in re.findall(r"\bagentstream_[a-z_]+", e)}
    assert used, "the dashboard queries no agentstream metric"
    assert used <= exposed, f"not on /metrics: {sorted(used - exposed)}"
    per_agent = {n for n in used if n.startswith("agentstream_agent_")}
    assert len(per_agent) >= 5, per_agent
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]


def test_ui_runs_as_composed(
    services: dict[str, dict[str, Any]], bootstrap: str, tmp_path: Path
) -> None:
    """The ui service's command, with a token, serves the lake the worker's volume holds."""
    from sinks.catalog import prepare

    svc = services["ui"]
    assert "ui" in svc.get("profiles", []), "the page needs a token: started on request"
    assert _depends(svc)["worker"]["condition"] == HEALTHY
    assert any(
        t == f"{COMPOSE_DATA}:ro" or t == COMPOSE_DATA
        for t in (str(v).split(":", 1)[1] for v in svc.get("volumes") or [])
    )
    data_dir = tmp_path / "data"
    prepare(data_dir)
    port = free_port()
    local = Local(bootstrap, data_dir, free_port(), suffix=uuid.uuid4().hex[:10])
    argv = _full_command(svc)
    composed_port = argv[argv.index("--port") + 1]
    assert [c for _, _, c in _port_mappings(svc)] == [int(composed_port)]
    argv = [str(port) if a == composed_port else a for a in argv]
    token = uuid.uuid4().hex
    env = {**local.env(svc), "AGENTSTREAM_UI_TOKEN": token}
    log = tmp_path / "ui.log"
    proc = _spawn(local.argv(argv), tmp_path, env, log)
    try:
        deadline = time.monotonic() + 45
        while "agentstream ui:" not in _tail(log):
            assert proc.poll() is None, f"ui exited {proc.returncode}:\n{_tail(log)}"
            assert time.monotonic() < deadline, _tail(log)
            time.sleep(0.3)
        url = f"http://127.0.0.1:{port}/api/view/overview"
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            # An empty lake: no time range yet, every tile empty.
            assert set(json.loads(resp.read())["data"]["tiles"].values()) == {None}
        assert _get(url)[0] == 401
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, _tail(log)


# --------------------------------------------------------------------------------------
# Validators
# --------------------------------------------------------------------------------------


def test_docker_compose_config_accepts_the_file() -> None:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    for extra in ([], ["--profile", "demo"]):
        out = subprocess.run(
            [exe, "-f", str(COMPOSE), *extra, "config", "-q"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, out.stderr


def test_compose_file_matches_the_compose_spec_schema() -> None:
    pytest.importorskip("check_jsonschema")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


# --------------------------------------------------------------------------------------
# The topology, run as local processes
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Local:
    """Where the test runs what the compose file runs in containers."""

    bootstrap: str
    data_dir: Path
    web_port: int
    suffix: str  # of this test's topics and consumer group

    def value(self, value: str) -> str:
        """Map one compose argument or environment value to its local counterpart."""
        if value == COMPOSE_DATA or value.startswith(COMPOSE_DATA + "/"):
            return str(self.data_dir) + value[len(COMPOSE_DATA) :]
        value = value.replace(COMPOSE_BROKER, self.bootstrap)
        if value == COMPOSE_WEB_PORT:
            return str(self.web_port)
        # Tests bind to loopback only.
        return "127.0.0.1" if value == "0.0.0.0" else value

    def argv(self, argv: list[str]) -> list[str]:
        """The service's command line with ``agentstream`` run from this checkout."""
        argv = [self.value(a) for a in argv]
        if argv[:1] == ["agentstream"]:
            return [*CLI, *argv[1:]]
        if argv[:2] == ["sh", "-c"]:
            cli = " ".join(shlex.quote(w) for w in CLI)
            script = re.sub(r"(?<![\w./-])agentstream(?![\w.-])", cli, argv[2])
            return ["sh", "-c", script, *argv[3:]]
        raise AssertionError(f"cannot run {argv} locally")

    def env(self, service: Mapping[str, Any]) -> dict[str, str]:
        """The test's environment less stray AGENTSTREAM_* settings, plus the service's
        own, on topics and a consumer group of this test alone."""
        keep = {"AGENTSTREAM_CACHE"}
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX) or k in keep}
        path = [str(ROOT), os.environ.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
        env.update({k: self.value(v) for k, v in _env(service).items()})
        env.update(
            {
                "AGENTSTREAM_EVENTS_TOPIC": f"compose-{self.suffix}-events",
                "AGENTSTREAM_DLQ_TOPIC": f"compose-{self.suffix}-dlq",
                "AGENTSTREAM_METRICS_TOPIC": f"compose-{self.suffix}-metrics",
                "AGENTSTREAM_ANOMALIES_TOPIC": f"compose-{self.suffix}-anomalies",
                "AGENTSTREAM_GROUP_ID": f"compose-{self.suffix}",
                # Were the compose file to rely on the default 6066, still not that port.
                "AGENTSTREAM_WEB_PORT": str(self.web_port),
            }
        )
        return env


def _spawn(
    argv: list[str], cwd: Path, env: Mapping[str, str], log: Path
) -> subprocess.Popen[bytes]:
    """A service's process in a session of its own, its output in ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Path, what: str) -> None:
    """Until ``url`` answers 200 (45 s at most); fails if the process exits first."""
    deadline = time.monotonic() + 45
    status = 0
    while status != 200:
        assert proc.poll() is None, f"{what} exited {proc.returncode}:\n{_tail(log)}"
        assert time.monotonic() < deadline, f"no healthy {what}:\n{_tail(log)}"
        time.sleep(0.3)
        try:
            status, _ = _get(url)
        except OSError:
            status = 0


def _count(env: Mapping[str, str], data_dir: Path) -> int | None:
    out = subprocess.run(
        [
            *CLI,
            "sql",
            "--data-dir",
            str(data_dir),
            "--format",
            "csv",
            "SELECT count(*) AS n FROM events",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = out.stdout.split()
    return int(lines[-1]) if out.returncode == 0 and len(lines) == 2 else None


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_worker_and_demo_traffic_run_as_composed(
    services: dict[str, dict[str, Any]],
    bootstrap: str,
    tmp_path: Path,
) -> None:
    """The worker service's command lands the demo-traffic service's burst plus our own."""
    data_dir = tmp_path / "data"
    web_port = free_port()
    local = Local(bootstrap, data_dir, web_port, suffix=uuid.uuid4().hex[:10])
    worker_svc, demo_svc = services["worker"], services["demo-traffic"]
    env = local.env(worker_svc)

    log = tmp_path / "worker.log"
    cmd = local.argv(_full_command(worker_svc))
    proc = _spawn(cmd, tmp_path, env, log)
    try:
        health = f"http://127.0.0.1:{web_port}/health"
        _wait_healthy(proc, health, log, "worker")

        # The demo-traffic one-shot, as composed (its shell pipeline included).
        demo_argv = _full_command(demo_svc)
        demo = subprocess.run(
            local.argv(demo_argv),
            cwd=tmp_path,
            env=local.env(demo_svc),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        (script_cli,) = [a for a in _invocations(demo_argv) if a[0] == "generate"]
        demo_events = int(_option(script_cli, "--events"))
        assert demo.returncode == 0, demo.stderr
        assert f"published {demo_events} events" in demo.stderr

        # A few hundred more, from another seed (event ids carry the seed).
        ours = 300
        jsonl = tmp_path / "events.jsonl"
        with jsonl.open("wb") as fh:
            seed = int(_option(script_cli, "--seed")) + 1
            assert generate_jsonl(TrafficConfig(events=ours, seed=seed), fh) == ours
        pub = subprocess.run(
            [*CLI, "publish", "--broker", bootstrap, str(jsonl)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert pub.returncode == 0, pub.stderr

        total = demo_events + ours
        deadline = time.monotonic() + 45
        landed = None
        while landed != total:
            assert proc.poll() is None, f"worker exited {proc.returncode}:\n{_tail(log)}"
            assert landed is None or landed < total, f"{landed} landed, {total} sent"
            assert time.monotonic() < deadline, f"{landed} of {total} landed:\n{_tail(log)}"
            time.sleep(0.5)
            landed = _count(env, data_dir)

        status, body = _get(health)
        assert status == 200, body
        page = json.loads(body)
        assert page["status"] == "ok"
        assert page["events_landed"] == total
        assert page["dead_letters"] == 0

        # `docker compose stop`: SIGTERM, then SIGKILL after stop_grace_period.
        grace = _seconds(worker_svc.get("stop_grace_period", "10s"))
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=min(30.0, grace))
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker still running {min(30.0, grace):.0f} s after SIGTERM")
        assert code == 0, f"worker exited {code} on SIGTERM:\n{_tail(log)}"
        print(f"worker stopped {time.monotonic() - started:.1f} s after SIGTERM")
        assert _count(env, data_dir) == total, "the lake changed after shutdown"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# -- the kafka service's configuration, booted as the apache/kafka image would boot it -----

# Environment variables the image does not turn into broker properties.
_IMAGE_NON_PROPERTIES = {
    "CLUSTER_ID",
    "KAFKA_VERSION",
    "KAFKA_OPTS",
    "KAFKA_LOG4J_OPTS",
    "KAFKA_JMX_OPTS",
    "KAFKA_JVM_PERFORMANCE_OPTS",
    "KAFKA_GC_LOG_OPTS",
    "KAFKA_LOG4J_ROOT_LOGLEVEL",
    "KAFKA_LOG4J_LOGGERS",
    "KAFKA_TOOLS_LOG4J_LOGLEVEL",
    "KAFKA_HEAP_OPTS",
}


def _property_name(env_key: str) -> str:
    """KAFKA_FOO_BAR -> foo.bar (``__`` -> ``_``, ``___`` -> ``-``), as the image does."""
    key = env_key.removeprefix("KAFKA_")
    key = re.sub(r"(?<=[^_])_(?=[^_])", ".", key)
    return key.replace("___", "-").replace("__", "_").lower()


def image_properties(env: Mapping[str, str]) -> dict[str, str]:
    return {
        _property_name(k): v
        for k, v in env.items()
        if k.startswith("KAFKA_") and k not in _IMAGE_NON_PROPERTIES
    }


def test_property_names_follow_the_image_rules() -> None:
    assert (
        _property_name("KAFKA_LISTENER_SECURITY_PROTOCOL_MAP") == "listener.security.protocol.map"
    )
    assert _property_name("KAFKA_LOG_DIRS") == "log.dirs"
    assert _property_name("KAFKA_FOO__BAR___BAZ") == "foo_bar-baz"


def test_kafka_service_config_boots_a_broker(
    services: dict[str, dict[str, Any]],
    tmp_path: Path,
) -> None:
    """The kafka service's environment, on loopback ports, formats and runs a real broker
    that clients reach through both the internal and the published listener."""
    java = shutil.which("java")
    if java is None:
        pytest.skip("no java on PATH")
    home = fetch_kafka(KAFKA_VERSION)
    env = _env(services["kafka"])
    props = image_properties(env)
    ports = {port: free_port() for _, port in _listeners(props["listeners"]).values()}

    def relocate(match: re.Match[str]) -> str:
        return f"{match.group(1)}127.0.0.1:{ports[int(match.group(3))]}"

    address = re.compile(r"(//|@)([A-Za-z0-9.\-]*):(\d+)")
    for key in ("listeners", "advertised.listeners", "controller.quorum.voters"):
        props[key] = address.sub(relocate, props[key])
    props["log.dirs"] = str(tmp_path / "kafka-data")
    server = tmp_path / "server.properties"
    server.write_text("".join(f"{k}={v}\n" for k, v in sorted(props.items())), encoding="utf-8")

    jvm = [java, "-Xms64m", "-Xmx256m", "-cp", f"{home / 'libs'}{os.sep}*"]
    fmt = subprocess.run(
        [
            *jvm,
            "kafka.tools.StorageTool",
            "format",
            "--cluster-id",
            env["CLUSTER_ID"],
            "--config",
            str(server),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr
    log = tmp_path / "kafka.log"
    with log.open("wb") as out:
        broker = subprocess.Popen(
            [*jvm, "kafka.Kafka", str(server)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        advertised = _listeners(props["advertised.listeners"])
        assert set(advertised) >= {"PLAINTEXT", "EXTERNAL"}
        deadline = time.monotonic() + 60
        for name, (host, port) in advertised.items():
            # A topic created (and given a leader) through each advertised listener: the
            # client bootstraps there and then follows the broker's advertised address.
            while True:
                assert broker.poll() is None, f"broker exited:\n{_tail(log)}"
                try:
                    ensure_topics(f"{host}:{port}", {f"probe-{name.lower()}": 1}, timeout=10)
                    break
                except Exception as exc:
                    if time.monotonic() > deadline:
                        pytest.fail(f"listener {name} at {host}:{port}: {exc}\n{_tail(log)}")
                    time.sleep(0.5)
    finally:
        broker.terminate()
        try:
            broker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(broker.pid, signal.SIGKILL)
            broker.wait()


# -- the otlp service ----------------------------------------------------------------------


def test_otlp_service_is_loopback_published_and_health_checked(
    services: dict[str, dict[str, Any]],
) -> None:
    otlp = services["otlp"]
    argv = _full_command(otlp)
    port = int(_option(argv, "--port"))
    assert _option(argv, "--host") == "0.0.0.0", "inside a container, listen beyond lo"
    assert _port_mappings(otlp) == [("127.0.0.1", port, port)]
    assert f"http://127.0.0.1:{port}/health" in " ".join(_argv(otlp["healthcheck"]["test"]))
    assert _depends(otlp)["kafka"]["condition"] == HEALTHY


def test_otlp_service_runs_as_composed(
    services: dict[str, dict[str, Any]], bootstrap: str, tmp_path: Path
) -> None:
    """The otlp service's command takes a span from the OTel SDK's OTLP/HTTP exporter and
    publishes its event; SIGTERM stops it cleanly."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from tests.helpers import consume_all

    svc = services["otlp"]
    local = Local(bootstrap, tmp_path / "data", free_port(), suffix=uuid.uuid4().hex[:10])
    argv = local.argv(_full_command(svc))
    port = free_port()
    argv[argv.index("--port") + 1] = str(port)
    argv[argv.index("--kafka-topic") + 1] = f"compose-{local.suffix}-otlp"
    argv[argv.index("--kafka-logs-topic") + 1] = f"compose-{local.suffix}-otlp-logs"
    env = local.env(svc)
    log = tmp_path / "otlp.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        _wait_healthy(proc, f"http://127.0.0.1:{port}/health", log, "otlp")
        tp = TracerProvider(resource=Resource.create({"service.name": "composed-agent"}))
        tp.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}/v1/traces"))
        )
        with tp.get_tracer("t").start_as_current_span(
            "chat", attributes={"gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 5}
        ):
            pass
        assert tp.force_flush()
        settings = Settings.load(env={}, broker=bootstrap)
        (record,) = consume_all(settings, env["AGENTSTREAM_EVENTS_TOPIC"], expected=1)
        event = json.loads(record.value)
        assert (event["agent_id"], event["model"], event["input_tokens"]) == (
            "composed-agent", "gpt-4o", 5,
        )  # fmt: skip
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=_seconds(svc.get("stop_grace_period", "10s")))
        assert code == 0, f"otlp exited {code} on SIGTERM:\n{_tail(log)}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
