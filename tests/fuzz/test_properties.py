"""Property tests on every parser that reads user input: presets, settings from env strings,
the API keys file and spec, SAGE_AUTOSCALE, the edge's request validation and the
management start body. Arbitrary input either parses or raises the one documented error
type (whose message says what is wrong); nothing else escapes.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import pydantic
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sage.common.config.settings import SageSettings
from sage.common.config.values import parse_autoscale
from sage.common.exceptions import ConfigurationError, InvalidRequestError
from sage.llm.presets.loader import PresetError, load_preset, parse_preset
from sage.protocol.management import PruneRequest, StartEngineRequest
from sage.protocol.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    decode,
)
from sage.services.edge.app import with_scheduling_hints
from sage.services.edge.auth import ApiKeyTable, load_api_keys_file, parse_api_keys
from sage.services.edge.management import start_request

from .conftest import PROPERTY_EXAMPLES

PROPS = settings(
    max_examples=PROPERTY_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def _near(template: dict[str, Any], keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects close to a valid template: each known key kept, dropped or given any value."""
    return st.fixed_dictionaries(
        {},
        optional={k: st.one_of(st.just(template[k]), json_values) for k in keys},
    ).map(lambda doc: {**doc})


_CHAT = {
    "model": "m",
    "messages": [{"role": "user", "content": "hi"}],
    "stream": False,
    "max_tokens": 8,
    "n": 1,
    "temperature": 0.5,
    "top_p": 1.0,
    "stop": ["x"],
    "stream_options": {"include_usage": True},
    "presence_penalty": 0.0,
}
_EMBED = {"model": "e", "input": ["a", "b"], "dimensions": 8, "encoding_format": "float"}
_START = {
    "model_id": "m",
    "engine_kind": "llm",
    "backend": "sim",
    "tensor_parallel_size": 1,
    "port": 0,
    "required_memory_gb": 1.0,
    "metadata": {"a": "b"},
    "use_gpu": False,
    "extra_args": ["--x"],
    "wait": True,
    "engine_id": "e-1",
    "startup_timeout_s": 10,
}


# -- edge request validation -------------------------------------------------------------


@PROPS
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_body_parses_or_is_a_400(body: bytes) -> None:
    """Raw bytes never crash decoding; non-objects get a 400 naming the problem (a body
    with no fields, like prune's, takes any object)."""
    try:
        decode(body, PruneRequest)
    except InvalidRequestError as exc:
        assert exc.message
        return
    assert isinstance(json.loads(body), dict)


@PROPS
@given(json_values | _near(_CHAT, list(_CHAT)))
def test_chat_validation_only_raises_invalid_request(doc: Any) -> None:
    """Any JSON object is a valid chat request or an InvalidRequestError (HTTP 400)."""
    assume(isinstance(doc, dict))
    try:
        parsed = decode(json.dumps(doc).encode(), ChatCompletionRequest)
    except InvalidRequestError as exc:
        assert exc.message and exc.to_openai()["error"]["type"] == "invalid_request_error"
        return
    assert isinstance(parsed.model, str) and parsed.model.strip()
    assert isinstance(doc["messages"], list) and doc["messages"]
    assert len(parsed.messages) == len(doc["messages"])


@PROPS
@given(_near({**_CHAT, "prompt": "p"}, [*_CHAT, "prompt"]))
def test_completion_validation_only_raises_invalid_request(doc: dict[str, Any]) -> None:
    """Legacy completions: valid, or a 400."""
    try:
        parsed = decode(json.dumps(doc).encode(), CompletionRequest)
    except InvalidRequestError as exc:
        assert exc.message
        return
    assert isinstance(parsed.streaming, bool)


@PROPS
@given(json_values | _near(_EMBED, list(_EMBED)))
def test_embedding_validation_only_raises_invalid_request(doc: Any) -> None:
    """Embeddings: valid (every input a non-empty string) or a 400."""
    assume(isinstance(doc, dict))
    try:
        parsed = decode(json.dumps(doc).encode(), EmbeddingRequest)
    except InvalidRequestError as exc:
        assert exc.message
        return
    assert all(isinstance(t, str) and t for t in parsed.inputs)
    assert 0 <= (parsed.dimensions or 0) < 2**31
    assert parsed.encoding_format in ("float", "base64", None)


@PROPS
@given(json_values | _near(_START, list(_START)))
def test_management_start_body_only_raises_invalid_request(doc: Any) -> None:
    """POST /v1/management/engines bodies: a StartEngineRequest or a 400 (no protobuf
    ValueError/TypeError from out-of-range numbers or odd types)."""
    assume(isinstance(doc, dict))
    try:
        request = start_request(decode(json.dumps(doc).encode(), StartEngineRequest))
    except InvalidRequestError as exc:
        assert exc.message
        return
    assert request.model.strip()


# Digit-like characters that str.isdigit() accepts but int() does not, signs, spaces.
_header_values = st.text(max_size=300) | st.sampled_from(
    ["\xb2", "\u0661\u0662", "-1", " 5", "1e3", "99999999999", "", "HIGH", "x" * 257]
)


@PROPS
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "x-sage-priority": _header_values,
            "x-sage-slo-ttft-ms": _header_values,
            "x-sage-slo-e2e-ms": _header_values,
            "x-session-id": _header_values,
        },
    )
)
def test_scheduling_headers_only_raise_invalid_request(headers: dict[str, str]) -> None:
    """Scheduling hint headers: parsed into RequestOptions, or a 400 naming the header."""
    try:
        with_scheduling_hints(None, headers)
    except InvalidRequestError as exc:
        assert exc.param in headers


# -- presets -----------------------------------------------------------------------------

_PRESET: dict[str, Any] = {
    "version": 1,
    "name": "p",
    "engines": [{"name": "a", "model": "m", "kind": "llm", "backend": "sim", "port": 9000}],
}


@PROPS
@given(st.text(max_size=300))
def test_preset_text_parses_or_is_a_preset_error(text: str) -> None:
    """Arbitrary text: a Preset or a PresetError (which names lines), never a YAML or
    pydantic exception."""
    try:
        parse_preset(text)
    except PresetError as exc:
        assert str(exc)


@PROPS
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "version": st.one_of(st.just(1), json_values),
            "name": st.one_of(st.just("p"), json_values),
            "description": json_values,
            "engines": st.one_of(
                st.just(_PRESET["engines"]),
                st.lists(_near(_PRESET["engines"][0], list(_PRESET["engines"][0])), max_size=3),
                json_values,
            ),
        },
    )
    | json_values
)
def test_preset_documents_parse_or_are_a_preset_error(doc: Any) -> None:
    """Structured near-valid presets dumped as YAML: a Preset or a PresetError."""
    try:
        preset = parse_preset(yaml.safe_dump(doc))
    except PresetError as exc:
        assert str(exc)
        return
    assert preset.engines


@PROPS
@given(st.text(max_size=40))
def test_preset_names_never_reach_the_filesystem(name: str) -> None:
    """Built-in preset lookup by any name (`../x`, `/etc/passwd`) is a lookup in a fixed
    list: unknown names are a PresetError, never a read elsewhere."""
    try:
        preset = load_preset(name=name)
    except PresetError:
        return
    assert "/" not in name and ".." not in name
    assert preset.name


# -- settings, API keys, autoscale --------------------------------------------------------

_ENV_FIELDS = [
    "SAGE_GATEWAY_PORT",
    "SAGE_RPC_TIMEOUT_S",
    "SAGE_MAX_BODY_BYTES",
    "SAGE_METRICS_REQUIRE_AUTH",
    "SAGE_LOG_FORMAT",
    "SAGE_OTEL_EXPORTER",
    "SAGE_DISABLE_NVML",
    "SAGE_API_KEYS",
    "SAGE_SCHEDULER_POLICY",
    "SAGE_AUTOSCALE_DRY_RUN",
]


@PROPS
@given(
    st.dictionaries(
        st.sampled_from(_ENV_FIELDS),
        st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=20),
        max_size=4,
    )
)
def test_settings_from_env_strings_parse_or_fail_validation(env: dict[str, str]) -> None:
    """Env strings become typed settings or a pydantic ValidationError naming the field."""
    with tempfile.TemporaryDirectory() as home:
        isolated = {k: v for k, v in os.environ.items() if not k.startswith("SAGE_")}
        with mock.patch.dict(os.environ, {**isolated, **env, "SAGE_HOME": home}, clear=True):
            try:
                settings_ = SageSettings(_env_file=None)  # type: ignore[call-arg]
            except pydantic.ValidationError as exc:
                fields = {str(e["loc"][0]) for e in exc.errors()}
                assert fields <= {f.removeprefix("SAGE_").lower() for f in env}
                return
    assert settings_.home == Path(home)


@PROPS
@given(st.text(max_size=60))
def test_api_keys_spec_parses_or_is_a_configuration_error(spec: str) -> None:
    """SAGE_API_KEYS: keys with tenants, or a ConfigurationError; never an empty key."""
    try:
        keys = parse_api_keys(spec)
        ApiKeyTable(keys)
    except ConfigurationError as exc:
        assert exc.param == "api_keys"
        return
    assert all(k.key and k.tenant for k in keys)


@PROPS
@given(
    json_values
    | st.lists(
        _near(
            {"key": "k", "tenant": "t", "rate_limit_rpm": 5, "rate_limit_tpm": 10},
            ["key", "tenant", "rate_limit_rpm", "rate_limit_tpm"],
        ),
        max_size=3,
    ),
    st.sampled_from([".json", ".yaml"]),
    st.booleans(),
)
def test_api_keys_file_loads_or_is_a_configuration_error(
    doc: Any, suffix: str, garble: bool
) -> None:
    """SAGE_API_KEYS_FILE with any content: keys, or a ConfigurationError naming the file."""
    text = json.dumps(doc) if suffix == ".json" else yaml.safe_dump(doc)
    if garble:
        text = text[: len(text) // 2] + "\x07{["
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"keys{suffix}"
        path.write_text(text, encoding="utf-8")
        try:
            keys = load_api_keys_file(path)
        except ConfigurationError as exc:
            assert str(path) in exc.message
            return
    assert all(k.key and k.rate_limit_rpm >= 0 for k in keys)


@PROPS
@given(
    st.text(max_size=60)
    | st.lists(
        st.tuples(st.text(min_size=0, max_size=8), st.integers(-3, 20), st.integers(-3, 20)).map(
            lambda t: f"{t[0]}:{t[1]}:{t[2]}"
        ),
        max_size=4,
    ).map(",".join)
)
def test_autoscale_spec_parses_or_is_a_configuration_error(spec: str) -> None:
    """SAGE_AUTOSCALE: ranges with 1 <= min <= max, or a ConfigurationError."""
    try:
        rules = parse_autoscale(spec)
    except ConfigurationError as exc:
        assert exc.param == "SAGE_AUTOSCALE"
        return
    for rule in rules:
        assert rule.model and 1 <= rule.min <= rule.max
