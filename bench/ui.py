"""How fast the live page is on a lake: ``python -m bench.ui --data-dir DIR``.

Starts ``agentstream ui --no-live`` on the lake, then measures, for each time range asked:
the first render of the overview in a fresh Chromium page (navigation to the tiles drawn),
and each view's queries as the server times them, wall clock and the server process's CPU
time (median of ``--runs`` requests, after one warm-up; the CPU time does not grow with
what else the machine runs). Each twice: *cold*, every request sent with ``Cache-Control:
no-cache`` so the server computes it (what the first request after the worker's next
commit costs), and as served (answers cached per data version). With ``--shots DIR`` it also saves a screenshot of every view (and of the first
anomaly condition's click-through) there. Needs Debian's chromium and Playwright.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from pipeline.broker import free_port
from pipeline.ui.server import VIEWS


def _get(url: str, cold: bool = False) -> dict[str, Any]:
    req = urllib.request.Request(url, headers={"Cache-Control": "no-cache"} if cold else {})
    with urllib.request.urlopen(req, timeout=120) as resp:
        data: dict[str, Any] = json.loads(resp.read())
        return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ui", description=__doc__)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--ranges", default="24h,all", help="comma-separated ranges")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--shots", type=Path, default=None, help="save screenshots here")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args(argv)

    from playwright.sync_api import sync_playwright

    port = free_port()
    started = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "ui",
            "--no-live",
            "--port",
            str(port),
            "--data-dir",
            str(args.data_dir),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    if "agentstream ui:" not in line:
        print(line + proc.stderr.read(), file=sys.stderr)
        return 1
    print(f"server ready in {time.perf_counter() - started:.1f} s (views bound, snapshot made)")
    base = f"http://127.0.0.1:{port}/"
    results: dict[str, Any] = {}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            for rng in args.ranges.split(","):
                result: dict[str, Any] = {}
                for mode in ("cold", "served"):
                    renders = []
                    for _ in range(args.runs):
                        page = browser.new_page(viewport={"width": 1400, "height": 1000})
                        if mode == "cold":
                            page.set_extra_http_headers({"Cache-Control": "no-cache"})
                        t0 = time.perf_counter()
                        page.goto(f"{base}?range={rng}", wait_until="domcontentloaded")
                        page.wait_for_selector("#tiles .tile .value", timeout=60_000)
                        renders.append((time.perf_counter() - t0) * 1000)
                        page.close()
                    views, cpu = {}, {}
                    for view in VIEWS:
                        url = f"{base}api/view/{view}?range={rng}"
                        _get(url)
                        got = [_get(url, mode == "cold") for _ in range(args.runs)]
                        views[view] = statistics.median(g["ms"] for g in got)
                        cpu[view] = statistics.median(g["cpu_ms"] for g in got)
                    first = statistics.median(renders)
                    result[mode] = {
                        "first_render_ms": first,
                        "views_ms": views,
                        "views_cpu_ms": cpu,
                    }
                    print(f"range {rng}, {mode}: first render of the overview {first:.0f} ms")
                    print(f"  {'view':<13} {'wall':>8} {'cpu':>8}")
                    for view, ms in views.items():
                        print(f"  {view:<13} {ms:5.0f} ms {cpu[view]:5.0f} ms")
                results[rng] = result
            if args.shots is not None:
                args.shots.mkdir(parents=True, exist_ok=True)
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                for view in VIEWS:
                    page.goto(f"{base}?view={view}&range=all", wait_until="domcontentloaded")
                    page.wait_for_selector("body[data-rendered]", timeout=60_000)
                    page.wait_for_timeout(300)  # charts draw on the next frame
                    page.screenshot(path=str(args.shots / f"ui-{view}.png"))
                page.goto(f"{base}?view=attention&range=all", wait_until="domcontentloaded")
                page.wait_for_selector("#conditions tbody a", timeout=60_000)
                page.click("#conditions tbody a >> nth=0")
                page.wait_for_selector("#context", timeout=60_000)
                page.wait_for_timeout(300)
                page.screenshot(path=str(args.shots / "ui-attention-condition.png"))
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
