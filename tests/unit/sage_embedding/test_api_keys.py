"""API keys: argument first, then `{METHOD}_API_KEY` (and aliases); missing is a clear error."""

from __future__ import annotations

import pytest

from sage.common.components.sage_embedding import EmbeddingFactory, check_model_availability
from sage.common.exceptions import AuthenticationError

from .fakes import FakeFactory, Recorded, Reply, openai_style_reply

# method -> (primary variable, alias variables, path prefix of its base_url)
KEYED_METHODS = {
    "openai": ("OPENAI_API_KEY", (), "/v1"),
    "jina": ("JINA_API_KEY", (), "/v1"),
    "zhipu": ("ZHIPU_API_KEY", ("ZHIPUAI_API_KEY",), "/api/paas/v4"),
    "siliconcloud": ("SILICONCLOUD_API_KEY", ("SILICONFLOW_API_KEY",), "/v1"),
    "nvidia_openai": ("NVIDIA_OPENAI_API_KEY", ("NVIDIA_API_KEY",), "/v1"),
    "cohere": ("COHERE_API_KEY", ("CO_API_KEY",), ""),
}


def echo_handler(request: Recorded) -> Reply:
    body = request.json()
    texts = body.get("input", body.get("texts"))
    if "texts" in body:
        return Reply(200, {"embeddings": {"float": [[1.0] for _ in texts]}})
    return openai_style_reply(texts, body["model"])


@pytest.mark.parametrize("method", sorted(KEYED_METHODS))
def test_missing_key_names_the_variable(method: str) -> None:
    variable = KEYED_METHODS[method][0]
    with pytest.raises(AuthenticationError, match=variable) as caught:
        EmbeddingFactory.create(method)
    assert caught.value.code == "missing_api_key"
    assert caught.value.param == "api_key"
    availability = check_model_availability(method)
    assert availability["status"] == "needs_api_key"
    assert variable in availability["action"]


@pytest.mark.parametrize("method", sorted(KEYED_METHODS))
def test_key_comes_from_the_environment(
    method: str, fake_provider: FakeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    variable, _, prefix = KEYED_METHODS[method]
    server = fake_provider(echo_handler)
    monkeypatch.setenv(variable, "from-env")
    EmbeddingFactory.create(method, base_url=server.url + prefix).embed("x")
    assert server.requests[0].headers["authorization"] == "Bearer from-env"
    assert check_model_availability(method)["status"] == "available"


@pytest.mark.parametrize("method", sorted(m for m, v in KEYED_METHODS.items() if v[1]))
def test_alias_variable_is_accepted(
    method: str, fake_provider: FakeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, aliases, prefix = KEYED_METHODS[method]
    server = fake_provider(echo_handler)
    monkeypatch.setenv(aliases[0], "from-alias")
    EmbeddingFactory.create(method, base_url=server.url + prefix).embed("x")
    assert server.requests[0].headers["authorization"] == "Bearer from-alias"


@pytest.mark.parametrize("method", sorted(KEYED_METHODS))
def test_argument_beats_the_environment(
    method: str, fake_provider: FakeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    variable, _, prefix = KEYED_METHODS[method]
    server = fake_provider(echo_handler)
    monkeypatch.setenv(variable, "from-env")
    EmbeddingFactory.create(method, api_key="from-arg", base_url=server.url + prefix).embed("x")
    assert server.requests[0].headers["authorization"] == "Bearer from-arg"


def test_blank_key_counts_as_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "   ")
    with pytest.raises(AuthenticationError, match="OPENAI_API_KEY"):
        EmbeddingFactory.create("openai", api_key="")


def test_key_never_appears_in_repr() -> None:
    embedder = EmbeddingFactory.create("openai", api_key="sk-secret-value")
    assert "sk-secret-value" not in repr(embedder)
