"""The live web page (``agentstream ui``) in a real browser, over a lake fed through the real
broker and a real worker.

Chromium is Debian's (``.ci/run`` installs it), driven by Playwright for Python; the page
keeps an event stream open, so the tests wait for the DOM and for text, never for network
idle. Numbers on the page are compared with the SQL views over the same lake.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pipeline import schema
from pipeline.broker import free_port
from pipeline.config import Settings
from pipeline.generate import TrafficConfig, generate
from pipeline.procs import stop_group
from pipeline.ui.queries import TILES
from pipeline.ui.server import VIEWS
from sinks.analysis import connect
from tests.helpers import (
    REPO,
    produce_raw,
    running_worker,
    unique_settings,
    wait_committed,
    worker_env,
)

pytestmark = pytest.mark.timeout(300)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("Debian's chromium is not installed (.ci/run installs it)", allow_module_level=True)

from playwright.sync_api import Browser, Page, sync_playwright  # noqa: E402

EVENTS = 4_000
SEED = 11
BUDGET_TENANT = "tenant-01"
XSS = "<script>window.__xss = 1</script>"
XSS_IMG = '<img src=x onerror="window.__xss = 2">'
HOSTILE_SESSION = "sess-hostile"
SCREENSHOTS = os.environ.get("AGENTSTREAM_UI_SCREENSHOTS")


@dataclass
class Lake:
    settings: Settings
    data_dir: Path
    newest: datetime
    spend: float
    """Spend of BUDGET_TENANT so far (its budget is this plus 25 dollars)."""


def _hostile(ts: datetime) -> list[dict[str, Any]]:
    base = {
        "schema_version": 1,
        "ts": ts.isoformat(),
        "agent_id": "support-bot",
        "agent_version": "v4",
        "prompt_version": "p12",
        "tenant_id": "tenant-02",
        "session_id": HOSTILE_SESSION,
        "task_id": "task-hostile",
    }
    return [
        {**base, "type": "escalation", "event_id": "hostile-1", "reason": XSS},
        {**base, "type": "retrieval", "event_id": "hostile-2", "hits": 0, "query": XSS_IMG},
        {
            **base,
            "type": "tool_call",
            "event_id": "hostile-3",
            "tool_name": XSS,
            "status": "error",
            "error_type": XSS_IMG,
            "latency_ms": 12.5,
        },
    ]


def _llm_call(i: int, ts: datetime, tenant: str, cost: float) -> dict[str, Any]:
    return {
        "type": "llm_call",
        "event_id": f"burn-{i}",
        "schema_version": 1,
        "ts": ts.isoformat(),
        "agent_id": "support-bot",
        "agent_version": "v4",
        "prompt_version": "p12",
        "model": "gpt-4o",
        "provider": "openai",
        "tenant_id": tenant,
        "session_id": "sess-burn",
        "task_id": f"task-burn-{i}",
        "input_tokens": 1000,
        "output_tokens": 100,
        "cost_usd": cost,
        "latency_ms": 300.0,
    }


@pytest.fixture(scope="module")
def lake(bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lake]:
    """Generated traffic with hostile text and bad messages, landed by a real worker whose
    tenant budget is 25 dollars above what the traffic spends."""
    root = tmp_path_factory.mktemp("ui")
    events = list(generate(TrafficConfig(events=EVENTS, seed=SEED, missing_cost_fraction=0.0)))
    newest = max(ev.ts for ev in events)
    spend = sum(
        ev.cost_usd or 0.0
        for ev in events
        if isinstance(ev, schema.LlmCall) and ev.tenant_id == BUDGET_TENANT
    )
    settings = unique_settings(
        bootstrap,
        root / "lake",
        allowed_lateness_s=5.0,
        budgets=f"tenant:{BUDGET_TENANT}={spend + 25:.2f}/day",
    )
    values = [schema.encode(ev) for ev in events]
    values += [json.dumps(e).encode() for e in _hostile(newest - timedelta(seconds=20))]
    # Rejects: the dead letters view must show them as text too.
    values += [b'{"type": "' + XSS.encode() + b'"}', b"not json " + XSS_IMG.encode()]
    # An event far ahead closes every window, as time passing would.
    sentinel = {**_hostile(newest)[0], "event_id": "sentinel", "reason": "sentinel"}
    sentinel["ts"] = (newest + timedelta(minutes=5)).isoformat()
    values.append(json.dumps(sentinel).encode())
    with running_worker(settings) as proc:
        produce_raw(settings, values)
        wait_committed(settings, len(values), proc, timeout=120)
        last = newest.replace(second=0, microsecond=0)
        deadline = time.monotonic() + 60
        query = "SELECT count(*) FROM metrics WHERE window_start = $1"
        while connect(settings.data_dir).execute(query, [last]).fetchall() == [(0,)]:
            assert time.monotonic() < deadline, "the last windows were never emitted"
            time.sleep(0.5)
        # Budget status rows land every 10 s (sooner with an alert): the budgets view needs one.
        while connect(settings.data_dir).sql("SELECT count(*) FROM budgets").fetchall() == [(0,)]:
            assert time.monotonic() < deadline, "no budget status was landed"
            time.sleep(0.5)
        yield Lake(settings, Path(settings.data_dir), newest, spend)


@pytest.fixture(scope="module")
def server(lake: Lake, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``agentstream ui`` as a user starts it, following the worker's topics."""
    port = free_port()
    log = tmp_path_factory.mktemp("ui-log") / "ui.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "ui", "--port", str(port)],
            env={k: v for k, v in worker_env(lake.settings).items() if k != "AGENTSTREAM_UI_TOKEN"},
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while f"agentstream ui: {url}" not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"ui exited {proc.returncode}: {log.read_text()}"
            assert time.monotonic() < deadline, f"ui never listened: {log.read_text()}"
            time.sleep(0.2)
        yield url
    finally:
        assert stop_group(proc, 15), "agentstream ui did not stop on SIGTERM"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A page whose console must stay free of errors."""
    # bypass_csp: Playwright's polling predicates are eval'd; it also means the escaping test
    # proves the page escapes by itself, without its Content-Security-Policy's help.
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000}, bypass_csp=True)
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: errors.append(str(e)))
    try:
        yield pg
    finally:
        ctx.close()
    assert errors == [], errors


def _open(page: Page, url: str) -> None:
    page.goto(url, wait_until="domcontentloaded")
    _rendered(page)


def _rendered(page: Page, after: str | None = None) -> None:
    """Wait until the page has drawn a view (a later one than ``after``)."""
    page.wait_for_function(
        "prev => document.body.dataset.rendered && document.body.dataset.rendered !== prev",
        arg=after,
        timeout=30_000,
    )
    assert page.inner_text("#error") == ""


def _tiles(page: Page) -> dict[str, float | None]:
    out = {}
    for key in TILES:
        raw = page.get_attribute(f'.tile[data-key="{key}"]', "data-value")
        out[key] = None if raw in (None, "") else float(raw)
    return out


def _expected(lake: Lake, start: str | None, end: str | None, **dims: str) -> dict[str, Any]:
    """The tiles recomputed from the views: sums over metric_windows, events and their
    latency from events (the overview must say exactly this)."""
    con = connect(lake.data_dir)
    cols = {"agent": "agent_id", "tenant": "tenant_id", "model": "model"}
    where = [f"{cols[k]} = ${k}" for k in dims]
    params: dict[str, Any] = dict(dims)
    if start is not None:
        params.update(start=start, end=end)
    mw = " AND ".join(
        ["level = 'key'", *where]
        + (
            ["window_start >= $start::TIMESTAMPTZ", "window_start < $end::TIMESTAMPTZ"]
            if start
            else []
        )
    )
    ev = " AND ".join(
        where + (["ts >= $start::TIMESTAMPTZ", "ts < $end::TIMESTAMPTZ"] if start else [])
        or ["true"]
    )
    sums = con.execute(
        "SELECT coalesce(sum(cost_usd), 0), sum(cost_usd) / nullif(sum(tasks_completed), 0), "
        "sum(tasks_completed) / nullif(sum(tasks_completed + tasks_failed + tasks_abandoned), 0), "
        "sum(escalations) / nullif(sum(tasks_started), 0), "
        "sum(retrieval_misses) / nullif(sum(retrievals), 0), "
        f"sum(tool_errors) / nullif(sum(tool_calls), 0) FROM metric_windows WHERE {mw}",
        {k: v for k, v in params.items() if f"${k}" in mw},
    ).fetchone()
    events = con.execute(
        "SELECT count(*), quantile_cont(latency_ms, 0.95) FILTER (WHERE type IN "
        "('llm_call', 'tool_call', 'retrieval') AND latency_ms IS NOT NULL) "
        f"FROM events WHERE {ev}",
        {k: v for k, v in params.items() if f"${k}" in ev},
    ).fetchone()
    assert sums is not None and events is not None
    return dict(zip(TILES, [events[0], *sums, events[1]], strict=True))


def _same(got: dict[str, float | None], want: dict[str, Any]) -> None:
    for key in TILES:
        if want[key] is None:
            assert got[key] is None, key
        else:
            assert got[key] == pytest.approx(float(want[key]), rel=1e-9, abs=1e-12), key


# --------------------------------------------------------------------------------------


def test_overview_tiles_equal_the_sql_views(lake: Lake, server: str, page: Page) -> None:
    _open(page, server + "?range=all")
    tiles = _tiles(page)
    rel = connect(lake.data_dir).sql("SELECT * FROM lake_summary")
    row = dict(zip(rel.columns, rel.fetchall()[0], strict=True))
    # The whole lake: exactly lake_summary's numbers.
    assert tiles["events"] == row["events"]
    for key in TILES[1:-1]:  # all but events and latency, which lake_summary lacks
        assert tiles[key] == pytest.approx(row[key], rel=1e-9), key
    _same(tiles, _expected(lake, None, None))
    assert page.inner_text('.tile[data-key="cost_usd"] .value') == f"${row['cost_usd']:,.2f}"

    # A filter and a custom range: the page's numbers follow the SQL's.
    agent = "support-bot"
    start = (lake.newest - timedelta(seconds=50)).replace(second=0, microsecond=0)
    end = start + timedelta(minutes=1)
    custom = {"range": "custom", "from": start.isoformat(), "to": end.isoformat()}
    _open(page, server + "?" + urllib.parse.urlencode({**custom, "agent": agent}))
    want = _expected(lake, start.isoformat(), end.isoformat(), agent=agent)
    assert want["events"] > 0
    _same(_tiles(page), want)
    # The previous period is the minute before.
    prev = {
        k: float(v) if v not in (None, "") else None
        for k in TILES
        for v in [page.get_attribute(f'.tile[data-key="{k}"]', "data-previous")]
    }
    _same(
        prev, _expected(lake, (start - (end - start)).isoformat(), start.isoformat(), agent=agent)
    )


def test_filters_and_the_url_round_trip(lake: Lake, server: str, page: Page) -> None:
    _open(page, server + "?range=all")
    before = page.evaluate("document.body.dataset.rendered")
    page.select_option("#f-tenant", "tenant-03")
    _rendered(page, before)
    assert "tenant=tenant-03" in page.url
    _same(_tiles(page), _expected(lake, None, None, tenant="tenant-03"))

    # The link is the state: a fresh page on the same URL shows the same thing.
    shared = page.url
    page.goto("about:blank")
    _open(page, shared)
    assert page.input_value("#f-tenant") == "tenant-03"
    assert page.input_value("#range") == "all"
    _same(_tiles(page), _expected(lake, None, None, tenant="tenant-03"))

    # Another view keeps the filters; back returns to the overview with them.
    before = page.evaluate("document.body.dataset.rendered")
    page.click('#tabs a[data-view="cost"]')
    _rendered(page, before)
    assert "view=cost" in page.url and "tenant=tenant-03" in page.url
    rows = page.locator("#cost-table tbody tr")
    assert rows.count() >= 1
    before = page.evaluate("document.body.dataset.rendered")
    page.go_back()
    _rendered(page, before)
    assert page.evaluate("document.body.dataset.view") == "overview"
    assert page.input_value("#f-tenant") == "tenant-03"

    # Clearing the filters clears them from the URL.
    before = page.evaluate("document.body.dataset.rendered")
    page.click("#reset")
    _rendered(page, before)
    assert "tenant=" not in page.url


def test_every_view_renders_its_numbers(
    lake: Lake, server: str, page: Page, tmp_path: Path
) -> None:
    con = connect(lake.data_dir)
    shots = Path(SCREENSHOTS) if SCREENSHOTS else tmp_path
    for view in VIEWS:
        _open(page, server + f"?view={view}&range=all")
        page.screenshot(path=str(shots / f"ui-{view}.png"), full_page=True)
    # Spot checks against the views, one per view with a table.
    _open(page, server + "?view=quality&range=all")
    ((tools,),) = con.sql("SELECT count(*) FROM tool_errors").fetchall()
    assert page.locator("#tool-errors tbody tr").count() == tools
    ((tasks_started,),) = con.sql("SELECT sum(tasks_started) FROM task_funnel").fetchall()
    funnel = page.locator("#funnel")
    col = [c.strip() for c in funnel.locator("thead th").all_inner_texts()].index("tasks_started")
    shown = sum(
        int(t.replace(",", ""))
        for t in funnel.locator(f"tbody tr td:nth-child({col + 1})").all_inner_texts()
    )
    assert shown == tasks_started
    _open(page, server + "?view=budgets&range=all")
    assert BUDGET_TENANT in page.inner_text("#budgets")
    _open(page, server + "?view=dead_letters")
    ((dead,),) = con.sql("SELECT count(*) FROM dead_letters").fetchall()
    assert dead == 2
    assert f"{dead} rejected messages" in page.inner_text("main")
    _open(page, server + "?view=cost&range=all&by=model")
    assert page.locator("#top-tasks tbody tr").count() == 20


def test_user_content_is_text_never_markup(lake: Lake, server: str, page: Page) -> None:
    _open(page, server + f"?view=sessions&q={HOSTILE_SESSION}")
    text = page.inner_text("#events")
    assert XSS in text and XSS_IMG in text
    assert page.inner_text("#timeline").count(XSS) >= 1
    _open(page, server + "?view=dead_letters")
    assert XSS in page.inner_text("#dead-recent")
    _open(page, server + "?view=quality&range=all")
    assert XSS in page.inner_text("#tool-errors")
    # Nothing ran, and no element came from the text.
    assert page.evaluate("window.__xss") is None
    assert page.locator("main script, main img").count() == 0


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, Any]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers


INJECTIONS = (
    "' OR 1=1 --",
    "x' UNION SELECT * FROM events --",
    "'); DROP VIEW events; --",
    "$agent",
    "support-bot' --",
    '" OR ""="',
    "\\' OR 1=1",
    "\x00",
    "%",
)


def test_filters_are_bound_parameters_never_sql(lake: Lake, server: str) -> None:
    con = connect(lake.data_dir)
    ((count,),) = con.sql("SELECT count(*) FROM events").fetchall()
    for payload in INJECTIONS:
        for param in ("agent", "version", "prompt", "model", "tenant"):
            status, body, _ = _get(
                server
                + "api/view/overview?"
                + urllib.parse.urlencode({"range": "all", param: payload})
            )
            assert status == 200, (param, payload, body)
            data = json.loads(body)["data"]
            assert data["tiles"]["events"] == 0, (param, payload)
            assert data["tiles"]["cost_usd"] == 0, (param, payload)
        for view in ("cost", "attention", "releases", "budgets", "quality", "sessions"):
            status, body, _ = _get(
                server
                + f"api/view/{view}?"
                + urllib.parse.urlencode({"agent": payload, "q": payload})
            )
            assert status == 200, (view, payload, body)
        for param, value in (
            ("range", payload),
            ("by", payload),
            ("from", payload),
        ):
            query = {param: value, "view": "cost"}
            if param == "from":
                query.update(range="custom", to="2026-01-05T10:00:00Z")
            status, body, _ = _get(server + "api/view/cost?" + urllib.parse.urlencode(query))
            assert status == 400 and "bad" in json.loads(body)["error"], (param, payload)
        status, body, _ = _get(server + "api/condition?" + urllib.parse.urlencode({"id": payload}))
        assert status == 400 and "no anomaly condition" in json.loads(body)["error"]
        status, body, _ = _get(server + "api/events.csv?" + urllib.parse.urlencode({"q": payload}))
        assert status == 200 and body.count(b"\n") == 1  # the header line only
        status, _, _ = _get(server + "api/view/" + urllib.parse.quote(payload, safe=""))
        assert status == 404
    # Nothing changed, and the views still answer.
    assert connect(lake.data_dir).sql("SELECT count(*) FROM events").fetchall() == [(count,)]
    status, body, _ = _get(server + "api/view/overview?range=all")
    assert json.loads(body)["data"]["tiles"]["events"] == count


def test_csv_export_holds_the_search(lake: Lake, server: str) -> None:
    status, body, headers = _get(server + f"api/events.csv?q={HOSTILE_SESSION}")
    assert status == 200 and headers["Content-Type"].startswith("text/csv")
    lines = body.decode().splitlines()
    ((n,),) = (
        connect(lake.data_dir)
        .execute("SELECT count(*) FROM events WHERE session_id = $1", [HOSTILE_SESSION])
        .fetchall()
    )
    assert len(lines) == 1 + n
    assert '"event_id"' in lines[0] or "event_id" in lines[0]


def test_security_headers_methods_and_hosts(server: str) -> None:
    status, _, headers = _get(server)
    assert status == 200
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    req = urllib.request.Request(server + "api/view/overview", method="POST", data=b"x")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 405
    # A page elsewhere that rebinds its name to 127.0.0.1 is not served.
    status, _, _ = _get(server, {"Host": "attacker.example:80"})
    assert status == 421


def _run_ui(
    args: list[str], env: dict[str, str], timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "ui", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_binding_beyond_loopback_needs_a_token(lake: Lake, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "AGENTSTREAM_UI_TOKEN"}
    env["PYTHONPATH"] = str(REPO)
    out = _run_ui(["--data-dir", str(lake.data_dir), "--host", "0.0.0.0", "--no-live"], env)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: --host 0.0.0.0")
    assert "AGENTSTREAM_UI_TOKEN" in out.stderr
    out = _run_ui(["--host", "0.0.0.0", "--no-live"], {**env, "AGENTSTREAM_UI_TOKEN": "short"})
    assert out.returncode == 2 and out.stderr.startswith("error: AGENTSTREAM_UI_TOKEN is too short")
    out = _run_ui(["--data-dir", str(tmp_path / "nowhere"), "--no-live"], env)
    assert out.returncode == 2 and out.stderr.startswith("error: data directory")
    assert "Traceback" not in out.stderr


def test_token_is_required_when_set(lake: Lake, tmp_path: Path) -> None:
    token = "a" * 12 + "0123456789"
    port = free_port()
    env = {**worker_env(lake.settings), "AGENTSTREAM_UI_TOKEN": token}
    log = tmp_path / "ui.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline.cli",
                "ui",
                "--host",
                "0.0.0.0",
                "--port",
                str(port),
                "--no-live",
            ],
            env=env,
            cwd=REPO,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        base = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 60
        while "agentstream ui:" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert _get(base)[0] == 401
        assert _get(base + "api/view/overview")[0] == 401
        assert _get(base, {"Authorization": "Bearer " + token[:-1] + "x"})[0] == 401
        assert _get(base + "api/view/overview", {"Authorization": f"Bearer {token}"})[0] == 200
        # Opening /?token=... once sets a cookie and drops the token from the address.
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        with opener.open(base + f"?view=cost&token={token}", timeout=10) as resp:
            assert resp.status == 200 and "token" not in resp.url
        with opener.open(base + "api/view/dead_letters", timeout=10) as resp:
            assert resp.status == 200
    finally:
        assert stop_group(proc, 15)


def _prometheus(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples of metric ``name`` by their labels."""
    out = {}
    for line in text.splitlines():
        m = re.fullmatch(name + r"\{(.*)\} (\S+)", line)
        if m:
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m.group(1))))
            out[labels] = float(m.group(2))
    return out


def test_worker_metrics_carry_per_agent_kpis(lake: Lake) -> None:
    """The worker's /metrics counts cost, tokens, tasks, escalations and tool errors per
    agent, version, model and tenant: the same totals as the events view."""
    status, body, _ = _get(f"http://127.0.0.1:{lake.settings.web_port}/metrics")
    assert status == 200
    text = body.decode()
    con = connect(lake.data_dir)
    labels = ("agent", "version", "model", "tenant")
    cols = "coalesce(agent_id, ''), coalesce(agent_version, ''), coalesce(model, ''), coalesce(tenant_id, '')"

    def by_key(sql: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {
            tuple(sorted(zip(labels, r[:4], strict=True))): float(r[4])
            for r in con.sql(sql).fetchall()
            if r[4]
        }

    def approx(got: dict[Any, float], want: dict[Any, float]) -> None:
        assert got.keys() == want.keys()
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=1e-9), k

    def samples(name: str, label: str | None = None, value: str | None = None) -> dict[Any, float]:
        """Samples of ``name`` (those with ``label=value``), keyed without that label."""
        return {
            tuple(p for p in k if p[0] != label): v
            for k, v in _prometheus(text, name).items()
            if label is None or (label, value) in k
        }

    for got, sql in (
        (samples("agentstream_agent_cost_usd_total"), "sum(cost_usd) FROM llm_calls"),
        (samples("agentstream_agent_escalations_total"), "count(*) FROM escalations"),
        (
            samples("agentstream_agent_tokens_total", "direction", "output"),
            "sum(output_tokens) FROM llm_calls",
        ),
        (
            samples("agentstream_agent_tasks_total", "outcome", "completed"),
            "count(*) FROM tasks WHERE outcome = 'completed'",
        ),
        (
            samples("agentstream_agent_errors_total", "kind", "tool"),
            "count(*) FROM tool_calls WHERE status = 'error'",
        ),
    ):
        approx(got, by_key(f"SELECT {cols}, {sql} GROUP BY ALL"))


def test_a_live_alert_appears_without_a_reload(lake: Lake, server: str, page: Page) -> None:
    """The worker's budget alert, published while the page is open, shows under Needs
    attention by itself; its click-through shows the alert window's events."""
    _open(page, server + "?view=attention&range=all")
    page.wait_for_function("document.body.dataset.live === '1'", timeout=30_000)
    assert "spend_usd" not in page.inner_text("#conditions")
    page.evaluate("window.__same_page = true")
    at = lake.newest + timedelta(minutes=6)
    burn = [_llm_call(i, at + timedelta(seconds=i), BUDGET_TENANT, 5.0) for i in range(10)]
    # In a thread: Playwright's sync API holds this thread's event loop.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(produce_raw, lake.settings, [json.dumps(e).encode() for e in burn]).result()
    try:
        page.wait_for_function(
            "document.querySelector('#conditions') && "
            "document.querySelector('#conditions').innerText.includes('spend_usd')",
            timeout=60_000,
        )
    except Exception:
        con = connect(lake.data_dir)
        burns = con.sql(
            "SELECT kind, detector, message FROM anomalies WHERE kind = 'budget_burn'"
        ).fetchall()
        spent = con.sql("SELECT * FROM budgets").fetchall()
        raise AssertionError(
            f"no alert on the page; lake: {burns}; budgets: {spent}; "
            f"updates seen: {page.evaluate('document.body.dataset.updates')}"
        ) from None
    assert page.evaluate("window.__same_page") is True  # no reload happened
    row = page.locator("#conditions tbody tr", has_text="spend_usd")
    assert "critical" in row.inner_text() and BUDGET_TENANT in row.inner_text()

    before = page.evaluate("document.body.dataset.rendered")
    row.locator("a").first.click()
    _rendered(page, before)
    assert "condition=" in page.url
    assert "is spent" in page.inner_text("#condition-message")
    con = connect(lake.data_dir)
    ((cid, start, end),) = con.sql(
        "SELECT condition_id, window_start, window_end FROM anomalies WHERE kind = 'budget_burn'"
    ).fetchall()
    assert cid in page.url
    ((total,),) = con.execute(
        "SELECT count(*) FROM events WHERE tenant_id = $t AND ts >= $s AND ts < $e "
        "AND type <> 'release'",
        {"t": BUDGET_TENANT, "s": start, "e": end},
    ).fetchall()
    heading = page.locator("section h2", has_text="Events of the window").inner_text()
    assert f": {total:,} (first" in heading
    first = con.execute(
        "SELECT event_id FROM events WHERE tenant_id = $t AND ts >= $s AND ts < $e "
        "AND type <> 'release' ORDER BY ts, event_id LIMIT 50",
        {"t": BUDGET_TENANT, "s": start, "e": end},
    ).fetchall()
    shown = page.locator("#window-events tbody tr td:nth-child(3)").all_inner_texts()
    assert shown == [r[0] for r in first]
    # ... and their sessions, one click from there.
    sessions = page.locator("#sessions a")
    assert sessions.count() >= 1
    sid = sessions.first.inner_text()
    before = page.evaluate("document.body.dataset.rendered")
    sessions.first.click()
    _rendered(page, before)
    assert f"Events of {sid}" in page.inner_text("main")
    assert re.search(r"view=sessions", page.url)
