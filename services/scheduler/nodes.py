"""The node table: which GPU hosts (node agents) exist, whether they are alive, where new
engines go, and draining the engines of nodes that stop reporting.

Agents report themselves (register + heartbeat) or are polled when listed statically; both
paths end in `NodeTable.report`. No grpc here: the servicer converts messages to `NodeReport`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from sage.common.config.values import parse_nodes as parse_node_addresses
from sage.common.exceptions import (
    ConflictError,
    InsufficientResourcesError,
    InvalidRequestError,
    NotFoundError,
)

from .registry import EngineRecord, EngineRegistry, EngineState


class NodeState(StrEnum):
    """READY nodes get new engines and traffic; UNHEALTHY ones keep traffic but get no new
    engines; DOWN ones have their engines drained."""

    READY = "ready"
    UNHEALTHY = "unhealthy"
    DOWN = "down"


@dataclass(frozen=True)
class NodeGpu:
    """One GPU as the agent reports it."""

    index: int
    memory_total_bytes: int
    memory_free_bytes: int
    name: str = ""


@dataclass(frozen=True)
class NodeReport:
    """What an agent says about its node."""

    node_id: str
    lifecycle_addr: str
    advertise_host: str = ""
    gpu_count: int = 0
    gpus: tuple[NodeGpu, ...] = ()
    engine_ids: tuple[str, ...] = ()
    agent_instance: str = ""
    cpu_backends: tuple[str, ...] = ()  # backends that never use a GPU (lifecycle's facts)


@dataclass(frozen=True)
class Node:
    """One row of the table."""

    report: NodeReport
    state: NodeState
    reason: str = ""
    last_seen: float = 0.0
    static: bool = False
    leased: bool = False  # from etcd: alive while the agent's lease (its key) is

    @property
    def node_id(self) -> str:
        """The node's id."""
        return self.report.node_id


@dataclass(frozen=True)
class StaticNode:
    """One entry of SAGE_NODES: an agent the scheduler polls."""

    node_id: str
    lifecycle_addr: str


def parse_nodes(text: str) -> list[StaticNode]:
    """`id=host:port,id=host:port` → entries (sage.common.config.values parses it); a
    malformed or repeated entry names itself."""
    return [StaticNode(n.id, n.address) for n in parse_node_addresses(text)]


def report_problem(report: NodeReport) -> str:
    """Why a report cannot be trusted for placement, or "" when it is consistent."""
    if report.gpu_count < 0:
        return f"reports a negative GPU count ({report.gpu_count})"
    if report.gpu_count != len(report.gpus):
        return f"claims {report.gpu_count} GPUs but describes {len(report.gpus)}"
    if len({g.index for g in report.gpus}) != len(report.gpus):
        return "reports the same GPU index twice"
    for gpu in report.gpus:
        if gpu.memory_total_bytes < 0 or gpu.memory_free_bytes < 0:
            return f"GPU {gpu.index} reports negative memory"
        if gpu.memory_free_bytes > gpu.memory_total_bytes:
            return (
                f"GPU {gpu.index} reports more free memory ({gpu.memory_free_bytes} B) than "
                f"total ({gpu.memory_total_bytes} B)"
            )
    return ""


def _check_identity(report: NodeReport) -> None:
    if not report.node_id:
        raise InvalidRequestError("node_id must not be empty", param="report.node_id")
    if not report.lifecycle_addr or ":" not in report.lifecycle_addr:
        raise InvalidRequestError(
            f"lifecycle_addr must be host:port, got {report.lifecycle_addr!r}",
            param="report.lifecycle_addr",
        )


@dataclass
class _Entry:
    node: Node
    drained: set[str] = field(default_factory=set)  # engine ids we drained, to restore
    # Engines that left routing without a drain notice since the node's last report (etcd:
    # their keys went while READY): if the node's own key goes next (the same lease
    # expired), they were lost with it.
    vanished: dict[str, EngineRecord] = field(default_factory=dict)


# Told the engines of a node found lost (and why), for their calls under way to be cut.
OnLost = Callable[[Sequence[EngineRecord], str], object]


class NodeTable:
    """Thread-safe node table over the engine registry (whose engines it drains/restores).

    A node found lost (silent past the timeout, a failed poll, its etcd key gone) has its
    engines drained and passed to `on_lost`, so requests already sent to them are cut
    rather than left to hang on a host that may never answer. An operator's drain or an
    engine's own stop does not come through here."""

    def __init__(
        self,
        registry: EngineRegistry,
        *,
        timeout_s: float,
        static: Iterable[StaticNode] = (),
        clock: Callable[[], float] = time.monotonic,
        on_lost: OnLost | None = None,
    ) -> None:
        self.registry = registry
        self.timeout_s = timeout_s
        self.on_lost = on_lost
        self._clock = clock
        self._lock = threading.Lock()
        self._nodes: dict[str, _Entry] = {}
        for entry in static:
            report = NodeReport(entry.node_id, entry.lifecycle_addr)
            self._nodes[entry.node_id] = _Entry(
                Node(report, NodeState.DOWN, "not polled yet", last_seen=0.0, static=True)
            )

    def static_nodes(self) -> list[StaticNode]:
        """Statically configured nodes, to poll."""
        with self._lock:
            return [
                StaticNode(e.node.node_id, e.node.report.lifecycle_addr)
                for e in self._nodes.values()
                if e.node.static
            ]

    def _alive(self, node: Node, now: float) -> bool:
        return node.state is not NodeState.DOWN and now - node.last_seen < self.timeout_s

    def report(
        self,
        report: NodeReport,
        *,
        register: bool,
        static: bool = False,
        from_store: bool = False,
    ) -> Node:
        """Take an agent's report. Registering a node id that another live agent (another
        address or instance) holds is a ConflictError; a heartbeat from an unknown node is a
        NotFoundError (the agent registers again). An inconsistent report marks it UNHEALTHY.

        `from_store`: the report is etcd's nodes/<id> (one key per id, so the last writer
        is the agent, no conflict to judge), and every engine this table drained for the
        node is routable again: an engine still in the registry is one whose engines/ key
        exists, which lifecycle writes only for ready engines."""
        _check_identity(report)
        now = self._clock()
        with self._lock:
            entry = self._nodes.get(report.node_id)
            if entry is None and not register:
                raise NotFoundError(
                    f"node {report.node_id!r} is not registered", param="report.node_id"
                )
            if entry is not None and not static and not from_store:
                old = entry.node
                same_agent = old.report.lifecycle_addr == report.lifecycle_addr and (
                    not old.report.agent_instance
                    or old.report.agent_instance == report.agent_instance
                    or register
                )
                if not same_agent and self._alive(old, now):
                    raise ConflictError(
                        f"node id {report.node_id!r} is already held by the live agent at "
                        f"{old.report.lifecycle_addr}; give this agent another SAGE_NODE_ID",
                        param="report.node_id",
                    )
            problem = report_problem(report)
            node = Node(
                report,
                NodeState.UNHEALTHY if problem else NodeState.READY,
                problem,
                last_seen=now,
                static=static or (entry is not None and entry.node.static),
                leased=from_store,
            )
            if entry is None:
                entry = self._nodes[report.node_id] = _Entry(node)
            else:
                entry.node = node
                entry.vanished.clear()  # the node is alive: those engines just stopped
            self._restore(entry, set(entry.drained if from_store else report.engine_ids))
            return node

    def mark_unreachable(self, node_id: str, reason: str) -> None:
        """A polled node did not answer (or its etcd key went away): it is down, its
        engines drained, and their calls under way cut (when it was not down already)."""
        with self._lock:
            entry = self._nodes.get(node_id)
            if entry is None:
                return
            was_down = entry.node.state is NodeState.DOWN
            entry.node = replace(entry.node, state=NodeState.DOWN, reason=reason)
            self._drain(entry)
            lost = [] if was_down else self._lost(entry)
        self._tell_lost(lost, f"node {node_id} was lost: {reason}")

    def engine_vanished(self, record: EngineRecord) -> None:
        """`record` left routing without a drain notice (etcd: its key was deleted while
        READY). Nothing is cut now (a plain stop looks the same); if its node is found lost
        before it reports again, the engine counts as lost with it (a lease's keys go
        together, in no set order across the watches)."""
        with self._lock:
            entry = self._nodes.get(record.node_id) if record.node_id else None
            if entry is not None and entry.node.state is not NodeState.DOWN:
                entry.vanished[record.engine_id] = record

    def sweep(self) -> list[str]:
        """Mark nodes silent for longer than the timeout DOWN and drain their engines;
        returns the ids newly marked down."""
        now = self._clock()
        gone: list[str] = []
        lost: list[tuple[list[EngineRecord], str]] = []
        with self._lock:
            for entry in self._nodes.values():
                node = entry.node
                if node.state is NodeState.DOWN or now - node.last_seen < self.timeout_s:
                    continue
                reason = (
                    f"no heartbeat for {now - node.last_seen:.1f}s (timeout {self.timeout_s:g}s)"
                )
                entry.node = replace(node, state=NodeState.DOWN, reason=reason)
                self._drain(entry)
                gone.append(node.node_id)
                lost.append((self._lost(entry), f"node {node.node_id} was lost: {reason}"))
        for engines, why in lost:
            self._tell_lost(engines, why)
        return gone

    def _drain(self, entry: _Entry) -> None:
        for record in self.registry.engines():
            if record.node_id == entry.node.node_id and record.state is EngineState.READY:
                self.registry.set_state(record.engine_id, EngineState.DRAINING)
                entry.drained.add(record.engine_id)

    def _lost(self, entry: _Entry) -> list[EngineRecord]:
        """Every engine of the node, whatever its state (an engine an operator drained
        still has requests on that host), and those that vanished just before it."""
        node_id = entry.node.node_id
        lost = {r.engine_id: r for r in self.registry.engines() if r.node_id == node_id}
        for engine_id, record in entry.vanished.items():
            lost.setdefault(engine_id, record)
        entry.vanished.clear()
        return list(lost.values())

    def _tell_lost(self, engines: list[EngineRecord], reason: str) -> None:
        # Outside the lock: the callback cuts connections, which may run its own code.
        if engines and self.on_lost is not None:
            self.on_lost(engines, reason)

    def _restore(self, entry: _Entry, alive: set[str]) -> None:
        # Only engines still in the DRAINING this table set: one drained or stopped on
        # purpose since then keeps its state.
        back = entry.drained & alive
        if back:  # most reports restore nothing: no pass over every engine for them
            states = {r.engine_id: r.state for r in self.registry.engines()}
            for engine_id in sorted(back):
                if states.get(engine_id) is EngineState.DRAINING:
                    self.registry.set_state(engine_id, EngineState.READY)
        entry.drained -= alive

    def admit_engine(self, record: EngineRecord) -> EngineRecord:
        """An engine registering from a node that is down stays out of routing until the
        node reports again."""
        with self._lock:
            entry = self._nodes.get(record.node_id) if record.node_id else None
            if entry is None or entry.node.state is not NodeState.DOWN:
                return record
            if record.state is EngineState.READY:
                entry.drained.add(record.engine_id)
                return replace(record, state=EngineState.DRAINING)
            entry.drained.discard(record.engine_id)  # its own state now: not ours to restore
            return record

    def nodes(self) -> list[Node]:
        """Every node, by id."""
        with self._lock:
            return sorted((e.node for e in self._nodes.values()), key=lambda n: n.node_id)

    def seconds_since_seen(self, node: Node) -> float:
        """How long ago the node last reported (inf when never); a node known from etcd
        whose key exists is alive now (its agent re-puts the key only on change)."""
        if node.leased and node.state is not NodeState.DOWN:
            return 0.0
        return self._clock() - node.last_seen if node.last_seen else float("inf")

    def engine_count(self, node_id: str) -> int:
        """Engines of `node_id` in the routing table."""
        return sum(1 for r in self.registry.engines() if r.node_id == node_id)

    def place(
        self, *, gpus_needed: int, use_gpu: bool | None, node_id: str = "", backend: str = ""
    ) -> Node:
        """The node a new engine should start on; `use_gpu` None decides it here.

        Deciding: a backend some node reports as CPU-only runs on CPU; any other (the
        automatic choice "" included) on GPUs, or on CPU when no node has the GPUs.
        """
        if use_gpu is not None:
            return self._place(gpus_needed, use_gpu, node_id)
        if self.cpu_only(backend):
            return self._place(gpus_needed, False, node_id)
        try:
            return self._place(gpus_needed, True, node_id)
        except InsufficientResourcesError:
            return self._place(gpus_needed, False, node_id)

    def cpu_only(self, backend: str) -> bool:
        """True when a node's lifecycle published `backend` as one that never uses a GPU."""
        name = backend.strip().lower()
        return bool(name) and any(name in n.report.cpu_backends for n in self.nodes())

    def _place(self, gpus_needed: int, use_gpu: bool, node_id: str) -> Node:
        """The node for an engine on GPUs (`use_gpu`) or on CPU.

        GPU engines: among READY nodes with at least `gpus_needed` GPUs, the one whose
        `gpus_needed` best GPUs have the most free memory (the tightest of them decides, as
        every tensor-parallel shard needs its share; total free memory breaks ties). CPU
        engines: the READY node with the fewest engines. An explicit unknown node is a
        NotFoundError naming it; a node that is not READY is refused with its reason.
        """
        gpus_needed = max(1, gpus_needed)
        nodes = self.nodes()
        if node_id:
            chosen = next((n for n in nodes if n.node_id == node_id), None)
            if chosen is None:
                known = ", ".join(n.node_id for n in nodes) or "none"
                raise NotFoundError(
                    f"no node named {node_id!r} (known nodes: {known})",
                    param="node",
                    code="node_not_found",
                )
            if chosen.state is not NodeState.READY:
                raise InsufficientResourcesError(
                    f"node {node_id!r} is {chosen.state.value}: {chosen.reason}", param="node"
                )
            if use_gpu and chosen.report.gpu_count < gpus_needed:
                raise InsufficientResourcesError(
                    f"node {node_id!r} has {chosen.report.gpu_count} GPUs, "
                    f"{gpus_needed} needed on one host",
                    param="tensor_parallel_size",
                )
            return chosen
        ready = [n for n in nodes if n.state is NodeState.READY]
        if not ready:
            raise InsufficientResourcesError(
                f"no ready node to place the engine on ({len(nodes)} known)", param="node"
            )
        if not use_gpu:
            return min(ready, key=lambda n: (self.engine_count(n.node_id), n.node_id))
        fitting = [n for n in ready if n.report.gpu_count >= gpus_needed]
        if not fitting:
            most = max(n.report.gpu_count for n in ready)
            raise InsufficientResourcesError(
                f"{gpus_needed} GPUs are needed on one host, the largest ready node has {most}",
                param="tensor_parallel_size",
            )

        def score(node: Node) -> tuple[int, int, str]:
            best = sorted((g.memory_free_bytes for g in node.report.gpus), reverse=True)
            best = best[:gpus_needed]
            return (best[-1], sum(best), node.node_id)

        return max(fitting, key=score)
