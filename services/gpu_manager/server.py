"""gRPC transport of the GPU manager."""

from __future__ import annotations

import asyncio
from typing import Any

from sage.common.config.settings import SageSettings
from sage.common.grpc import Registration, SageServer, create_server
from sage.rpc.gpu_manager.v1 import gpu_manager_pb2 as pb
from sage.rpc.gpu_manager.v1 import gpu_manager_pb2_grpc as pb_grpc

from .ledger import Reservation, ReservationLedger
from .nvml import NvmlReader


def _reservation_pb(r: Reservation) -> pb.Reservation:
    return pb.Reservation(
        engine_id=r.engine_id,
        gpu_index=r.gpu_index,
        memory_bytes=r.memory_bytes,
        owner_pid=r.owner_pid,
        created_at=r.created_at,
    )


class GpuManagerServicer(pb_grpc.GpuManagerServiceServicer):
    """GpuManagerService over NVML readings and the ledger."""

    def __init__(self, reader: NvmlReader, ledger: ReservationLedger) -> None:
        self.reader = reader
        self.ledger = ledger

    async def ListGpus(self, request: pb.ListGpusRequest, context: Any) -> pb.ListGpusResponse:
        snap = await asyncio.to_thread(self.reader.read)
        return pb.ListGpusResponse(
            gpus=[
                pb.Gpu(
                    index=g.index,
                    uuid=g.uuid,
                    name=g.name,
                    memory_total_bytes=g.memory_total_bytes,
                    memory_used_bytes=g.memory_used_bytes,
                    memory_free_bytes=g.memory_free_bytes,
                    memory_reserved_bytes=self.ledger.reserved_on(g.index),
                    utilization_percent=g.utilization_percent,
                    temperature_celsius=g.temperature_celsius,
                    processes=[
                        pb.GpuProcess(pid=p.pid, used_memory_bytes=p.used_memory_bytes)
                        for p in g.processes
                    ],
                )
                for g in snap.gpus
            ],
            nvml_available=snap.nvml_available,
            nvml_error=snap.nvml_error,
            driver_version=snap.driver_version,
        )

    async def Reserve(self, request: pb.ReserveRequest, context: Any) -> pb.ReserveResponse:
        snap = await asyncio.to_thread(self.reader.read)
        made = self.ledger.reserve(
            request.engine_id,
            snap.gpus,
            gpu_indexes=list(request.gpu_indexes),
            gpu_count=request.gpu_count,
            memory_per_gpu_bytes=request.memory_per_gpu_bytes,
            memory_fraction=request.memory_fraction,
            owner_pid=request.owner_pid,
        )
        return pb.ReserveResponse(reservations=[_reservation_pb(r) for r in made])

    async def Release(self, request: pb.ReleaseRequest, context: Any) -> pb.ReleaseResponse:
        return pb.ReleaseResponse(
            reservations=[_reservation_pb(r) for r in self.ledger.release(request.engine_id)]
        )

    async def ListReservations(
        self, request: pb.ListReservationsRequest, context: Any
    ) -> pb.ListReservationsResponse:
        return pb.ListReservationsResponse(
            reservations=[_reservation_pb(r) for r in self.ledger.all()]
        )


def build_server(settings: SageSettings, addr: str | None = None) -> tuple[SageServer, int]:
    """The GPU manager server wired from settings."""
    reader = NvmlReader(disabled=settings.disable_nvml)
    server, port = create_server(
        addr or f"{settings.host}:{settings.gpu_manager_port}",
        [
            Registration(
                pb.DESCRIPTOR.services_by_name["GpuManagerService"].full_name,
                pb_grpc.add_GpuManagerServiceServicer_to_server,
                GpuManagerServicer(reader, ReservationLedger()),
            )
        ],
    )

    async def _close() -> None:
        await asyncio.to_thread(reader.close)

    server.on_stop(_close)
    return server, port
