"""deploy/compose and deploy/systemd checked against the code they deploy.

Every port and SAGE_* variable must be a real SagePorts value / settings field, every
command must be accepted by the real argparse parser of the module it runs, envoy must route
each real gRPC service to the compose service that serves it, and the systemd units' exact
command lines must bring the stack up as plain processes.
"""

from __future__ import annotations

import argparse
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from sage.common.config.ports import SagePorts
from sage.common.config.settings import env_names, flat_default
from sage.common.utils.processes import free_port, stop_process
from sage.rpc.embedding.v1 import embedding_pb2
from sage.rpc.gpu_manager.v1 import gpu_manager_pb2
from sage.rpc.lifecycle.v1 import lifecycle_pb2
from sage.rpc.scheduler.v1 import scheduler_pb2

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


def test_targets_group_the_right_units(units: dict[str, dict[str, list[tuple[str, str]]]]) -> None:
    everything = set(unit_values(units["sage-llm.target"], "Unit", "Wants")[0].split())
    assert everything == set(SERVICE_UNITS)
    agent = set(unit_values(units["sage-node-agent.target"], "Unit", "Wants")[0].split())
    assert agent == {"sage-gpu-manager.service", "sage-lifecycle.service"}
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
