"""OTLP ingestion end to end: real clients -> `agentstream otlp` -> Kafka -> worker -> lake.

One `agentstream otlp` process and one worker serve the whole module (topics and group of its
own); each test uses agents (``service.name``) of its own and checks exact counts and sums
in the ``events`` view once the worker has committed everything on the events topic.

Clients: the OpenTelemetry SDK with its OTLP/HTTP protobuf exporter; OpenInference's OpenAI
instrumentation around the real ``openai`` client, which talks to a tiny OpenAI-compatible
server started here; raw OTLP/JSON and gzip over HTTP; and OTLP protobuf and JSON messages
on the Collector's Kafka topic, as its Kafka exporter writes them.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import TracesData
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode

from pipeline.broker import free_port
from pipeline.config import Settings
from pipeline.kafka import committed_lag
from sinks.catalog import connect
from sinks.lake import holds_lake
from tests.helpers import (
    REPO,
    consume_all,
    produce_raw,
    running_worker,
    unique_settings,
    worker_env,
)

pytestmark = pytest.mark.timeout(300)
MAX_BODY_MIB = 2


class Stack:
    """The module's receiver and worker."""

    def __init__(self, settings: Settings, port: int, kafka_topic: str, log: Path) -> None:
        self.settings = settings
        self.port = port
        self.kafka_topic = kafka_topic
        self.log = log
        self.url = f"http://127.0.0.1:{port}"

    def post(
        self, path: str, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes, dict[str, str]]:
        req = urllib.request.Request(
            self.url + path,
            data=body,
            method="POST",
            headers={"Content-Type": content_type, **(headers or {})},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), dict(exc.headers)

    def metric(self, name: str, **labels: str) -> float:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith(f"{name}{{{want}}}") or (not labels and line.startswith(name + " ")):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def settle(self, timeout: float = 90) -> None:
        """Wait until the worker has committed every message on the events topic."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            total, done = asyncio.run(committed_lag(self.settings))
            if done == total:
                return
            time.sleep(0.3)
        raise AssertionError(f"worker committed {done} of {total}")

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        return connect(self.settings.data_dir).sql(sql).fetchall()

    def wait_rows(self, agent: str, expected: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        got = -1
        while time.monotonic() < deadline:
            if holds_lake(self.settings.data_dir):
                ((got,),) = self.rows(f"SELECT count(*) FROM events WHERE agent_id = '{agent}'")
                if got >= expected:
                    self.settle()
                    return
            time.sleep(0.3)
        raise AssertionError(f"{got} of {expected} events of {agent} landed; log {self.log}")


@pytest.fixture(scope="module")
def stack(bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("otlp")
    settings = unique_settings(bootstrap, tmp / "lake")
    port = free_port()
    kafka_topic = f"otlp-{uuid.uuid4().hex[:8]}"
    log = tmp / "otlp.log"
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "pipeline.cli", "otlp", "--port", str(port),
                "--kafka-topic", kafka_topic, "--kafka-logs-topic", f"{kafka_topic}-logs",
                "--max-body-mib", str(MAX_BODY_MIB),
            ],
            env=worker_env(settings),
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )  # fmt: skip
    s = Stack(settings, port, kafka_topic, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                with urllib.request.urlopen(s.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        with running_worker(settings):
            yield s
        assert proc.poll() is None, f"the receiver died: {log.read_text()}"
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0, log.read_text()


def _provider(service: str, exporter: Any) -> TracerProvider:
    """As users set it up: a batch processor, so an agent run is exported together (its
    tenant, set on the agent span, reaches the model calls below it)."""
    tp = TracerProvider(resource=Resource.create({"service.name": service, "service.version": "7"}))
    tp.add_span_processor(BatchSpanProcessor(exporter))
    return tp


def _agent_run(tp: TracerProvider, tools_fail: bool = False) -> None:
    """What an instrumented agent emits: invoke_agent > 2 chats, a tool call, an HTTP call."""
    tracer = tp.get_tracer("agent")
    with tracer.start_as_current_span(
        "invoke_agent support",
        attributes={
            "gen_ai.operation.name": "invoke_agent",
            "agentstream.tenant.id": "acme",
            # Rolled-up totals on the agent span must not be counted again.
            "gen_ai.usage.input_tokens": 10_000,
        },
    ):
        for i in range(2):
            with tracer.start_as_current_span(
                "chat gpt-4o",
                attributes={
                    "gen_ai.operation.name": "chat",
                    "gen_ai.provider.name": "openai",
                    "gen_ai.request.model": "gpt-4o",
                    "gen_ai.usage.input_tokens": 100 + i,
                    "gen_ai.usage.output_tokens": 20,
                    "gen_ai.usage.cache_read.input_tokens": 50,
                    "gen_ai.response.finish_reasons": ["stop"],
                },
            ):
                pass
        with tracer.start_as_current_span(
            "execute_tool lookup",
            attributes={"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "lookup"},
        ) as tool:
            if tools_fail:
                tool.set_status(Status(StatusCode.ERROR, "boom"))
                tool.set_attribute("error.type", "TimeoutError")
        with tracer.start_as_current_span("GET /orders", attributes={"http.request.method": "GET"}):
            pass


def test_sdk_spans_land_once_with_tokens_model_agent_and_trace(stack: Stack) -> None:
    agent = f"sdk-{uuid.uuid4().hex[:6]}"
    memory = InMemorySpanExporter()
    tp = _provider(agent, OTLPSpanExporter(endpoint=stack.url + "/v1/traces"))
    tp.add_span_processor(SimpleSpanProcessor(memory))
    skipped_before = stack.metric(
        "agentstream_otlp_items_total", signal="traces", outcome="skipped"
    )
    _agent_run(tp)
    _agent_run(tp, tools_fail=True)
    assert tp.force_flush()
    spans = memory.get_finished_spans()
    assert len(spans) == 10
    # 2 runs x (task started + ended, 2 llm calls, 1 tool call); HTTP spans skipped.
    stack.wait_rows(agent, 10)

    def summary() -> list[tuple[Any, ...]]:
        return stack.rows(
            f"""SELECT type, count(*), sum(input_tokens), sum(output_tokens),
                       sum(cached_input_tokens), count(DISTINCT trace_id), min(model),
                       min(provider), min(agent_version), min(tenant_id),
                       count(*) FILTER (status = 'error'), min(error_type)
                FROM events WHERE agent_id = '{agent}' GROUP BY type ORDER BY type"""
        )

    first = summary()
    assert first == [
        (
            "llm_call",
            4,
            100 + 101 + 100 + 101,
            80,
            200,
            2,
            "gpt-4o",
            "openai",
            "7",
            "acme",
            0,
            None,
        ),
        ("task", 4, None, None, None, 2, None, None, "7", "acme", 0, None),
        ("tool_call", 2, None, None, None, 2, None, None, "7", "acme", 1, "TimeoutError"),
    ]
    traces = {f"{s.context.trace_id:032x}" for s in spans}
    landed = stack.rows(f"SELECT DISTINCT trace_id, task_id FROM events WHERE agent_id = '{agent}'")
    assert {t for t, _ in landed} == traces
    assert all(t == task for t, task in landed)  # the task is the trace
    ((outcomes,),) = stack.rows(
        f"SELECT list(outcome ORDER BY outcome) FROM events WHERE agent_id = '{agent}' AND type = 'task'"
    )
    assert outcomes == ["completed", "completed", "started", "started"]
    assert (
        stack.metric("agentstream_otlp_items_total", signal="traces", outcome="skipped")
        == skipped_before + 2
    )

    # The same spans sent again (an exporter retry): each event id lands once.
    again = OTLPSpanExporter(endpoint=stack.url + "/v1/traces")
    assert again.export(spans) == SpanExportResult.SUCCESS
    stack.settle()
    time.sleep(1.0)  # a flush interval or two for any duplicate to be landed
    stack.settle()
    assert summary() == first
    ((dupes,),) = stack.rows(
        f"SELECT count(*) FROM dead_letters WHERE reason LIKE 'duplicate event_id%' "
        f'AND raw_text LIKE \'%"agent_id":"{agent}"%\''
    )
    assert dupes == 10


def test_sdk_evaluation_results_and_feedback_become_evaluation_and_feedback_events(
    stack: Stack,
) -> None:
    """An LLM judge scores each answer inside its chat span and a user rates the run, through
    the SDK's OTLP logs exporter: evaluation events of the judged span, with its model."""
    agent = f"eval-{uuid.uuid4().hex[:6]}"
    resource = Resource.create({"service.name": agent, "service.version": "7"})
    tp = TracerProvider(resource=resource)
    spans = InMemorySpanExporter()
    tp.add_span_processor(SimpleSpanProcessor(spans))
    tp.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=stack.url + "/v1/traces")))
    lp = LoggerProvider(resource=resource)
    lp.add_log_record_processor(
        BatchLogRecordProcessor(OTLPLogExporter(endpoint=stack.url + "/v1/logs"))
    )
    judge = lp.get_logger("judge")
    tracer = tp.get_tracer("agent")
    verdicts = [(0.9, "pass"), (0.2, "fail"), (0.95, "pass")]
    for score, label in verdicts:
        with tracer.start_as_current_span(
            "invoke_agent", attributes={"gen_ai.operation.name": "invoke_agent"}
        ):
            with tracer.start_as_current_span(
                "chat",
                attributes={
                    "gen_ai.operation.name": "chat",
                    "gen_ai.request.model": "gpt-4o-mini",
                    "gen_ai.usage.input_tokens": 10,
                    "gen_ai.usage.output_tokens": 5,
                },
            ):
                # The conventions' way: the record is emitted in the evaluated span's context.
                judge.emit(
                    event_name="gen_ai.evaluation.result",
                    attributes={
                        "gen_ai.evaluation.name": "hallucination",
                        "gen_ai.evaluation.score.value": score,
                        "gen_ai.evaluation.score.label": label,
                        "gen_ai.request.model": "gpt-4o-mini",
                    },
                )
                # An evaluator that errored has no result: nothing to count.
                judge.emit(
                    event_name="gen_ai.evaluation.result",
                    attributes={"gen_ai.evaluation.name": "tone", "error.type": "timeout"},
                )
            judge.emit(
                event_name="agentstream.feedback",
                attributes={"agentstream.feedback.rating": 2 if label == "fail" else 5},
            )
    assert tp.force_flush() and lp.force_flush()
    chats = {
        f"{s.context.span_id:016x}": f"{s.context.trace_id:032x}"
        for s in spans.get_finished_spans()
        if s.name == "chat"
    }
    # 3 runs x (task started + ended, 1 llm call, 1 evaluation, 1 feedback)
    stack.wait_rows(agent, 3 * 5)
    got = stack.rows(
        f"""SELECT evaluator, score, label, passed, evaluator_kind, scope, span_id, trace_id,
                   task_id, model, agent_version
            FROM evaluations WHERE agent_id = '{agent}' ORDER BY score"""
    )
    assert [g[:6] for g in got] == [
        ("hallucination", 0.2, "fail", False, "llm_judge", "span"),
        ("hallucination", 0.9, "pass", True, "llm_judge", "span"),
        ("hallucination", 0.95, "pass", True, "llm_judge", "span"),
    ]
    # Each evaluation names the chat span it judged, in that span's trace (the task).
    assert {g[6]: g[7] for g in got} == chats
    assert all(g[8] == g[7] and g[9:] == ("gpt-4o-mini", "7") for g in got)
    ((ratings,),) = stack.rows(
        f"SELECT list(rating ORDER BY rating) FROM feedback WHERE agent_id = '{agent}'"
    )
    assert ratings == [2, 5, 5]
    ((types,),) = stack.rows(
        f"SELECT list(DISTINCT type ORDER BY type) FROM events WHERE agent_id = '{agent}'"
    )
    assert types == ["evaluation", "feedback", "llm_call", "task"]
    tp.shutdown()
    lp.shutdown()


class _FakeOpenAI(BaseHTTPRequestHandler):
    """Just enough of the chat completions API for the real openai client."""

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        n = len(request["messages"])
        body = json.dumps(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": request["model"],
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": "ok"},
                    }
                ],
                "usage": {
                    "prompt_tokens": 10 * n,
                    "completion_tokens": 3,
                    "total_tokens": 10 * n + 3,
                },
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_openai_client_instrumented_by_openinference(stack: Stack) -> None:
    import openai
    from openinference.instrumentation.openai import OpenAIInstrumentor

    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    agent = f"oi-{uuid.uuid4().hex[:6]}"
    tp = _provider(agent, OTLPSpanExporter(endpoint=stack.url + "/v1/traces"))
    instrumentor = OpenAIInstrumentor()
    instrumentor.instrument(tracer_provider=tp)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_port}/v1", api_key="test")
        for n in (1, 2, 3):
            messages: Any = [{"role": "user", "content": f"question {i}"} for i in range(n)]
            client.chat.completions.create(model="gpt-4o-mini", messages=messages)
        assert tp.force_flush()
    finally:
        instrumentor.uninstrument()
        server.shutdown()
    stack.wait_rows(agent, 3)
    rows = stack.rows(
        f"""SELECT type, count(*), sum(input_tokens), sum(output_tokens), min(model), min(provider),
                   count(DISTINCT trace_id), count(DISTINCT span_id)
            FROM events WHERE agent_id = '{agent}' GROUP BY ALL"""
    )
    assert rows == [("llm_call", 3, 10 + 20 + 30, 9, "gpt-4o-mini", "openai", 3, 3)]


def _json_span(trace: str, span: str, **attrs: Any) -> dict[str, Any]:
    now = time.time_ns()

    def value(v: Any) -> dict[str, Any]:
        if isinstance(v, bool):
            return {"boolValue": v}
        if isinstance(v, int):
            return {"intValue": str(v)}  # int64 as a decimal string, as OTLP/JSON writes it
        if isinstance(v, dict):
            return v  # already an AnyValue (or something odd on purpose)
        return {"stringValue": v}

    return {
        "traceId": trace,
        "spanId": span,
        "name": "chat",
        "kind": 3,
        "startTimeUnixNano": str(now - 2_000_000_000),
        "endTimeUnixNano": str(now - 1_000_000_000),
        "attributes": [{"key": k, "value": value(v)} for k, v in attrs.items()],
        "status": {"code": 0},
    }


def _json_body(service: str, spans: list[dict[str, Any]]) -> bytes:
    return json.dumps(
        {
            "resourceSpans": [
                {
                    "resource": {
                        "attributes": [{"key": "service.name", "value": {"stringValue": service}}]
                    },
                    "scopeSpans": [{"scope": {"name": "t"}, "spans": spans}],
                }
            ]
        }
    ).encode()


def _chat(trace: str, span: str, tokens: int, **extra: Any) -> dict[str, Any]:
    return _json_span(
        trace,
        span,
        **{
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": "gpt-4o-mini",
            "gen_ai.usage.input_tokens": tokens,
            "gen_ai.usage.output_tokens": 1,
            **extra,
        },
    )


def _evaluation(agent: str, trace: str, score: float, with_other_record: bool = False) -> bytes:
    """OTLP/JSON logs: an evaluation result of span 1 of ``trace`` (and an app log line)."""
    records: list[dict[str, Any]] = [
        {
            "timeUnixNano": str(time.time_ns()),
            "eventName": "gen_ai.evaluation.result",
            "traceId": trace,
            "spanId": f"{1:016x}",
            "attributes": [
                {"key": "gen_ai.evaluation.name", "value": {"stringValue": "relevance"}},
                {"key": "gen_ai.evaluation.score.value", "value": {"doubleValue": score}},
            ],
        }
    ]
    if with_other_record:
        records.append({"timeUnixNano": str(time.time_ns()), "eventName": "app.log"})
    resource = {"attributes": [{"key": "service.name", "value": {"stringValue": agent}}]}
    doc = {"resourceLogs": [{"resource": resource, "scopeLogs": [{"logRecords": records}]}]}
    return json.dumps(doc).encode()


def test_otlp_json_gzip_partial_success_and_hostile_requests(stack: Stack) -> None:
    agent = f"json-{uuid.uuid4().hex[:6]}"
    trace = uuid.uuid4().hex
    good = [_chat(trace, f"{i + 1:016x}", 100 * (i + 1)) for i in range(3)]
    odd = _chat(trace, f"{9:016x}", 7, **{"weird.attr": {"fancyValue": 3}})  # unknown type: ignored
    no_ids = _chat("", "", 5)
    huge = _chat(trace, f"{10:016x}", 11, **{"gen_ai.request.model": "m" * 5000})
    body = gzip.compress(_json_body(agent, [*good, odd, no_ids, huge]))
    status, answer, _ = stack.post(
        "/v1/traces", body, "application/json", {"Content-Encoding": "gzip"}
    )
    assert status == 200, answer
    partial = json.loads(answer)["partialSuccess"]
    assert partial["rejectedSpans"] == "2"
    assert "span without a valid trace_id and span_id" in partial["errorMessage"]
    assert "$.model" in partial["errorMessage"]

    hostile = {
        "malformed protobuf": (b"\x0a\xff\xff\xff\xff\x0f", "application/x-protobuf", {}, 400),
        "malformed JSON": (b'{"resourceSpans": [', "application/json", {}, 400),
        "not OTLP JSON": (b'{"resourceSpans": 7}', "application/json", {}, 400),
        "wrong content type": (b"hello", "text/plain", {}, 415),
        "truncated gzip": (gzip.compress(_json_body(agent, good))[:-12], "application/json", {"Content-Encoding": "gzip"}, 400),
        "unknown encoding": (b"{}", "application/json", {"Content-Encoding": "br"}, 415),
        "huge body": (b"\x00" * ((MAX_BODY_MIB << 20) + 1), "application/x-protobuf", {}, 413),
        "gzip bomb": (gzip.compress(b" " * ((MAX_BODY_MIB << 20) + 10)), "application/json", {"Content-Encoding": "gzip"}, 413),
    }  # fmt: skip
    for what, (raw, content_type, headers, expected) in hostile.items():
        status, answer, _ = stack.post("/v1/traces", raw, content_type, headers)
        assert status == expected, (what, status, answer)
        if content_type == "application/json":
            assert json.loads(answer)["message"], what
        else:
            assert answer, what  # a google.rpc.Status
    assert stack.metric("agentstream_otlp_requests_total", signal="traces", status="400") >= 3

    # Still serving: a protobuf body, answered in protobuf, and an evaluation log record.
    memory = InMemorySpanExporter()
    tp = _provider(agent, memory)
    _agent_run(tp)
    assert tp.force_flush()
    status, answer, _ = stack.post(
        "/v1/traces",
        encode_spans(memory.get_finished_spans()).SerializeToString(),
        "application/x-protobuf",
    )
    assert status == 200
    assert not ExportTraceServiceResponse.FromString(answer).HasField("partial_success")
    evaluation = _evaluation(agent, trace, 0.75, with_other_record=True)
    status, answer, _ = stack.post("/v1/logs", evaluation, "application/json")
    assert status == 200, answer
    assert json.loads(answer) == {}

    # 3 good + the odd one (4 llm calls), 5 events of the SDK run, 1 evaluation.
    stack.wait_rows(agent, 4 + 5 + 1)
    rows = stack.rows(
        f"""SELECT type, count(*), sum(input_tokens), sum(score)
            FROM events WHERE agent_id = '{agent}' GROUP BY type ORDER BY type"""
    )
    assert rows == [
        ("evaluation", 1, None, 0.75),
        ("llm_call", 6, 100 + 200 + 300 + 7 + 100 + 101, None),
        ("task", 2, None, None),
        ("tool_call", 1, None, None),
    ]


def test_collector_kafka_topic_protobuf_and_json(stack: Stack) -> None:
    agent = f"kafka-{uuid.uuid4().hex[:6]}"
    memory = InMemorySpanExporter()
    tp = _provider(agent, memory)
    _agent_run(tp)
    assert tp.force_flush()
    request = encode_spans(memory.get_finished_spans())
    traces_data = TracesData(resource_spans=request.resource_spans).SerializeToString()
    trace = uuid.uuid4().hex
    as_json = _json_body(agent, [_chat(trace, f"{i + 1:016x}", 1000) for i in range(2)])
    garbage = b"\x0a\x05not a span at all"
    produce_raw(
        stack.settings,
        [traces_data, as_json, garbage, traces_data],  # the last: at-least-once repeat
        topic=stack.kafka_topic,
    )
    produce_raw(stack.settings, [_evaluation(agent, trace, 0.5)], topic=f"{stack.kafka_topic}-logs")
    stack.wait_rows(agent, 5 + 2 + 1)
    time.sleep(1.0)
    stack.settle()
    rows = stack.rows(
        f"SELECT type, count(*), sum(input_tokens) FROM events WHERE agent_id = '{agent}' GROUP BY type ORDER BY type"
    )
    assert rows == [
        ("evaluation", 1, None),
        ("llm_call", 4, 100 + 101 + 2000),
        ("task", 2, None),
        ("tool_call", 1, None),
    ]
    dead = [
        r
        for r in consume_all(stack.settings, stack.settings.dlq_topic, expected=1000, timeout=5)
        if r.value == garbage
    ]
    assert len(dead) == 1
    headers = dict(dead[0].headers)
    assert headers["agentstream.reason"].decode().startswith("not OTLP traces: malformed protobuf")
    assert headers["agentstream.source"].decode().startswith(f"{stack.kafka_topic}/")


def test_kafka_down_answers_503_with_retry_after_then_recovers(tmp_path: Path) -> None:
    """A broker of its own (embedded Tansu) stopped under a running `agentstream otlp`:
    503 with Retry-After and /health 503; once the broker is back, the retry is accepted."""
    from pipeline.broker import LocalBroker
    from pipeline.kafka import ensure_pipeline_topics

    memory = InMemorySpanExporter()
    tp = _provider("down", memory)
    _agent_run(tp)
    assert tp.force_flush()
    body = encode_spans(memory.get_finished_spans()).SerializeToString()
    broker = LocalBroker("tansu")
    settings = Settings.load(env={}, broker=broker.start(), data_dir=tmp_path)
    ensure_pipeline_topics(settings)
    port = free_port()
    log = tmp_path / "otlp.log"
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "otlp", "--port", str(port), "--no-kafka"],
            env=worker_env(settings), stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
            start_new_session=True,
        )  # fmt: skip
    stack = Stack(settings, port, "", log)

    def post_until(expected: int, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                status, answer, headers = stack.post("/v1/traces", body, "application/x-protobuf")
            except OSError:
                status, answer, headers = 0, b"", {}
            if status == expected:
                return headers
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, (status, answer, log.read_text())
            time.sleep(0.5)

    def health() -> int:
        try:
            with urllib.request.urlopen(stack.url + "/health", timeout=5) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    try:
        post_until(200, 60)
        broker.stop()
        assert post_until(503, 60)["Retry-After"] == "2"
        assert health() == 503
        broker.start()  # same port, empty (Tansu keeps nothing)
        ensure_pipeline_topics(settings)
        post_until(200, 90)
        assert health() == 200
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        broker.stop()


def test_user_mistakes_are_one_line_and_status_2(stack: Stack) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "otlp", *args],
            env=worker_env(stack.settings), cwd=REPO, capture_output=True, text=True,
            timeout=120, check=False,
        )  # fmt: skip

    cases = {
        "bad broker address 'nonsense'": ("--broker", "nonsense"),
        "bad --kafka-topic topic name 'no spaces'": ("--kafka-topic", "no spaces", "--port", "0"),
        f"cannot listen on 127.0.0.1:{stack.port}": ("--port", str(stack.port), "--no-kafka"),
    }
    for expected, args in cases.items():
        out = run(*args)
        assert out.returncode == 2, (args, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), out.stderr


def test_saturated_receiver_answers_429_with_retry_after_and_retries_land(stack: Stack) -> None:
    """In process, one request at a time allowed: concurrent exports beyond it get 429 with
    Retry-After; retried, every span is accepted once."""
    import aiohttp
    from aiohttp import web

    from bench.otlp import bodies
    from pipeline.broker import ensure_topics
    from pipeline.otel.receiver import OtlpReceiver
    from pipeline.publisher import Publisher

    payloads = bodies(6 * 700, 700)
    topic = f"sat-{uuid.uuid4().hex[:8]}"
    ensure_topics(stack.settings.broker, {topic: 2})

    async def scenario() -> tuple[list[int], set[str | None], float]:
        async with Publisher(stack.settings, topic=topic) as publisher:
            receiver = OtlpReceiver(publisher, max_pending=1, retry_after_s=1)
            runner = receiver.runner()
            await runner.setup()
            port = free_port()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            url = f"http://127.0.0.1:{port}/v1/traces"
            first: list[int] = []
            retry_after: set[str | None] = set()
            try:
                async with aiohttp.ClientSession() as http:

                    async def export(body: bytes) -> None:
                        while True:
                            async with http.post(
                                url, data=body, headers={"Content-Type": "application/x-protobuf"}
                            ) as resp:
                                await resp.read()
                                if len(first) < len(payloads) and body not in seen:
                                    seen.add(body)
                                    first.append(resp.status)
                                if resp.status == 200:
                                    return
                                assert resp.status == 429
                                retry_after.add(resp.headers.get("Retry-After"))
                                await asyncio.sleep(float(resp.headers["Retry-After"]))

                    seen: set[bytes] = set()
                    await asyncio.gather(*(export(b) for b in payloads))
            finally:
                await runner.cleanup()
            return first, retry_after, receiver.metrics.count("traces", "accepted")

    first, retry_after, accepted = asyncio.run(scenario())
    assert 200 in first and 429 in first, first
    assert retry_after == {"1"}
    assert accepted == 6 * 600  # every span once (the HTTP span of each run is skipped)
