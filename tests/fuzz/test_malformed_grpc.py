"""Malformed gRPC to every method of every service, through a generic channel with
identity serializers: garbage bytes, truncated protobufs and another message type.

Each call must end with a clean status (INVALID_ARGUMENT preferred; INTERNAL only with a
short message, never a traceback or UNKNOWN), and every service must still answer its
health check afterwards.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor, ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sage.common.grpc import create_channel
from sage.rpc.embedding.v1 import embedding_pb2
from sage.rpc.gpu_manager.v1 import gpu_manager_pb2
from sage.rpc.lifecycle.v1 import lifecycle_pb2
from sage.rpc.scheduler.v1 import scheduler_pb2

from .conftest import PROPERTY_EXAMPLES

SERVICES: dict[str, ServiceDescriptor] = {
    "scheduler": scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"],
    "lifecycle": lifecycle_pb2.DESCRIPTOR.services_by_name["LifecycleService"],
    "gpu_manager": gpu_manager_pb2.DESCRIPTOR.services_by_name["GpuManagerService"],
    "embedding_service": embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"],
}
# Outcomes of a well-formed but wrong request: the handler judged it.
HANDLED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNIMPLEMENTED,
}
UNPARSEABLE = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL}


def _truncated(message_type: Any) -> bytes:
    """The input message with a long string/bytes field, cut inside that field."""
    message = message_type._concrete_class()
    for field in message_type.fields:
        if field.is_repeated:
            continue
        if field.type == FieldDescriptor.TYPE_STRING:
            setattr(message, field.name, "x" * 100)
            break
        if field.type == FieldDescriptor.TYPE_BYTES:
            setattr(message, field.name, b"x" * 100)
            break
    else:  # no scalar string field: a length-delimited field 1 that claims 100 bytes
        return b"\x0a\x64" + b"x" * 10
    return bytes(message.SerializeToString())[:50]


PAYLOADS = {
    "garbage": b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
    "bad_wire_type": b"\x0f\x00\x00",  # wire type 7 does not exist
    "length_past_end": b"\x0a\xff\xff\xff\x0f",
}
WRONG_TYPE = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


async def _call(channel: grpc.aio.Channel, path: str, streaming: bool, payload: bytes) -> Any:
    """Send raw bytes; return the final status code and details."""
    if streaming:
        stream = channel.unary_stream(path, None, None)(payload, timeout=10)
        try:
            async for _ in stream:
                pass
        except grpc.aio.AioRpcError as err:
            return err.code(), err.details() or ""
        return grpc.StatusCode.OK, ""
    try:
        await channel.unary_unary(path, None, None)(payload, timeout=10)
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def _clean(details: str) -> bool:
    return "Traceback" not in details and 'File "' not in details and len(details) < 600


async def _all_healthy(plane: Any) -> None:
    for service in SERVICES:
        channel = create_channel(plane.settings.address(service))
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        finally:
            await channel.close(None)


@pytest.mark.parametrize("service", list(SERVICES))
async def test_malformed_messages_get_clean_errors(service: str, full_plane: Any) -> None:
    """Every method, every malformed payload: INVALID_ARGUMENT or a clean INTERNAL."""
    descriptor = SERVICES[service]
    channel = create_channel(full_plane.settings.address(service))
    outcomes: dict[str, Any] = {}
    try:
        for method in descriptor.methods:
            path = f"/{descriptor.full_name}/{method.name}"
            payloads = {**PAYLOADS, "truncated": _truncated(method.input_type)}
            for name, payload in payloads.items():
                code, details = await _call(channel, path, method.server_streaming, payload)
                outcomes[f"{method.name}/{name}"] = (code, details)
                assert code in UNPARSEABLE, (method.name, name, code, details)
                assert _clean(details), (method.name, name, details)
            code, details = await _call(
                channel, path, method.server_streaming, WRONG_TYPE.SerializeToString()
            )
            assert code in HANDLED, (method.name, "wrong_type", code, details)
            assert _clean(details), (method.name, "wrong_type", details)
    finally:
        await channel.close(None)
    assert len(outcomes) == 4 * len(descriptor.methods)
    await _all_healthy(full_plane)


@settings(
    max_examples=max(20, PROPERTY_EXAMPLES // 5),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(payload=st.binary(max_size=64))
async def test_random_bytes_to_read_only_methods(payload: bytes, full_plane: Any) -> None:
    """Random bytes to the read-only methods of each service: a parse error, or the
    handler's own answer; never UNKNOWN or a traceback."""
    for service, method in (
        ("scheduler", "GetStatus"),
        ("scheduler", "ListModels"),
        ("lifecycle", "GetEngine"),
        ("lifecycle", "TailLogs"),
        ("gpu_manager", "ListGpus"),
    ):
        descriptor = SERVICES[service]
        channel = create_channel(full_plane.settings.address(service))
        try:
            code, details = await _call(
                channel, f"/{descriptor.full_name}/{method}", False, payload
            )
        finally:
            await channel.close(None)
        assert code in HANDLED | UNPARSEABLE, (service, method, code, details)
        assert _clean(details)
