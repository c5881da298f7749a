"""Reading OpenAI request bodies at the edge through the protocol models
(`sage.protocol.openai`; management bodies: `sage.protocol.management`); every error names
the field."""

from __future__ import annotations

from typing import TypeVar

import msgspec
import orjson

from sage.common.exceptions import InvalidRequestError
from sage.common.http import Request
from sage.protocol.openai import EmbeddingRequest, ProtocolError, decode

T = TypeVar("T", bound=msgspec.Struct)


def read_request(request: Request, body: bytes, cls: type[T]) -> T:
    """`body` as a `cls`, with the request labelled by its model for metrics even when the
    body is rejected."""
    try:
        parsed = decode(body, cls)
    except InvalidRequestError as exc:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise exc from None
        if isinstance(doc, dict) and isinstance(doc.get("model"), str):
            request.model = doc["model"]
        if cls is EmbeddingRequest and _token_array(exc):
            raise InvalidRequestError(
                f"{exc.message} (token arrays are not supported)", param=exc.param
            ) from None
        raise exc from None
    request.model = getattr(parsed, "model", "")
    return parsed


def _token_array(exc: InvalidRequestError) -> bool:
    """Whether the rejected input item is a list (of token ids, as OpenAI allows)."""
    return (
        isinstance(exc, ProtocolError)
        and exc.problem.param.startswith("input[")
        and isinstance(exc.problem.value, list)
    )
