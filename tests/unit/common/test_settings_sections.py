"""SageSettings sections: each service's settings in its own section, the flat SAGE_* names
landing there, and structured config-file values equal to the env strings."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydantic
import pytest

from sage.common.config.settings import SageSettings, describe_settings_error
from sage.common.config.values import AutoscaleRule, StaticNodeAddress
from sage.common.exceptions import ConfigurationError


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in list(os.environ):
        if var.startswith("SAGE_") or var in ("HF_HOME", "HF_HUB_CACHE"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("SAGE_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)  # no stray .env


# (variable, value, where the service reads it, the value it reads)
FLAT_ENV: list[tuple[str, str, Callable[[SageSettings], Any], Any]] = [
    ("SAGE_SCHEDULER_PORT", "6001", lambda s: s.scheduler.port, 6001),
    ("SAGE_SCHEDULER_POLICY", "hybrid:fair", lambda s: s.scheduler.policy, "hybrid:fair"),
    ("SAGE_SCHEDULER_MAX_QUEUE", "7", lambda s: s.scheduler.max_queue, 7),
    ("SAGE_SCHEDULER_BREAKER_COOLDOWN_S", "2.5", lambda s: s.scheduler.breaker_cooldown_s, 2.5),
    ("SAGE_AUTOSCALE_DRY_RUN", "true", lambda s: s.autoscaler.dry_run, True),
    ("SAGE_AUTOSCALE_IDLE_S", "9", lambda s: s.autoscaler.idle_s, 9.0),
    ("SAGE_GATEWAY_PORT", "6002", lambda s: s.edge.port, 6002),
    ("SAGE_CORS_ORIGINS", "*", lambda s: s.edge.cors_origins, "*"),
    ("SAGE_MAX_BODY_BYTES", "1000", lambda s: s.edge.max_body_bytes, 1000),
    ("SAGE_HTTP_MAX_HEADERS", "12", lambda s: s.http.max_headers, 12),
    ("SAGE_API_KEYS", "k1:t1", lambda s: s.auth.api_keys, "k1:t1"),
    ("SAGE_METRICS_REQUIRE_AUTH", "false", lambda s: s.auth.metrics_require_auth, False),
    ("SAGE_LIFECYCLE_PORT", "6003", lambda s: s.lifecycle.port, 6003),
    ("SAGE_LIFECYCLE_MAX_CRASHES", "9", lambda s: s.lifecycle.max_crashes, 9),
    ("SAGE_ENGINE_PORTS", "9000-9010", lambda s: s.lifecycle.engine_ports, "9000-9010"),
    ("SAGE_MODEL_ROOTS", "/m", lambda s: s.lifecycle.model_roots, "/m"),
    ("SAGE_VLLM_PYTHON", "/v/python", lambda s: s.lifecycle.vllm_python, "/v/python"),
    ("SAGE_GPU_MANAGER_PORT", "6004", lambda s: s.gpu_manager.port, 6004),
    ("SAGE_GPU_SIMULATE", "2x40", lambda s: s.gpu_manager.simulate, "2x40"),
    ("SAGE_GPU_RESERVE_MARGIN_MIB", "64", lambda s: s.gpu_manager.reserve_margin_mib, 64),
    ("SAGE_DISABLE_NVML", "1", lambda s: s.gpu_manager.disable_nvml, True),
    ("HF_HOME", "/hf", lambda s: s.gpu_manager.hub_cache_dirs(), [Path("/hf/hub")]),
    ("SAGE_EMBEDDING_SERVICE_PORT", "6005", lambda s: s.embedding_service.port, 6005),
    ("SAGE_TLS_CA_FILE", "/ca.pem", lambda s: s.tls.ca_file, "/ca.pem"),
    ("SAGE_NODE_ID", "gpu-7", lambda s: s.cluster.node_id, "gpu-7"),
    ("SAGE_NODE_TIMEOUT_S", "3", lambda s: s.cluster.timeout_s, 3.0),
    ("SAGE_CHAT_MODEL", "qwen", lambda s: s.client.chat_model, "qwen"),
    ("SAGE_UNIFIED_BASE_URL", "http://h/v1", lambda s: s.client.unified_base_url, "http://h/v1"),
    ("SAGE_ADMIN_API_KEY", "adm", lambda s: s.admin_api_key, "adm"),
    ("SAGE_RPC_TIMEOUT_S", "4", lambda s: s.rpc_timeout_s, 4.0),
]


@pytest.mark.parametrize(
    ("var", "value", "read", "expected"), FLAT_ENV, ids=[e[0] for e in FLAT_ENV]
)
def test_flat_env_names_land_in_their_service_section(
    monkeypatch: pytest.MonkeyPatch,
    var: str,
    value: str,
    read: Callable[[SageSettings], Any],
    expected: Any,
) -> None:
    assert read(SageSettings()) != expected  # the value comes from the variable
    monkeypatch.setenv(var, value)
    assert read(SageSettings()) == expected


def test_flat_names_still_read_and_copy_into_sections(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGE_SCHEDULER_ROUTING", "p2c")
    s = SageSettings(gateway_port=7001, autoscale="m:1:2")
    assert s.scheduler_routing == "p2c" and s.gateway_port == 7001 == s.edge.port
    copy = s.model_copy(update={"scheduler_port": 7002, "nodes": "a=h:1"})
    assert copy.scheduler.port == 7002 and copy.address("scheduler") == "127.0.0.1:7002"
    assert copy.cluster.nodes == [StaticNodeAddress(id="a", address="h:1")]
    assert copy.autoscaler.models == [AutoscaleRule(model="m", min=1, max=2)]
    assert s.scheduler.port != 7002  # the original is untouched
    with pytest.raises(pydantic.ValidationError, match="autoscale"):
        s.model_copy(update={"autoscale": "m:3:1"})


def test_nested_env_form_works_and_wins_over_the_flat_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SAGE_LIFECYCLE__MAX_CRASHES", "8")
    monkeypatch.setenv("SAGE_SCHEDULER_PORT", "6101")
    monkeypatch.setenv("SAGE_SCHEDULER__PORT", "6102")
    s = SageSettings()
    assert (s.lifecycle.max_crashes, s.scheduler.port) == (8, 6102)


def _file(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_structured_file_values_equal_the_string_forms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    strings = _file(
        tmp_path,
        "strings.yaml",
        "autoscale: 'qwen:7b:1:4,sim:2:2'\nnodes: 'a=10.0.0.1:50052,b=host-b:50052'\n"
        "scheduler:\n  policy: 'hybrid:fair'\n",
    )
    structured = _file(
        tmp_path,
        "structured.yaml",
        "autoscaler:\n  models:\n    - {model: 'qwen:7b', min: 1, max: 4}\n"
        "    - {model: sim, min: 2, max: 2}\n"
        "cluster:\n  nodes:\n    - {id: a, address: '10.0.0.1:50052'}\n"
        "    - {id: b, address: 'host-b:50052'}\n"
        "scheduler:\n  policy: {name: hybrid, inner: fair}\n",
    )
    flat_keys = _file(
        tmp_path,
        "flat.json",
        '{"autoscale": [{"model": "qwen:7b", "min": 1, "max": 4},'
        ' {"model": "sim", "min": 2, "max": 2}],'
        ' "nodes": [{"id": "a", "address": "10.0.0.1:50052"},'
        ' {"id": "b", "address": "host-b:50052"}],'
        ' "scheduler_policy": {"name": "hybrid", "inner": "fair"}}',
    )
    loaded = []
    for path in (strings, structured, flat_keys):
        monkeypatch.setenv("SAGE_CONFIG", str(path))
        s = SageSettings()
        loaded.append((s.autoscaler.models, s.cluster.nodes, s.scheduler.policy))
    assert loaded[0] == loaded[1] == loaded[2]
    assert loaded[0][0][0] == AutoscaleRule(model="qwen:7b", min=1, max=4)
    assert loaded[0][2] == "hybrid:fair"


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"SAGE_AUTOSCALE": "m:3:1"}, ["SAGE_AUTOSCALE", "min <= max"]),
        ({"SAGE_AUTOSCALE": "m:1:2,m:1:3"}, ["SAGE_AUTOSCALE", "twice"]),
        ({"SAGE_NODES": "a=nowhere"}, ["SAGE_NODES", "id=host:port"]),
        ({"SAGE_GPU_SIMULATE": "lots"}, ["SAGE_GPU_SIMULATE", "gpu_manager.simulate"]),
        ({"SAGE_GATEWAY_PORT": "x"}, ["SAGE_GATEWAY_PORT", "edge.port"]),
        ({"SAGE_SCHEDULER__MAX_QUEUE": "many"}, ["SAGE_SCHEDULER_MAX_QUEUE"]),
    ],
)
def test_a_bad_env_value_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], names: list[str]
) -> None:
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    with pytest.raises(pydantic.ValidationError) as info:
        SageSettings()
    message = describe_settings_error(info.value)
    for name in names:
        assert name in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("autoscaler:\n  models:\n    - {model: m, min: 0, max: 2}\n", "autoscale"),
        ("autoscale:\n  - {model: m, min: 1, maxx: 2}\n", "autoscale"),
        ("cluster:\n  nodes:\n    - {id: a, address: nowhere}\n", "nodes"),
        ("scheduler:\n  policy: {name: hybrid, inner: fair, extra: 1}\n", "scheduler_policy"),
    ],
)
def test_a_bad_structured_value_names_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, expected: str
) -> None:
    monkeypatch.setenv("SAGE_CONFIG", str(_file(tmp_path, "bad.yaml", text)))
    with pytest.raises(pydantic.ValidationError) as info:
        SageSettings()
    assert {str(e["loc"][0]) for e in info.value.errors()} == {expected}


def test_an_unknown_key_in_a_section_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "SAGE_CONFIG", str(_file(tmp_path, "s.yaml", "gpu_manager:\n  simulat: 2\n"))
    )
    with pytest.raises(ConfigurationError, match=r"'gpu_manager_simulat'.*'gpu_manager_simulate'"):
        SageSettings()


def test_a_service_with_a_bad_structured_file_exits_naming_the_setting(tmp_path: Path) -> None:
    import subprocess

    path = _file(tmp_path, "s.yaml", "autoscale:\n  - {model: m, min: 3, max: 1}\n")
    env = {"PATH": "/usr/bin:/bin", "SAGE_HOME": str(tmp_path), "SAGE_CONFIG": str(path)}
    proc = subprocess.run(
        [sys.executable, "-m", "sage.services.scheduler", "--check-config"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "SAGE_AUTOSCALE (autoscaler.models" in proc.stderr and "Traceback" not in proc.stderr


def test_lists_and_port_ranges_in_a_file_equal_the_comma_strings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    strings = _file(
        tmp_path,
        "strings.toml",
        'model_roots = "/models,/data/models"\nengine_ports = "9100-9199"\n'
        'cors_origins = "http://a.test,http://b.test"\napi_keys = "k1:t1,k2"\n',
    )
    structured = _file(
        tmp_path,
        "structured.toml",
        '[lifecycle]\nmodel_roots = ["/models", "/data/models"]\n'
        "engine_ports = {first = 9100, last = 9199}\n"
        '[edge]\ncors_origins = ["http://a.test", "http://b.test"]\n'
        '[auth]\napi_keys = ["k1:t1", "k2"]\n',
    )
    loaded = []
    for path in (strings, structured):
        monkeypatch.setenv("SAGE_CONFIG", str(path))
        s = SageSettings()
        loaded.append((s.lifecycle.model_roots, s.lifecycle.engine_ports, s.edge.cors_origins))
        assert s.auth.api_keys == "k1:t1,k2"
    assert loaded[0] == loaded[1] == ("/models,/data/models", "9100-9199", loaded[0][2])
    monkeypatch.setenv("SAGE_CONFIG", str(_file(tmp_path, "bad.toml", 'model_roots = ["/a,/b"]\n')))
    with pytest.raises(pydantic.ValidationError, match="model_roots"):
        SageSettings()
