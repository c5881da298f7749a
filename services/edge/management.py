"""The management API (`/v1/management/*`) with SAGE's field names, over lifecycle,
scheduler and gpu_manager gRPC.

Closed by default: it answers only the admin key (SAGE_ADMIN_API_KEY, else the 0600 file
`sage llm serve` writes), and with no admin key configured it answers 403 to everyone,
since starting engines runs programs on the host. Tenant API keys never open it.
"""

from __future__ import annotations

import asyncio
import hmac
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import grpc
import msgspec

from sage.common.apikeys import bearer_token
from sage.common.exceptions import (
    AuthenticationError,
    EngineNotFoundError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    SageError,
)
from sage.common.grpc import create_channel, rpc_errors_as_sage
from sage.common.grpc.engine_enums import kind_name, kind_value, role_name, role_value, state_name
from sage.common.http import App, Handler, Request, Response
from sage.protocol.management import (
    Adapter,
    AdapterList,
    Backend,
    BackendList,
    ControlPlane,
    ControlPlaneMetrics,
    Engine,
    EngineList,
    EngineLogs,
    Gpu,
    GpuStatus,
    ManagementStatus,
    ModelStats,
    Node,
    NodeGpu,
    NodeList,
    PlacementPreview,
    PruneRequest,
    PruneResult,
    RegisterEngineRequest,
    SchedulerReplica,
    StartEngineRequest,
)
from sage.protocol.openai import INT32_MAX, decode
from sage.rpc.common.v1 import common_pb2
from sage.rpc.gpu_manager.v1 import gpu_manager_pb2
from sage.rpc.lifecycle.v1 import lifecycle_pb2, lifecycle_pb2_grpc
from sage.rpc.scheduler.v1 import scheduler_pb2 as spb

if TYPE_CHECKING:
    from sage.rpc.lifecycle.v1.lifecycle_pb2_grpc import LifecycleServiceAsyncStub

PREFIX = "/v1/management"
# Loading an adapter reads its weights in the engine (lifecycle bounds it at 120 s).
ADAPTER_TIMEOUT_S = 150.0
_ENGINE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# SAGE's status names for the contract's engine states.
_STATUS = {
    "starting": "STARTING",
    "ready": "RUNNING",
    "draining": "STOPPING",
    "stopped": "STOPPED",
    "failed": "FAILED",
    "unspecified": "UNKNOWN",
}


def reply(body: msgspec.Struct, status: int = 200) -> Response:
    """A management reply, encoded from its protocol model."""
    return Response(msgspec.json.encode(body), status)


def engine_reply(engine: common_pb2.Engine) -> Engine:
    """An Engine message in SAGE's management JSON."""
    return Engine(
        engine_id=engine.engine_id,
        model_id=engine.model,
        engine_kind=kind_name(engine.kind, "unspecified"),
        role=role_name(engine.role),
        backend=engine.backend,
        status=_STATUS[state_name(engine.state)],
        host=engine.host,
        port=engine.port,
        base_url=engine.base_url,
        pid=engine.pid or None,
        gpu_ids=list(engine.gpu_indexes),
        engine_label=engine.label,
        restart_count=engine.restart_count,
        started_at=engine.started_at or None,
        error=engine.error or None,
        metadata=dict(engine.metadata),
        node_id=engine.node_id or None,
        lora_enabled=engine.lora_enabled,
        adapters=[Adapter(name=a.name, path=a.path) for a in engine.adapters],
    )


_NODE_STATE = {
    spb.NODE_STATE_READY: "ready",
    spb.NODE_STATE_UNHEALTHY: "unhealthy",
    spb.NODE_STATE_DOWN: "down",
}


def node_reply(node: spb.Node) -> Node:
    """A node of the scheduler's table as management JSON."""
    report = node.report
    return Node(
        node_id=report.node_id,
        state=_NODE_STATE.get(node.state, "unknown"),
        reason=node.reason or None,
        lifecycle_addr=report.lifecycle_addr,
        advertise_host=report.advertise_host or None,
        static=node.static,
        last_seen_s_ago=node.last_seen_s_ago if node.last_seen_s_ago >= 0 else None,
        gpu_count=report.gpu_count,
        gpus=[
            NodeGpu(
                index=g.index,
                name=g.name,
                memory_total_bytes=g.memory_total_bytes,
                memory_free_bytes=g.memory_free_bytes,
            )
            for g in report.gpus
        ],
        engines=node.engines,
        engine_ids=list(report.engine_ids),
    )


def start_request(body: StartEngineRequest) -> lifecycle_pb2.StartEngineRequest:
    """A decoded start (or register) body → lifecycle's StartEngineRequest, defaults filled."""
    request = lifecycle_pb2.StartEngineRequest(
        model=body.model_name,
        kind=kind_value(body.engine_kind_name),
        backend=body.backend or "",
        tensor_parallel_size=body.tensor_parallel_size or 1,
        pipeline_parallel_size=body.pipeline_parallel_size or 1,
        port=body.port or 0,
        required_memory_gb=body.required_memory_gb or 0.0,
        gpu_memory_utilization=body.gpu_memory_utilization or 0.0,
        label=body.label_text,
        max_concurrent_requests=body.max_concurrent_requests or 0,
        max_model_len=body.max_model_len or 0,
        extra_args=body.extra_args or [],
        aliases=body.aliases or [],
        metadata={k: str(v) for k, v in (body.metadata or {}).items()},
        engine_id=body.engine_id or "",
        startup_timeout_s=body.startup_timeout_s or 300,
        no_wait=not body.wait,
        role=role_value(body.role or "both"),
        join_existing_model=body.join_existing_model,
        enable_lora=body.enable_lora,
        max_lora_rank=body.max_lora_rank or 0,
    )
    if body.use_gpu is not None:
        request.use_gpu = body.use_gpu
    return request


def _engine_path(path: str) -> tuple[str, str]:
    """/v1/management/engines/{id}[/logs] → (id, tail); ids are checked (no traversal)."""
    rest = path.removeprefix(f"{PREFIX}/engines/")
    engine_id, _, tail = rest.partition("/")
    if not _ENGINE_ID.fullmatch(engine_id):
        raise InvalidRequestError(f"invalid engine id {engine_id!r}", param="engine_id")
    return engine_id, tail


class NodeLifecycles:
    """Lifecycle stubs of the scheduler's nodes, one channel per address, opened lazily on
    the server's loop. With fewer than two nodes known, the edge's own lifecycle is used,
    so a single-machine stack behaves exactly as before."""

    def __init__(self, upstreams: Callable[[], Any], timeout_s: float) -> None:
        self._upstreams = upstreams
        self._timeout_s = timeout_s
        self._stubs: dict[str, LifecycleServiceAsyncStub] = {}

    def stub(self, addr: str) -> LifecycleServiceAsyncStub:
        """The lifecycle at `addr`."""
        stub = self._stubs.get(addr)
        if stub is None:
            channel = create_channel(addr, default_timeout=self._timeout_s)
            stub = self._stubs[addr] = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        return stub

    async def nodes(self) -> list[spb.Node]:
        """The scheduler's node table (empty when the scheduler has none or is older)."""
        try:
            reply = await self._upstreams().scheduler.ListNodes(
                spb.ListNodesRequest(), timeout=self._timeout_s
            )
        except grpc.RpcError:
            return []
        return list(reply.nodes)

    async def targets(self) -> list[tuple[str, LifecycleServiceAsyncStub]]:
        """(node id, lifecycle) of every node not down; the edge's own lifecycle alone when
        fewer than two nodes are known."""
        nodes = await self.nodes()
        if len(nodes) < 2:
            return [("", self._upstreams().lifecycle)]
        return [
            (n.report.node_id, self.stub(n.report.lifecycle_addr))
            for n in nodes
            if n.state != spb.NODE_STATE_DOWN
        ]

    async def place(
        self, start: lifecycle_pb2.StartEngineRequest, node_id: str
    ) -> tuple[LifecycleServiceAsyncStub, spb.Node | None]:
        """Where to start `start`: an explicit node, else the scheduler's choice when there
        are several nodes, else the edge's own lifecycle. GPU or CPU, and the fallback to
        CPU, are the scheduler's call unless the request says `use_gpu`."""
        if not node_id and len(await self.nodes()) < 2:
            return self._upstreams().lifecycle, None
        gpus = max(1, start.tensor_parallel_size) * max(1, start.pipeline_parallel_size)
        request = spb.PlaceEngineRequest(
            gpus_needed=min(gpus, INT32_MAX),  # int32 on the wire; no node has that many
            use_gpu=start.use_gpu,
            gpu_auto=not start.HasField("use_gpu"),
            backend=start.backend,
            node_id=node_id,
        )
        with rpc_errors_as_sage():
            reply = await self._upstreams().scheduler.PlaceEngine(request, timeout=self._timeout_s)
        return self.stub(reply.node.report.lifecycle_addr), reply.node

    async def owner(self, engine_id: str) -> LifecycleServiceAsyncStub:
        """The lifecycle that knows `engine_id` (EngineNotFoundError when none does): the
        node the scheduler's routing table names for it; an engine not in routing (starting,
        failed, stopped) is looked for on every node."""
        nodes = await self.nodes()
        if len(nodes) < 2:
            lifecycle: LifecycleServiceAsyncStub = self._upstreams().lifecycle
            return lifecycle
        with rpc_errors_as_sage():
            routed = await self._upstreams().scheduler.ListEngines(
                spb.ListEnginesRequest(), timeout=self._timeout_s
            )
        node_id = next((e.node_id for e in routed.engines if e.engine_id == engine_id), "")
        addr = next((n.report.lifecycle_addr for n in nodes if n.report.node_id == node_id), "")
        if addr:
            return self.stub(addr)
        targets = [stub for _, stub in await self.targets()]

        async def knows(stub: LifecycleServiceAsyncStub) -> bool:
            try:
                await stub.GetEngine(
                    lifecycle_pb2.GetEngineRequest(engine_id=engine_id), timeout=self._timeout_s
                )
            except grpc.RpcError:
                return False
            return True

        found = await asyncio.gather(*(knows(stub) for stub in targets))
        for stub, ok in zip(targets, found, strict=True):
            if ok:
                return stub
        raise EngineNotFoundError(f"no engine with id {engine_id!r}", param="engine_id")

    async def list_engines(self) -> list[common_pb2.Engine]:
        """Engines of every reachable node (a node that does not answer is left out)."""
        targets = await self.targets()
        if len(targets) == 1:
            with rpc_errors_as_sage():
                reply = await targets[0][1].ListEngines(
                    lifecycle_pb2.ListEnginesRequest(), timeout=self._timeout_s
                )
            return list(reply.engines)

        async def engines_of(stub: LifecycleServiceAsyncStub) -> list[common_pb2.Engine]:
            try:
                reply = await stub.ListEngines(
                    lifecycle_pb2.ListEnginesRequest(), timeout=self._timeout_s
                )
            except grpc.RpcError:
                return []
            return list(reply.engines)

        lists = await asyncio.gather(*(engines_of(stub) for _, stub in targets))
        return [e for engines in lists for e in engines]


class AdminGate:
    """The admin key check: what opens /v1/management (and /metrics)."""

    def __init__(self, admin_api_key: str | None) -> None:
        self._key = admin_api_key.encode() if admin_api_key else None

    def matches(self, headers: Mapping[str, str]) -> bool:
        """True when the request carries the admin key (compared in constant time)."""
        token = bearer_token(headers.get("authorization"))
        if self._key is None or token is None:
            return False
        return hmac.compare_digest(token.encode(), self._key)

    def check(self, headers: Mapping[str, str]) -> None:
        """Raise unless the request carries the admin key: 403 when none is configured,
        401 otherwise (a tenant's key included, so a 401 never confirms a tenant key)."""
        if self._key is None:
            raise PermissionDeniedError(
                "/v1/management is closed: no admin key is configured. Set "
                "SAGE_ADMIN_API_KEY for the edge, or start the stack with `sage llm serve`, "
                "which writes one to $SAGE_HOME/llm/admin.key (mode 0600) for the CLI and "
                "client to use",
                code="admin_key_not_configured",
            )
        if not self.matches(headers):
            raise AuthenticationError(
                "a valid admin key is required for /v1/management "
                "(Authorization: Bearer <admin key>); tenant API keys do not open it"
            )


def _query(request: Request) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(request.query.decode("latin-1")).items()}


def add_management_routes(
    app: App, upstreams: Callable[[], Any], admin: AdminGate, timeout_s: float
) -> None:
    """Register every /v1/management route on `app`, each behind `admin`."""
    node_lifecycles = NodeLifecycles(upstreams, timeout_s)

    def guarded(handler: Handler) -> Handler:
        async def check(request: Request) -> Any:
            admin.check(request.headers)
            return await handler(request)

        return check

    def route(method: str, path: str) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            app.add(method, path, guarded(handler))
            return handler

        return register

    @route("GET", f"{PREFIX}/engines")
    async def list_engines(request: Request) -> Response:
        engines = [engine_reply(e) for e in await node_lifecycles.list_engines()]
        return reply(EngineList(engines=engines, count=len(engines)))

    @route("POST", f"{PREFIX}/engines")
    async def start_engine(request: Request) -> Response:
        body = decode(await request.body(), StartEngineRequest)
        start = start_request(body)
        lifecycle, node = await node_lifecycles.place(start, body.node or "")
        if body.dry_run:  # where it would go, nothing started
            preview = node_reply(node) if node is not None else None
            return reply(PlacementPreview(dry_run=True, node=preview))
        with rpc_errors_as_sage():
            started = await lifecycle.StartEngine(start, timeout=start.startup_timeout_s + 60)
        return reply(engine_reply(started.engine), 202 if start.no_wait else 201)

    @route("POST", f"{PREFIX}/engines/register")
    async def register_engine(request: Request) -> Response:
        body = decode(await request.body(), RegisterEngineRequest)
        start = start_request(body)
        start.base_url = body.base_url
        start.backend = "external"
        lifecycle, _ = await node_lifecycles.place(start, body.node or "")
        with rpc_errors_as_sage():
            registered = await lifecycle.StartEngine(start)
        return reply(engine_reply(registered.engine), 201)

    @route("POST", f"{PREFIX}/engines/prune")
    async def prune(request: Request) -> Response:
        body = await request.body()
        if body:  # no fields; `{}` is what the CLI sends, whitespace alone is broken JSON
            decode(body, PruneRequest)
        pruned: list[str] = []
        for _, lifecycle in await node_lifecycles.targets():
            with rpc_errors_as_sage():
                done = await lifecycle.PruneEngines(lifecycle_pb2.PruneEnginesRequest())
            pruned.extend(done.engine_ids)
        return reply(PruneResult(pruned=pruned, count=len(pruned)))

    @route("GET", f"{PREFIX}/engines/{{engine_id}}")
    @route("GET", f"{PREFIX}/engines/{{engine_id}}/logs")
    @route("GET", f"{PREFIX}/engines/{{engine_id}}/adapters")
    async def get_engine(request: Request) -> Response:
        engine_id, tail = _engine_path(request.path)
        if tail == "logs":
            lines = _query(request).get("lines", "100")
            if not (lines.isascii() and lines.isdigit()) or not 0 < int(lines) <= 100_000:
                raise InvalidRequestError("lines must be an integer in 1..100000", param="lines")
            owner = await node_lifecycles.owner(engine_id)
            with rpc_errors_as_sage():
                logs = await owner.TailLogs(
                    lifecycle_pb2.TailLogsRequest(engine_id=engine_id, lines=int(lines))
                )
            return reply(EngineLogs(engine_id=engine_id, lines=list(logs.lines)))
        if tail and tail != "adapters":
            raise NotFoundError(f"no route for GET {request.path}", code="unknown_url")
        owner = await node_lifecycles.owner(engine_id)
        with rpc_errors_as_sage():
            found = await owner.GetEngine(lifecycle_pb2.GetEngineRequest(engine_id=engine_id))
        engine = engine_reply(found.engine)
        if tail == "adapters":
            return reply(AdapterList(engine_id=engine_id, adapters=engine.adapters))
        return reply(engine)

    @route("POST", f"{PREFIX}/engines/{{engine_id}}/adapters")
    async def load_adapter(request: Request) -> Response:
        engine_id, tail = _engine_path(request.path)
        if tail != "adapters":
            raise NotFoundError(f"no route for POST {request.path}", code="unknown_url")
        adapter = decode(await request.body(), Adapter)
        load = lifecycle_pb2.LoadAdapterRequest(
            engine_id=engine_id,
            adapter=common_pb2.LoraAdapter(name=adapter.name, path=adapter.path),
        )
        owner = await node_lifecycles.owner(engine_id)
        with rpc_errors_as_sage():
            loaded = await owner.LoadAdapter(load, timeout=ADAPTER_TIMEOUT_S)
        return reply(engine_reply(loaded.engine), 201)

    @route("DELETE", f"{PREFIX}/engines/{{engine_id}}")
    @route("DELETE", f"{PREFIX}/engines/{{engine_id}}/adapters/{{name}}")
    async def stop_engine(request: Request) -> Response:
        engine_id, tail = _engine_path(request.path)
        if tail.startswith("adapters/"):
            name = tail.removeprefix("adapters/")  # ASGI paths arrive percent-decoded
            if not name:
                raise InvalidRequestError("adapter name is empty", param="name")
            owner = await node_lifecycles.owner(engine_id)
            with rpc_errors_as_sage():
                unloaded = await owner.UnloadAdapter(
                    lifecycle_pb2.UnloadAdapterRequest(engine_id=engine_id, name=name),
                    timeout=ADAPTER_TIMEOUT_S,
                )
            return reply(engine_reply(unloaded.engine))
        if tail:
            raise NotFoundError(f"no route for DELETE {request.path}", code="unknown_url")
        drain = _query(request).get("drain", "false").lower() in ("1", "true", "yes")
        owner = await node_lifecycles.owner(engine_id)
        with rpc_errors_as_sage():
            stopped = await owner.StopEngine(
                lifecycle_pb2.StopEngineRequest(engine_id=engine_id, drain=drain),
                timeout=120,
            )
        return reply(engine_reply(stopped.engine))

    @route("GET", f"{PREFIX}/nodes")
    async def nodes(request: Request) -> Response:
        with rpc_errors_as_sage():
            table = await upstreams().scheduler.ListNodes(spb.ListNodesRequest())
        listed = [node_reply(n) for n in table.nodes]
        return reply(NodeList(nodes=listed, count=len(listed)))

    @route("GET", f"{PREFIX}/backends")
    async def backends(request: Request) -> Response:
        with rpc_errors_as_sage():
            listed = await upstreams().lifecycle.ListBackends(lifecycle_pb2.ListBackendsRequest())
        return reply(
            BackendList(
                backends=[
                    Backend(
                        name=b.name,
                        kinds=[kind_name(k, "unspecified") for k in b.kinds],
                        uses_gpu=b.uses_gpu,
                        available=b.available,
                        reason=b.reason,
                    )
                    for b in listed.backends
                ]
            )
        )

    async def gpu_status() -> GpuStatus:
        with rpc_errors_as_sage():
            read = await upstreams().gpu.ListGpus(gpu_manager_pb2.ListGpusRequest())
        return GpuStatus(
            nvml_available=read.nvml_available,
            nvml_error=read.nvml_error or None,
            driver_version=read.driver_version or None,
            gpus=[
                Gpu(
                    index=g.index,
                    uuid=g.uuid,
                    name=g.name,
                    memory_total_bytes=g.memory_total_bytes,
                    memory_used_bytes=g.memory_used_bytes,
                    memory_free_bytes=g.memory_free_bytes,
                    memory_reserved_bytes=g.memory_reserved_bytes,
                    memory_available_bytes=g.memory_available_bytes,
                    utilization_percent=g.utilization_percent,
                    temperature_celsius=g.temperature_celsius,
                    engine_ids=list(g.engine_ids),
                )
                for g in read.gpus
            ],
        )

    @route("GET", f"{PREFIX}/gpu")
    async def gpu(request: Request) -> Response:
        return reply(await gpu_status())

    @route("GET", f"{PREFIX}/status")
    async def status(request: Request) -> Response:
        up = upstreams()
        with rpc_errors_as_sage():
            sched = await up.scheduler.GetStatus(spb.GetStatusRequest())
            routed = await up.scheduler.ListEngines(spb.ListEnginesRequest())
        try:
            metrics = await up.scheduler.GetMetrics(spb.GetMetricsRequest(), timeout=2.0)
            model_stats = [
                ModelStats(
                    model=m.model,
                    p50_ms=m.p50_ms,
                    p95_ms=m.p95_ms,
                    p99_ms=m.p99_ms,
                    ttft_p50_ms=m.ttft_p50_ms,
                    tpot_p50_ms=m.tpot_p50_ms,
                    rps=m.rps,
                    slo_attainment=m.slo_attainment,
                    queued=m.queued,
                )
                for m in metrics.models
            ]
        except grpc.RpcError:
            model_stats = []
        ready = [e for e in routed.engines if state_name(e.state) == "ready"]
        try:
            engines = [engine_reply(e) for e in await node_lifecycles.list_engines()]
        except (grpc.RpcError, SageError):
            engines = [engine_reply(e) for e in routed.engines]  # lifecycle down: routing view
        nodes = [node_reply(n) for n in await node_lifecycles.nodes()]
        try:
            gpus: GpuStatus | None = await gpu_status()
        except Exception:
            gpus = None
        return reply(
            ManagementStatus(
                llm_available=any(kind_name(e.kind, "") == "llm" for e in ready),
                embedding_available=any(kind_name(e.kind, "") == "embedding" for e in ready),
                control_plane=ControlPlane(
                    policy=sched.policy,
                    pending_requests=sched.queued,
                    running_requests=sched.in_flight,
                    instances=sched.engines_total,
                    instances_ready=sched.engines_ready,
                    metrics=ControlPlaneMetrics(
                        requests_total=sched.requests_total,
                        requests_failed=sched.requests_failed,
                        models=model_stats,
                    ),
                    scheduler_leader=sched.leader_address,
                    scheduler_replicas=[
                        SchedulerReplica(address=r.addr, state="down" if r.down else "up")
                        for r in up.generation.replicas
                    ],
                ),
                gpu=gpus,
                nodes=nodes,
                engines=engines,
                count=len(engines),
            )
        )
