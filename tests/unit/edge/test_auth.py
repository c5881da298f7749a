"""API keys: parsing SAGE_API_KEYS and the keys file, and checking Authorization headers."""

from __future__ import annotations

from pathlib import Path

import pytest

from sage.common.exceptions import ConfigurationError
from sage.services.edge.auth import (
    ApiKey,
    ApiKeyTable,
    InvalidApiKeyError,
    load_api_keys_file,
    load_key_table,
    parse_api_keys,
)


def test_env_keys_with_and_without_tenant() -> None:
    assert parse_api_keys(" k1 , k2:team-b,,") == [
        ApiKey("k1", "default"),
        ApiKey("k2", "team-b"),
    ]
    assert parse_api_keys("") == []
    with pytest.raises(ConfigurationError, match="empty key"):
        parse_api_keys(":tenant")


def test_yaml_and_json_files(tmp_path: Path) -> None:
    yaml_file = tmp_path / "keys.yaml"
    yaml_file.write_text(
        "- key: sk-a\n  tenant: team-a\n  rate_limit_rpm: 60\n  rate_limit_tpm: 1000\n- key: sk-b\n"
    )
    assert load_api_keys_file(yaml_file) == [
        ApiKey("sk-a", "team-a", 60, 1000),
        ApiKey("sk-b", "default", 0, 0),
    ]
    json_file = tmp_path / "keys.json"
    json_file.write_text('{"keys": [{"key": "sk-c", "tenant": "c", "rate_limit_rpm": 5}]}')
    assert load_api_keys_file(json_file) == [ApiKey("sk-c", "c", 5, 0)]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("key: nope", "must hold a list"),
        ("- tenant: x", "entry 0: key"),
        ("- key: a\n  rate_limit_rpm: -1", "rate_limit_rpm"),
        ("- key: a\n  colour: red", "colour"),
        ("- [unclosed", "not valid YAML"),
    ],
)
def test_bad_files_name_the_problem(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(content)
    with pytest.raises(ConfigurationError, match=needle) as info:
        load_api_keys_file(path)
    assert info.value.param == "api_keys_file"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read"):
        load_key_table("", tmp_path / "absent.yaml")


def test_conflicting_duplicate_key_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="twice"):
        ApiKeyTable([ApiKey("same", "a"), ApiKey("same", "b")])
    assert len(ApiKeyTable([ApiKey("same", "a"), ApiKey("same", "a")])) == 1


def test_authentication() -> None:
    off = ApiKeyTable()
    assert not off.enabled and off.authenticate({}) is None
    table = ApiKeyTable([ApiKey("sk-secret-key-1", "t1", 10)])
    assert table.authenticate({"authorization": "Bearer sk-secret-key-1"}) == ApiKey(
        "sk-secret-key-1", "t1", 10
    )
    assert table.authenticate({"authorization": "bearer  sk-secret-key-1 "}) is not None
    with pytest.raises(InvalidApiKeyError, match="didn't provide") as missing:
        table.authenticate({})
    assert missing.value.http_status == 401
    assert missing.value.to_openai()["error"]["code"] == "invalid_api_key"
    assert missing.value.to_openai()["error"]["type"] == "invalid_request_error"
    with pytest.raises(InvalidApiKeyError, match="didn't provide"):
        table.authenticate({"authorization": "Basic abc"})
    with pytest.raises(InvalidApiKeyError, match="Incorrect API key") as wrong:
        table.authenticate({"authorization": "Bearer sk-wrong-key-123"})
    # the key is never echoed whole
    assert "sk-wrong-key-123" not in wrong.value.message
    assert "sk-***-123" in wrong.value.message
