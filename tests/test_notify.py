"""``agentstream notify`` against a real local HTTP server and the real broker: retries with
backoff, at most one post per alert id across restarts, offsets committed only after a post."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web

from pipeline.broker import free_port
from pipeline.notify import Notifier, slack_text
from tests.helpers import produce_raw, run_cli, unique_settings

pytestmark = pytest.mark.timeout(300)


def _alert(severity: str, kind: str = "outlier", **extra: Any) -> dict[str, Any]:
    return {
        "anomaly_id": uuid.uuid4().hex,
        "kind": kind,
        "severity": severity,
        "measure": "cost_per_task",
        "agent_id": "support-bot",
        "message": f"cost_per_task of agent support-bot jumped ({severity})",
        "explanation": "95% of the cost_per_task increase is version v4",
        **extra,
    }


class Hook:
    """A webhook endpoint that answers ``fail`` 500s before accepting, and records posts."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.attempts = 0
        self.accepted: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        body = await request.json()
        if self.fail > 0:
            self.fail -= 1
            return web.Response(status=500, text="try later")
        self.accepted.append(body)
        return web.Response(status=200, text="ok")


@asynccontextmanager
async def serving(hook: Hook, port: int) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/hook", hook.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/hook"
    finally:
        await runner.cleanup()


def _publish(settings: Any, alerts: list[dict[str, Any]]) -> None:
    produce_raw(
        settings,
        [msgspec.json.encode(a) for a in alerts],
        [a["anomaly_id"].encode() for a in alerts],
        topic=settings.anomalies_topic,
    )


def test_posts_retry_filter_and_survive_restarts(bootstrap: str, tmp_path: Path) -> None:
    settings = unique_settings(bootstrap, tmp_path / "lake", partitions=1)
    group = f"notify-{uuid.uuid4().hex[:6]}"
    port = free_port()
    warning, info, critical = (
        _alert("warning"),
        _alert("info"),
        _alert("critical", "rule", rule="r"),
    )
    # Records that are no alert are passed over.
    produce_raw(
        settings, [b"not json", b"[1, 2]", b'{"kind": "x"}'], topic=settings.anomalies_topic
    )
    _publish(settings, [warning, info, warning, critical])  # the warning twice (a replay)
    hook = Hook(fail=2)

    def notifier() -> Notifier:
        return Notifier(
            settings,
            f"http://127.0.0.1:{port}/hook",
            group=group,
            from_beginning=True,
            backoff_s=0.05,
            max_backoff_s=0.2,
        )

    async def first() -> Notifier:
        async with serving(hook, port):
            n = notifier()
            assert await asyncio.wait_for(n.run(max_posts=2), 60) == 2
            return n

    n = asyncio.run(first())
    # The first post failed twice (HTTP 500) and was retried; info is below warning; the
    # repeated warning went out once.
    assert hook.attempts == 4 and n.attempts == 4
    assert [b["anomaly"]["anomaly_id"] for b in hook.accepted] == [
        warning["anomaly_id"],
        critical["anomaly_id"],
    ]
    body = hook.accepted[1]
    assert body["anomaly"] == critical
    assert body["text"] == slack_text(critical)
    assert body["text"].startswith("[CRITICAL] rule 'r': ") and "Why: 95%" in body["text"]

    # A restart (a new notifier, same group) posts what is new only: not the warning again
    # (posted before; its repeat was never committed), not the info.
    late = _alert("critical")
    _publish(settings, [warning, late])

    async def second() -> None:
        async with serving(hook, port):
            assert await asyncio.wait_for(notifier().run(max_posts=1), 60) == 1

    asyncio.run(second())
    assert [b["anomaly"]["anomaly_id"] for b in hook.accepted[2:]] == [late["anomaly_id"]]
    posted = (settings.data_dir / ".notify" / f"{group}.posted").read_text().split()
    assert posted == [warning["anomaly_id"], critical["anomaly_id"], late["anomaly_id"]]


def test_an_alert_is_not_lost_when_the_notifier_stops_while_retrying(
    bootstrap: str, tmp_path: Path
) -> None:
    settings = unique_settings(bootstrap, tmp_path / "lake", partitions=1)
    group = f"notify-{uuid.uuid4().hex[:6]}"
    port = free_port()
    alert = _alert("critical")
    _publish(settings, [alert])
    down = Hook(fail=10**6)
    url = f"http://127.0.0.1:{port}/hook"

    async def failing() -> None:
        async with serving(down, port):
            n = Notifier(settings, url, group=group, from_beginning=True, backoff_s=0.05)
            task = asyncio.create_task(n.run())
            while down.attempts < 3:
                await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(failing())
    up = Hook()

    async def healthy() -> None:
        async with serving(up, port):
            n = Notifier(settings, url, group=group, from_beginning=True, backoff_s=0.05)
            assert await asyncio.wait_for(n.run(max_posts=1), 60) == 1

    asyncio.run(healthy())
    assert [b["anomaly"]["anomaly_id"] for b in up.accepted] == [alert["anomaly_id"]]


@pytest.mark.parametrize(
    ("url", "args"),
    [
        ("ftp://example.com/hook", []),
        ("hooks.slack.com/services/x", []),
        ("http://", []),
        ("http://host:99999/x", []),
        ("http://127.0.0.1/x", ["--min-severity", "loud"]),
    ],
)
def test_bad_webhook_or_severity_is_one_line(url: str, args: list[str]) -> None:
    proc = run_cli("notify", "--webhook", url, *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    if args:  # click's own check of a choice: usage, then the error
        assert "Invalid value for '--min-severity'" in lines[-1]
    else:
        (line,) = lines
        assert line.startswith(f"error: bad --webhook {url!r}"), line


def test_tail_shows_the_rule_and_the_explanation() -> None:
    from types import SimpleNamespace

    from pipeline.cli import describe

    alert = _alert("critical", "rule", rule="support cost doubled", detected_at="t", observed=2.0)
    line = describe("anomalies", SimpleNamespace(value=msgspec.json.encode(alert)))
    assert "CRITICAL rule cost_per_task" in line
    assert line.endswith(
        "rule='support cost doubled'  why: 95% of the cost_per_task increase is version v4"
    )
