"""The one exception hierarchy of the control plane.

Each class maps once to a gRPC status code and once to an HTTP status plus the nested
OpenAI error JSON (`{"error": {"message", "type", "param", "code"}}`), so an error raised
deep in a service reaches the user unchanged in meaning, whichever way they came in.
"""

from __future__ import annotations

from typing import Any, ClassVar

import grpc

__all__ = [
    "AuthenticationError",
    "ConfigurationError",
    "ConflictError",
    "DeadlineExceededError",
    "EngineNotFoundError",
    "EngineStartError",
    "InsufficientResourcesError",
    "InternalError",
    "InvalidRequestError",
    "ModelNotFoundError",
    "NotFoundError",
    "OverloadedError",
    "PermissionDeniedError",
    "RateLimitError",
    "SageError",
    "ServiceUnavailableError",
    "UpstreamError",
    "ValidationError",
    "error_class_by_name",
    "error_class_by_reason",
    "openai_error_body",
]


class SageError(Exception):
    """Base of every error the control plane raises on purpose."""

    # google.rpc.ErrorInfo.reason on gRPC: stable, UPPER_SNAKE, documented in protos/README.md.
    reason: ClassVar[str] = "INTERNAL"
    grpc_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    http_status: ClassVar[int] = 500
    openai_type: ClassVar[str] = "internal_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.retry_after = retry_after

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI error JSON for this error."""
        return openai_error_body(self.message, self.openai_type, self.param, self.code)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, param={self.param!r})"


class InvalidRequestError(SageError):
    """The request is malformed or names a bad value; `param` names the field."""

    reason = "INVALID_REQUEST"
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400
    openai_type = "invalid_request_error"


# SAGE's name for the same thing.
ValidationError = InvalidRequestError


class AuthenticationError(SageError):
    """Missing or wrong API key."""

    reason = "AUTHENTICATION_FAILED"
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401
    openai_type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(SageError):
    """The key is valid but may not do this (e.g. management routes without the admin key)."""

    reason = "PERMISSION_DENIED"
    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403
    openai_type = "permission_error"


class NotFoundError(SageError):
    """A named thing does not exist."""

    reason = "NOT_FOUND"
    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404
    openai_type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFoundError(NotFoundError):
    """No registered engine serves the requested model."""

    reason = "MODEL_NOT_FOUND"
    default_code = "model_not_found"

    def __init__(self, model: str, *, message: str | None = None) -> None:
        super().__init__(message or f"The model `{model}` does not exist.", param="model")
        self.model = model


class EngineNotFoundError(NotFoundError):
    """No engine with this id."""

    reason = "ENGINE_NOT_FOUND"
    default_code = "engine_not_found"


class ConflictError(SageError):
    """The thing already exists or is in a state that forbids the request."""

    reason = "CONFLICT"
    grpc_code = grpc.StatusCode.ALREADY_EXISTS
    http_status = 409
    openai_type = "invalid_request_error"
    default_code = "conflict"


class OverloadedError(SageError):
    """Admission refused: queues are full. Clients should retry after `retry_after` seconds."""

    reason = "OVERLOADED"
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429
    openai_type = "rate_limit_error"
    default_code = "overloaded"


class RateLimitError(OverloadedError):
    """A per-key or per-tenant rate limit was hit."""

    reason = "RATE_LIMITED"
    default_code = "rate_limit_exceeded"


class InsufficientResourcesError(SageError):
    """Not enough free GPU memory (or GPUs) to place an engine.

    RESOURCE_EXHAUSTED on gRPC (the ask exceeds what the host has), but HTTP 409 rather
    than 429: retrying the same request will not help until something is released.
    """

    reason = "INSUFFICIENT_RESOURCES"
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 409
    openai_type = "invalid_request_error"
    default_code = "insufficient_gpu_resources"


class ServiceUnavailableError(SageError):
    """A dependency (engine, service) cannot serve now; retrying later may work."""

    reason = "SERVICE_UNAVAILABLE"
    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503
    openai_type = "service_unavailable"
    default_code = "service_unavailable"


class UpstreamError(SageError):
    """An engine answered with a server error or broke the protocol."""

    reason = "UPSTREAM_ERROR"
    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 502
    openai_type = "upstream_error"
    default_code = "bad_gateway"


class DeadlineExceededError(SageError):
    """The request ran past its deadline."""

    reason = "DEADLINE_EXCEEDED"
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504
    openai_type = "timeout"
    default_code = "timeout"


class EngineStartError(SageError):
    """An engine process could not be started or did not become ready."""

    reason = "ENGINE_START_FAILED"
    grpc_code = grpc.StatusCode.ABORTED
    http_status = 500
    openai_type = "internal_error"
    default_code = "engine_start_failed"


class ConfigurationError(SageError):
    """Configuration (flags, env, files) is invalid; the message says which setting."""

    reason = "CONFIGURATION_ERROR"
    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 500
    openai_type = "internal_error"
    default_code = "configuration_error"


class InternalError(SageError):
    """A bug or unexpected failure; logged with a traceback where it happened."""

    reason = "INTERNAL"


_BY_NAME: dict[str, type[SageError]] = {}


def _collect(cls: type[SageError]) -> None:
    _BY_NAME[cls.__name__] = cls
    for sub in cls.__subclasses__():
        _collect(sub)


_collect(SageError)


def error_class_by_name(name: str) -> type[SageError] | None:
    """The exception class with this name, for rebuilding errors sent across gRPC."""
    if name not in _BY_NAME:
        _collect(SageError)  # pick up subclasses defined after import
    return _BY_NAME.get(name)


def error_class_by_reason(reason: str) -> type[SageError] | None:
    """The class that declares this ErrorInfo reason (its subclasses inherit it); INTERNAL
    is InternalError's, the base class only lends it to subclasses that declare none."""
    _collect(SageError)  # cheap; picks up subclasses defined after import
    for cls in _BY_NAME.values():
        if cls is not SageError and cls.__dict__.get("reason") == reason:
            return cls
    return None


def openai_error_body(
    message: str, type_: str, param: str | None = None, code: str | int | None = None
) -> dict[str, Any]:
    """The nested OpenAI error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
