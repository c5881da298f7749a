"""One trace from the edge through the scheduler to the engine call, and log lines that
carry the request id and trace id. The services run in this process, so one in-memory
exporter sees every service's spans."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import orjson
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from sage.common.grpc import server as grpc_server
from sage.common.http import asgi
from sage.common.http.testing import RecordingEngine
from sage.common.utils.logging import configure_logging
from sage.services.scheduler import executor


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """An in-memory exporter behind the tracers of the edge, gRPC runtime and executor.

    The tracers are swapped for the test rather than installing a global provider, which
    OpenTelemetry allows only once per process (later tests could not install theirs).
    """
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    for module in (asgi, grpc_server, executor):
        monkeypatch.setattr(module, "_tracer", provider.get_tracer(module.__name__))
    yield memory
    provider.shutdown()


@pytest.fixture
async def recorder() -> AsyncIterator[RecordingEngine]:
    """A recording engine in the test's loop."""
    async with RecordingEngine() as engine:
        yield engine


@pytest.fixture
async def edge(control_plane: Any, recorder: RecordingEngine) -> httpx.AsyncClient:
    """The edge client with the recorder registered as `rec`."""
    await control_plane.register("rec-a", "rec", recorder.base_url)
    client: httpx.AsyncClient = control_plane.client
    return client


CHAT = {"model": "rec", "messages": [{"role": "user", "content": "trace me"}]}


def _traceparent(recorder: RecordingEngine) -> tuple[int, int]:
    """(trace id, parent span id) from the traceparent the engine received."""
    version, trace_id, span_id, flags = recorder.last.headers["traceparent"].split("-")
    assert version == "00" and int(flags, 16) & 1  # sampled
    return int(trace_id, 16), int(span_id, 16)


async def _trace(spans: InMemorySpanExporter, trace_id: int, count: int) -> list[ReadableSpan]:
    """The finished spans of one trace; the edge ends its span just after the reply is sent."""
    for _ in range(200):
        found = [
            s
            for s in spans.get_finished_spans()
            if s.context is not None and s.context.trace_id == trace_id
        ]
        if len(found) >= count:
            return found
        await asyncio.sleep(0.01)
    raise AssertionError(f"expected {count} spans in the trace, got {[s.name for s in found]}")


def _one(
    found: list[ReadableSpan], name: str, kind: SpanKind, parent: int | None = -1
) -> ReadableSpan:
    """The one span with this name and kind (and parent span id, unless -1)."""
    matching = [
        s
        for s in found
        if s.name == name
        and s.kind == kind
        and (parent == -1 or (s.parent.span_id if s.parent else None) == parent)
    ]
    assert len(matching) == 1, [(s.name, s.kind, s.parent) for s in found]
    return matching[0]


@pytest.mark.parametrize("stream", [False, True])
async def test_one_trace_spans_edge_scheduler_and_engine(
    edge: httpx.AsyncClient, recorder: RecordingEngine, spans: InMemorySpanExporter, stream: bool
) -> None:
    resp = await edge.post("/v1/chat/completions", json={**CHAT, "stream": stream})
    assert resp.status_code == 200, resp.text
    trace_id, engine_parent = _traceparent(recorder)
    # the recording engine is an App too: its own server span continues the trace
    found = await _trace(spans, trace_id, 4)
    edge_span = _one(found, "POST /v1/chat/completions", SpanKind.SERVER, parent=None)
    rpc = "ChatStream" if stream else "Chat"
    scheduler_span = _one(found, f"/sage.rpc.scheduler.v1.SchedulerService/{rpc}", SpanKind.SERVER)
    engine_span = _one(found, "POST /v1/chat/completions", SpanKind.CLIENT)
    assert {s.context.trace_id for s in found if s.context} == {trace_id}
    # edge → scheduler → engine call, each the parent of the next
    assert edge_span.context is not None and scheduler_span.context is not None
    assert scheduler_span.parent is not None
    assert scheduler_span.parent.span_id == edge_span.context.span_id
    assert engine_span.parent is not None
    assert engine_span.parent.span_id == scheduler_span.context.span_id
    # the engine got the client span as its parent
    assert engine_span.context is not None and engine_parent == engine_span.context.span_id
    _one(found, "POST /v1/chat/completions", SpanKind.SERVER, parent=engine_parent)
    assert engine_span.attributes is not None
    assert engine_span.attributes["sage.engine_id"] == "rec-a"
    assert engine_span.attributes["url.full"] == recorder.base_url + "/v1/chat/completions"
    if not stream:
        assert engine_span.attributes["http.response.status_code"] == 200


async def test_an_incoming_traceparent_is_continued(
    edge: httpx.AsyncClient, recorder: RecordingEngine, spans: InMemorySpanExporter
) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    resp = await edge.post(
        "/v1/chat/completions",
        json=CHAT,
        headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
    )
    assert resp.status_code == 200
    assert _traceparent(recorder)[0] == int(trace_id, 16)
    found = await _trace(spans, int(trace_id, 16), 4)
    _one(found, "POST /v1/chat/completions", SpanKind.SERVER, parent=0x00F067AA0BA902B7)


async def test_a_failed_engine_call_is_an_error_span(
    control_plane: Any, edge: httpx.AsyncClient, spans: InMemorySpanExporter
) -> None:
    await control_plane.register("dead-a", "dead", "http://127.0.0.1:1")
    resp = await edge.post("/v1/chat/completions", json={**CHAT, "model": "dead"})
    assert resp.status_code == 502
    for _ in range(200):
        failed = [
            s
            for s in spans.get_finished_spans()
            if s.kind == SpanKind.CLIENT and (s.attributes or {}).get("sage.engine_id") == "dead-a"
        ]
        if failed:
            break
        await asyncio.sleep(0.01)
    assert failed and not failed[0].status.is_ok
    assert failed[0].events and failed[0].events[0].name == "exception"


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The service logging setup (JSON lines), writing into a buffer for the test."""
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    configure_logging("test", "INFO", "json")
    handler = next(h for h in root.handlers if getattr(h, "_sage", False))
    assert isinstance(handler, logging.StreamHandler)
    buffer = io.StringIO()
    handler.setStream(buffer)
    try:
        yield buffer
    finally:
        root.removeHandler(handler)
        root.handlers[:] = before[0]
        root.setLevel(before[1])


async def test_log_lines_during_a_request_carry_request_and_trace_ids(
    control_plane: Any,
    edge: httpx.AsyncClient,
    recorder: RecordingEngine,
    spans: InMemorySpanExporter,
    json_log: io.StringIO,
) -> None:
    # A dead engine beside the live one: the scheduler logs a warning when it fails over.
    await control_plane.register("dead-b", "rec", "http://127.0.0.1:1")
    request_ids = [f"log-test-{i}" for i in range(2)]
    trace_ids = {}
    for rid in request_ids:  # round robin: one of the two requests meets the dead engine
        resp = await edge.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": rid})
        assert resp.status_code == 200
        trace_ids[rid] = f"{_traceparent(recorder)[0]:032x}"
    lines = [orjson.loads(line) for line in json_log.getvalue().splitlines() if line]
    failovers = [line for line in lines if line["msg"] == "engine unreachable, failing over"]
    assert len(failovers) == 1, lines
    line = failovers[0]
    assert line["service"] == "test" and line["engine_id"] == "dead-b"
    assert line["request_id"] in request_ids
    assert line["trace_id"] == trace_ids[line["request_id"]]
