"""The shared gRPC runtime against a real server on an ephemeral port.

A small generic-handler service stands in for a SAGE service so the runtime's own
behaviour is visible: request id and trace context crossing the hop, SageError mapping,
INTERNAL for bugs, default deadlines, and health going NOT_SERVING on shutdown.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sage.common.exceptions import (
    DeadlineExceededError,
    InternalError,
    OverloadedError,
    ServiceUnavailableError,
)
from sage.common.grpc import (
    Registration,
    SageServer,
    create_channel,
    create_server,
    from_rpc_error,
    rpc_errors_as_sage,
)
from sage.common.utils.logging import request_id_var

SERVICE = "sage.test.v1.EchoService"


def _identity(data: bytes) -> bytes:
    return data


async def _whoami(request: bytes, context: Any) -> bytes:
    span = trace.get_current_span().get_span_context()
    return f"{request_id_var.get()}|{span.trace_id:032x}".encode()


async def _overloaded(request: bytes, context: Any) -> bytes:
    raise OverloadedError("queue full", retry_after=2.5)


async def _bug(request: bytes, context: Any) -> bytes:
    raise KeyError("oops")


async def _slow(request: bytes, context: Any) -> bytes:
    await asyncio.sleep(5)
    return b""


async def _missing(request: bytes, context: Any) -> bytes:
    raise NotImplementedError("Method not implemented!")  # as a generated base servicer does


async def _echo_until_bad(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    async for request in requests:
        if request == b"bad":
            raise ServiceUnavailableError("going away")
        yield request


async def _count(request: bytes, context: Any) -> AsyncIterator[bytes]:
    for i in range(int(request)):
        yield str(i).encode()
    raise OverloadedError("stopped midway")


def _add(servicer: Any, server: grpc.aio.Server) -> None:
    unary = {
        name: grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=_identity, response_serializer=_identity
        )
        for name, fn in (
            ("WhoAmI", _whoami),
            ("Overloaded", _overloaded),
            ("Bug", _bug),
            ("Slow", _slow),
            ("Missing", _missing),
        )
    }
    unary["EchoUntilBad"] = grpc.stream_stream_rpc_method_handler(
        _echo_until_bad, request_deserializer=_identity, response_serializer=_identity
    )
    unary["Count"] = grpc.unary_stream_rpc_method_handler(
        _count, request_deserializer=_identity, response_serializer=_identity
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, unary),))


@pytest.fixture
async def echo() -> AsyncIterator[tuple[SageServer, grpc.aio.Channel]]:
    server, port = create_server("127.0.0.1:0", [Registration(SERVICE, _add, None)])
    await server.start()
    channel = create_channel(f"127.0.0.1:{port}", default_timeout=0.5)
    yield server, channel
    await channel.close(None)
    await server.stop(0)


def _call(channel: grpc.aio.Channel, name: str) -> Any:
    return channel.unary_unary(
        f"/{SERVICE}/{name}", request_serializer=_identity, response_deserializer=_identity
    )


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


async def test_request_id_and_trace_cross_the_hop(
    echo: tuple[SageServer, grpc.aio.Channel], spans: InMemorySpanExporter
) -> None:
    _, channel = echo
    tracer = trace.get_tracer("test")
    token = request_id_var.set("req-42")
    try:
        with tracer.start_as_current_span("client") as parent:
            reply = await _call(channel, "WhoAmI")(b"")
    finally:
        request_id_var.reset(token)
    rid, trace_id = reply.decode().split("|")
    assert rid == "req-42"
    assert trace_id == f"{parent.get_span_context().trace_id:032x}"
    server_spans = [s for s in spans.get_finished_spans() if s.name.endswith("/WhoAmI")]
    assert server_spans and server_spans[-1].parent is not None


async def test_a_fresh_request_id_when_none_is_sent(
    echo: tuple[SageServer, grpc.aio.Channel],
) -> None:
    reply = await _call(echo[1], "WhoAmI")(b"")
    assert len(reply.decode().split("|")[0]) == 32


async def test_sage_error_keeps_its_class_and_retry_after(
    echo: tuple[SageServer, grpc.aio.Channel],
) -> None:
    with pytest.raises(OverloadedError) as info, rpc_errors_as_sage():
        await _call(echo[1], "Overloaded")(b"")
    assert info.value.message == "queue full"
    assert info.value.retry_after == 2.5
    assert info.value.http_status == 429


async def test_unexpected_error_is_internal_and_server_survives(
    echo: tuple[SageServer, grpc.aio.Channel],
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        await _call(echo[1], "Bug")(b"")
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert isinstance(from_rpc_error(info.value), InternalError)
    assert "KeyError" in (info.value.details() or "")
    assert b"|" in await _call(echo[1], "WhoAmI")(b"")  # still serving


async def test_default_deadline_applies_to_every_call(
    echo: tuple[SageServer, grpc.aio.Channel],
) -> None:
    with pytest.raises(DeadlineExceededError), rpc_errors_as_sage():
        await _call(echo[1], "Slow")(b"")  # channel default is 0.5 s, handler takes 5 s


async def test_stream_error_after_items_reaches_the_client(
    echo: tuple[SageServer, grpc.aio.Channel],
) -> None:
    call = echo[1].unary_stream(
        f"/{SERVICE}/Count", request_serializer=_identity, response_deserializer=_identity
    )(b"3")
    got = []
    with pytest.raises(OverloadedError), rpc_errors_as_sage():
        async for item in call:
            got.append(item)
    assert got == [b"0", b"1", b"2"]


async def test_a_missing_method_is_unimplemented_not_internal(
    echo: tuple[SageServer, grpc.aio.Channel],
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        await _call(echo[1], "Missing")(b"")
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_bidi_stream_error_becomes_its_status(
    echo: tuple[SageServer, grpc.aio.Channel],
) -> None:
    call = echo[1].stream_stream(
        f"/{SERVICE}/EchoUntilBad", request_serializer=_identity, response_deserializer=_identity
    )(iter([b"a", b"b", b"bad"]))
    got = []
    with pytest.raises(ServiceUnavailableError, match="going away"), rpc_errors_as_sage():
        async for item in call:
            got.append(item)
    assert got == [b"a", b"b"]


async def test_health_goes_not_serving_on_stop() -> None:
    server, port = create_server("127.0.0.1:0", [Registration(SERVICE, _add, None)])
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    watch = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=SERVICE), timeout=5
    )
    updates = watch.__aiter__()
    assert (await updates.__anext__()).status == health_pb2.HealthCheckResponse.SERVING
    stopping = asyncio.create_task(server.stop(grace=1))
    # Balancers watching health see NOT_SERVING before the server goes away.
    assert (await updates.__anext__()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    await stopping
    await channel.close(None)


async def test_unreachable_service_is_service_unavailable() -> None:
    channel = create_channel("127.0.0.1:1", default_timeout=1)
    with pytest.raises(ServiceUnavailableError) as info, rpc_errors_as_sage():
        await _call(channel, "WhoAmI")(b"")
    assert "unavailable" in info.value.message
    await channel.close(None)
