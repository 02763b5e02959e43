"""The naive baseline: a faust agent that updates a tumbling windowed Table per event.

This is the obvious way to compute a windowed KPI with faust (the shape of the faust docs'
page-view example and of ``shared/probes/faust_windowed_table.py``): ``async for`` over the
events topic, the JSON decoded by faust into a dict, and one windowed-table update per event
(cost per agent in 1-minute event-time windows, keyed by the event's ``ts``). It does far
less than the agentstream worker (one measure instead of ~40, no validation, no landing, no
dead letters, no repartition by agent), so its rate is an upper bound for the naive design.

Run as its own process by ``bench.run`` (``python bench/naive_faust.py``), configured by
environment variables:

* ``BENCH_BROKER``: bootstrap ``host:port``
* ``BENCH_TOPIC``: the events topic (read from the beginning)
* ``BENCH_APP_ID``: faust app id (also its consumer group)
* ``BENCH_DATA_DIR``: faust's data folder
* ``BENCH_CAP``: stop counting after this many events
* ``BENCH_SECONDS``: ... or after this many seconds from the first event
* ``BENCH_RESULT``: JSON file written once the cap is reached: ``{"events", "seconds"}``

The process keeps running after writing the result; the caller stops it.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import faust


def build_app() -> tuple[faust.App, Any]:
    """The faust app and its agent, configured from the ``BENCH_*`` environment."""
    env = os.environ
    cap = int(env["BENCH_CAP"])
    seconds = float(env["BENCH_SECONDS"])
    result = Path(env["BENCH_RESULT"])
    app = faust.App(
        env["BENCH_APP_ID"],
        broker=f"kafka://{env['BENCH_BROKER']}",
        store="memory://",
        datadir=env["BENCH_DATA_DIR"],
        autodiscover=False,
        web_enabled=False,
        topic_partitions=4,
        topic_replication_factor=1,
    )
    events = app.topic(env["BENCH_TOPIC"], key_serializer="raw", value_serializer="json")
    cost = (
        app.Table("cost_per_agent", default=float, partitions=4)
        .tumbling(timedelta(minutes=1), expires=timedelta(hours=1))
        # Event time from the JSON ``ts`` (an RFC 3339 string; faust parses it). The
        # method is on WindowWrapper, not on the interface faust's stubs return.
        .relative_to(lambda event: event.value["ts"])  # type: ignore[attr-defined]
    )
    state: dict[str, Any] = {"n": 0, "first": None, "done": False}

    @app.agent(events)
    async def naive(stream: faust.StreamT[dict[str, Any]]) -> None:
        async for event in stream:
            if state["done"]:
                continue
            now = time.perf_counter()
            if state["first"] is None:
                state["first"] = now
            cost[event["agent_id"]] += event.get("cost_usd") or 0.0
            state["n"] += 1
            elapsed = now - state["first"]
            if state["n"] >= cap or elapsed >= seconds:
                state["done"] = True
                # Rate over the events after the first one: n - 1 intervals in `elapsed`.
                body = {
                    "events": state["n"],
                    "seconds": elapsed,
                    "capped_by_time": elapsed >= seconds,
                }
                tmp = result.with_suffix(".tmp")
                tmp.write_text(json.dumps(body))
                tmp.replace(result)

    return app, naive


def main() -> None:
    app, _ = build_app()
    worker = faust.Worker(app, loglevel="warning", quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()
