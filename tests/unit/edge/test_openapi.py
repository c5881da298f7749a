"""The OpenAPI document: valid OpenAPI 3.1, every route in it, and request schemas (generated
from the protocol models) that accept exactly what the edge's validation accepts."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from sage.common.config.settings import SageSettings
from sage.common.exceptions import InvalidRequestError
from sage.protocol.management import (
    Adapter,
    ModelPoint,
    RegisterEngineRequest,
    Sample,
    StartEngineRequest,
)
from sage.protocol.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    convert,
    decode,
)
from sage.services.edge.app import create_app
from sage.services.edge.dashboard_routes import preset_list
from sage.services.edge.management import start_request
from sage.services.edge.openapi import openapi_document
from sage.services.edge.timeseries import TimeSeries as Series

DOC = openapi_document()
METHODS = {"get", "post", "put", "delete", "patch", "options", "head"}


def test_is_valid_openapi_3_1() -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    assert DOC["openapi"] == "3.1.0"
    validator.validate(DOC)


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_every_ref_resolves() -> None:
    for ref in _refs(DOC):
        node: Any = DOC
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        assert isinstance(node, dict), ref


def test_documents_every_route_and_nothing_else() -> None:
    app = create_app(SageSettings())
    documented = {
        (method.upper(), path)
        for path, item in DOC["paths"].items()
        for method in item
        if method in METHODS
    }
    for method, path in documented:
        concrete = re.sub(r"\{[^}]+\}", "engine-1", path)
        matched = app.match(concrete)
        assert matched is not None and method in matched[1], (method, path)
    for method, route in app.routes():
        if route.endswith("*"):
            assert any(
                m == method and p.startswith(route[:-1]) and "{" in p for m, p in documented
            ), (method, route)
        else:
            assert (method, route) in documented, (method, route)


def test_operations_document_their_errors() -> None:
    for path, item in DOC["paths"].items():
        for method, op in item.items():
            assert op["operationId"] and op["responses"], (method, path)
            if path.startswith("/v1/"):
                assert "401" in op["responses"], (method, path)
            if "requestBody" in op or "parameters" in op:
                assert "400" in op["responses"], (method, path)
    for name in ("createChatCompletion", "createCompletion", "createEmbedding"):
        op = next(
            op
            for item in DOC["paths"].values()
            for op in item.values()
            if op["operationId"] == name
        )
        assert {"413", "429"} <= set(op["responses"])
        assert op["security"] == [{"ApiKey": []}, {}]


def _validator(name: str) -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"components": DOC["components"], "$ref": f"#/components/schemas/{name}"}
    return jsonschema.Draft202012Validator(schema)


def _protocol(cls: type[Any]) -> Callable[[dict[str, Any]], Any]:
    """The edge's check of an OpenAI body: the protocol model, decoding the JSON bytes."""
    return lambda body: decode(json.dumps(body).encode(), cls)


def _accepted(check: Callable[[dict[str, Any]], Any], body: dict[str, Any]) -> bool:
    try:
        check(body)
    except InvalidRequestError:
        return False
    return True


MSG = [{"role": "user", "content": "hi"}]
CHAT_BODIES: list[dict[str, Any]] = [
    {"model": "m", "messages": MSG},
    {"model": "m", "messages": MSG, "max_tokens": 5, "temperature": 0, "top_p": 1, "n": 2},
    {"model": "m", "messages": MSG, "stop": ["a", "b"], "stream": True, "seed": 3},
    {"model": "m", "messages": MSG, "stream": None, "stop": None, "max_tokens": None},
    {"model": "m", "messages": [{"role": "assistant", "content": None}, *MSG]},
    {"model": "m", "messages": [{"role": "assistant"}]},
    {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]},
    {"model": "m", "messages": MSG, "tools": [], "response_format": {"type": "json_object"}},
    {"model": "m", "messages": MSG, "stream_options": {"include_usage": True}},
    {"model": "m", "messages": MSG, "frequency_penalty": -2, "presence_penalty": 2},
    {"model": "", "messages": MSG},
    {"model": "  ", "messages": MSG},
    {"model": 1, "messages": MSG},
    {"messages": MSG},
    {"model": "m"},
    {"model": "m", "messages": []},
    {"model": "m", "messages": "hi"},
    {"model": "m", "messages": [{"content": "x"}]},
    {"model": "m", "messages": [{"role": "robot", "content": "x"}]},
    {"model": "m", "messages": [{"role": "user"}]},
    {"model": "m", "messages": [{"role": "user", "content": None}]},
    {"model": "m", "messages": [{"role": "user", "content": 5}]},
    {"model": "m", "messages": ["x"]},
    {"model": "m", "messages": MSG, "max_tokens": 0},
    {"model": "m", "messages": MSG, "max_tokens": -1},
    {"model": "m", "messages": MSG, "max_tokens": 2**31},
    {"model": "m", "messages": MSG, "max_tokens": True},
    {"model": "m", "messages": MSG, "max_completion_tokens": "5"},
    {"model": "m", "messages": MSG, "n": 0},
    {"model": "m", "messages": MSG, "temperature": 2.5},
    {"model": "m", "messages": MSG, "temperature": "hot"},
    {"model": "m", "messages": MSG, "temperature": False},
    {"model": "m", "messages": MSG, "top_p": 1.5},
    {"model": "m", "messages": MSG, "presence_penalty": -3},
    {"model": "m", "messages": MSG, "stop": 5},
    {"model": "m", "messages": MSG, "stop": ["a", 1]},
    {"model": "m", "messages": MSG, "stream": "yes"},
    {"model": "m", "messages": MSG, "stream_options": "x"},
]


@pytest.mark.parametrize("body", CHAT_BODIES, ids=lambda b: str(b)[:60])
def test_chat_schema_agrees_with_validation(body: dict[str, Any]) -> None:
    assert _validator("ChatCompletionRequest").is_valid(body) == _accepted(
        _protocol(ChatCompletionRequest), body
    )


COMPLETION_BODIES: list[dict[str, Any]] = [
    {"model": "m", "prompt": "x"},
    {"model": "m", "prompt": ["a", "b"], "max_tokens": 3},
    {"model": "m", "prompt": [1, 2, 3]},
    {"model": "m"},
    {"model": "m", "prompt": 5},
    {"model": "m", "prompt": None},
    {"model": "m", "prompt": "x", "top_p": -0.1},
]


@pytest.mark.parametrize("body", COMPLETION_BODIES, ids=lambda b: str(b)[:60])
def test_completion_schema_agrees_with_validation(body: dict[str, Any]) -> None:
    accepted = _accepted(_protocol(CompletionRequest), body)
    assert _validator("CompletionRequest").is_valid(body) == accepted


EMBEDDING_BODIES: list[dict[str, Any]] = [
    {"model": "e", "input": "x"},
    {"model": "e", "input": ["a", "b"], "dimensions": 8, "encoding_format": "base64"},
    {"model": "e", "input": "x", "dimensions": None, "encoding_format": None},
    {"model": "e", "input": "x", "dimensions": 0},
    {"model": "e", "input": " "},
    {"model": "e", "input": ""},
    {"model": "e", "input": []},
    {"model": "e", "input": [""]},
    {"model": "e", "input": [1, 2]},
    {"model": "e", "input": ["x"] * 2049},
    {"model": "e"},
    {"model": " ", "input": "x"},
    {"input": "x"},
    {"model": "e", "input": "x", "dimensions": -1},
    {"model": "e", "input": "x", "dimensions": False},
    {"model": "e", "input": "x", "dimensions": ""},
    {"model": "e", "input": "x", "dimensions": 2**31},
    {"model": "e", "input": "x", "encoding_format": "int8"},
    {"model": "e", "input": "x", "encoding_format": ""},
]


@pytest.mark.parametrize("body", EMBEDDING_BODIES, ids=lambda b: str(b)[:60])
def test_embedding_schema_agrees_with_validation(body: dict[str, Any]) -> None:
    accepted = _accepted(_protocol(EmbeddingRequest), body)
    assert _validator("EmbeddingRequest").is_valid(body) == accepted


START_BODIES: list[dict[str, Any]] = [
    {"model_id": "m"},
    {"model": "m", "kind": "embedding", "backend": "sim", "port": 0, "wait": False},
    {"model_id": "m", "tensor_parallel_size": 2, "metadata": {"a": 1, "b": "x", "c": True}},
    {"model_id": "m", "backend": None, "engine_label": None, "extra_args": None},
    {"model_id": "m", "use_gpu": None, "required_memory_gb": 1.5, "aliases": ["x"]},
    {},
    {"model_id": ""},
    {"model_id": "m", "colour": "red"},
    {"model_id": "m", "engine_kind": "vision"},
    {"model_id": "m", "engine_kind": None},
    {"model_id": "m", "backend": False},
    {"model_id": "m", "backend": 5},
    {"model_id": "m", "tensor_parallel_size": 0},
    {"model_id": "m", "port": -1},
    {"model_id": "m", "port": 2**31},
    {"model_id": "m", "required_memory_gb": -1},
    {"model_id": "m", "extra_args": "x"},
    {"model_id": "m", "extra_args": [1]},
    {"model_id": "m", "metadata": {"a": [1]}},
    {"model_id": "m", "metadata": []},
    {"model_id": "m", "use_gpu": "yes"},
    {"model_id": "m", "wait": None},
    {"model_id": "m", "startup_timeout_s": 0},
]


@pytest.mark.parametrize("body", START_BODIES, ids=lambda b: str(b)[:60])
def test_start_engine_schema_agrees_with_validation(body: dict[str, Any]) -> None:
    """The edge decodes the body and builds lifecycle's request from it; both must pass."""
    decoded = _protocol(StartEngineRequest)
    accepted = _accepted(lambda b: start_request(decoded(b)), body)
    assert _validator("StartEngineRequest").is_valid(body) == accepted


REGISTER_BODIES: list[dict[str, Any]] = [
    {"model_id": "m", "base_url": "http://127.0.0.1:8000"},
    {"model": "m", "base_url": "https://x", "join_existing_model": True, "node": "n1"},
    {"model_id": "m"},
    {"base_url": "http://x"},
    {"model_id": "m", "base_url": "ftp://x"},
    {"model_id": "m", "base_url": None},
    {"model_id": "m", "base_url": "http://x", "join_existing_model": "yes"},
    {"model_id": "m", "base_url": "http://x", "colour": "red"},
]


@pytest.mark.parametrize("body", REGISTER_BODIES, ids=lambda b: str(b)[:60])
def test_register_schema_agrees_with_validation(body: dict[str, Any]) -> None:
    decoded = _protocol(RegisterEngineRequest)
    accepted = _accepted(lambda b: start_request(decoded(b)), body)
    assert _validator("RegisterEngineRequest").is_valid(body) == accepted


ADAPTER_BODIES: list[dict[str, Any]] = [
    {"name": "a", "path": "/p"},
    {"name": "a"},
    {"name": " ", "path": "/p"},
    {"name": "a", "path": 5},
    {"name": "a", "path": "/p", "rank": 8},
]


@pytest.mark.parametrize("body", ADAPTER_BODIES, ids=lambda b: str(b)[:60])
def test_adapter_schema_agrees_with_validation(body: dict[str, Any]) -> None:
    assert _validator("Adapter").is_valid(body) == _accepted(_protocol(Adapter), body)


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"model_id": "m", "colour": "red"}, "colour", "unknown field colour"),
        ({"backend": "sim"}, "model_id", "model_id is required"),
        ({"model_id": "m", "kind": "chat"}, "kind", "kind must be one of 'embedding', 'llm'"),
        ({"model_id": "m", "port": -1}, "port", "port must be a non-negative integer"),
        ({"model_id": "m", "metadata": {"a": [1]}}, "metadata", "metadata must be an object"),
    ],
)
def test_start_errors_name_the_field(body: dict[str, Any], param: str, words: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        _protocol(StartEngineRequest)(body)
    assert caught.value.param == param
    assert words in caught.value.message


def test_examples_are_valid() -> None:
    for name, schema in DOC["components"]["schemas"].items():
        for example in schema.get("examples", []):
            assert _validator(name).is_valid(example), name


def test_dashboard_replies_fit_their_models() -> None:
    """The dashboard's replies are encoded from the protocol's Structs; what goes on the wire
    must still be what the generated document says (and each preset's start body a valid
    StartEngineRequest)."""
    series = Series(interval_s=2.0, window_s=10.0)
    point = ModelPoint(
        rps=1.0,
        tokens_per_s=20.0,
        ttft_p50_ms=30.0,
        tpot_p50_ms=5.0,
        p95_ms=90.0,
        slo_attainment=1.0,
        queued=0,
    )
    counters = {"queued": 0, "in_flight": 1, "requests_total": 10}
    series.add(
        Sample(
            t=100.0,
            **counters,
            requests_failed=0,
            models={"m": point},
            engine_in_flight={"e-1": 1.0},
        ),
        "fifo",
    )
    series.add(  # a failure: an error event
        Sample(t=102.0, **counters, requests_failed=1, models={}, engine_in_flight={}), "fifo"
    )
    series.unreachable(104.0, "connection refused")
    shown = json.loads(msgspec.json.encode(series.snapshot()))
    assert len(shown["errors"]) == 2 and shown["policy"] == "fifo"
    assert _validator("TimeSeries").is_valid(shown)
    presets = json.loads(msgspec.json.encode(preset_list()))
    assert presets["presets"]
    assert _validator("PresetList").is_valid(presets)
    for preset in presets["presets"]:
        for engine in preset["engines"]:
            start_request(convert(engine["start"], StartEngineRequest))
            assert _validator("StartEngineRequest").is_valid(engine["start"]), engine["name"]
