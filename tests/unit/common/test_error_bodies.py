"""sage.common.error_bodies against the error bodies real servers send, and the callers that
read them through it (engine replies, the client, remote embedding providers) agreeing."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest

from sage.common.components.sage_embedding.remote import error_from_response
from sage.common.engine_errors import engine_error
from sage.common.error_bodies import ErrorBody, loads_error_body, parse_error_body
from sage.common.exceptions import (
    AuthenticationError,
    InvalidRequestError,
    ModelNotFoundError,
    UpstreamError,
)
from sage.engines.sim.app import vllm_error_body
from sage.llm.result import error_from_payload

# Bodies as the servers send them (vLLM 0.32's ErrorResponse via the sim, which mirrors it).
OPENAI = {
    "error": {
        "message": "The model `gpt-9` does not exist",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
}
VLLM = vllm_error_body("max_tokens must be at least 1, got -5.", 400, "max_tokens")
VLLM_FLAT = {  # vLLM before 0.6: ErrorResponse at the top level
    "object": "error",
    "message": "bad encoding_format",
    "type": "BadRequestError",
    "param": None,
    "code": 400,
}
TEI = {"error": "Input validation error: `inputs` must not be empty", "error_type": "Validation"}
VLLM_UNAUTHORIZED = {"error": "Unauthorized"}
FASTAPI_404 = {"detail": "Not Found"}
FASTAPI_422 = {
    "detail": [
        {
            "type": "literal_error",
            "loc": ["body", "encoding_format"],
            "msg": "Input should be 'float'",
        },
        {"type": "missing", "loc": ["body", "input", 0], "msg": "Field required"},
    ]
}
ZHIPU = {"error": {"code": "1211", "msg": "model not found"}}
AWS = {"Message": "The security token included in the request is invalid."}


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (
            OPENAI,
            ErrorBody(
                "The model `gpt-9` does not exist",
                type="invalid_request_error",
                param="model",
                code="model_not_found",
                openai=True,
            ),
        ),
        (
            VLLM,
            ErrorBody(
                "max_tokens must be at least 1, got -5.",
                type="BadRequestError",
                param="max_tokens",
                code=400,
                openai=True,
            ),
        ),
        (
            VLLM_FLAT,
            ErrorBody("bad encoding_format", type="BadRequestError", code=400, openai=True),
        ),
        (
            TEI,
            ErrorBody(
                "Input validation error: `inputs` must not be empty",
                type="Validation",
                openai=True,
            ),
        ),
        (VLLM_UNAUTHORIZED, ErrorBody("Unauthorized")),
        (FASTAPI_404, ErrorBody("Not Found")),
        (
            FASTAPI_422,
            ErrorBody(
                "body.encoding_format: Input should be 'float'; body.input.0: Field required",
                param="encoding_format",
            ),
        ),
        (ZHIPU, ErrorBody("model not found", code="1211")),
        (AWS, ErrorBody("The security token included in the request is invalid.")),
        ({"error": {"code": 500}}, ErrorBody(None, code=500)),
        ({"error": {"message": "x", "code": True, "param": 3}}, ErrorBody("x", openai=True)),
        ({"message": {"why": "nested"}}, ErrorBody('{"why":"nested"}')),
    ],
)
def test_each_shape_is_read(doc: dict[str, Any], expected: ErrorBody) -> None:
    assert parse_error_body(doc) == expected
    assert loads_error_body(orjson.dumps(doc)) == expected


@pytest.mark.parametrize(
    "content", [b"<html>502 Bad Gateway</html>", b"[1, 2]", b'"error"', b"{}", b'{"data": []}']
)
def test_what_is_no_error_body(content: bytes) -> None:
    assert loads_error_body(content) is None


@pytest.mark.parametrize(
    ("doc", "openai"),
    [
        (OPENAI, True),
        (VLLM, True),
        (VLLM_FLAT, True),
        (TEI, True),
        (VLLM_UNAUTHORIZED, False),
        (FASTAPI_404, False),
    ],
)
def test_an_engines_words_reach_the_caller_only_from_openai_shapes(
    doc: dict[str, Any], openai: bool
) -> None:
    """The engine hop passes OpenAI-shaped words on; any other body is summarised."""
    content = orjson.dumps(doc)
    error = engine_error("e1", 400, content)
    body = loads_error_body(content)
    assert body is not None and body.message is not None
    assert (body.message in error.message) is openai
    if not openai:
        assert f"HTTP 400 (json, {len(content)} bytes)" in error.message


@pytest.mark.parametrize("doc", [OPENAI, VLLM, TEI, VLLM_UNAUTHORIZED, ZHIPU])
def test_the_client_and_the_providers_read_the_same_words(doc: dict[str, Any]) -> None:
    body = parse_error_body(doc)
    assert body is not None and body.message
    client = error_from_payload(401, doc)
    provider = error_from_response(
        "acme", httpx.Response(401, json=doc, request=httpx.Request("POST", "http://x"))
    )
    assert client.message == body.message
    assert provider.message.startswith(f"acme embeddings API answered HTTP 401: {body.message}")
    assert isinstance(provider, AuthenticationError)


def test_the_client_maps_code_status_and_type() -> None:
    assert isinstance(error_from_payload(404, OPENAI, model="gpt-9"), ModelNotFoundError)
    # A stream's error event has no HTTP status: vLLM's int `code` stands for it.
    streamed = error_from_payload(None, VLLM)
    assert isinstance(streamed, InvalidRequestError) and streamed.param == "max_tokens"
    assert isinstance(error_from_payload(None, vllm_error_body("boom", 502)), UpstreamError)
