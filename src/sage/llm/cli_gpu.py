"""`sage llm gpu`: GPUs as the GPU manager sees them (readings + reservations), table or JSON."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

import typer

from sage.common.config.settings import SageSettings, load_settings
from sage.common.exceptions import ServiceUnavailableError
from sage.common.grpc import create_channel, rpc_errors_as_sage
from sage.rpc.gpu_manager.v1 import gpu_manager_pb2 as pb
from sage.rpc.gpu_manager.v1 import gpu_manager_pb2_grpc as pb_grpc

from .cli_common import cli_errors

GiB = 1 << 30


async def fetch_gpu_report(addr: str, rpc_timeout_s: float) -> dict[str, Any]:
    """ListGpus + ListReservations from the GPU manager at `addr`, as plain JSON-able data."""
    channel = create_channel(addr, default_timeout=rpc_timeout_s)
    try:
        stub = pb_grpc.GpuManagerServiceStub(channel)
        with rpc_errors_as_sage():
            gpus = await stub.ListGpus(pb.ListGpusRequest())
            held = await stub.ListReservations(pb.ListReservationsRequest())
    finally:
        await channel.close(None)
    return {
        "gpu_manager": addr,
        "nvml_available": gpus.nvml_available,
        "nvml_error": gpus.nvml_error,
        "driver_version": gpus.driver_version,
        "safety_margin_bytes": gpus.safety_margin_bytes,
        "gpus": [
            {
                "index": g.index,
                "uuid": g.uuid,
                "name": g.name,
                "memory_total_bytes": g.memory_total_bytes,
                "memory_used_bytes": g.memory_used_bytes,
                "memory_free_bytes": g.memory_free_bytes,
                "memory_reserved_bytes": g.memory_reserved_bytes,
                "memory_available_bytes": g.memory_available_bytes,
                "utilization_percent": g.utilization_percent,
                "temperature_celsius": g.temperature_celsius,
                "processes": [
                    {"pid": p.pid, "used_memory_bytes": p.used_memory_bytes} for p in g.processes
                ],
                "engines": list(g.engine_ids),
            }
            for g in gpus.gpus
        ],
        "reservations": [
            {
                "engine_id": r.engine_id,
                "gpu_index": r.gpu_index,
                "gpu_uuid": r.gpu_uuid,
                "memory_bytes": r.memory_bytes,
                "owner_pid": r.owner_pid,
                "created_at": r.created_at,
            }
            for r in held.reservations
        ],
    }


def _gib(value: int) -> str:
    return f"{value / GiB:.1f}"


def format_gpu_table(report: dict[str, Any]) -> str:
    """The human view: one row per GPU, memory in GiB, then the reservations."""
    lines: list[str] = []
    if not report["nvml_available"]:
        lines.append(f"no GPUs: NVML unavailable ({report['nvml_error'] or 'unknown reason'})")
    elif not report["gpus"]:
        lines.append("no GPUs on this host")
    else:
        header = ("GPU", "NAME", "USED", "RESERVED", "FREE", "AVAILABLE", "TOTAL", "UTIL", "TEMP")
        rows = [
            (
                str(g["index"]),
                g["name"],
                _gib(g["memory_used_bytes"]),
                _gib(g["memory_reserved_bytes"]),
                _gib(g["memory_free_bytes"]),
                _gib(g["memory_available_bytes"]),
                _gib(g["memory_total_bytes"]),
                f"{g['utilization_percent']}%",
                f"{g['temperature_celsius']}C",
            )
            for g in report["gpus"]
        ]
        widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

        def line(cells: tuple[str, ...], engines: str) -> str:
            padded = (c.ljust(w) for c, w in zip(cells, widths, strict=True))
            return "  ".join((*padded, engines))

        lines.append(line(header, "ENGINES"))
        for row, g in zip(rows, report["gpus"], strict=True):
            lines.append(line(row, ", ".join(g["engines"]) or "-"))
        lines.append(
            "memory in GiB; AVAILABLE = free - safety margin "
            f"({_gib(report['safety_margin_bytes'])}) - reserved but not yet in use"
        )
        if report["driver_version"]:
            lines.append(f"driver {report['driver_version']}")
    if report["reservations"]:
        lines.append("")
        lines.append("reservations:")
        for r in report["reservations"]:
            owner = f"pid {r['owner_pid']}" if r["owner_pid"] else "no owner"
            lines.append(
                f"  {r['engine_id']:<28} GPU {r['gpu_index']}  {_gib(r['memory_bytes'])} GiB  "
                f"{owner}"
            )
    return "\n".join(lines)


@cli_errors
def cmd_gpu(
    json_out: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of a table.")
    ] = False,
    addr: Annotated[
        str | None,
        typer.Option(
            "--addr", help="GPU manager host:port (default: SAGE_GPU_MANAGER_ADDR, or the stack's)."
        ),
    ] = None,
) -> int:
    """Show GPUs, memory reservations and the engines on them."""
    settings: SageSettings = load_settings()
    target = addr or settings.address("gpu_manager")
    try:
        report = asyncio.run(fetch_gpu_report(target, settings.rpc_timeout_s))
    except ServiceUnavailableError as exc:
        raise ServiceUnavailableError(
            f"cannot reach the GPU manager at {target} (is `sage llm serve` running?): "
            f"{exc.message}"
        ) from None
    if json_out:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print(format_gpu_table(report))
    return 0


def register_gpu(app: typer.Typer) -> None:
    """Add `gpu` to the `llm` group."""
    app.command("gpu", epilog="Example: sage llm gpu --json")(cmd_gpu)
