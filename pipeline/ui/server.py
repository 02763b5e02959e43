"""``agentstream ui``: an aiohttp app that serves the page, its JSON and a live event stream.

Reads. Queries run in a small thread pool, each thread with its own cursor on one DuckDB
connection from ``sinks.catalog.connect`` (the views) with in-memory copies of the small derived
tables, re-made when the live feed says they moved or every ``REFRESH_S``, never on the event loop. Each request's queries
are bounded in time (``QUERY_TIMEOUT_S``: the cursor is interrupted) and rows
(``queries.MAX_ROWS``).

Live. One aiokafka consumer follows the derived topics (metrics, anomalies, release
verdicts, dead letters) from their end, without a group; each fetch becomes one server-sent
event per topic that had records, and the page refreshes the views those topics feed. The
worker lands a flush before it publishes it, so what a message announces is in the lake.

Security. Read-only (GET only, SELECTs of fixed SQL with bound parameters). Bound to
127.0.0.1 by default, and then only requests naming a loopback host are served (a web page
elsewhere cannot reach the server through DNS rebinding). With ``AGENTSTREAM_UI_TOKEN`` set
(required to bind elsewhere), every request must carry it: ``Authorization: Bearer``, the
cookie set by opening ``/?token=...`` once, compared in constant time. Every response
forbids scripts from anywhere but the page's own files.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, TypeVar

import duckdb
import msgspec
from aiohttp import web

from pipeline.config import ConfigError, Settings
from pipeline.listen import listen
from pipeline.ui import queries
from pipeline.ui.queries import BadRequest, Filters

log = logging.getLogger("agentstream.ui")

STATIC: Final = Path(__file__).parent / "static"
TOKEN_ENV: Final = "AGENTSTREAM_UI_TOKEN"
TOKEN_COOKIE: Final = "agentstream_ui_token"
MIN_TOKEN_LEN: Final = 16
QUERY_TIMEOUT_S: Final = 10.0
REFRESH_S: Final = 15.0
RECONNECT_S: Final = 300.0
MIN_REFRESH_GAP_S: Final = 2.0
PING_S: Final = 15.0
CSV_ROWS: Final = 100_000
CACHE_ENTRIES: Final = 64
PREWARM: Final = 4
PREWARM_IDLE_S: Final = 60.0
LOOPBACK_NAMES: Final = frozenset({"localhost", "127.0.0.1", "::1"})
_CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)

T = TypeVar("T")


class QueryTimeout(Exception):
    """A request's queries took longer than allowed and were interrupted."""


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_binding(host: str, token: str | None) -> None:
    """Refuse to serve beyond this machine without a token (one ``error:`` line)."""
    if token is not None and len(token) < MIN_TOKEN_LEN:
        raise ConfigError(
            f"{TOKEN_ENV} is too short ({len(token)} characters): use at least "
            f"{MIN_TOKEN_LEN}, e.g. `export {TOKEN_ENV}=$(openssl rand -hex 16)`"
        )
    if not is_loopback(host) and token is None:
        raise ConfigError(
            f"--host {host} serves the page beyond this machine: set {TOKEN_ENV} to a secret "
            f"of at least {MIN_TOKEN_LEN} characters (then open /?token=...), or bind "
            "127.0.0.1"
        )


class LakeReader:
    """Runs query functions in threads, one cursor per thread, bounded in time.

    The connection comes from ``sinks.analysis.connect`` and holds the ``queries.SNAPSHOT``
    tables; ``refresh`` makes a new one (new files, new tables) and swaps it in whole, so a
    query sees one snapshot or the next, never half of each.

    Answers are cached per data version, the lake's snapshot id (``run_cached``): the lake
    changes only when the worker commits a flush, so between commits a view asked again
    (another tab, a filter toggled back, the page's periodic re-read) costs nothing, and a
    ``refresh`` that finds the same version copies nothing. After a refresh that found new
    data, the ``PREWARM`` views asked most recently are computed again before the pages are
    told (``prewarm``): their re-read then finds the answer ready. Only while pages ask
    (within ``PREWARM_IDLE_S``): a lake nobody looks at costs no queries.
    """

    def __init__(self, data_dir: Path, threads: int = 2, timeout_s: float = QUERY_TIMEOUT_S):
        self.data_dir = Path(data_dir)
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="agentstream-ui")
        self._lock = threading.Lock()
        self._local = threading.local()
        self._con: duckdb.DuckDBPyConnection | None = None
        self._generation = 0
        self._made = 0.0
        self._refreshing: asyncio.Lock | None = None
        self.version: int | None = None  # the lake's snapshot id the copies were made at
        self._cache: OrderedDict[Hashable, Any] = OrderedDict()
        self._asked = time.monotonic()
        self._recent: OrderedDict[Hashable, tuple[Callable[..., Any], tuple[Any, ...]]] = (
            OrderedDict()
        )
        self.refresh()  # a missing or unreadable lake fails here, once, with its message

    def refresh(self) -> bool:
        """A new copy of the derived tables if the lake has a new version (True then);
        every ``RECONNECT_S`` a new connection too (new views: a table that got its first
        files since is then read)."""
        from sinks.analysis import connect

        with self._lock:
            con, made = self._con, self._made
        if con is not None:
            version = queries.data_version(con.cursor())
            if version is not None and version == self.version:
                return False
            if time.monotonic() - made < RECONNECT_S:
                # Concurrent readers see the old copy or the new one (one transaction).
                queries.snapshot(con.cursor())
                self._swap(con, version, reconnected=False)
                return True
        con = connect(self.data_dir)
        # Many small files: their footers are read once, not on every query.
        con.execute("SET parquet_metadata_cache = true")
        version = queries.data_version(con)
        queries.snapshot(con)
        self._swap(con, version, reconnected=True)
        return True

    def _swap(self, con: duckdb.DuckDBPyConnection, version: int | None, reconnected: bool) -> None:
        with self._lock:
            if reconnected:
                self._con = con
                self._made = time.monotonic()
                self._generation += 1
            self.version = version
            self._cache.clear()

    async def refresh_async(self) -> bool:
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        async with self._refreshing:
            return await asyncio.get_running_loop().run_in_executor(self._pool, self.refresh)

    async def run_cached(self, fn: Callable[..., T], *args: Any) -> T:
        """``run``, answered from the cache while the lake's version is the same."""
        key = (fn.__qualname__, args)
        with self._lock:
            self._asked = time.monotonic()
            self._recent[key] = (fn, args)
            self._recent.move_to_end(key)
            while len(self._recent) > PREWARM:
                self._recent.popitem(last=False)
            version = self.version
            if version is not None and key in self._cache:
                self._cache.move_to_end(key)
                hit: T = self._cache[key]
                return hit
        result = await self.run(fn, *args)
        with self._lock:
            if version is not None and version == self.version:
                self._cache[key] = result
                while len(self._cache) > CACHE_ENTRIES:
                    self._cache.popitem(last=False)
        return result

    async def prewarm(self) -> None:
        """Compute the most recently asked views again (after a refresh that found new
        data), one at a time; a view that fails is left for its next request to report."""
        with self._lock:
            recent = list(self._recent.values())
            if time.monotonic() - self._asked > PREWARM_IDLE_S:
                return
        for fn, args in reversed(recent):
            with contextlib.suppress(Exception):
                await self.run_cached(fn, *args)

    def remember(self, fn: Callable[..., Any], *args: Any) -> None:
        """Count ``fn(args)`` as asked, so ``prewarm`` computes it (the page's first view)."""
        with self._lock:
            self._asked = time.monotonic()
            self._recent[(fn.__qualname__, args)] = (fn, args)

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        local = self._local
        with self._lock:
            con, generation = self._con, self._generation
        assert con is not None
        if getattr(local, "generation", None) != generation:
            local.cursor = con.cursor()
            local.generation = generation
        cur: duckdb.DuckDBPyConnection = local.cursor
        return cur

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        used: list[duckdb.DuckDBPyConnection] = []

        def job() -> T:
            cur = self._cursor()
            used.append(cur)
            return fn(cur, *args)

        fut = loop.run_in_executor(self._pool, job)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.timeout_s)
        except TimeoutError:
            for cur in used:
                cur.interrupt()
            fut.add_done_callback(lambda f: f.exception())
            raise QueryTimeout(
                f"the lake's queries took longer than {self.timeout_s:g} s and were stopped: "
                "pick a shorter time range or more filters"
            ) from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class LiveFeed:
    """Follows the derived topics and tells every subscriber which ones moved."""

    def __init__(
        self,
        settings: Settings | None,
        on_update: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.on_update = on_update or self._publish_all
        self.connected = False
        self._warned = False
        self.subscribers: set[asyncio.Queue[dict[str, Any] | None]] = set()
        self._task: asyncio.Task[None] | None = None
        self.topics: dict[str, str] = {}
        if settings is not None:
            self.topics = {
                settings.metrics_topic: "metrics",
                settings.anomalies_topic: "anomalies",
                settings.verdicts_topic: "verdicts",
                settings.dlq_topic: "dead_letters",
            }

    def start(self) -> None:
        if self.settings is not None:
            self._task = asyncio.get_running_loop().create_task(self._follow())

    async def stop(self) -> None:
        for q in list(self.subscribers):
            q.put_nowait(None)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def subscribe(self) -> asyncio.Queue[dict[str, Any] | None]:
        q: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=100)
        self.subscribers.add(q)
        return q

    def _publish_all(self, messages: list[dict[str, Any]]) -> None:
        for m in messages:
            self.publish(m)

    def publish(self, message: dict[str, Any]) -> None:
        for q in list(self.subscribers):
            if q.full():  # a stalled page misses updates, not the others
                continue
            q.put_nowait(message)

    def _status(self, connected: bool) -> None:
        if connected != self.connected:
            self.connected = connected
            self.publish({"event": "status", "live": connected})

    async def _follow(self) -> None:
        while True:
            try:
                await self._consume()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker went away: say so once, keep trying
                if self.connected or not self._warned:
                    log.warning(
                        "live feed: %s (the page works without it; retrying)",
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                    )
                    self._warned = True
            self._status(False)
            await asyncio.sleep(3.0)

    async def _consume(self) -> None:
        from aiokafka import AIOKafkaConsumer

        from pipeline.kafka import client_kwargs

        assert self.settings is not None
        # No group: every partition of the topics, from their end, nothing committed; a
        # topic the worker has not made yet is picked up with the next metadata refresh.
        consumer = AIOKafkaConsumer(
            *self.topics,
            **client_kwargs(self.settings),
            group_id=None,
            auto_offset_reset="latest",
            enable_auto_commit=False,
            metadata_max_age_ms=10_000,
            request_timeout_ms=10_000,
        )
        try:
            await consumer.start()
            while True:
                batch = await consumer.getmany(timeout_ms=500, max_records=5_000)
                # Live once the first fetch has placed the consumer at the end.
                self._status(True)
                self._announce(batch)
        finally:
            await consumer.stop()

    def _announce(self, batch: dict[Any, list[Any]]) -> None:
        moved: dict[str, list[Any]] = {}
        for tp, records in batch.items():
            moved.setdefault(self.topics[tp.topic], []).extend(records)
        messages = []
        for kind, records in moved.items():
            message: dict[str, Any] = {"event": "update", "topic": kind, "records": len(records)}
            if kind == "anomalies":
                alerts = []
                for r in records[:20]:
                    with contextlib.suppress(msgspec.DecodeError, TypeError):
                        data = msgspec.json.decode(r.value)
                        alerts.append(
                            {
                                k: data.get(k)
                                for k in ("kind", "severity", "message", "condition_id")
                            }
                        )
                message["alerts"] = alerts
            messages.append(message)
        if messages:
            self.on_update(messages)


# --------------------------------------------------------------------------------------
# the web app
# --------------------------------------------------------------------------------------

_JSON = msgspec.json.Encoder()


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=_JSON.encode(data), status=status, content_type="application/json", headers=headers
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _security(host: str, token: str | None) -> Any:
    loopback_only = is_loopback(host)
    secret = token.encode() if token is not None else None

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            raise web.HTTPMethodNotAllowed(request.method, ["GET", "HEAD"])
        if loopback_only and not is_loopback((request.url.host or "").strip("[]")):
            return web.Response(status=421, text="this page answers to localhost only\n")
        set_cookie = False
        if secret is not None:
            offered = request.query.get("token")
            if offered is not None and hmac.compare_digest(offered.encode(), secret):
                set_cookie = True
            elif not _authorised(request, secret):
                return web.Response(
                    status=401,
                    text=f"open this page with ?token=<{TOKEN_ENV}> (or send it as a bearer token)\n",
                )
        if set_cookie:
            # Keep the token out of the address bar and of later links.
            clean = request.rel_url.with_query(
                {k: v for k, v in request.query.items() if k != "token"}
            )
            response: web.StreamResponse = web.HTTPFound(str(clean))
        else:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                response = exc
        response.headers["Content-Security-Policy"] = _CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        if set_cookie:
            assert token is not None
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict", path="/")
        return response

    return middleware


def _authorised(request: web.Request, secret: bytes) -> bool:
    auth = request.headers.get("Authorization", "")
    candidates = [request.cookies.get(TOKEN_COOKIE, "")]
    if auth.startswith("Bearer "):
        candidates.append(auth[7:])
    ok = False
    for c in candidates:
        ok |= hmac.compare_digest(c.encode(), secret)
    return ok


VIEWS: Final[dict[str, Callable[..., Any]]] = {
    "overview": queries.overview,
    "cost": queries.cost,
    "attention": queries.attention,
    "releases": queries.releases,
    "budgets": queries.budgets,
    "quality": queries.quality,
    "sessions": queries.sessions,
    "dead_letters": queries.dead_letters,
}


def create_app(
    data_dir: Path,
    settings: Settings | None,
    *,
    host: str = "127.0.0.1",
    token: str | None = None,
) -> web.Application:
    """The page's app over ``data_dir``; ``settings`` name the broker and topics to follow
    (None: no live updates)."""
    check_binding(host, token)
    reader = LakeReader(data_dir)
    pending: list[dict[str, Any]] = []
    wake = asyncio.Event()

    def on_update(messages: list[dict[str, Any]]) -> None:
        pending.extend(messages)
        wake.set()

    feed = LiveFeed(settings, on_update)

    async def refresher() -> None:
        """Refresh the snapshot when the topics moved (or every REFRESH_S), then tell the
        pages: what they re-read is then in it."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), REFRESH_S)
            wake.clear()
            batch = pending[:]
            pending.clear()
            if batch and all(m["topic"] == "dead_letters" for m in batch):
                # Dead letters are read live, not from the copy: nothing to refresh.
                for message in merge_updates(batch):
                    feed.publish(message)
                continue
            started = time.monotonic()
            try:
                if await reader.refresh_async():
                    await reader.prewarm()
            except Exception as exc:
                log.warning("refresh failed: %s", str(exc).splitlines()[0] if str(exc) else exc)
            for message in merge_updates(batch):
                feed.publish(message)
            # A busy stream moves the topics every flush: the copy is made at most this
            # often, so refreshing never takes over the machine.
            await asyncio.sleep(max(0.0, MIN_REFRESH_GAP_S - (time.monotonic() - started)))

    app = web.Application(middlewares=[_security(host, token)])
    index = (STATIC / "index.html").read_bytes()

    async def page(_request: web.Request) -> web.Response:
        return web.Response(body=index, content_type="text/html", charset="utf-8")

    async def _timed(fn: Callable[..., Any], *args: Any, fresh: bool = False) -> web.Response:
        started = time.perf_counter()
        # Process CPU time: what the request cost, whatever else the machine runs (one
        # request at a time, as in bench/ui.py).
        cpu = time.process_time()
        try:
            data = await (reader.run(fn, *args) if fresh else reader.run_cached(fn, *args))
        except BadRequest as exc:
            return _json({"error": str(exc)}, 400)
        except QueryTimeout as exc:
            return _json({"error": str(exc)}, 503)
        except duckdb.Error as exc:
            log.warning("query failed: %s", exc)
            return _json({"error": f"the lake could not answer: {str(exc).splitlines()[0]}"}, 500)
        ms = (time.perf_counter() - started) * 1000
        cpu_ms = (time.process_time() - cpu) * 1000
        return _json(
            {"data": data, "ms": round(ms, 1), "cpu_ms": round(cpu_ms, 1), "live": feed.connected},
            headers={"Server-Timing": f"db;dur={ms:.1f}", "Cache-Control": "no-store"},
        )

    def _filters(request: web.Request) -> Filters:
        return queries.parse_filters(request.query)

    def _fresh(request: web.Request) -> bool:
        """``Cache-Control: no-cache``: the client wants the answer computed now (bench)."""
        return "no-cache" in request.headers.get("Cache-Control", "")

    async def view(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        fn = VIEWS.get(name)
        if fn is None:
            return _json(
                {"error": f"no view {name[:40]!r}: expected one of {', '.join(VIEWS)}"}, 404
            )
        try:
            f = _filters(request)
        except BadRequest as exc:
            return _json({"error": str(exc)}, 400)
        args: list[Any] = [f]
        if name == "cost":
            args.append(request.query.get("by", "agent"))
        if name == "sessions":
            args.append(request.query.get("q", "").strip())
        return await _timed(fn, *args, fresh=_fresh(request))

    async def condition(request: web.Request) -> web.Response:
        cid = request.query.get("id", "")
        if not cid or len(cid) > queries.MAX_FILTER_LEN:
            return _json({"error": "bad id: give the condition_id of an anomaly condition"}, 400)
        return await _timed(queries.condition, cid, fresh=_fresh(request))

    async def options(request: web.Request) -> web.Response:
        return await _timed(queries.options, Filters(), fresh=_fresh(request))

    async def events_csv(request: web.Request) -> web.Response:
        try:
            f = _filters(request)
        except BadRequest as exc:
            return _json({"error": str(exc)}, 400)
        q = request.query.get("q", "").strip()
        if len(q) > queries.MAX_FILTER_LEN:
            return _json({"error": "bad q: too long"}, 400)
        try:
            body = await reader.run(queries.events_csv, f, q, CSV_ROWS)
        except (BadRequest, QueryTimeout) as exc:
            return _json({"error": str(exc)}, 400)
        name = "agentstream-events.csv"
        return web.Response(
            body=body,
            content_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    async def live(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        q = feed.subscribe()
        try:
            await response.write(_sse({"event": "status", "live": feed.connected}))
            while True:
                try:
                    message = await asyncio.wait_for(q.get(), PING_S)
                except TimeoutError:
                    await response.write(b": ping\n\n")
                    continue
                if message is None:
                    break
                await response.write(_sse(message))
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            feed.subscribers.discard(q)
        return response

    app.router.add_get("/", page)
    app.router.add_get("/api/view/{name}", view)
    app.router.add_get("/api/condition", condition)
    app.router.add_get("/api/options", options)
    app.router.add_get("/api/events.csv", events_csv)
    app.router.add_get("/api/live", live)
    app.router.add_static("/static/", STATIC, follow_symlinks=False)

    tasks: list[asyncio.Task[None]] = []

    async def on_startup(_app: web.Application) -> None:
        feed.start()
        # The page opens on the overview of the default range: have it ready.
        reader.remember(queries.options, Filters())
        reader.remember(queries.overview, Filters())
        loop = asyncio.get_running_loop()
        tasks.append(loop.create_task(reader.prewarm()))
        tasks.append(loop.create_task(refresher()))

    async def on_shutdown(_app: web.Application) -> None:
        for task in tasks:
            task.cancel()
        await feed.stop()
        reader.close()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    return app


def merge_updates(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One update per topic: record counts added, the first 20 alerts kept."""
    merged: dict[str, dict[str, Any]] = {}
    for m in messages:
        into = merged.setdefault(m["topic"], {**m, "records": 0, "alerts": []})
        into["records"] += m["records"]
        into["alerts"] = (into["alerts"] + m.get("alerts", []))[:20]
    return list(merged.values())


def _sse(message: dict[str, Any]) -> bytes:
    kind = message.get("event", "update")
    return b"event: " + str(kind).encode() + b"\ndata: " + _JSON.encode(message) + b"\n\n"


def serve(
    data_dir: Path,
    settings: Settings | None,
    host: str,
    port: int,
    token: str | None,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Run the page until SIGINT or SIGTERM; ``ready`` gets its address once it listens."""
    app = create_app(data_dir, settings, host=host, token=token)
    shown = f"[{host}]" if ":" in host else host

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        runner = web.AppRunner(app, shutdown_timeout=2.0)
        await runner.setup()
        try:
            await listen(runner, host, port)
            if ready is not None:
                ready(f"http://{shown}:{port}/")
            await stop.wait()
        finally:
            await runner.cleanup()

    asyncio.run(main())
