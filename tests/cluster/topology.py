"""The etcd-mode cluster of issue 21 on namespace hosts (see netns.py):

    etcd-1..3   one etcd member each (a 3-member cluster)
    cp-1, cp-2  control plane: edge + scheduler + embedding service, separate processes
    node-a      node agent: gpu_manager (2 simulated 40 GiB GPUs) + lifecycle
    node-b      node agent: gpu_manager (1 simulated 80 GiB GPU) + lifecycle

Every service runs as `python -m sage.services.<name>` inside its host, bound to the host's
address, with SAGE_ETCD_ENDPOINTS naming the three members and nothing else pointing one
host at another: agents, schedulers and edges find each other through etcd. Engines (sims,
and the bundled embedding engine on a simulated GPU) are started through an edge's
management API, so lifecycle runs them inside its node. The test process sits on
the same bridge (netns.Network) and dials every host directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sage.common.etcd import ClusterKeys, EtcdClient
from sage.common.etcd.testing import EtcdMembers
from sage.common.grpc import create_channel, create_sync_channel
from sage.rpc.common.v1 import common_pb2
from sage.rpc.gpu_manager.v1 import gpu_manager_pb2, gpu_manager_pb2_grpc
from sage.rpc.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from tests.cluster.netns import Host, Network, Processes

T = TypeVar("T")

# Ports are the same on every host: each namespace has its own.
PORTS = {
    "edge": 8889,
    "scheduler": 50051,
    "embedding": 50054,
    "lifecycle": 50052,
    "gpu_manager": 50053,
}
PORT_ENV = {
    "edge": "SAGE_GATEWAY_PORT",
    "scheduler": "SAGE_SCHEDULER_PORT",
    "embedding": "SAGE_EMBEDDING_SERVICE_PORT",
    "lifecycle": "SAGE_LIFECYCLE_PORT",
    "gpu_manager": "SAGE_GPU_MANAGER_PORT",
}
CONTROL_PLANE = ("cp-1", "cp-2")
NODES = {"node-a": "2x40", "node-b": "1x80"}
# Start order within a host: what others dial first comes up first.
CP_SERVICES = ("embedding", "scheduler", "edge")
NODE_SERVICES = ("gpu_manager", "lifecycle")
ADMIN_KEY = "sk-cluster-faults-admin"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
# The lease TTL the cluster runs with: a dead agent's engines leave routing within it.
LEASE_TTL_S = 4
# The autoscaled model: min = max = 2 replicas (copies start where a replica runs: node-a).
AUTO_MODEL, AUTO_REPLICAS = "sim-auto", 2

# The bundled embedding model, served by our embedding engine on a simulated GPU (computing
# on the CPU): the engines that hold GPU reservations. Sims hold none.
EMBED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# The engines every test starts from: (engine id, model, kind, node, on a GPU).
ENGINES = (
    ("chat-a", "sim", "llm", "node-a", False),
    ("chat-b", "sim", "llm", "node-b", False),
    ("embed-a", EMBED_MODEL, "embedding", "node-a", True),
    ("embed-b", EMBED_MODEL, "embedding", "node-b", True),
    ("auto-1", AUTO_MODEL, "llm", "node-a", False),
)


async def until(
    what: str,
    check: Callable[[], Awaitable[T | None]],
    within_s: float,
    *,
    every_s: float = 0.2,
    detail: Callable[[], str] | None = None,
) -> tuple[T, float]:
    """Poll `check` until it returns something other than None/False (errors count as not
    yet); (that value, seconds it took). Fails after `within_s`."""
    start = time.monotonic()
    last: Any = None
    while True:
        try:
            value = await check()
            if value is not None and value is not False:
                return value, time.monotonic() - start
            last = value
        except Exception as exc:
            last = repr(exc)
        if time.monotonic() - start > within_s:
            extra = f"\n{detail()}" if detail is not None else ""
            raise AssertionError(f"not within {within_s:g}s: {what} (last: {last}){extra}")
        await asyncio.sleep(every_s)


@dataclass
class Cluster:
    """The hosts, the etcd members and the services; how to start, kill and ask them."""

    net: Network
    procs: Processes
    etcd: EtcdMembers
    workdir: Path
    token: str
    hosts: dict[str, Host] = field(default_factory=dict)

    # -- addresses ---------------------------------------------------------------------

    def addr(self, host: str, service: str) -> str:
        """host:port of a service."""
        return f"{self.hosts[host].addr}:{PORTS[service]}"

    def edge_url(self, host: str) -> str:
        """The base URL of an edge."""
        return f"http://{self.addr(host, 'edge')}"

    @property
    def edges(self) -> list[str]:
        """Base URLs of both edges."""
        return [self.edge_url(cp) for cp in CONTROL_PLANE]

    def host_of(self, address: str) -> str:
        """The host whose address `address` (host:port) names."""
        ip_addr = address.rsplit(":", 1)[0]
        return next(name for name, h in self.hosts.items() if h.addr == ip_addr)

    # -- processes ----------------------------------------------------------------------

    def define(self) -> None:
        """Every service's command line and environment (not started)."""
        endpoints = self.etcd.endpoints
        base = {k: v for k, v in os.environ.items() if not k.startswith("SAGE_")}
        base.update(
            {
                "PYTHONUNBUFFERED": "1",
                "SAGE_LOG_LEVEL": "INFO",
                "SAGE_ETCD_ENDPOINTS": endpoints,
                "SAGE_ETCD_LEASE_TTL_S": str(LEASE_TTL_S),
                # One stack across hosts: every host holds the same internal token.
                "SAGE_INTERNAL_TOKEN": self.token,
                # Addresses private to this test's bridge: no TLS needed to bind them.
                "SAGE_INSECURE": "1",
                "SAGE_ADMIN_API_KEY": ADMIN_KEY,
                "SAGE_DISABLE_NVML": "1",
                "SAGE_RPC_TIMEOUT_S": "5",
                "SAGE_REQUEST_TIMEOUT_S": "20",
                # How often an agent checks whether its node report changed.
                "SAGE_NODE_HEARTBEAT_S": "0.5",
                **{PORT_ENV[s]: str(p) for s, p in PORTS.items()},
            }
        )
        for name in CONTROL_PLANE:
            host = self.hosts[name]
            env = {
                **base,
                "SAGE_HOME": str(self.workdir / name / "home"),
                "SAGE_HOST": host.addr,
                "SAGE_ADVERTISE_HOST": host.addr,
                "SAGE_NODE_ID": name,
                "SAGE_AUTOSCALE": f"{AUTO_MODEL}:{AUTO_REPLICAS}:{AUTO_REPLICAS}",
                "SAGE_AUTOSCALE_INTERVAL_S": "0.5",
                "SAGE_AUTOSCALE_COOLDOWN_S": "1",
                "SAGE_AUTOSCALE_IDLE_S": "3600",
            }
            for service in CP_SERVICES:
                self._define(host, service, env)
        for name, gpus in NODES.items():
            host = self.hosts[name]
            env = {
                **base,
                "SAGE_HOME": str(self.workdir / name / "home"),
                "SAGE_HOST": host.addr,
                "SAGE_ADVERTISE_HOST": host.addr,
                "SAGE_NODE_ID": name,
                "SAGE_GPU_SIMULATE": gpus,
                "SAGE_LIFECYCLE_RESTART_BACKOFF_S": "0.2",
                "SAGE_LAUNCH_ALLOWED_ARGS": "--device",
                # A killed or restarted agent re-adopts its engines; they never stop with it.
                "SAGE_LIFECYCLE_STOP_ENGINES_ON_EXIT": "false",
            }
            for service in NODE_SERVICES:
                self._define(host, service, env)

    def _define(self, host: Host, service: str, env: dict[str, str]) -> None:
        module = f"sage.services.{service}"
        self.procs.add(
            host,
            f"{host.name}/{service}",
            [sys.executable, "-m", module],
            env,
            self.workdir / host.name / "home",
        )

    def services(self, hosts: Iterable[str] | None = None) -> list[str]:
        """Service process names in start order (agents first, then the control plane)."""
        order = [f"{n}/{s}" for n in NODES for s in NODE_SERVICES]
        order += [f"{c}/{s}" for c in CONTROL_PLANE for s in CP_SERVICES]
        if hosts is None:
            return order
        wanted = set(hosts)
        return [p for p in order if p.split("/")[0] in wanted]

    def start(self, name: str, within_s: float = 40.0) -> None:
        """Start a service and wait until it is ready."""
        self.procs.start(name)
        self.wait_ready(name, within_s)

    def start_many(self, names: Iterable[str], within_s: float = 60.0) -> None:
        """Start several at once, then wait for each (cheaper than one by one)."""
        names = list(names)
        for name in names:
            self.procs.start(name)
        deadline = time.monotonic() + within_s
        for name in names:
            self.wait_ready(name, max(1.0, deadline - time.monotonic()))

    def wait_ready(self, name: str, within_s: float) -> None:
        """Until the service answers: the edge's HTTP, the others' gRPC health."""
        proc = self.procs.procs[name]
        host, service = name.split("/")
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if not proc.alive:
                raise AssertionError(f"{name} exited:\n{self.procs.tail(name, 40)}")
            if service == "edge":
                with contextlib.suppress(httpx.HTTPError):
                    got = httpx.get(self.edge_url(host) + "/openapi.json", timeout=2)
                    if got.status_code == 200:
                        return
            else:
                with contextlib.suppress(grpc.RpcError):
                    with grpc.insecure_channel(self.addr(host, service)) as channel:
                        reply = health_pb2_grpc.HealthStub(channel).Check(
                            health_pb2.HealthCheckRequest(), timeout=1.0
                        )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            time.sleep(0.2)
        raise AssertionError(f"{name} not ready in {within_s:g}s:\n{self.procs.tail(name, 40)}")

    def kill9(self, name: str) -> None:
        """SIGKILL a service."""
        self.procs.kill9(name)

    def stray_processes(self, host: str, engine_pids: set[int]) -> list[str]:
        """Command lines of processes inside a host that are neither one of its services
        nor one of `engine_pids` (or below one: an engine's own workers)."""
        services = {p.pid for p in self.procs.procs.values() if p.host.name == host and p.alive}
        stray = []
        for pid in self.net.pids(self.hosts[host].ns):
            if pid in services:
                continue
            with contextlib.suppress(psutil.NoSuchProcess):
                proc = psutil.Process(pid)
                if not {proc.pid, *(p.pid for p in proc.parents())} & engine_pids:
                    stray.append(" ".join(proc.cmdline()))
        return stray

    # -- what the cluster says ---------------------------------------------------------

    def etcd_client(self) -> EtcdClient:
        """A client of the three members (close it)."""
        return EtcdClient(self.etcd.endpoints, timeout_s=2.0)

    async def etcd_ids(self, prefix: str) -> list[str]:
        """Key names (after the prefix) under a ClusterKeys prefix, duplicates kept."""
        client = self.etcd_client()
        try:
            kvs, _ = await client.get_prefix(prefix)
        finally:
            await client.close()
        return [kv.key.decode()[len(prefix) :] for kv in kvs]

    async def leases(self) -> dict[str, int]:
        """Every leased key under the prefix -> its lease id (a lease lost and granted again
        shows as a new id)."""
        client = self.etcd_client()
        try:
            kvs, _ = await client.get_prefix(ClusterKeys().prefix + "/")
        finally:
            await client.close()
        return {kv.key.decode(): kv.lease for kv in kvs if kv.lease}

    async def scheduler_leader(self) -> str:
        """The host whose scheduler leads the election ("" when none stands)."""
        client = self.etcd_client()
        try:
            kvs, _ = await client.get_prefix(ClusterKeys().scheduler_election)
        finally:
            await client.close()
        if not kvs:
            return ""
        leader = min(kvs, key=lambda kv: kv.create_revision)
        return self.host_of(leader.value.decode())

    async def etcd_leader(self) -> int:
        """Index of the etcd member that is raft leader now."""
        client = self.etcd_client()
        try:
            for i, member in enumerate(self.etcd.members):
                with contextlib.suppress(grpc.RpcError):
                    status = await client.status(member.endpoint)
                    if status.leader == status.header.member_id:
                        return i
        finally:
            await client.close()
        raise AssertionError("no etcd member says it leads")

    async def routed(self, cp: str) -> list[common_pb2.Engine]:
        """The engines a scheduler routes to (ready ones), as it lists them."""
        channel = create_channel(self.addr(cp, "scheduler"), default_timeout=3.0)
        try:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
            reply = await stub.ListEngines(scheduler_pb2.ListEnginesRequest())
        finally:
            await channel.close(None)
        return [e for e in reply.engines if e.state == common_pb2.ENGINE_STATE_READY]

    async def routed_ids(self, cp: str) -> list[str]:
        """Sorted ids of the engines a scheduler routes to (duplicates kept)."""
        return sorted(e.engine_id for e in await self.routed(cp))

    def reservations(self, node: str) -> list[str]:
        """Engine ids holding a GPU reservation on a node (duplicates kept)."""
        with create_sync_channel(self.addr(node, "gpu_manager")) as channel:
            stub = gpu_manager_pb2_grpc.GpuManagerServiceStub(channel)
            reply = stub.ListReservations(gpu_manager_pb2.ListReservationsRequest(), timeout=5)
        return sorted(r.engine_id for r in reply.reservations)

    async def management(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """A management API call through cp-1's edge (cp-2's if cp-1's is down)."""
        last: Exception | None = None
        for url in self.edges:
            try:
                async with httpx.AsyncClient(
                    base_url=url, timeout=90, trust_env=False, headers=ADMIN
                ) as client:
                    return await client.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                last = exc
        raise AssertionError(f"no edge answered {method} {path}: {last!r}")

    async def engines(self, running: bool = False) -> dict[str, dict[str, Any]]:
        """Engines lifecycles know (id -> record; only RUNNING ones with `running`), through
        the management API; an id listed twice fails."""
        resp = await self.management("GET", "/v1/management/engines")
        assert resp.status_code == 200, resp.text
        listed = resp.json()["engines"]
        ids = [e["engine_id"] for e in listed]
        assert len(ids) == len(set(ids)), f"an engine is listed twice: {sorted(ids)}"
        return {e["engine_id"]: e for e in listed if not running or e["status"] == "RUNNING"}


def build(workdir: Path, token: str) -> Cluster:
    """The namespaces and the etcd members' definitions (nothing started yet); the network
    is torn down again when building it fails half-way."""
    net = Network()
    try:
        net.create()
        hosts = {f"etcd-{i + 1}": net.add_host(f"etcd-{i + 1}", 21 + i) for i in range(3)}
        for i, name in enumerate(CONTROL_PLANE):
            hosts[name] = net.add_host(name, 11 + i)
        for i, name in enumerate(NODES):
            hosts[name] = net.add_host(name, 31 + i)
        etcd = EtcdMembers(
            workdir / "etcd",
            hosts=[hosts[f"etcd-{i + 1}"].addr for i in range(3)],
            netns=[hosts[f"etcd-{i + 1}"].ns for i in range(3)],
        )
    except BaseException:
        net.teardown()
        raise
    return Cluster(net, Processes(workdir), etcd, workdir, token, hosts)


def bring_up(cluster: Cluster) -> None:
    """etcd, then the node agents, then the control plane."""
    cluster.etcd.start()
    cluster.etcd.wait_healthy(30)
    cluster.define()
    cluster.start_many(cluster.services(NODES), within_s=60)
    cluster.start_many(cluster.services(CONTROL_PLANE), within_s=60)


async def start_engines(cluster: Cluster) -> None:
    """The ENGINES, through the management API, placed on their nodes."""
    for engine_id, model, _, node, gpu in ENGINES:
        body: dict[str, Any] = {
            "model_id": model,
            "backend": "sim",
            "engine_id": engine_id,
            "node": node,
            "wait": False,  # started together; `whole` waits for them
        }
        if gpu:
            body.update(
                backend="embedding",
                kind="embedding",
                use_gpu=True,
                required_memory_gb=2,
                extra_args=["--device", "cpu"],  # the simulated GPU has no CUDA
            )
        resp = await cluster.management("POST", "/v1/management/engines", json=body)
        assert resp.status_code in (200, 201, 202), f"{engine_id}: {resp.text}"


def expected_models() -> dict[str, int]:
    """Ready engines per model once the cluster is whole."""
    counts: dict[str, int] = {}
    for _, model, *_ in ENGINES:
        counts[model] = counts.get(model, 0) + 1
    counts[AUTO_MODEL] = AUTO_REPLICAS
    return counts


async def whole(cluster: Cluster, within_s: float = 45.0) -> dict[str, dict[str, Any]]:
    """Until every engine runs, etcd holds each once, each scheduler routes each of them
    exactly once and both edges list every model with its full count; returns the running
    engines (id -> record)."""

    async def check() -> dict[str, dict[str, Any]] | None:
        listed = await cluster.engines()
        # Stopped engines stay listed (lifecycle keeps their records); nothing may be on
        # its way up or down.
        if any(e["status"] not in ("RUNNING", "STOPPED") for e in listed.values()):
            return None
        engines = {i: e for i, e in listed.items() if e["status"] == "RUNNING"}
        if len(engines) != sum(expected_models().values()):
            return None
        if sorted(await cluster.etcd_ids(ClusterKeys().engines)) != sorted(engines):
            return None
        for cp in CONTROL_PLANE:
            if await cluster.routed_ids(cp) != sorted(engines):
                return None
        for url in cluster.edges:
            async with httpx.AsyncClient(base_url=url, timeout=5, trust_env=False) as client:
                models = (await client.get("/v1/models")).json()["data"]
            ready = {m["id"]: m["ready_engines"] for m in models}
            if ready != expected_models():
                return None
        return engines

    async def state() -> str:
        parts = []
        with contextlib.suppress(Exception):
            parts.append(f"engines: {sorted(await cluster.engines())}")
        for cp in CONTROL_PLANE:
            with contextlib.suppress(Exception):
                parts.append(f"{cp} routes {await cluster.routed_ids(cp)}")
        with contextlib.suppress(Exception):
            parts.append(f"etcd engines/: {await cluster.etcd_ids(ClusterKeys().engines)}")
        return "; ".join(parts)

    try:
        engines, _ = await until("the cluster whole", check, within_s, every_s=0.3)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{await state()}\n{cluster.procs.tails()}") from None
    return engines


async def trim(cluster: Cluster) -> None:
    """Stop replicas of the autoscaled model past its maximum (a failed test may leave one:
    the autoscaler never drains below its idle time), so the next test starts whole."""
    autos = sorted(
        (e.get("started_at") or 0.0, i)
        for i, e in (await cluster.engines(running=True)).items()
        if e["model_id"] == AUTO_MODEL
    )
    for _, engine_id in autos[AUTO_REPLICAS:]:
        await cluster.management("DELETE", f"/v1/management/engines/{engine_id}")
