"""SageError ↔ google.rpc.Status, the standard rich error model of gRPC.

A service's error travels as a `google.rpc.Status` in the `grpc-status-details-bin` trailer,
so a Go, Java or grpcurl caller can read it without knowing Python: an `ErrorInfo` (a stable
reason per error class, see protos/README.md), a `BadRequest` when the error names a
parameter, a `RetryInfo` when the caller should wait before retrying. The Python side
rebuilds the exact SageError from it (client.error_from_status).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from sage.common.exceptions import (
    SageError,
    error_class_by_name,
    error_class_by_reason,
)

# The trailer grpc itself defines for a serialized google.rpc.Status.
DETAILS_KEY = "grpc-status-details-bin"
# ErrorInfo.domain of every SAGE error.
DOMAIN = "sage.llm"
# ErrorInfo.metadata keys: the OpenAI error fields, and the Python class (for exact rebuilds
# of subclasses in Python peers; other callers go by the reason).
META_TYPE = "type"
META_PARAM = "param"
META_CODE = "code"
META_CLASS = "sage_class"


# The reason of a call refused for a missing or wrong internal token: the stack's own
# misconfiguration, not a SageError (a Python caller rebuilds it as an InternalError).
INTERNAL_TOKEN_REJECTED = "INTERNAL_TOKEN_REJECTED"


def status_proto(
    code: grpc.StatusCode, message: str, exc: SageError | None = None, *, reason: str = ""
) -> status_pb2.Status:
    """The google.rpc.Status a call failing with (`code`, `message`) carries; `exc` adds
    its ErrorInfo, BadRequest and RetryInfo, else `reason` a bare ErrorInfo. `message` must
    be the status's details string (grpc_status.rpc_status.from_call checks they agree)."""
    status = status_pb2.Status(code=code.value[0], message=message)
    if exc is None:
        if reason:
            _pack(status, error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN))
        return status
    info = error_details_pb2.ErrorInfo(reason=type(exc).reason, domain=DOMAIN)
    info.metadata[META_TYPE] = exc.openai_type
    info.metadata[META_CLASS] = type(exc).__name__
    if exc.param:
        info.metadata[META_PARAM] = exc.param
    if exc.code:
        info.metadata[META_CODE] = str(exc.code)
    _pack(status, info)
    if exc.param:
        violation = error_details_pb2.BadRequest.FieldViolation(
            # `message`, not exc.message: the status's (capped) text, so that a message
            # echoing a huge input does not push the trailer past grpc's size limit.
            field=exc.param,
            description=message,
            reason=type(exc).reason,
        )
        _pack(status, error_details_pb2.BadRequest(field_violations=[violation]))
    if exc.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(round(max(0.0, exc.retry_after) * 1e9))
        _pack(status, error_details_pb2.RetryInfo(retry_delay=delay))
    return status


def status_details(
    code: grpc.StatusCode, message: str, exc: SageError | None = None, *, reason: str = ""
) -> bytes:
    """status_proto serialized: the value of the grpc-status-details-bin trailer."""
    data: bytes = status_proto(code, message, exc, reason=reason).SerializeToString()
    return data


def _pack(status: status_pb2.Status, detail: object) -> None:
    packed = any_pb2.Any()
    packed.Pack(detail)  # type: ignore[arg-type]
    status.details.append(packed)


@dataclass(frozen=True)
class ErrorDetails:
    """What a Status's details say about a SAGE error."""

    cls: type[SageError]
    param: str | None
    code: str | None
    retry_after: float | None


def parse_details(raw: bytes | str | None) -> ErrorDetails | None:
    """The SAGE error in a grpc-status-details-bin value (bytes, or base64 as on the wire
    and in a Multiplex error's trailers); None when absent, malformed, or not ours."""
    if raw is None:
        return None
    try:
        data = base64.b64decode(raw + "=" * (-len(raw) % 4)) if isinstance(raw, str) else raw
        status = status_pb2.Status.FromString(data)
    except (DecodeError, binascii.Error, ValueError):
        return None
    info: error_details_pb2.ErrorInfo | None = None
    param: str | None = None
    retry_after: float | None = None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            if bad.field_violations:
                param = bad.field_violations[0].field or None
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToNanoseconds() / 1e9
    if info is None or info.domain != DOMAIN:
        return None
    cls = error_class_by_reason(info.reason)
    if cls is None:
        return None
    # A subclass of the reason's class (PayloadTooLargeError for INVALID_REQUEST) is kept.
    exact = error_class_by_name(info.metadata.get(META_CLASS, ""))
    if exact is not None and issubclass(exact, cls):
        cls = exact
    return ErrorDetails(
        cls=cls,
        param=info.metadata.get(META_PARAM) or param,
        code=info.metadata.get(META_CODE),
        retry_after=retry_after,
    )
