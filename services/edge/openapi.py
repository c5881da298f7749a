"""The edge's OpenAPI 3.1 document.

The OpenAI API's schemas are generated from the models the edge validates with
(`sage.protocol.openai`), so they cannot drift from what the routes accept; fields the edge
passes through to the engine are open (`additionalProperties`). The management API's
schemas are generated the same way from `sage.protocol.management`, which `management.py`
decodes bodies into and builds replies from; only paths and parameters are written here.
"""

from __future__ import annotations

from typing import Any

from sage.protocol.anthropic import json_schemas as anthropic_schemas
from sage.protocol.management import json_schemas as management_schemas
from sage.protocol.openai import INT32_MAX, NOT_BLANK, json_schemas

JSON = "application/json"
SSE = "text/event-stream"
# Request examples, for readers of the document and for its fuzzers' first cases.
_EXAMPLES = {
    "ChatCompletionRequest": {
        "model": "sim",
        "messages": [{"role": "user", "content": "Say hello"}],
        "max_tokens": 8,
    },
    "CompletionRequest": {"model": "sim", "prompt": "Once upon a time", "max_tokens": 8},
    "ResponsesRequest": {"model": "sim", "input": "Say hello", "max_output_tokens": 8},
    "EmbeddingRequest": {"model": "sim-embedding", "input": ["hello", "world"]},
    "TokenizeRequest": {"model": "sim", "prompt": "Once upon a time"},
    "DetokenizeRequest": {"model": "sim", "tokens": [1, 2, 3]},
    "RerankRequest": {
        "model": "sim-embedding",
        "query": "what is a panda?",
        "documents": ["hi", "The giant panda is a bear native to China."],
        "top_n": 1,
    },
    "ScoreRequest": {
        "model": "sim-embedding",
        "text_1": "what is a panda?",
        "text_2": ["hi", "The giant panda is a bear native to China."],
    },
}


def _openai_schemas() -> dict[str, Any]:
    schemas = json_schemas()
    for name, example in _EXAMPLES.items():
        schemas[name]["examples"] = [example]
    return schemas


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {JSON: {"schema": schema}}


def _errors(*statuses: int) -> dict[str, Any]:
    names = {
        400: "BadRequest",
        401: "Unauthorized",
        403: "Forbidden",
        404: "NotFound",
        409: "Conflict",
        413: "PayloadTooLarge",
        415: "UnsupportedMediaType",
        421: "MisdirectedRequest",
        429: "RateLimited",
        500: "InternalError",
        502: "BadGateway",
        503: "Unavailable",
        504: "Timeout",
    }
    return {str(s): {"$ref": f"#/components/responses/{names[s]}"} for s in statuses}


_NON_EMPTY = {"type": "string", "minLength": 1, "pattern": NOT_BLANK}
# One server-sent event, as tools read a `text/event-stream` schema without `itemSchema`:
# `data` is a JSON chunk (ChatCompletionChunk, CompletionChunk or an error), last `[DONE]`.
_SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {"type": "string"},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}


def _anthropic_schemas() -> dict[str, Any]:
    schemas = anthropic_schemas()
    schemas["AnthropicMessagesRequest"]["examples"] = [
        {"model": "sim", "max_tokens": 8, "messages": [{"role": "user", "content": "Hello"}]}
    ]
    return schemas


_SCHEMAS: dict[str, Any] = {**_openai_schemas(), **_anthropic_schemas(), **management_schemas()}


def _error_response(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": _json(_ref("Error"))}
    if headers:
        response["headers"] = headers
    return response


_RESPONSES: dict[str, Any] = {
    "BadRequest": _error_response("Malformed request; `error.param` names the field."),
    "Unauthorized": _error_response("Missing or unknown API key (code invalid_api_key)."),
    "Forbidden": _error_response(
        "A cross-site browser request (code cross_site_request), or management with no admin "
        "key configured (code admin_key_not_configured)."
    ),
    "NotFound": _error_response("Unknown model (code model_not_found), engine or route."),
    "Conflict": _error_response("The engine exists already or resources are insufficient."),
    "PayloadTooLarge": _error_response("The body is over SAGE_MAX_BODY_BYTES."),
    "UnsupportedMediaType": _error_response(
        "A POST (or a DELETE with a body) without Content-Type: application/json."
    ),
    "MisdirectedRequest": _error_response(
        "The Host header is not a loopback name, an IP address, the bind host or a name in "
        "SAGE_ALLOWED_HOSTS (code host_not_allowed)."
    ),
    "RateLimited": _error_response(
        "The key's tenant is over its requests or tokens per minute "
        "(code rate_limit_exceeded), or the scheduler is overloaded.",
        {
            "Retry-After": {
                "description": "Seconds to wait before retrying.",
                "schema": {"type": "integer", "minimum": 1},
            }
        },
    ),
    "InternalError": _error_response("A bug; logged with a traceback."),
    "BadGateway": _error_response("The engine failed or could not be reached."),
    "Unavailable": _error_response("A control-plane service is unavailable."),
    "Timeout": _error_response("The request ran past its deadline."),
}

_INFERENCE_ERRORS = (400, 401, 403, 404, 413, 415, 421, 429, 500, 502, 503, 504)
# Any route: a foreign Host header (421) or another site's Origin (403).
_BROWSER_ERRORS = (403, 421)
_API_KEY: list[dict[str, list[str]]] = [{"ApiKey": []}, {}]
_ADMIN: list[dict[str, list[str]]] = [{"AdminKey": []}, {}]
_MGMT_ERRORS = (401, 403, 421, 500, 503)


def _operation(
    summary: str,
    operation_id: str,
    responses: dict[str, Any],
    *,
    tags: list[str],
    security: list[dict[str, list[str]]] | None = None,
    body: str | None = None,
    parameters: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "operationId": operation_id,
        "tags": tags,
        "responses": responses,
    }
    if security is not None:
        op["security"] = security
    if body is not None:
        op["requestBody"] = {"required": True, "content": _json(_ref(body))}
    if parameters:
        op["parameters"] = parameters
    return op


# Optional scheduling hints on generation requests (read by the edge, judged by the scheduler).
_SCHEDULING_HEADERS: list[dict[str, Any]] = [
    {
        "name": "x-sage-priority",
        "in": "header",
        "description": "Priority class: high, normal or low (or 0, 1, 2).",
        "schema": {"type": "string", "enum": ["high", "normal", "low", "0", "1", "2"]},
    },
    {
        "name": "x-sage-slo-ttft-ms",
        "in": "header",
        "description": "Time-to-first-token target in whole milliseconds.",
        "schema": {"type": "integer", "minimum": 0, "maximum": INT32_MAX},
    },
    {
        "name": "x-sage-slo-e2e-ms",
        "in": "header",
        "description": "End-to-end latency target in whole milliseconds.",
        "schema": {"type": "integer", "minimum": 0, "maximum": INT32_MAX},
    },
    {
        "name": "x-session-id",
        "in": "header",
        "description": "Session affinity key: requests with one key prefer one engine.",
        "schema": {"type": "string", "maxLength": 256},
    },
]

_ENGINE_ID = {
    "name": "engine_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"},
}


def _mgmt(
    summary: str,
    operation_id: str,
    status: str,
    schema: str,
    *,
    body: str | None = None,
    parameters: list[dict[str, Any]] | None = None,
    errors: tuple[int, ...] = (),
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    responses = {
        status: {"description": "OK", "content": _json(_ref(schema))},
        **(extra or {}),
        **_errors(*sorted({*_MGMT_ERRORS, *errors})),
    }
    return _operation(
        summary,
        operation_id,
        responses,
        tags=["management"],
        security=_ADMIN,
        body=body,
        parameters=parameters,
    )


# The dashboard's static files: served without a key (its data needs the admin key).
_DASHBOARD_ASSETS = (
    ("/dashboard", "The operators' dashboard (HTML)", "dashboard", "text/html"),
    ("/dashboard/app.js", "The dashboard's script", "dashboardScript", "text/javascript"),
    ("/dashboard/style.css", "The dashboard's stylesheet", "dashboardStyle", "text/css"),
)


def _static_asset(summary: str, operation_id: str, media: str) -> dict[str, Any]:
    return _operation(
        summary,
        operation_id,
        {
            "200": {"description": summary, "content": {media: {"schema": {"type": "string"}}}},
            **_errors(*_BROWSER_ERRORS),
        },
        tags=["operations"],
        security=[{}],
    )


def _generation(summary: str, operation_id: str, reply: str, body: str) -> dict[str, Any]:
    """A chat/completion operation: JSON, or its chunks as SSE with stream=true."""
    return _operation(
        summary,
        operation_id,
        {
            "200": {
                "description": "The completion, or with stream=true its chunks.",
                "content": {JSON: {"schema": _ref(reply)}, SSE: {"schema": _SSE_EVENT}},
            },
            **_errors(*_INFERENCE_ERRORS),
        },
        tags=["inference"],
        security=_API_KEY,
        body=body,
        parameters=_SCHEDULING_HEADERS,
    )


def _responses_operation() -> dict[str, Any]:
    """POST /v1/responses: the engine's response object, or with stream=true its named
    events (response.created ... response.completed; no [DONE])."""
    operation = _generation(
        "Create a response (OpenAI's Responses API; its events as SSE when stream is true)",
        "createResponse",
        "ChatCompletion",
        "ResponsesRequest",
    )
    reply = {
        "type": "object",
        "required": ["id", "object", "output"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "response"},
            "status": {"type": "string"},
            "output": {"type": "array", "items": {"type": "object"}},
            "usage": {"type": ["object", "null"]},
        },
    }
    operation["responses"]["200"] = {
        "description": "The response, or with stream=true its events.",
        "content": {JSON: {"schema": reply}, SSE: {"schema": _SSE_EVENT}},
    }
    operation["responses"]["404"] = _error_response(
        "Unknown model, or its engine does not serve /v1/responses."
    )
    return operation


# Errors of /v1/messages in Anthropic's shape (the route's own); the gateway's checks before
# any route (a foreign Host or Origin, a non-JSON POST) answer in OpenAI's.
_ANTHROPIC_ERRORS = {
    400: "A malformed request; the message names the field (invalid_request_error).",
    401: "Missing or unknown API key (x-api-key or Authorization: Bearer).",
    404: "Unknown model, or its engine does not serve /v1/messages (not_found_error).",
    413: "The body is over SAGE_MAX_BODY_BYTES (request_too_large).",
    429: "The key's tenant is over its rate limits (rate_limit_error).",
    500: "A bug (api_error).",
    502: "The engine failed (api_error).",
    503: "A control-plane service is unavailable (overloaded_error).",
    504: "The request ran past its deadline (api_error).",
    529: "The model's queue is full (overloaded_error).",
}


def _messages_operation() -> dict[str, Any]:
    """POST /v1/messages: Anthropic's Messages API, scheduled as chat."""
    anthropic = {
        str(status): {"description": text, "content": _json(_ref("AnthropicErrorResponse"))}
        for status, text in _ANTHROPIC_ERRORS.items()
    }
    return _operation(
        "Create a message with Anthropic's Messages API (Anthropic's SSE events when stream "
        "is true)",
        "createMessage",
        {
            "200": {
                "description": "The message, or with stream=true Anthropic's events.",
                "content": {
                    JSON: {"schema": _ref("AnthropicMessageResponse")},
                    SSE: {"schema": _SSE_EVENT},
                },
            },
            **anthropic,
            **_errors(403, 415, 421),
        },
        tags=["inference"],
        security=_API_KEY,
        body="AnthropicMessagesRequest",
        parameters=_SCHEDULING_HEADERS,
    )


def _json_operation(
    summary: str, operation_id: str, description: str, reply: str, body: str
) -> dict[str, Any]:
    """A keyed inference operation with a JSON body and a JSON reply (no streaming)."""
    return _operation(
        summary,
        operation_id,
        {
            "200": {"description": description, "content": _json(_ref(reply))},
            **_errors(*_INFERENCE_ERRORS),
        },
        tags=["inference"],
        security=_API_KEY,
        body=body,
    )


def openapi_document(version: str = "0.1.0") -> dict[str, Any]:
    """The whole OpenAPI 3.1 document for the edge."""
    paths: dict[str, Any] = {
        "/v1/chat/completions": {
            "post": _generation(
                "Create a chat completion (streamed as SSE when stream is true)",
                "createChatCompletion",
                "ChatCompletion",
                "ChatCompletionRequest",
            )
        },
        "/v1/completions": {
            "post": _generation(
                "Create a text completion (streamed as SSE when stream is true)",
                "createCompletion",
                "Completion",
                "CompletionRequest",
            )
        },
        "/v1/responses": {"post": _responses_operation()},
        "/v1/messages": {"post": _messages_operation()},
        "/v1/embeddings": {
            "post": _json_operation(
                "Create embeddings (micro-batched by the embedding service)",
                "createEmbedding",
                "One vector per input.",
                "EmbeddingList",
                "EmbeddingRequest",
            )
        },
        "/tokenize": {
            "post": _json_operation(
                "Token ids of a prompt or a chat, by an engine of the model (vLLM's route)",
                "tokenize",
                "Token ids.",
                "TokenizeResponse",
                "TokenizeRequest",
            )
        },
        "/detokenize": {
            "post": _json_operation(
                "Text of token ids, by an engine of the model (vLLM's route)",
                "detokenize",
                "Text.",
                "DetokenizeResponse",
                "DetokenizeRequest",
            )
        },
        # vLLM serves each under two paths; both reach the same handler here.
        **{
            path: {
                "post": _json_operation(
                    "Documents ranked by relevance to a query, by a cross-encoder engine of"
                    " the model (vLLM's route)",
                    operation_id,
                    "Results, most relevant first (top_n of them when given).",
                    "RerankResponse",
                    "RerankRequest",
                )
            }
            for path, operation_id in (("/v1/rerank", "rerank"), ("/rerank", "rerankUnversioned"))
        },
        **{
            path: {
                "post": _json_operation(
                    "Scores of text pairs, by a cross-encoder engine of the model (vLLM's route)",
                    operation_id,
                    "One score a pair.",
                    "ScoreResponse",
                    "ScoreRequest",
                )
            }
            for path, operation_id in (("/score", "score"), ("/v1/score", "scoreVersioned"))
        },
        "/v1/models": {
            "get": _operation(
                "List the models (and aliases) registered engines serve",
                "listModels",
                {
                    "200": {"description": "Models.", "content": _json(_ref("ModelList"))},
                    **_errors(401, *_BROWSER_ERRORS, 500, 503),
                },
                tags=["inference"],
                security=_API_KEY,
            )
        },
        "/health": {
            "get": _operation(
                "Liveness of the edge and its scheduler (never needs a key)",
                "health",
                {
                    "200": {"description": "Serving.", "content": _json(_ref("Health"))},
                    "503": {
                        "description": "The scheduler is unreachable.",
                        "content": _json(_ref("Health")),
                    },
                    **_errors(*_BROWSER_ERRORS),
                },
                tags=["operations"],
                security=[{}],
            )
        },
        "/metrics": {
            "get": _operation(
                "Prometheus metrics of the edge",
                "metrics",
                {
                    "200": {
                        "description": "Prometheus text exposition.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_errors(401, *_BROWSER_ERRORS),
                },
                tags=["operations"],
                security=[{"ApiKey": []}, {"AdminKey": []}, {}],
            )
        },
        "/openapi.json": {
            "get": _operation(
                "This document",
                "openapi",
                {
                    "200": {"description": "OpenAPI 3.1.", "content": _json({"type": "object"})},
                    **_errors(*_BROWSER_ERRORS),
                },
                tags=["operations"],
                security=[{}],
            )
        },
        "/v1/management/engines": {
            "get": _mgmt("List engines", "listEngines", "200", "EngineList"),
            "post": _mgmt(
                "Start an engine (waits until ready unless wait is false)",
                "startEngine",
                "201",
                "Engine",
                body="StartEngineRequest",
                errors=(400, 404, 409, 415, 504),
                extra={
                    "202": {
                        "description": "wait=false: the engine is STARTING.",
                        "content": _json(_ref("Engine")),
                    },
                    "200": {
                        "description": "dry_run=true: where the engine would be placed.",
                        "content": _json(_ref("PlacementPreview")),
                    },
                },
            ),
        },
        "/v1/management/engines/register": {
            "post": _mgmt(
                "Register an already-running engine",
                "registerEngine",
                "201",
                "Engine",
                body="RegisterEngineRequest",
                errors=(400, 404, 409, 415),  # 404: no node of that name
            )
        },
        "/v1/management/engines/prune": {
            "post": _mgmt(
                "Forget stopped and failed engines",
                "pruneEngines",
                "200",
                "PruneResult",
                body="PruneRequest",
                errors=(400, 415),
            )
        },
        "/v1/management/engines/{engine_id}": {
            "get": _mgmt(
                "Get one engine",
                "getEngine",
                "200",
                "Engine",
                parameters=[_ENGINE_ID],
                errors=(400, 404),
            ),
            "delete": _mgmt(
                "Stop an engine",
                "stopEngine",
                "200",
                "Engine",
                parameters=[
                    _ENGINE_ID,
                    {
                        "name": "drain",
                        "in": "query",
                        "required": False,
                        "description": "Let in-flight requests finish first (1/true/yes).",
                        "schema": {"type": "string"},
                    },
                ],
                errors=(400, 404, 415, 504),
            ),
        },
        "/v1/management/engines/{engine_id}/adapters": {
            "get": _mgmt(
                "The LoRA adapters loaded on an engine",
                "listAdapters",
                "200",
                "AdapterList",
                parameters=[_ENGINE_ID],
                errors=(400, 404),
            ),
            "post": _mgmt(
                "Load a LoRA adapter on an engine started with enable_lora; requests naming "
                "it as their model then go to it",
                "loadAdapter",
                "201",
                "Engine",
                body="Adapter",
                parameters=[_ENGINE_ID],
                errors=(400, 404, 409, 415, 502, 504),
            ),
        },
        "/v1/management/engines/{engine_id}/adapters/{name}": {
            "delete": _mgmt(
                "Unload a LoRA adapter from an engine",
                "unloadAdapter",
                "200",
                "Engine",
                parameters=[
                    _ENGINE_ID,
                    {"name": "name", "in": "path", "required": True, "schema": _NON_EMPTY},
                ],
                errors=(400, 404, 415, 502),
            )
        },
        "/v1/management/engines/{engine_id}/logs": {
            "get": _mgmt(
                "Tail an engine's log",
                "tailEngineLogs",
                "200",
                "EngineLogs",
                parameters=[
                    _ENGINE_ID,
                    {
                        "name": "lines",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": 100_000},
                    },
                ],
                errors=(400, 404),
            )
        },
        "/v1/management/backends": {
            "get": _mgmt("List engine backends", "listBackends", "200", "BackendList")
        },
        "/v1/management/gpu": {"get": _mgmt("GPU readings", "getGpus", "200", "GpuStatus")},
        "/v1/management/nodes": {
            "get": _mgmt("Nodes (GPU hosts) and their health", "listNodes", "200", "NodeList")
        },
        "/v1/management/status": {
            "get": _mgmt("Control-plane status", "getStatus", "200", "ManagementStatus")
        },
        "/v1/management/timeseries": {
            "get": _mgmt(
                "The last minutes of queue, latency and throughput (the dashboard's charts)",
                "getTimeSeries",
                "200",
                "TimeSeries",
            )
        },
        "/v1/management/presets": {
            "get": _mgmt(
                "Built-in presets with their start bodies", "listPresets", "200", "PresetList"
            )
        },
        **{
            path: {"get": _static_asset(summary, operation_id, media)}
            for path, summary, operation_id, media in _DASHBOARD_ASSETS
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "SAGE LLM gateway",
            "version": version,
            "description": "OpenAI-compatible inference API plus SAGE's engine management "
            "API. Errors use OpenAI's shape. API keys are required only when the deployment "
            "configures them (SAGE_API_KEYS / SAGE_API_KEYS_FILE); the management routes "
            "always need the admin key (SAGE_ADMIN_API_KEY, or the key file `sage llm serve` "
            "writes to $SAGE_HOME/llm/admin.key), and answer 403 when none is configured.",
        },
        "servers": [{"url": "/"}],
        "tags": [
            {"name": "inference", "description": "OpenAI-compatible routes."},
            {"name": "management", "description": "Engines, backends, GPUs, status."},
            {"name": "operations", "description": "Health, metrics, this document, the dashboard."},
        ],
        "paths": paths,
        "components": {
            "schemas": _SCHEMAS,
            "responses": _RESPONSES,
            "securitySchemes": {
                "ApiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A key from SAGE_API_KEYS or SAGE_API_KEYS_FILE.",
                },
                "AdminKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "SAGE_ADMIN_API_KEY, else $SAGE_HOME/llm/admin.key.",
                },
            },
        },
    }
