"""``agentstream notify``: post every alert on ``agent-anomalies`` to a webhook.

The notifier is a consumer group of its own on the anomalies topic. For each record, in
order: alerts below ``min_severity`` are passed over; an ``anomaly_id`` already posted is
passed over (the topic is at-least-once: a worker's replay republishes the same ids); any
other is POSTed as JSON, a Slack-compatible ``text`` plus the full record under
``anomaly``, retried with exponential backoff (connection errors, timeouts, 429 and 5xx)
until the endpoint accepts it. Only then is its id appended to the posted-ids file (fsync)
and the record's offset committed, so a restart resumes after the last alert posted and
never posts one twice; a crash between the post and the id's write is the one window where
an alert can be posted again. An endpoint that refuses an alert for good (another 4xx) is
logged and passed over, so one bad record does not stop every later one.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
import msgspec

from pipeline.config import ConfigError, Settings

__all__ = ["SEVERITIES", "Notifier", "check_webhook", "slack_text"]

log = logging.getLogger("agentstream.notify")
SEVERITIES: Final = ("info", "warning", "critical")
_RETRYABLE: Final = frozenset({408, 425, 429})


def check_webhook(url: str) -> str:
    """``url`` if it is an absolute http(s) URL with a host, else ``ConfigError``."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"bad --webhook {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
        raise ConfigError(
            f"bad --webhook {url!r}: expected an http:// or https:// URL with a host, "
            "e.g. https://hooks.slack.com/services/T000/B000/XXXX"
        )
    return url


def slack_text(alert: dict[str, Any]) -> str:
    """The alert as one Slack message line (``text``)."""
    head = f"[{str(alert.get('severity', '?')).upper()}] {alert.get('kind')}"
    if alert.get("rule"):
        head += f" {alert['rule']!r}"
    text = f"{head}: {alert.get('message', '')}"
    if alert.get("explanation"):
        text += f" Why: {alert['explanation']}"
    return text


class Notifier:
    """Follows the anomalies topic as ``group`` and posts alerts to ``webhook``."""

    def __init__(
        self,
        settings: Settings,
        webhook: str,
        *,
        min_severity: str = "warning",
        group: str = "agentstream-notify",
        state_dir: Path | None = None,
        from_beginning: bool = False,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        timeout_s: float = 10.0,
        on_post: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        if min_severity not in SEVERITIES:
            raise ConfigError(
                f"bad --min-severity {min_severity!r}: choose one of {', '.join(SEVERITIES)}"
            )
        self.settings = settings
        self.webhook = check_webhook(webhook)
        self.min_rank = SEVERITIES.index(min_severity)
        self.group = group
        folder = state_dir if state_dir is not None else settings.data_dir / ".notify"
        self.state_file = folder / f"{group}.posted"
        self.from_beginning = from_beginning
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.on_post = on_post
        self.posted: set[str] = set()
        self.attempts = 0
        self.refused = 0

    def _load(self) -> None:
        try:
            self.posted = set(self.state_file.read_text(encoding="utf-8").split())
        except FileNotFoundError:
            self.posted = set()

    def _remember(self, anomaly_id: str) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.state_file, "a", encoding="utf-8") as fh:
            fh.write(anomaly_id + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.posted.add(anomaly_id)

    async def run(self, max_posts: int | None = None) -> int:
        """Follow the topic until cancelled (or ``max_posts`` alerts were posted); returns
        how many were posted."""
        from aiokafka import AIOKafkaConsumer, TopicPartition
        from aiokafka.errors import KafkaConnectionError

        from pipeline.kafka import client_kwargs, unreachable

        self._load()
        consumer = AIOKafkaConsumer(
            self.settings.anomalies_topic,
            **client_kwargs(self.settings),
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest" if self.from_beginning else "latest",
        )
        try:
            await consumer.start()
        except KafkaConnectionError as exc:
            await consumer.stop()
            raise unreachable(self.settings, exc) from None
        posted = 0
        try:
            async with aiohttp.ClientSession(timeout=self.timeout) as http:
                while max_posts is None or posted < max_posts:
                    batches = await consumer.getmany(timeout_ms=500)
                    for tp, records in batches.items():
                        for r in records:
                            if await self._handle(http, r.value):
                                posted += 1
                            await consumer.commit(
                                {TopicPartition(tp.topic, tp.partition): r.offset + 1}
                            )
                            if max_posts is not None and posted >= max_posts:
                                return posted
        finally:
            await consumer.stop()
        return posted

    async def _handle(self, http: aiohttp.ClientSession, value: bytes | None) -> bool:
        """Post one record if it is due; True when it was posted now."""
        try:
            alert = msgspec.json.decode(value or b"")
        except msgspec.DecodeError:
            log.warning("skipping a record that is not JSON")
            return False
        if not isinstance(alert, dict) or not alert.get("anomaly_id"):
            log.warning("skipping a record without anomaly_id")
            return False
        severity = alert.get("severity")
        rank = SEVERITIES.index(severity) if severity in SEVERITIES else 0
        if rank < self.min_rank or alert["anomaly_id"] in self.posted:
            return False
        body = msgspec.json.encode({"text": slack_text(alert), "anomaly": alert})
        if await self._post(http, body, alert["anomaly_id"]):
            self._remember(alert["anomaly_id"])
            if self.on_post is not None:
                self.on_post(alert)
            return True
        return False

    async def _post(self, http: aiohttp.ClientSession, body: bytes, anomaly_id: str) -> bool:
        """POST until accepted (True) or refused for good (False); retries with backoff."""
        delay = self.backoff_s
        while True:
            self.attempts += 1
            try:
                async with http.post(
                    self.webhook, data=body, headers={"Content-Type": "application/json"}
                ) as resp:
                    if 200 <= resp.status < 300:
                        return True
                    detail = (await resp.text())[:200]
                    if resp.status < 500 and resp.status not in _RETRYABLE:
                        self.refused += 1
                        log.error(
                            "webhook refused alert %s: HTTP %d %s; not retried",
                            anomaly_id,
                            resp.status,
                            detail,
                        )
                        return False
                    problem = f"HTTP {resp.status} {detail}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            log.warning(
                "posting alert %s failed (%s); retrying in %.1f s", anomaly_id, problem, delay
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_backoff_s)
