"""The node table: duplicates, lying agents, timeouts draining engines, placement."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from sage.common.exceptions import (
    ConflictError,
    InsufficientResourcesError,
    InvalidRequestError,
    ModelNotFoundError,
    NotFoundError,
    ServiceUnavailableError,
)
from sage.services.scheduler.nodes import (
    NodeGpu,
    NodeReport,
    NodeState,
    NodeTable,
    StaticNode,
    parse_nodes,
)
from sage.services.scheduler.registry import EngineKind, EngineRecord, EngineRegistry, EngineState

GiB = 1 << 30


class Clock:
    """A hand-moved monotonic clock."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def gpus(*free_gib: float, total_gib: float = 80) -> tuple[NodeGpu, ...]:
    return tuple(
        NodeGpu(i, int(total_gib * GiB), int(free * GiB)) for i, free in enumerate(free_gib)
    )


def report(node_id: str, addr: str, *gpu: NodeGpu, engines: tuple[str, ...] = ()) -> NodeReport:
    return NodeReport(node_id, addr, "h", len(gpu), tuple(gpu), engines, agent_instance=addr)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry() -> EngineRegistry:
    return EngineRegistry()


@pytest.fixture
def table(registry: EngineRegistry, clock: Clock) -> NodeTable:
    return NodeTable(registry, timeout_s=6.0, clock=clock)


def engine(engine_id: str, node_id: str) -> EngineRecord:
    return EngineRecord(
        engine_id, "m", EngineKind.LLM, f"http://10.0.0.1/{engine_id}", node_id=node_id
    )


def test_duplicate_node_id_from_another_agent_is_refused_while_the_first_lives(
    table: NodeTable, clock: Clock
) -> None:
    table.report(report("a", "10.0.0.1:1", *gpus(10)), register=True)
    with pytest.raises(
        ConflictError, match=re.escape("'a' is already held by the live agent at 10.0.0.1:1")
    ):
        table.report(report("a", "10.0.0.2:1", *gpus(10)), register=True)
    clock.now += 7  # the first went silent: the id is free again
    node = table.report(report("a", "10.0.0.2:1", *gpus(10)), register=True)
    assert node.report.lifecycle_addr == "10.0.0.2:1"


def test_a_restarted_agent_at_the_same_address_may_register_again(table: NodeTable) -> None:
    table.report(report("a", "10.0.0.1:1"), register=True)
    again = NodeReport("a", "10.0.0.1:1", agent_instance="new")
    assert table.report(again, register=True).state is NodeState.READY


def test_heartbeat_from_an_unknown_node_asks_it_to_register(table: NodeTable) -> None:
    with pytest.raises(NotFoundError, match="not registered"):
        table.report(report("ghost", "10.0.0.9:1"), register=False)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (NodeReport("a", "h:1", gpu_count=2, gpus=gpus(10)), "claims 2 GPUs but describes 1"),
        (NodeReport("a", "h:1", gpu_count=1, gpus=gpus(90)), "more free memory"),
        (NodeReport("a", "h:1", gpu_count=1, gpus=gpus(-1)), "negative memory"),
        (NodeReport("a", "h:1", gpu_count=-1), "negative GPU count"),
    ],
)
def test_a_node_lying_about_gpus_is_unhealthy_and_gets_no_engines(
    table: NodeTable, bad: NodeReport, reason: str
) -> None:
    node = table.report(bad, register=True)
    assert node.state is NodeState.UNHEALTHY
    assert reason in node.reason
    with pytest.raises(InsufficientResourcesError, match="no ready node"):
        table.place(gpus_needed=1, use_gpu=False)


def test_missing_identity_is_a_clear_error(table: NodeTable) -> None:
    with pytest.raises(InvalidRequestError, match="node_id"):
        table.report(NodeReport("", "h:1"), register=True)
    with pytest.raises(InvalidRequestError, match="lifecycle_addr"):
        table.report(NodeReport("a", "nohostport"), register=True)


def test_silent_node_has_its_engines_drained_and_restored_when_it_returns(
    table: NodeTable, registry: EngineRegistry, clock: Clock
) -> None:
    table.report(report("a", "h:1", engines=("e1",)), register=True)
    table.report(report("b", "h:2", engines=("e2",)), register=True)
    registry.register(engine("e1", "a"))
    registry.register(engine("e2", "b"))
    clock.now += 4
    table.report(report("a", "h:1", engines=("e1",)), register=False)
    clock.now += 3  # b silent for 7 s > 6 s
    assert table.sweep() == ["b"]
    assert [e.engine_id for e in registry.ready_for("m")] == ["e1"]
    assert next(n for n in table.nodes() if n.node_id == "b").state is NodeState.DOWN
    # lifecycle's periodic re-registration must not sneak the engine back while b is down
    registry.register(table.admit_engine(engine("e2", "b")))
    assert [e.engine_id for e in registry.ready_for("m")] == ["e1"]
    table.report(report("b", "h:2", engines=("e2",)), register=False)
    assert sorted(e.engine_id for e in registry.ready_for("m")) == ["e1", "e2"]


def test_engines_a_node_no_longer_runs_stay_drained(
    table: NodeTable, registry: EngineRegistry, clock: Clock
) -> None:
    table.report(report("b", "h:2", engines=("e2",)), register=True)
    registry.register(engine("e2", "b"))
    clock.now += 10
    table.sweep()
    table.report(report("b", "h:2", engines=()), register=True)
    assert registry.engines()[0].state is EngineState.DRAINING


def test_gpu_placement_prefers_free_memory_but_keeps_tensor_parallel_on_one_host(
    table: NodeTable,
) -> None:
    table.report(report("two-small", "h:1", *gpus(40, 40)), register=True)
    table.report(report("one-big", "h:2", *gpus(70)), register=True)
    assert table.place(gpus_needed=1, use_gpu=True).node_id == "one-big"
    assert table.place(gpus_needed=2, use_gpu=True).node_id == "two-small"
    with pytest.raises(InsufficientResourcesError, match="3 GPUs are needed on one host"):
        table.place(gpus_needed=3, use_gpu=True)


def test_cpu_placement_picks_the_least_loaded_node(
    table: NodeTable, registry: EngineRegistry
) -> None:
    table.report(report("a", "h:1"), register=True)
    table.report(report("b", "h:2"), register=True)
    registry.register(engine("e1", "a"))
    assert table.place(gpus_needed=1, use_gpu=False).node_id == "b"


def test_the_scheduler_decides_gpu_or_cpu_from_the_backends_the_nodes_publish(
    table: NodeTable, registry: EngineRegistry
) -> None:
    cpu_only = ("sim",)
    table.report(replace(report("gpu", "h:1", *gpus(70)), cpu_backends=cpu_only), register=True)
    table.report(replace(report("cpu", "h:2"), cpu_backends=cpu_only), register=True)
    registry.register(engine("e1", "cpu"))  # the CPU node is the busier one
    # a GPU backend goes to the GPUs; one a node publishes as CPU-only, to the idler node
    assert table.place(gpus_needed=1, use_gpu=None, backend="vllm").node_id == "gpu"
    registry.register(engine("e2", "gpu"))
    registry.register(engine("e3", "gpu"))
    assert table.place(gpus_needed=1, use_gpu=None, backend=" Sim").node_id == "cpu"
    assert table.place(gpus_needed=1, use_gpu=None, backend="vllm").node_id == "gpu"
    # no node has 2 GPUs: the automatic choice falls back to CPU, an explicit one does not
    assert table.place(gpus_needed=2, use_gpu=None, backend="").node_id == "cpu"
    with pytest.raises(InsufficientResourcesError, match="2 GPUs are needed on one host"):
        table.place(gpus_needed=2, use_gpu=True, backend="")


def test_explicit_node_must_exist_and_be_ready(table: NodeTable, clock: Clock) -> None:
    table.report(report("a", "h:1", *gpus(10)), register=True)
    with pytest.raises(NotFoundError, match="no node named 'nope' \\(known nodes: a\\)"):
        table.place(gpus_needed=1, use_gpu=False, node_id="nope")
    with pytest.raises(InsufficientResourcesError, match="has 1 GPUs, 2 needed"):
        table.place(gpus_needed=2, use_gpu=True, node_id="a")
    clock.now += 10
    table.sweep()
    with pytest.raises(InsufficientResourcesError, match="'a' is down: no heartbeat"):
        table.place(gpus_needed=1, use_gpu=False, node_id="a")


def test_static_nodes_start_down_until_polled(registry: EngineRegistry, clock: Clock) -> None:
    table = NodeTable(registry, timeout_s=6, static=[StaticNode("s", "h:9")], clock=clock)
    assert table.nodes()[0].state is NodeState.DOWN
    table.report(report("s", "h:9"), register=True, static=True)
    assert table.nodes()[0].state is NodeState.READY and table.nodes()[0].static
    table.mark_unreachable("s", "lifecycle at h:9 unreachable")
    assert table.nodes()[0].reason == "lifecycle at h:9 unreachable"


def test_parse_nodes_names_the_bad_entry() -> None:
    assert parse_nodes(" a=10.0.0.1:50052, b=host:1 ") == [
        StaticNode("a", "10.0.0.1:50052"),
        StaticNode("b", "host:1"),
    ]
    with pytest.raises(ValueError, match="'b=nohost' is not id=host:port"):
        parse_nodes("a=h:1,b=nohost")
    with pytest.raises(ValueError, match="names node 'a' twice"):
        parse_nodes("a=h:1,a=h:2")


def test_an_engine_drained_on_purpose_while_its_node_was_down_stays_drained(
    table: NodeTable, registry: EngineRegistry, clock: Clock
) -> None:
    table.report(report("a", "h:1", engines=("e1",)), register=True)
    registry.register(engine("e1", "a"))
    clock.now += 7
    assert table.sweep() == ["a"]
    # lifecycle drains e1 to stop it while the node is down
    draining = EngineRecord(
        "e1", "m", EngineKind.LLM, "http://10.0.0.1/e1", node_id="a", state=EngineState.DRAINING
    )
    registry.register(table.admit_engine(draining))
    table.report(report("a", "h:1", engines=("e1",)), register=False)  # node back
    assert [e.state for e in registry.engines()] == [EngineState.DRAINING]


def test_a_node_back_in_etcd_restores_the_engines_whose_keys_came_first(
    table: NodeTable, registry: EngineRegistry
) -> None:
    # etcd mode: nodes/ and engines/ are separate watches, so after a partition heals an
    # engine's key may arrive before its node's, and the node report may not list it yet.
    table.report(report("a", "h:1"), register=True, from_store=True)
    table.mark_unreachable("a", "its etcd key was deleted")
    registry.register(table.admit_engine(engine("e1", "a")))
    assert registry.engines()[0].state is EngineState.DRAINING
    # Whoever writes nodes/a is the agent: a new address is no conflict, and e1 routes.
    table.report(report("a", "h:9"), register=True, from_store=True)
    assert [e.engine_id for e in registry.ready_for("m")] == ["e1"]
    assert table.nodes()[0].report.lifecycle_addr == "h:9"


def test_an_unsynced_registry_says_so_instead_of_model_not_found(
    registry: EngineRegistry,
) -> None:
    registry.unsynced = "this replica has not synced engines from etcd yet"
    with pytest.raises(ServiceUnavailableError, match="not synced"):
        registry.ready_for("m")
    registry.unsynced = ""
    with pytest.raises(ModelNotFoundError):
        registry.ready_for("m")


def _recording(table: NodeTable) -> list[tuple[list[str], str]]:
    """What `table` tells its on_lost: (engine ids, reason) per call."""
    told: list[tuple[list[str], str]] = []
    table.on_lost = lambda engines, why: told.append((sorted(e.engine_id for e in engines), why))
    return told


def test_a_lost_node_passes_every_engine_of_it_to_on_lost_once(
    table: NodeTable, registry: EngineRegistry, clock: Clock
) -> None:
    """Silent past the timeout or unreachable: each of its engines (one an operator had
    drained too: its requests are on that host) is told once, so its calls are cut; a
    node already down tells nothing more."""
    told = _recording(table)
    table.report(report("a", "h:1", engines=("e1", "e2")), register=True)
    table.report(report("b", "h:2", engines=("e3",)), register=True)
    for engine_id, node_id in (("e1", "a"), ("e2", "a"), ("e3", "b")):
        registry.register(engine(engine_id, node_id))
    registry.set_state("e2", EngineState.DRAINING)
    clock.now += 4
    table.report(report("b", "h:2", engines=("e3",)), register=False)
    clock.now += 3
    assert table.sweep() == ["a"]
    assert told == [(["e1", "e2"], "node a was lost: no heartbeat for 7.0s (timeout 6s)")]
    table.sweep()
    table.mark_unreachable("a", "lifecycle at h:1 unreachable")
    assert len(told) == 1
    table.mark_unreachable("b", "lifecycle at h:2 unreachable")
    assert told[1] == (["e3"], "node b was lost: lifecycle at h:2 unreachable")


def test_engines_whose_keys_went_just_before_their_nodes_are_lost_with_it(
    table: NodeTable, registry: EngineRegistry
) -> None:
    """etcd: a lease's keys go together, but nodes/ and engines/ are separate watches, so
    an engine's delete may come first (it is deregistered then): it is still told lost
    when the node's delete follows. One whose node reported since just stopped."""
    told = _recording(table)
    table.report(report("a", "h:1"), register=True, from_store=True)
    for engine_id in ("e1", "e2"):
        registry.register(engine(engine_id, "a"))
    table.engine_vanished(registry.deregister("e1"))
    assert told == []  # nothing is cut for an engine stopped on its own
    table.mark_unreachable("a", "its etcd key was deleted")
    assert told == [(["e1", "e2"], "node a was lost: its etcd key was deleted")]

    table.report(report("a", "h:1"), register=True, from_store=True)
    registry.register(engine("e1", "a"))
    table.engine_vanished(registry.deregister("e1"))
    table.report(report("a", "h:1", engines=("e2",)), register=True, from_store=True)
    registry.deregister("e2")
    table.mark_unreachable("a", "its etcd key was deleted")
    assert len(told) == 1  # e1 stopped while a still reported; e2 went on purpose
