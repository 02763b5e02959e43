"""``pipeline.report.render_report``: one self-contained HTML file with real content.

Rendered on ``test_analysis.shared_lake``; every number checked here is recomputed with DuckDB
straight from the landed event files (not through the views the report uses), and formatted
with ``sinks.analysis.fmt``. With Chromium on the machine, the file is also loaded in headless
Chromium and screenshotted (``AGENTSTREAM_UPDATE_SCREENSHOT=1`` copies that picture to
``docs/report.png``).
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from test_analysis import EVENTS_N, raw_events, shared_lake

from pipeline.report import render_report
from sinks.analysis import fmt
from sinks.catalog import QueryError, prepare

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Page(HTMLParser):
    """What a test needs from the report: images, tables (cell texts by id), cards, links."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.headers: dict[str, list[str]] = {}
        self.cards: dict[str, str] = {}
        self.urls: list[str] = []
        self.tags: set[str] = set()
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._row: list[str] | None = None
        self._card: str | None = None
        self._value = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.add(tag)
        for key in ("src", "href"):
            if key in a:
                self.urls.append(a[key])
        if tag == "img":
            self.images.append(a)
        elif tag == "table":
            self._table = a.get("id", f"table-{len(self.tables)}")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "div" and a.get("id", "").startswith("kpi-"):
            self._card = a["id"].removeprefix("kpi-")
        elif tag == "div" and a.get("class") == "value" and self._card is not None:
            self._value = True

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table is not None:
            if self._table not in self.headers:
                self.headers[self._table] = self._row
            else:
                self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "div" and self._value:
            self._value = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._value and self._card is not None:
            self.cards[self._card] = self.cards.get(self._card, "") + data.strip()

    def records(self, table_id: str) -> list[dict[str, str]]:
        head = self.headers[table_id]
        return [dict(zip(head, row, strict=True)) for row in self.tables[table_id]]


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_lake(tmp_path_factory)


@pytest.fixture(scope="module")
def report(lake: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "nested" / "report.html"
    assert render_report(lake, out) == out
    return out


@pytest.fixture(scope="module")
def page(report: Path) -> Page:
    p = Page()
    p.feed(report.read_text(encoding="utf-8"))
    return p


def test_images_are_embedded_pngs(page: Page) -> None:
    assert len(page.images) == 9  # evaluations and feedback: one more figure
    for img in page.images:
        assert img["alt"]
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix)
        png = base64.b64decode(img["src"][len(prefix) :], validate=True)
        assert png.startswith(PNG_MAGIC) and len(png) > 15_000
        with Image.open(io.BytesIO(png)) as im:
            im.verify()
        with Image.open(io.BytesIO(png)) as im:
            assert im.width >= 1000 and im.height >= 250
            # A real plot, not a blank canvas: many distinct colours.
            assert len(im.convert("RGB").getcolors(1 << 20) or []) > 50


def test_self_contained(page: Page, report: Path) -> None:
    """Nothing to fetch: every URL is a data: URI or an anchor, and no script."""
    assert all(u.startswith(("data:", "#")) for u in page.urls), page.urls
    assert "script" not in page.tags and "link" not in page.tags
    assert report.stat().st_size < 5_000_000


def test_headline_numbers(lake: Path, page: Page) -> None:
    events, cost, started, completed, ended, escalations = (
        raw_events(lake)
        .execute(
            "SELECT count(*), sum(cost_usd), count(*) FILTER (outcome = 'started'), "
            "count(*) FILTER (outcome = 'completed'), "
            "count(*) FILTER (outcome IN ('completed', 'failed', 'abandoned')), "
            "count(*) FILTER (type = 'escalation') FROM ev"
        )
        .fetchone()
        or ()
    )
    assert events == EVENTS_N
    assert page.cards == {
        "events": fmt("events", events),
        "cost": fmt("cost_usd", cost),
        "tasks": fmt("tasks_started", started),
        "success": fmt("task_success_rate", completed / ended),
        "escalation": fmt("escalation_rate", escalations / started),
    }
    assert page.cards["events"] == "30,000"


def test_task_funnel_table(lake: Path, page: Page) -> None:
    expected = (
        raw_events(lake)
        .execute(
            "SELECT agent_id, agent_version, count(*) FILTER (outcome = 'started'), "
            "count(*) FILTER (outcome = 'completed'), count(*) FILTER (outcome = 'failed'), "
            "count(*) FILTER (outcome = 'abandoned') FROM ev WHERE type = 'task' "
            "GROUP BY ALL ORDER BY ALL"
        )
        .fetchall()
    )
    got = page.records("task-funnel")
    assert [(r["agent_id"], r["agent_version"]) for r in got] == [e[:2] for e in expected]
    assert {"support-bot", "sql-copilot", "code-reviewer"} <= {r["agent_id"] for r in got}
    for r, (_a, _v, s, c, f, ab) in zip(got, expected, strict=True):
        assert r["tasks_started"] == fmt("n", s) and r["tasks_completed"] == fmt("n", c)
        assert r["tasks_failed"] == fmt("n", f) and r["tasks_abandoned"] == fmt("n", ab)
        assert r["task_success_rate"] == fmt("task_success_rate", c / (c + f + ab))


def test_cost_table(lake: Path, page: Page) -> None:
    expected = {
        (a, v): (cost, completed)
        for a, v, cost, completed in raw_events(lake)
        .execute(
            "SELECT agent_id, agent_version, coalesce(sum(cost_usd), 0), "
            "count(*) FILTER (outcome = 'completed') FROM ev GROUP BY ALL"
        )
        .fetchall()
    }
    got = page.records("cost-by-version-day")
    assert len(got) == len(expected)  # one day
    for r in got:
        cost, completed = expected[(r["agent_id"], r["agent_version"])]
        assert r["cost_usd"] == fmt("cost_usd", cost)
        assert r["cost_per_completed_task"] == fmt("cost_per_completed_task", cost / completed)
    costs = [float(r["cost_usd"].lstrip("$").replace(",", "")) for r in got]
    assert costs == sorted(costs, reverse=True)


def test_tool_errors_table(lake: Path, page: Page) -> None:
    expected = {
        t: (n, e)
        for t, n, e in raw_events(lake)
        .execute(
            "SELECT tool_name, count(*), count(*) FILTER (status = 'error') FROM ev "
            "WHERE type = 'tool_call' GROUP BY ALL"
        )
        .fetchall()
    }
    got = page.records("tool-errors")
    assert len(got) == 20  # the table shows the 20 worst
    worst = max(expected.items(), key=lambda kv: (kv[1][1] / kv[1][0], kv[1][1]))
    assert got[0]["tool_name"] == worst[0]
    for r in got:
        n, e = expected[r["tool_name"]]
        assert (r["calls"], r["errors"]) == (fmt("n", n), fmt("n", e))
        assert r["error_rate"] == fmt("error_rate", e / n)


def test_fix_next_table(lake: Path, page: Page) -> None:
    """The most frequent problem of any agent and prompt version, counted from the events."""
    top = (
        raw_events(lake)
        .execute(
            "SELECT agent_id, prompt_version, evaluator, count(*) AS n FROM ev "
            "WHERE type = 'evaluation' AND NOT passed GROUP BY ALL ORDER BY n DESC LIMIT 1"
        )
        .fetchall()
    )
    got = page.records("feedback-loop")
    assert len(got) == 25
    counts = [int(r["count"].replace(",", "")) for r in got]
    assert counts == sorted(counts, reverse=True)
    failing = [r for r in got if r["category"] == "failing_evaluator"]
    agent, prompt, evaluator, n = top[0]
    assert {"agent_id": agent, "prompt_version": prompt, "item": evaluator} in [
        {k: r[k] for k in ("agent_id", "prompt_version", "item")} for r in failing
    ] or n < min(counts)


def test_latency_table(lake: Path, page: Page) -> None:
    got = {(r["step"], r["model"]): r for r in page.records("latency-by-model")}
    for model, values in (
        raw_events(lake)
        .execute("SELECT model, list(latency_ms) FROM ev WHERE type = 'llm_call' GROUP BY ALL")
        .fetchall()
    ):
        r = got[("llm_call", model)]
        assert r["calls"] == fmt("n", len(values))
        assert r["latency_p95_ms"] == fmt("latency_p95_ms", float(np.percentile(values, 95)))
    assert got[("tool_call", "–")]["model"] == "–"  # tool calls name no model


def test_anomalies_tables(lake: Path, page: Page) -> None:
    con = raw_events(lake)
    (alerts,) = con.execute("SELECT count(*) FROM lake.anomalies").fetchone() or ()
    rows = page.records("anomalies")
    assert len(rows) == alerts >= 1
    assert all(r["subject"].startswith("support-bot") for r in rows)  # the injected incident
    assert {r["measure"] for r in rows} >= {"cost_per_task"}
    cost = next(r for r in rows if r["measure"] == "cost_per_task")
    assert cost["baseline"].startswith("$") and cost["observed"].startswith("$")
    # Alerts of an agent say which of its versions, models, tenants the change comes from.
    agent_alerts = [
        r for r in rows if r["kind"] != "recovery" and r["subject"] == "support-bot (agent)"
    ]
    assert agent_alerts and all(r["explanation"] not in ("", "–") for r in agent_alerts)
    assert any("by dimension: agent_version v4" in r["explanation"] for r in agent_alerts)
    conditions = page.records("anomaly-conditions")
    assert conditions and all(c["severity"] in ("info", "warning", "critical") for c in conditions)


def test_empty_and_missing_lakes(tmp_path: Path) -> None:
    prepare(tmp_path / "empty")
    out = render_report(tmp_path / "empty", tmp_path / "empty.html")
    p = Page()
    p.feed(out.read_text(encoding="utf-8"))
    assert p.cards["events"] == "0" and len(p.images) == 9
    assert p.tables["task-funnel"] == [["no rows"]]
    with pytest.raises(QueryError, match="does not exist"):
        render_report(tmp_path / "missing", tmp_path / "missing.html")


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.mark.skipif(_chromium() is None, reason="no Chromium on this machine")
def test_chromium_renders_the_report(report: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    browser = _chromium()
    assert browser is not None
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",  # as root in CI
        "--disable-gpu",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        "--window-size=1280,1900",
        f"--screenshot={shot}",
        report.as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0 and shot.exists(), done.stderr.decode(errors="replace")[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1280, 1900)
        rgb = im.convert("RGB")
        # Headline cards and the first plots were laid out and painted (not a blank page).
        assert len(rgb.getcolors(1 << 20) or []) > 200
        top: Any = rgb.crop((0, 0, 1280, 400))
        assert len(top.getcolors(1 << 20) or []) > 20
    if os.environ.get("AGENTSTREAM_UPDATE_SCREENSHOT") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shot, REPO / "docs" / "report.png")
