"""EmbeddingFactory, the registry, list_embedding_models and check_model_availability."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sage.common.components.sage_embedding import (
    BaseEmbedding,
    BatchEmbeddingProtocol,
    EmbeddingFactory,
    EmbeddingProtocol,
    HashEmbedding,
    MethodRegistry,
    MethodSpec,
    check_model_availability,
    get_embedding_model,
    list_embedding_models,
)
from sage.common.exceptions import ConflictError, InvalidRequestError

ALL_METHODS = [
    "hash",
    "mockembedder",
    "hf",
    "openai",
    "jina",
    "zhipu",
    "cohere",
    "ollama",
    "siliconcloud",
    "bedrock",
    "nvidia_openai",
]


def test_every_seed_method_is_listed() -> None:
    models = list_embedding_models()
    assert list(models) == ALL_METHODS
    assert EmbeddingFactory.list_methods() == ALL_METHODS
    for method, info in models.items():
        assert set(info) == {
            "display_name",
            "description",
            "requires_api_key",
            "requires_download",
            "default_dimension",
            "examples",
        }, method
        assert info["description"] and info["display_name"] and info["examples"]
    assert models["hash"]["default_dimension"] == 384
    assert models["openai"]["requires_api_key"] is True
    assert models["ollama"]["requires_api_key"] is False
    assert models["hf"]["requires_download"] is True
    assert "BAAI/bge-small-zh-v1.5" in models["hf"]["examples"]


def test_create_and_alias() -> None:
    embedder = EmbeddingFactory.create("hash", dim=32)
    assert isinstance(embedder, HashEmbedding)
    assert embedder.get_dim() == 32
    assert isinstance(get_embedding_model("HASH"), HashEmbedding)
    assert isinstance(embedder, EmbeddingProtocol)
    assert isinstance(embedder, BatchEmbeddingProtocol)


def test_unknown_method_lists_the_known_ones() -> None:
    with pytest.raises(InvalidRequestError, match=r"unknown embedding method 'nope'.*openai"):
        EmbeddingFactory.create("nope")
    assert check_model_availability("nope")["status"] == "unavailable"


def test_unknown_option_is_a_clear_error() -> None:
    with pytest.raises(InvalidRequestError, match=r"does not take option.*dimension.*dim") as err:
        EmbeddingFactory.create("hash", dimension=10)
    assert err.value.param == "dimension"
    with pytest.raises(InvalidRequestError, match="colour"):
        EmbeddingFactory.create("jina", api_key="k", colour="blue")


def test_subclass_options_include_the_shared_ones() -> None:
    embedder = EmbeddingFactory.create("cohere", api_key="k", input_type="search_query", timeout=5)
    assert embedder.model_name == "embed-multilingual-v3.0"


def test_hf_needs_a_model() -> None:
    with pytest.raises(InvalidRequestError, match=r"needs option.*model"):
        EmbeddingFactory.create("hf")


def test_availability_of_local_methods() -> None:
    assert check_model_availability("hash") == {
        "status": "available",
        "message": "hash needs no model files and no credentials",
        "action": "",
    }
    assert check_model_availability("mockembedder")["status"] == "available"


def test_availability_uses_the_given_environment() -> None:
    env = {"JINA_API_KEY": "k"}
    assert check_model_availability("jina", "jina-embeddings-v3", env=env)["status"] == "available"
    assert check_model_availability("jina", env={})["status"] == "needs_api_key"
    bedrock = check_model_availability(
        "bedrock", env={"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}
    )
    assert bedrock["status"] == "available"


def test_registry_refuses_duplicate_names() -> None:
    spec = MethodSpec(name="x", display_name="X", description="x", factory=HashEmbedding)
    registry = MethodRegistry.of([spec])
    with pytest.raises(ConflictError):
        registry.register(spec)
    alias = MethodSpec(
        name="y", display_name="Y", description="y", factory=HashEmbedding, aliases=("X",)
    )
    with pytest.raises(ConflictError):
        registry.register(alias)
    assert "x" in registry and "X" in registry and "y" not in registry
    assert registry.get("X") is spec


def test_base_embedding_is_a_context_manager() -> None:
    with EmbeddingFactory.create("mockembedder") as embedder:
        assert isinstance(embedder, BaseEmbedding)
        assert "mockembedder" in repr(embedder)


def test_package_import_does_not_load_torch() -> None:
    code = (
        "import sys\n"
        "import sage.common.components.sage_embedding as m\n"
        "m.list_embedding_models(); m.check_model_availability('hf', 'org/model')\n"
        "m.EmbeddingFactory.create('hash').embed('x')\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'sentence_transformers' not in sys.modules, 'sentence_transformers imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
