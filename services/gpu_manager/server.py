"""gRPC transport of the GPU manager: decode, call GPUResourceManager in a thread, encode."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from sage.common.config.settings import SageSettings
from sage.common.etcd import cluster_keys, etcd_client, node_id_of
from sage.common.grpc import Registration, SageServer, create_server
from sage.rpc.gpu_manager.v1 import gpu_manager_pb2 as pb
from sage.rpc.gpu_manager.v1 import gpu_manager_pb2_grpc as pb_grpc

from .estimate import ModelMemoryEstimator
from .etcd_store import EtcdReservationStore
from .ledger import MiB, ReservationLedger, SafetyMargin
from .nvml import NvmlReader
from .resource_manager import GPUResourceManager, GpuStatus
from .sim_nvml import parse_simulation
from .store import LedgerStore, Reservation, ReservationStore

log = logging.getLogger("sage.gpu_manager")

RESERVATIONS_FILE = "gpu_reservations.json"


def _reservation_pb(r: Reservation) -> pb.Reservation:
    return pb.Reservation(
        engine_id=r.engine_id,
        gpu_index=r.gpu_index,
        memory_bytes=r.memory_bytes,
        owner_pid=r.owner_pid,
        created_at=r.created_at,
        gpu_uuid=r.gpu_uuid,
    )


def _gpu_pb(s: GpuStatus) -> pb.Gpu:
    g = s.gpu
    return pb.Gpu(
        index=g.index,
        uuid=g.uuid,
        name=g.name,
        memory_total_bytes=g.memory_total_bytes,
        memory_used_bytes=g.memory_used_bytes,
        memory_free_bytes=g.memory_free_bytes,
        memory_reserved_bytes=s.reserved_bytes,
        memory_available_bytes=s.available_bytes,
        utilization_percent=g.utilization_percent,
        temperature_celsius=g.temperature_celsius,
        processes=[
            pb.GpuProcess(pid=p.pid, used_memory_bytes=p.used_memory_bytes) for p in g.processes
        ],
        engine_ids=list(s.engine_ids),
    )


class GpuManagerServicer(pb_grpc.GpuManagerServiceServicer):
    """GpuManagerService over GPUResourceManager; its calls block, so each runs in a thread."""

    def __init__(self, manager: GPUResourceManager) -> None:
        self.manager = manager

    async def ListGpus(self, request: pb.ListGpusRequest, context: Any) -> pb.ListGpusResponse:
        status = await asyncio.to_thread(self.manager.status)
        return pb.ListGpusResponse(
            gpus=[_gpu_pb(s) for s in status.gpus],
            nvml_available=status.nvml_available,
            nvml_error=status.nvml_error,
            driver_version=status.driver_version,
            safety_margin_bytes=status.safety_margin_bytes,
        )

    async def Reserve(self, request: pb.ReserveRequest, context: Any) -> pb.ReserveResponse:
        made = await asyncio.to_thread(
            self.manager.reserve,
            request.engine_id,
            gpu_indexes=list(request.gpu_indexes),
            gpu_count=request.gpu_count,
            memory_per_gpu_bytes=request.memory_per_gpu_bytes,
            memory_fraction=request.memory_fraction,
            owner_pid=request.owner_pid,
        )
        log.info(
            "reserved",
            extra={
                "engine_id": request.engine_id,
                "gpus": [r.gpu_index for r in made],
                "bytes_per_gpu": made[0].memory_bytes,
            },
        )
        return pb.ReserveResponse(reservations=[_reservation_pb(r) for r in made])

    async def Release(self, request: pb.ReleaseRequest, context: Any) -> pb.ReleaseResponse:
        released = await asyncio.to_thread(self.manager.release, request.engine_id)
        log.info("released", extra={"engine_id": request.engine_id})
        return pb.ReleaseResponse(reservations=[_reservation_pb(r) for r in released])

    async def SetOwner(self, request: pb.SetOwnerRequest, context: Any) -> pb.SetOwnerResponse:
        owned = await asyncio.to_thread(
            self.manager.set_owner,
            request.engine_id,
            request.owner_pid,
            request.owner_started_at,
        )
        log.info(
            "reservation owner set",
            extra={"engine_id": request.engine_id, "owner_pid": request.owner_pid},
        )
        return pb.SetOwnerResponse(reservations=[_reservation_pb(r) for r in owned])

    async def ListReservations(
        self, request: pb.ListReservationsRequest, context: Any
    ) -> pb.ListReservationsResponse:
        held = await asyncio.to_thread(self.manager.reservations)
        return pb.ListReservationsResponse(reservations=[_reservation_pb(r) for r in held])

    async def Reconcile(self, request: pb.ReconcileRequest, context: Any) -> pb.ReconcileResponse:
        released = await asyncio.to_thread(self.manager.reconcile)
        return pb.ReconcileResponse(released=[_reservation_pb(r) for r in released])


class GpuManagerServer(SageServer):
    """A SageServer that also reconciles the ledger on a timer while it serves (once right at
    start, so reservations of owners that died while the service was down go at once)."""

    def __init__(self, base: SageServer, manager: GPUResourceManager, interval_s: float) -> None:
        super().__init__(base.server, base.health, base.service_names)
        self.manager = manager
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Serve, then start the reconcile timer."""
        await super().start()
        if self.interval_s > 0:
            self._task = asyncio.create_task(self._reconcile_forever(), name="gpu-reconcile")

    async def stop(self, grace: float = 5.0) -> None:
        """Stop the timer, then the server."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await super().stop(grace)

    async def _reconcile_forever(self) -> None:
        while True:
            try:
                released = await asyncio.to_thread(self.manager.reconcile)
                for r in released:
                    log.info(
                        "released reservation of a gone owner",
                        extra={"engine_id": r.engine_id, "owner_pid": r.owner_pid},
                    )
            except Exception:  # keep the timer alive; the next round may succeed
                log.exception("reconcile failed")
            await asyncio.sleep(self.interval_s)


def build_store(settings: SageSettings) -> LedgerStore:
    """Where reservations outlive the process: etcd under gpu/<node id>/reservations/ in etcd
    mode (SAGE_ETCD_ENDPOINTS; no JSON file then), else the JSON file in the state dir."""
    if settings.cluster.etcd_mode:
        prefix = cluster_keys(settings).gpu_reservations(node_id_of(settings))
        return EtcdReservationStore(etcd_client(settings), prefix)
    return ReservationStore(settings.llm_state_dir / RESERVATIONS_FILE)


def build_manager(settings: SageSettings, nvml: Any | None = None) -> GPUResourceManager:
    """GPUResourceManager wired from settings: NVML (unless disabled; `nvml` replaces the
    pynvml module, e.g. with a SimNvml), the persisted ledger (loaded now: in etcd mode an
    unreachable etcd fails the start rather than serving an empty ledger)."""
    options = settings.gpu_manager
    store = build_store(settings)
    try:
        ledger = ReservationLedger(
            margin=SafetyMargin(options.reserve_margin_fraction, options.reserve_margin_mib * MiB),
            store=store,
        )
    except BaseException:
        store.close()
        raise
    if nvml is None and options.simulate:
        nvml = parse_simulation(options.simulate)
    return GPUResourceManager(
        # Simulated GPUs never touch NVML, so SAGE_DISABLE_NVML does not switch them off.
        NvmlReader(nvml, disabled=options.disable_nvml and not options.simulate),
        ledger,
        ModelMemoryEstimator(options.hub_cache_dirs()),
    )


def build_server(
    settings: SageSettings,
    addr: str | None = None,
    *,
    nvml: Any | None = None,
) -> tuple[GpuManagerServer, int]:
    """The GPU manager server wired from settings (its `gpu_manager` section)."""
    manager = build_manager(settings, nvml)
    try:
        base, port = create_server(
            addr or f"{settings.host}:{settings.gpu_manager.port}",
            [
                Registration(
                    pb.DESCRIPTOR.services_by_name["GpuManagerService"].full_name,
                    pb_grpc.add_GpuManagerServiceServicer_to_server,
                    GpuManagerServicer(manager),
                )
            ],
        )
    except BaseException:
        manager.close()  # the store's thread and etcd channels, NVML
        raise
    server = GpuManagerServer(base, manager, settings.gpu_manager.reconcile_interval_s)

    async def _close() -> None:
        await asyncio.to_thread(manager.close)

    server.on_stop(_close)
    log.info(
        "ledger loaded",
        extra={"store": manager.ledger.store_where, "reservations": len(manager.reservations())},
    )
    return server, port
