"""One control plane over several hosts, with hosts made of network namespaces.

Three namespaces joined by a bridge: `central` runs the scheduler and the edge; `node-a`
(two simulated 40 GiB GPUs) and `node-b` (one simulated 80 GiB GPU) each run gpu_manager
and lifecycle as a node agent bound to its own address. Sim engines are started through the
edge; the test checks where they land, that requests reach engines on both hosts, what
happens to bad agents, and that a node whose link goes down is drained from routing and
comes back. The HTTP/gRPC client runs inside `central` (a helper process fed JSON lines).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sage.common.grpc import process_token
from sage.common.security import engine_api_key
from sage.common.utils.processes import stop_process

SUBNET = "10.77.0"
CENTRAL_IP, NODE_A_IP, NODE_B_IP = f"{SUBNET}.1", f"{SUBNET}.2", f"{SUBNET}.3"
GHOST = f"{SUBNET}.99:50052"  # a statically listed agent nobody runs
SCHED_PORT, EDGE_PORT, LIFE_PORT, GPU_PORT = 50061, 8889, 50062, 50063
HEARTBEAT_S, TIMEOUT_S = 0.5, 2.5


def _netns_unavailable() -> str:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"sage-probe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.decode().strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


_REASON = _netns_unavailable() if sys.platform == "linux" else "network namespaces are Linux-only"
pytestmark = pytest.mark.skipif(bool(_REASON), reason=_REASON or "ok")
ADMIN_KEY = "sk-admin-multihost-test"

# Runs inside `central`: one JSON request per stdin line, one JSON answer per stdout line.
_CLIENT = r"""
import json, os, sys
import grpc, httpx
from sage.rpc.common.v1 import common_pb2
from sage.rpc.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

http = httpx.Client(timeout=60, trust_env=False)
for line in sys.stdin:
    cmd = json.loads(line)
    try:
        if cmd["op"] == "http":
            r = http.request(
                cmd["method"], cmd["url"], json=cmd.get("json"), headers=cmd.get("headers")
            )
            try:
                body = r.json()
            except ValueError:
                body = r.text
            out = {"status": r.status_code, "body": body}
        else:  # register a node directly with the scheduler, as an agent would
            with grpc.insecure_channel(cmd["addr"]) as channel:
                stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
                report = common_pb2.NodeReport(**cmd["report"])
                try:
                    reply = stub.RegisterNode(
                        scheduler_pb2.RegisterNodeRequest(report=report),
                        timeout=10,
                        metadata=(("x-sage-internal-token", os.environ["SAGE_INTERNAL_TOKEN"]),),
                    )
                    node = reply.node
                    out = {"code": "OK", "state": int(node.state), "reason": node.reason}
                except grpc.RpcError as err:
                    out = {"code": err.code().name, "details": err.details()}
    except Exception as exc:
        out = {"error": repr(exc)}
    print(json.dumps(out), flush=True)
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@dataclass
class Cluster:
    """Namespaces, service processes and a client inside `central`."""

    tag: str
    workdir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: dict[str, Path] = field(default_factory=dict)
    client: subprocess.Popen[bytes] | None = None

    def ns(self, name: str) -> str:
        return f"sage-{self.tag}-{name}"

    def spawn(self, ns: str, name: str, module: str, env: dict[str, str]) -> None:
        """`ip netns exec NS python -m module` with only our SAGE_* settings."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("SAGE_")}
        home = self.workdir / name
        home.mkdir(parents=True, exist_ok=True)
        log = self.logs[name] = self.workdir / f"{name}.log"
        full = {**base, "SAGE_HOME": str(home), "SAGE_LOG_LEVEL": "INFO", **env}
        with open(log, "wb") as out:
            self.procs.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", self.ns(ns), sys.executable, "-m", module],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=full,
                    cwd=home,
                )
            )

    def call(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """One request through the client in `central`."""
        assert self.client is not None and self.client.stdin and self.client.stdout
        self.client.stdin.write((json.dumps(cmd) + "\n").encode())
        self.client.stdin.flush()
        line = self.client.stdout.readline()
        assert line, f"the in-namespace client died; logs: {self.tails()}"
        answer: dict[str, Any] = json.loads(line)
        assert "error" not in answer, answer
        return answer

    def http(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """(status, json) of an edge request made from inside `central`."""
        url = path if path.startswith("http") else f"http://{CENTRAL_IP}:{EDGE_PORT}{path}"
        if path.startswith("/v1/management") and headers is None:
            headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        answer = self.call(
            {"op": "http", "method": method, "url": url, "json": body, "headers": headers}
        )
        return answer["status"], answer["body"]

    def register_node(self, **report: Any) -> dict[str, Any]:
        """RegisterNode straight to the scheduler."""
        return self.call({"op": "register", "addr": f"{CENTRAL_IP}:{SCHED_PORT}", "report": report})

    def wait_for(self, what: str, check: Callable[[], bool], timeout_s: float) -> float:
        """Poll `check` (bounded in time); returns the seconds it took."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if check():
                return time.monotonic() - start
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout_s}s waiting for {what}\n{self.tails()}")

    def tails(self) -> str:
        return "\n".join(
            f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:])
            for name, path in self.logs.items()
            if path.exists()
        )

    def nodes(self) -> dict[str, dict[str, Any]]:
        status, body = self.http("GET", "/v1/management/nodes")
        assert status == 200, body
        return {n["node_id"]: n for n in body["nodes"]}


def _build_network(cluster: Cluster) -> None:
    central = cluster.ns("central")
    for name in ("central", "node-a", "node-b"):
        _ip("netns", "add", cluster.ns(name))
        _ip("-n", cluster.ns(name), "link", "set", "lo", "up")
    _ip("-n", central, "link", "add", "br0", "type", "bridge")
    _ip("-n", central, "addr", "add", f"{CENTRAL_IP}/24", "dev", "br0")
    _ip("-n", central, "link", "set", "br0", "up")
    for name, addr in (("node-a", NODE_A_IP), ("node-b", NODE_B_IP)):
        outer, inner = f"sg{cluster.tag[:6]}{name[-1]}o", f"sg{cluster.tag[:6]}{name[-1]}i"
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", outer, "netns", central)
        _ip("link", "set", inner, "netns", cluster.ns(name))
        _ip("-n", central, "link", "set", outer, "master", "br0")
        _ip("-n", central, "link", "set", outer, "up")
        _ip("-n", cluster.ns(name), "link", "set", inner, "name", "eth0")
        _ip("-n", cluster.ns(name), "addr", "add", f"{addr}/24", "dev", "eth0")
        _ip("-n", cluster.ns(name), "link", "set", "eth0", "up")


def _teardown(cluster: Cluster) -> None:
    """Stop every process we started (and the engines inside our namespaces), then delete
    the namespaces, which removes their links."""
    if cluster.client is not None:
        with contextlib.suppress(Exception):
            assert cluster.client.stdin is not None
            cluster.client.stdin.close()
        stop_process(cluster.client, timeout=5)
    for proc in reversed(cluster.procs):
        stop_process(proc, timeout=10)
    for name in ("central", "node-a", "node-b"):
        ns = cluster.ns(name)
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        for pid in pids.stdout.split():  # engines left behind by a killed lifecycle
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def cluster(tmp_path: Path, no_leaked_children: None) -> Iterator[Cluster]:
    """Namespaces + scheduler/edge in central + an agent pair in each node, torn down after."""
    cluster = Cluster(uuid.uuid4().hex[:6], tmp_path)
    try:
        _build_network(cluster)
        common = {
            "SAGE_NODE_HEARTBEAT_S": str(HEARTBEAT_S),
            "SAGE_NODE_TIMEOUT_S": str(TIMEOUT_S),
            "SAGE_RPC_TIMEOUT_S": "5",
            "SAGE_REQUEST_TIMEOUT_S": "20",
            "SAGE_SCHEDULER_ADDR": f"{CENTRAL_IP}:{SCHED_PORT}",
            # One stack across hosts: every node holds the same internal token.
            "SAGE_INTERNAL_TOKEN": process_token(),
            # Namespace addresses are private to this test: no TLS needed to bind them.
            "SAGE_INSECURE": "1",
            "SAGE_ADMIN_API_KEY": ADMIN_KEY,
        }
        cluster.spawn(
            "central",
            "scheduler",
            "sage.services.scheduler",
            {
                **common,
                "SAGE_HOST": CENTRAL_IP,
                "SAGE_SCHEDULER_PORT": str(SCHED_PORT),
                "SAGE_NODES": f"ghost={GHOST}",
                "SAGE_SCHEDULER_BREAKER_FAILURES": "2",
            },
        )
        cluster.spawn(
            "central",
            "edge",
            "sage.services.edge",
            {**common, "SAGE_HOST": CENTRAL_IP, "SAGE_GATEWAY_PORT": str(EDGE_PORT)},
        )
        for name, addr, gpus in (("node-a", NODE_A_IP, "2x40"), ("node-b", NODE_B_IP, "1x80")):
            node_env = {
                **common,
                "SAGE_HOST": addr,
                "SAGE_ADVERTISE_HOST": addr,
                "SAGE_NODE_ID": name,
                "SAGE_LIFECYCLE_PORT": str(LIFE_PORT),
                "SAGE_GPU_MANAGER_PORT": str(GPU_PORT),
                "SAGE_GPU_SIMULATE": gpus,
            }
            cluster.spawn(name, f"{name}-gpu", "sage.services.gpu_manager", node_env)
            cluster.spawn(name, f"{name}-lifecycle", "sage.services.lifecycle", node_env)
        cluster.client = subprocess.Popen(
            ["ip", "netns", "exec", cluster.ns("central"), sys.executable, "-c", _CLIENT],
            env={**os.environ, "SAGE_INTERNAL_TOKEN": process_token()},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(tmp_path / "client.log", "wb"),  # noqa: SIM115 - closed with the process
        )
        cluster.logs["client"] = tmp_path / "client.log"
        yield cluster
    finally:
        _teardown(cluster)


def _successes(cluster: Cluster, engine: dict[str, Any]) -> float:
    """Requests an engine has served, from its own vLLM metrics (read across hosts, with the
    engine's key: lifecycle started it)."""
    key = engine_api_key(process_token(), engine["engine_id"])
    status, text = cluster.http(
        "GET", f"{engine['base_url']}/metrics", headers={"Authorization": f"Bearer {key}"}
    )
    assert status == 200
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in str(text).splitlines()
        if line.startswith("vllm:request_success_total")
    )


def _chat(cluster: Cluster, n: int) -> list[int]:
    body = {"model": "sim-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return [cluster.http("POST", "/v1/chat/completions", body)[0] for _ in range(n)]


def test_engines_are_placed_routed_and_drained_across_hosts(cluster: Cluster) -> None:
    # Both agents register; the statically listed ghost is reported down, named as such.
    def agents_ready() -> bool:
        try:
            nodes = cluster.nodes()
        except (AssertionError, OSError):
            return False
        if not all(nodes.get(n, {}).get("state") == "ready" for n in ("node-a", "node-b")):
            return False
        # An agent whose gpu_manager was not up yet reports 0 GPUs until its next heartbeat.
        return (nodes["node-a"]["gpu_count"], nodes["node-b"]["gpu_count"]) == (2, 1)

    cluster.wait_for("both node agents to register with their GPUs", agents_ready, 60)
    nodes = cluster.nodes()
    assert (nodes["node-a"]["gpu_count"], nodes["node-b"]["gpu_count"]) == (2, 1)
    assert nodes["node-a"]["lifecycle_addr"] == f"{NODE_A_IP}:{LIFE_PORT}"
    assert nodes["ghost"]["state"] == "down" and nodes["ghost"]["static"]
    cluster.wait_for(
        "the static ghost node to be reported unreachable",
        lambda: "unreachable" in (cluster.nodes()["ghost"]["reason"] or ""),
        10,
    )

    # Placement: one GPU → the node with more free memory; TP=2 only fits node-a.
    def placed(**fields: Any) -> Any:
        status, body = cluster.http(
            "POST",
            "/v1/management/engines",
            {"model_id": "sim-chat", "backend": "sim", "dry_run": True, **fields},
        )
        return status, body["node"]["node_id"] if status == 200 else body["error"]["message"]

    assert placed(use_gpu=True) == (200, "node-b")
    assert placed(use_gpu=True, tensor_parallel_size=2) == (200, "node-a")
    status, message = placed(use_gpu=True, tensor_parallel_size=3)
    assert status == 409 and "3 GPUs are needed on one host" in message
    status, message = placed(node="node-z")
    assert status == 404 and "node-z" in message

    # Start engines through the edge: a GPU one on node-b, then a CPU one on the idler node-a.
    status, on_b = cluster.http(
        "POST",
        "/v1/management/engines",
        {"model_id": "sim-chat", "backend": "sim", "use_gpu": True, "engine_id": "chat-b"},
    )
    assert status == 201, on_b
    assert on_b["node_id"] == "node-b" and on_b["base_url"].startswith(f"http://{NODE_B_IP}:")
    status, on_a = cluster.http(
        "POST",
        "/v1/management/engines",
        {"model_id": "sim-chat", "backend": "sim", "engine_id": "chat-a"},
    )
    assert status == 201, on_a
    assert on_a["node_id"] == "node-a" and on_a["base_url"].startswith(f"http://{NODE_A_IP}:")
    status, listed = cluster.http("GET", "/v1/management/engines")
    assert {(e["engine_id"], e["node_id"]) for e in listed["engines"]} == {
        ("chat-a", "node-a"),
        ("chat-b", "node-b"),
    }

    # Requests from central are served by engines on both hosts.
    assert _chat(cluster, 8) == [200] * 8
    assert _successes(cluster, on_a) > 0
    assert _successes(cluster, on_b) > 0

    # Bad agents: a second agent claiming node-a is refused; a lying one is unhealthy.
    dup = cluster.register_node(node_id="node-a", lifecycle_addr=f"{CENTRAL_IP}:9")
    assert dup["code"] == "ALREADY_EXISTS" and "node-a" in dup["details"]
    liar = cluster.register_node(
        node_id="liar",
        lifecycle_addr=f"{CENTRAL_IP}:8",
        gpu_count=4,
        gpus=[{"index": 0, "memory_total_bytes": 1, "memory_free_bytes": 2}],
    )
    assert liar["code"] == "OK" and "claims 4 GPUs but describes 1" in liar["reason"]
    assert cluster.nodes()["liar"]["state"] == "unhealthy"
    assert cluster.nodes()["node-a"]["lifecycle_addr"] == f"{NODE_A_IP}:{LIFE_PORT}"

    # Node-b's link goes down: within the node timeout its engine leaves routing, and
    # requests keep succeeding on node-a.
    served_by_a = _successes(cluster, on_a)
    _ip("-n", cluster.ns("node-b"), "link", "set", "eth0", "down")

    def ready_instances() -> int:
        status, body = cluster.http("GET", "/v1/management/status")
        assert status == 200, body
        return int(body["control_plane"]["instances_ready"])

    cluster.wait_for(
        "node-b's engine to leave routing", lambda: ready_instances() == 1, TIMEOUT_S * 6
    )
    down = cluster.nodes()["node-b"]
    assert down["state"] == "down" and "no heartbeat" in down["reason"]
    assert _chat(cluster, 6) == [200] * 6
    assert _successes(cluster, on_a) >= served_by_a + 6

    # The link comes back: node-b heart-beats again with its engine alive → back in routing.
    _ip("-n", cluster.ns("node-b"), "link", "set", "eth0", "up")
    cluster.wait_for("node-b's engine to return", lambda: ready_instances() == 2, 20)
    assert cluster.nodes()["node-b"]["state"] == "ready"
    assert _chat(cluster, 4) == [200] * 4
