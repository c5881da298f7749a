"""The edge's settings from SAGE_* variables, and the CORS policy they produce."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sage.common.config.settings import load_settings
from sage.common.http import CorsPolicy
from sage.services.edge.auth import ApiKey, load_key_table


def test_env_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    keys_file.write_text('[{"key": "sk-file", "tenant": "f", "rate_limit_tpm": 9}]')
    monkeypatch.setenv("SAGE_HOME", str(tmp_path))
    monkeypatch.setenv("SAGE_API_KEYS", "sk-a,sk-b:team-b")
    monkeypatch.setenv("SAGE_API_KEYS_FILE", str(keys_file))
    monkeypatch.setenv("SAGE_METRICS_REQUIRE_AUTH", "true")
    monkeypatch.setenv("SAGE_CORS_ORIGINS", "https://a.example,https://b.example")
    settings = load_settings()
    assert settings.metrics_require_auth is True
    table = load_key_table(settings.api_keys, settings.api_keys_file)
    assert table.authenticate({"authorization": "Bearer sk-b"}) == ApiKey("sk-b", "team-b")
    assert table.authenticate({"authorization": "Bearer sk-file"}) == ApiKey("sk-file", "f", 0, 9)
    policy = CorsPolicy.parse(settings.cors_origins)
    assert policy is not None and policy.origins == {"https://a.example", "https://b.example"}


def test_defaults_keep_everything_off(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SAGE_HOME", str(tmp_path))
    for name in ("SAGE_API_KEYS", "SAGE_API_KEYS_FILE", "SAGE_CORS_ORIGINS"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert not load_key_table(settings.api_keys, settings.api_keys_file).enabled
    assert CorsPolicy.parse(settings.cors_origins) is None
    assert settings.metrics_require_auth is None  # /metrics needs a key once keys exist


def test_cors_policy_parsing() -> None:
    assert CorsPolicy.parse(" , ") is None
    star = CorsPolicy.parse("*")
    assert star is not None and star.any_origin and star.allows("https://anything")
    listed = CorsPolicy.parse("https://a.example/")
    assert listed is not None and listed.allows("https://a.example")
    assert not listed.allows("https://b.example")


def test_a_bad_keys_file_stops_the_edge_with_a_message(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sage.services.edge", "--port", "0"],
        env={
            "SAGE_HOME": str(tmp_path),
            "SAGE_API_KEYS_FILE": str(tmp_path / "missing.yaml"),
            "PATH": "/usr/bin:/bin",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "cannot read SAGE_API_KEYS_FILE" in result.stderr
