"""Settings: environment, validation, and secrets that never show up in output."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.broker import free_port
from pipeline.config import ConfigError, Secret, Settings
from pipeline.kafka import client_kwargs
from tests.helpers import REPO

PASSWORD = "hunter2-do-not-print"


def test_environment_then_overrides() -> None:
    env = {"AGENTSTREAM_PARTITIONS": "8", "AGENTSTREAM_WINDOW": "5m", "AGENTSTREAM_BROKER": "k:1"}
    s = Settings.load(env=env, broker="kafka://other:9093")
    assert (s.partitions, s.window_seconds, s.broker) == (8, 300, "other:9093")


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"AGENTSTREAM_PARTITIONS": "abc"}, "AGENTSTREAM_PARTITIONS='abc'"),
        ({"AGENTSTREAM_WINDOW": "2m"}, "bad window '2m'"),
        ({"AGENTSTREAM_AGGREGATE_PARTITIONS": "0"}, "bad aggregate_partitions 0: must be >= 1"),
        ({"AGENTSTREAM_SECURITY_PROTOCOL": "TLS"}, "bad security_protocol 'TLS'"),
        ({"AGENTSTREAM_SASL_MECHANISM": "GSSAPI"}, "bad sasl_mechanism 'GSSAPI'"),
        ({"AGENTSTREAM_SECURITY_PROTOCOL": "SASL_SSL"}, "needs AGENTSTREAM_SASL_USERNAME"),
        ({"AGENTSTREAM_SSL_CAFILE": "/nonexistent/ca.pem"}, "no such file '/nonexistent/ca.pem'"),
        ({"AGENTSTREAM_EVENTS_TOPIC": "bad topic"}, "bad events topic name 'bad topic'"),
    ],
)
def test_bad_settings_name_the_value(env: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        Settings.load(env=env)
    assert words in str(err.value)


def sasl_env() -> dict[str, str]:
    return {
        "AGENTSTREAM_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "AGENTSTREAM_SASL_MECHANISM": "SCRAM-SHA-256",
        "AGENTSTREAM_SASL_USERNAME": "agent",
        "AGENTSTREAM_SASL_PASSWORD": PASSWORD,
    }


def test_secret_is_masked_everywhere_but_the_client() -> None:
    s = Settings.load(env=sasl_env())
    assert isinstance(s.sasl_password, Secret)
    for text in (repr(s), str(s), f"{s}", repr(s.sasl_password), str(s.sasl_password)):
        assert PASSWORD not in text
    kwargs = client_kwargs(s)
    assert kwargs["sasl_plain_password"] == PASSWORD
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-256"
    # Another process gets the real value through the environment.
    assert s.to_env()["AGENTSTREAM_SASL_PASSWORD"] == PASSWORD


def test_cli_errors_and_worker_logs_never_show_the_password(bootstrap: str, tmp_path: Path) -> None:
    env = {**os.environ, **sasl_env(), "PYTHONPATH": str(REPO)}
    events = tmp_path / "one.jsonl"
    events.write_text("\n")
    # A broker that is not there, and the real one, which does not speak SASL on this port.
    for broker in (f"127.0.0.1:{free_port()}", bootstrap):
        out = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "publish", "--broker", broker, str(events)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 2, out.stderr
        assert PASSWORD not in out.stdout + out.stderr
        assert "Traceback" not in out.stderr
    log = tmp_path / "worker.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline.cli",
                "worker",
                "--broker",
                bootstrap,
                "--data-dir",
                str(tmp_path / "lake"),
                "--web-port",
                str(free_port()),
                "--loglevel",
                "debug",
            ],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
        # Until the worker has logged for a few seconds (its start, settings, connection
        # attempts); starting alone can take 10 s and more on a busy 2-core machine.
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and log.stat().st_size == 0:
            time.sleep(0.5)
        time.sleep(6)
        proc.kill()
        proc.wait()
    text = log.read_text(errors="replace")
    assert text, "the worker wrote no log at all"
    assert PASSWORD not in text
