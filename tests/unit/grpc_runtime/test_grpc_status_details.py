"""Errors on the gRPC wire as a standard google.rpc.Status, against a real server on port 0.

A caller in another language reads the grpc-status-details-bin trailer (here: plain grpcio
with grpc_status.rpc_status.from_call, as any client library does it) and sees a stable
reason, the field violations and the retry delay; the Python client rebuilds the exact
SageError; a peer of the previous release (only the sage-error* trailers) still works.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from sage.common.exceptions import (
    AuthenticationError,
    ConfigurationError,
    ConflictError,
    DeadlineExceededError,
    EngineNotFoundError,
    EngineStartError,
    InsufficientResourcesError,
    InternalError,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    PermissionDeniedError,
    RateLimitError,
    SageError,
    ServiceUnavailableError,
    UpstreamError,
)
from sage.common.grpc import create_channel, create_server, from_rpc_error, rpc_errors_as_sage
from sage.common.grpc.client import error_from_status
from sage.common.grpc.server import Registration
from sage.common.grpc.status import DETAILS_KEY, DOMAIN
from sage.common.http.asgi import PayloadTooLargeError
from sage.services.scheduler.mux import error_reply

SERVICE = "sage.test.v1.FailService"
TOKEN = "status-details-test-token"

# What each raised error must look like on the wire: (error, gRPC code, reason).
ERRORS: list[tuple[SageError, grpc.StatusCode, str]] = [
    (
        InvalidRequestError("temperature must be <= 2", param="temperature"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_REQUEST",
    ),
    (ModelNotFoundError("gpt-9"), grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"),
    (
        EngineNotFoundError("no engine e1", param="engine_id"),
        grpc.StatusCode.NOT_FOUND,
        "ENGINE_NOT_FOUND",
    ),
    (
        RateLimitError("tenant over its limit", retry_after=2.5),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "RATE_LIMITED",
    ),
    (
        OverloadedError("shed", code="slo_unattainable", retry_after=1.0),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "OVERLOADED",
    ),
    (
        InsufficientResourcesError("needs 80 GiB"),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "INSUFFICIENT_RESOURCES",
    ),
    (
        ServiceUnavailableError("no engine ready"),
        grpc.StatusCode.UNAVAILABLE,
        "SERVICE_UNAVAILABLE",
    ),
    (UpstreamError("engine said 500"), grpc.StatusCode.UNAVAILABLE, "UPSTREAM_ERROR"),
    (DeadlineExceededError("too slow"), grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"),
    (ConflictError("already running"), grpc.StatusCode.ALREADY_EXISTS, "CONFLICT"),
    (AuthenticationError("bad key"), grpc.StatusCode.UNAUTHENTICATED, "AUTHENTICATION_FAILED"),
    (PermissionDeniedError("admin only"), grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"),
    (EngineStartError("did not start"), grpc.StatusCode.ABORTED, "ENGINE_START_FAILED"),
    (ConfigurationError("bad flag"), grpc.StatusCode.FAILED_PRECONDITION, "CONFIGURATION_ERROR"),
    (InternalError("bug"), grpc.StatusCode.INTERNAL, "INTERNAL"),
    # A subclass keeps its parent's reason and, for Python peers, its own class.
    (
        PayloadTooLargeError("body too large", param="messages"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_REQUEST",
    ),
]
IDS = [type(exc).__name__ for exc, _, _ in ERRORS]


def _identity(data: bytes) -> bytes:
    return data


async def _fail(request: bytes, context: Any) -> bytes:
    raise ERRORS[int(request)][0]


async def _huge(request: bytes, context: Any) -> bytes:
    raise InvalidRequestError("bad prompt: " + "x" * 200_000, param="prompt")


async def _bug(request: bytes, context: Any) -> bytes:
    raise KeyError("oops")


async def _old_style(request: bytes, context: Any) -> bytes:
    """What a service of the previous release sends: only the sage-error* trailers."""
    await context.abort(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "slow down",
        trailing_metadata=(
            ("sage-error", "RateLimitError"),
            ("sage-error-param", "user"),
            ("sage-error-code", "tenant_limit"),
            ("retry-after", "3"),
        ),
    )
    return b""


def _handlers(*pairs: tuple[str, Any]) -> Any:
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            name: grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=_identity, response_serializer=_identity
            )
            for name, fn in pairs
        },
    )


def _strict(data: bytes) -> bytes:
    if not data.isdigit():
        raise ValueError("not a number")
    return data


async def _echo(request: bytes, context: Any) -> bytes:
    return request


def _add(servicer: Any, server: grpc.aio.Server) -> None:
    strict = grpc.unary_unary_rpc_method_handler(
        _echo, request_deserializer=_strict, response_serializer=_identity
    )
    server.add_generic_rpc_handlers(
        (
            _handlers(("Fail", _fail), ("Bug", _bug), ("Huge", _huge)),
            grpc.method_handlers_generic_handler(SERVICE + "2", {"Strict": strict}),
        )
    )


@pytest.fixture
async def port() -> AsyncIterator[int]:
    server, bound = create_server(
        "127.0.0.1:0", [Registration(SERVICE, _add, None)], internal_token=TOKEN
    )
    await server.start()
    yield bound
    await server.stop(0)


def _foreign_call(port: int, method: str, request: bytes, token: str | None = TOKEN) -> Any:
    """A call made with nothing of SAGE's: plain grpcio, the token as plain metadata."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(
            f"/{SERVICE}/{method}", request_serializer=_identity, response_deserializer=_identity
        )
        try:
            call(request, timeout=5, metadata=(("x-sage-internal-token", token),) if token else ())
        except grpc.RpcError as err:
            return err
    raise AssertionError("the call succeeded")


def _unpack(status: status_pb2.Status) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for detail in status.details:
        for kind in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.RetryInfo,
        ):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                found[kind.__name__] = message
    return found


@pytest.mark.parametrize(("index"), range(len(ERRORS)), ids=IDS)
async def test_a_foreign_caller_reads_the_standard_status(port: int, index: int) -> None:
    exc, code, reason = ERRORS[index]
    err = await asyncio.to_thread(_foreign_call, port, "Fail", str(index).encode())
    assert err.code() == code
    status = rpc_status.from_call(err)  # raises if code or message disagree with the call's
    assert status is not None
    details = _unpack(status)
    info = details["ErrorInfo"]
    assert (info.reason, info.domain) == (reason, DOMAIN)
    assert info.metadata["type"] == exc.openai_type
    assert info.metadata.get("param") == exc.param
    assert info.metadata.get("code") == exc.code
    if exc.param:
        (violation,) = details["BadRequest"].field_violations
        assert (violation.field, violation.description) == (exc.param, exc.message)
    else:
        assert "BadRequest" not in details
    if exc.retry_after is not None:
        delay = details["RetryInfo"].retry_delay
        assert delay.ToNanoseconds() == round(exc.retry_after * 1e9)
    else:
        assert "RetryInfo" not in details


@pytest.mark.parametrize(("index"), range(len(ERRORS)), ids=IDS)
async def test_the_python_client_rebuilds_the_exact_error(port: int, index: int) -> None:
    exc = ERRORS[index][0]
    channel = create_channel(f"127.0.0.1:{port}", internal_token=TOKEN)
    try:
        with pytest.raises(SageError) as info, rpc_errors_as_sage():
            await channel.unary_unary(
                f"/{SERVICE}/Fail", request_serializer=_identity, response_deserializer=_identity
            )(str(index).encode())
    finally:
        await channel.close(None)
    got = info.value
    assert type(got) is type(exc)
    assert (got.message, got.param, got.code, got.retry_after) == (
        exc.message,
        exc.param,
        exc.code,
        exc.retry_after,
    )
    assert got.http_status == exc.http_status


async def test_the_legacy_trailers_are_still_sent_for_older_peers(port: int) -> None:
    err = await asyncio.to_thread(_foreign_call, port, "Fail", b"3")  # RateLimitError
    trailers = dict(err.trailing_metadata())
    assert trailers["sage-error"] == "RateLimitError"
    assert trailers["retry-after"] == "2.5"
    assert DETAILS_KEY in trailers


async def test_a_huge_message_still_fits_the_trailers(port: int) -> None:
    err = await asyncio.to_thread(_foreign_call, port, "Huge", b"")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(err)
    assert status is not None and status.message.startswith("bad prompt: xxx")
    (violation,) = _unpack(status)["BadRequest"].field_violations
    assert violation.field == "prompt" and len(violation.description) < 5000


async def test_an_unexpected_error_is_internal_with_a_reason(port: int) -> None:
    err = await asyncio.to_thread(_foreign_call, port, "Bug", b"")
    status = rpc_status.from_call(err)
    assert status is not None and status.code == grpc.StatusCode.INTERNAL.value[0]
    assert _unpack(status)["ErrorInfo"].reason == "INTERNAL"
    assert isinstance(from_rpc_error(err), InternalError)


async def test_a_malformed_request_message_is_invalid_request(port: int) -> None:
    def call() -> Any:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            method = channel.unary_unary(
                f"/{SERVICE}2/Strict", request_serializer=_identity, response_deserializer=_identity
            )
            with pytest.raises(grpc.RpcError) as info:
                method(b"x", timeout=5, metadata=(("x-sage-internal-token", TOKEN),))
            return info.value

    err = await asyncio.to_thread(call)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(err)
    assert status is not None
    assert _unpack(status)["ErrorInfo"].reason == "INVALID_REQUEST"


async def test_a_wrong_internal_token_says_so_and_stays_internal_for_python(port: int) -> None:
    err = await asyncio.to_thread(_foreign_call, port, "Fail", b"0", "wrong")
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    status = rpc_status.from_call(err)
    assert status is not None
    assert _unpack(status)["ErrorInfo"].reason == "INTERNAL_TOKEN_REJECTED"
    # The stack's own misconfiguration, never the user's API key (which would be a 401).
    assert type(from_rpc_error(err)) is InternalError


async def test_an_old_style_peer_is_still_understood() -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_handlers(("Old", _old_style)),))
    bound = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = create_channel(f"127.0.0.1:{bound}", internal_token=TOKEN)
    try:
        with pytest.raises(RateLimitError) as info, rpc_errors_as_sage():
            await channel.unary_unary(
                f"/{SERVICE}/Old", request_serializer=_identity, response_deserializer=_identity
            )(b"")
    finally:
        await channel.close(None)
        await server.stop(0)
    got = info.value
    assert (got.message, got.param, got.code, got.retry_after) == (
        "slow down",
        "user",
        "tenant_limit",
        3.0,
    )


def test_the_standard_details_win_over_the_legacy_trailers() -> None:
    reply = error_reply(7, ModelNotFoundError("m"))
    trailers: dict[str, str | bytes] = dict(reply.error.trailers)
    trailers["sage-error"] = "ConflictError"  # a stale or foreign legacy trailer
    got = error_from_status(grpc.StatusCode.NOT_FOUND, reply.error.message, trailers)
    assert type(got) is ModelNotFoundError


@pytest.mark.parametrize(("index"), range(len(ERRORS)), ids=IDS)
def test_a_multiplex_error_carries_the_same_status(index: int) -> None:
    exc, code, reason = ERRORS[index]
    error = error_reply(1, exc).error
    status = status_pb2.Status.FromString(base64.b64decode(error.trailers[DETAILS_KEY]))
    assert (status.code, status.message) == (code.value[0], error.message)
    assert _unpack(status)["ErrorInfo"].reason == reason
    # What the edge does with it (services/edge/mux.py).
    got = error_from_status(code, error.message, dict(error.trailers))
    assert type(got) is type(exc)
    assert (got.param, got.code, got.retry_after) == (exc.param, exc.code, exc.retry_after)


@pytest.mark.parametrize(("index"), range(len(ERRORS) - 1), ids=IDS[:-1])
def test_a_status_from_another_language_is_rebuilt_by_its_reason(index: int) -> None:
    """A server in another language sends the documented reason, no Python class name."""
    exc, code, reason = ERRORS[index]
    status = status_pb2.Status(code=code.value[0], message="from Go")
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN)
    info.metadata["param"] = "p"
    status.details.add().Pack(info)
    delay = error_details_pb2.RetryInfo()
    delay.retry_delay.FromNanoseconds(1_500_000_000)
    status.details.add().Pack(delay)
    got = error_from_status(code, "from Go", {DETAILS_KEY: status.SerializeToString()})
    assert type(got) is type(exc)
    assert (got.message, got.param, got.retry_after) == ("from Go", "p", 1.5)
