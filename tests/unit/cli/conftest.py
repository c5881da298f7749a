"""Fixtures for CLI tests: an isolated SAGE_HOME and a fake Hugging Face Hub."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .fake_hub import FakeHub, running_hub


@pytest.fixture
def sage_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """SAGE_HOME in a temp folder, no gateway URL or admin key from the outer environment."""
    home = tmp_path / "sage"
    monkeypatch.setenv("SAGE_HOME", str(home))
    for name in ("SAGE_UNIFIED_BASE_URL", "SAGE_ADMIN_API_KEY", "SAGE_GATEWAY_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env
    return home


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A fake Hub on 127.0.0.1; huggingface_hub pointed at it with a temp cache."""
    with running_hub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        monkeypatch.delenv("SAGE_CHINA_MAINLAND", raising=False)
        yield hub
