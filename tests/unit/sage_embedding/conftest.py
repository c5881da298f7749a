"""Fixtures for the sage_embedding tests: a clean environment and fake provider servers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .fakes import FakeFactory, FakeProvider, Handler

ENV_VARS_TO_CLEAR = (
    "OPENAI_API_KEY",
    "JINA_API_KEY",
    "ZHIPU_API_KEY",
    "ZHIPUAI_API_KEY",
    "COHERE_API_KEY",
    "CO_API_KEY",
    "OLLAMA_API_KEY",
    "OLLAMA_HOST",
    "SILICONCLOUD_API_KEY",
    "SILICONFLOW_API_KEY",
    "NVIDIA_OPENAI_API_KEY",
    "NVIDIA_API_KEY",
    "BEDROCK_API_KEY",
    "AWS_BEARER_TOKEN_BEDROCK",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_ENDPOINT",
    "HF_TOKEN",
    "HF_HUB_CACHE",
)


@pytest.fixture(autouse=True)
def clean_embedding_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No provider key or HF setting leaks in from the machine; local fakes bypass proxies."""
    for name in ENV_VARS_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def fake_provider() -> Iterator[FakeFactory]:
    """Start fake provider servers; all are stopped after the test."""
    started: list[FakeProvider] = []

    def start(handler: Handler) -> FakeProvider:
        server = FakeProvider(handler)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()
