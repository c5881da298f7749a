"""Real-GPU check of the GPU manager (issue 5); run by scripts/device/gpu_manager_check.sh.

Starts `python -m sage.services.gpu_manager`, compares its ListGpus readings with
`nvidia-smi --query-gpu=... --format=csv`, puts real memory on GPU 0 from an owner process,
reserves for that owner, checks the bad-input statuses, restarts the service to show the
reservation survives, kills the owner and reconciles, and prints `sage llm gpu`.
Exits non-zero on the first failed check.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sage.rpc.gpu_manager.v1 import gpu_manager_pb2 as pb
from sage.rpc.gpu_manager.v1 import gpu_manager_pb2_grpc as pb_grpc

MiB = 1 << 20
GiB = 1 << 30
FIELDS = "index,uuid,name,memory.total,memory.used,memory.free,utilization.gpu,temperature.gpu"
# Readings taken a moment apart by two tools; memory of a static workload agrees closely.
USED_TOLERANCE_MIB = 256
LOAD_GIB = 8


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def check(ok: bool, what: str) -> None:
    print(f"  [{'ok' if ok else 'FAIL'}] {what}", flush=True)
    if not ok:
        raise SystemExit(f"check failed: {what}")


def nvidia_smi() -> list[dict[str, str]]:
    """nvidia-smi's readings, printed as CSV (the issue's command) and parsed."""
    cmd = ["nvidia-smi", f"--query-gpu={FIELDS}", "--format=csv"]
    print("$ " + " ".join(cmd))
    raw = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    print(raw.rstrip())
    rows = subprocess.run(
        [*cmd[:-1], "--format=csv,noheader,nounits"], check=True, capture_output=True, text=True
    ).stdout
    keys = FIELDS.split(",")
    return [
        dict(zip(keys, (c.strip() for c in line.split(",")), strict=True))
        for line in rows.splitlines()
        if line.strip()
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_service(port: int, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "sage.services.gpu_manager", "--host", "127.0.0.1"]
    print(f"$ {' '.join(cmd)} --port {port}   (SAGE_HOME={os.environ['SAGE_HOME']})")
    proc = subprocess.Popen(
        [*cmd, "--port", str(port)], stdout=log.open("ab"), stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 60
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"service exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    print(f"  serving (pid {proc.pid})")
                    return proc
            except grpc.RpcError:
                time.sleep(0.2)
    raise SystemExit("service did not become healthy")


def stop_service(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(30)
    check(code == 0, f"service stopped cleanly on SIGTERM (exit {code})")


def compare(service: Any, smi: list[dict[str, str]], label: str) -> None:
    """Side by side, then: same GPUs, equal totals, used/free within tolerance."""
    banner(f"service vs nvidia-smi ({label})")
    print(
        f"  {'idx':>3} {'source':<8} {'total MiB':>10} {'used MiB':>9} {'free MiB':>9} "
        f"{'util%':>5} {'temp':>4}  name / uuid"
    )
    for g, s in zip(service.gpus, smi, strict=False):
        print(
            f"  {g.index:>3} {'service':<8} {g.memory_total_bytes // MiB:>10} "
            f"{g.memory_used_bytes // MiB:>9} {g.memory_free_bytes // MiB:>9} "
            f"{g.utilization_percent:>5} {g.temperature_celsius:>4}  {g.name} {g.uuid}"
        )
        print(
            f"  {s['index']:>3} {'smi':<8} {s['memory.total']:>10} {s['memory.used']:>9} "
            f"{s['memory.free']:>9} {s['utilization.gpu']:>5} {s['temperature.gpu']:>4}  "
            f"{s['name']} {s['uuid']}"
        )
    check(len(service.gpus) == len(smi), f"{len(service.gpus)} GPU(s) on both sides")
    for g, s in zip(service.gpus, smi, strict=True):
        check(g.uuid == s["uuid"] and g.name == s["name"], f"GPU {g.index}: same uuid and name")
        check(
            g.memory_total_bytes // MiB == int(s["memory.total"]),
            f"GPU {g.index}: total {g.memory_total_bytes // MiB} MiB == {s['memory.total']} MiB",
        )
        used_diff = abs(g.memory_used_bytes // MiB - int(s["memory.used"]))
        free_diff = abs(g.memory_free_bytes // MiB - int(s["memory.free"]))
        check(
            used_diff <= USED_TOLERANCE_MIB and free_diff <= USED_TOLERANCE_MIB,
            f"GPU {g.index}: used differs by {used_diff} MiB, free by {free_diff} MiB "
            f"(tolerance {USED_TOLERANCE_MIB})",
        )


def load_gpu() -> subprocess.Popen[str] | None:
    """A process holding LOAD_GIB on GPU 0 through PyTorch (cudaMalloc); None without torch."""
    code = (
        "import sys, time, torch\n"
        f"x = torch.empty({LOAD_GIB} * 2**30, dtype=torch.uint8, device='cuda:0')\n"
        "torch.cuda.synchronize(); print('allocated', flush=True); time.sleep(900)\n"
    )
    try:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    except OSError:
        return None
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "allocated":
        proc.kill()
        print("  (no torch/CUDA here: skipping the load step)")
        return None
    return proc


def expect_error(call: Any, request: Any, code: grpc.StatusCode, what: str) -> None:
    try:
        call(request, timeout=10)
    except grpc.RpcError as err:
        check(err.code() == code, f"{what}: {err.code().name}: {err.details()}")
        return
    check(False, f"{what}: expected {code.name}, call succeeded")


def reservations(stub: Any) -> list[tuple[str, int, int, int]]:
    listed = stub.ListReservations(pb.ListReservationsRequest(), timeout=10).reservations
    return [(r.engine_id, r.gpu_index, r.memory_bytes, r.owner_pid) for r in listed]


def main() -> int:
    home = Path(os.environ["SAGE_HOME"])
    log = home / "gpu_manager.log"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    addr = f"127.0.0.1:{port}"

    banner("start the service")
    service = start_service(port, log)
    owner: subprocess.Popen[str] | None = None
    try:
        with grpc.insecure_channel(addr) as channel:
            stub = pb_grpc.GpuManagerServiceStub(channel)
            gpus = stub.ListGpus(pb.ListGpusRequest(), timeout=10)
            print(
                f"  nvml_available={gpus.nvml_available} driver={gpus.driver_version} "
                f"nvml_error={gpus.nvml_error!r} margin={gpus.safety_margin_bytes // MiB} MiB"
            )
            check(gpus.nvml_available and len(gpus.gpus) > 0, "NVML available, GPUs listed")
            compare(gpus, nvidia_smi(), "idle")

            banner(f"an owner process allocates {LOAD_GIB} GiB on GPU 0")
            owner = load_gpu()
            if owner is not None:
                time.sleep(1)
                loaded = stub.ListGpus(pb.ListGpusRequest(), timeout=10)
                compare(loaded, nvidia_smi(), f"{LOAD_GIB} GiB held by pid {owner.pid}")
                grew = loaded.gpus[0].memory_used_bytes - gpus.gpus[0].memory_used_bytes
                check(grew >= LOAD_GIB * GiB, f"GPU 0 used grew by {grew / GiB:.2f} GiB")
                procs = [(p.pid, p.used_memory_bytes // MiB) for p in loaded.gpus[0].processes]
                print(f"  processes on GPU 0 (pid, MiB): {procs}")

            banner("reserve and release")
            owner_pid = owner.pid if owner is not None else os.getpid()
            made = stub.Reserve(
                pb.ReserveRequest(
                    engine_id="check-engine",
                    gpu_indexes=[0],
                    memory_per_gpu_bytes=16 * GiB,
                    owner_pid=owner_pid,
                ),
                timeout=10,
            )
            made_rows = [
                (r.engine_id, r.gpu_index, r.memory_bytes // MiB) for r in made.reservations
            ]
            print(f"  reserved (engine, GPU, MiB): {made_rows}")
            g0 = stub.ListGpus(pb.ListGpusRequest(), timeout=10).gpus[0]
            print(
                f"  GPU 0: free {g0.memory_free_bytes // MiB} MiB, reserved "
                f"{g0.memory_reserved_bytes // MiB} MiB, available "
                f"{g0.memory_available_bytes // MiB} MiB, engines {list(g0.engine_ids)}"
            )
            check(g0.memory_reserved_bytes == 16 * GiB, "GPU 0 shows the 16 GiB reservation")
            # The owner's memory already shows in NVML free; only the rest of the 16 GiB
            # is outstanding (usage is attributed because the owner's pid is on the GPU).
            in_use = sum(p.used_memory_bytes for p in g0.processes if p.pid == owner_pid)
            outstanding = max(0, 16 * GiB - in_use)
            expected = g0.memory_free_bytes - gpus.safety_margin_bytes - outstanding
            check(
                abs(g0.memory_available_bytes - expected) < MiB,
                f"available {g0.memory_available_bytes // MiB} MiB = free - margin - "
                f"(16 GiB reserved - {in_use // MiB} MiB the owner holds)",
            )
            tp = stub.Reserve(
                pb.ReserveRequest(engine_id="tmp", gpu_count=1, memory_fraction=0.1), timeout=10
            )
            print(
                f"  reserved tmp: {[(r.gpu_index, r.memory_bytes // MiB) for r in tp.reservations]}"
            )
            rel = stub.Release(pb.ReleaseRequest(engine_id="tmp"), timeout=10)
            check(len(rel.reservations) == 1, "released tmp")

            banner("bad input")
            expect_error(
                stub.Reserve,
                pb.ReserveRequest(engine_id="huge", memory_per_gpu_bytes=10_000 * GiB),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "more than exists",
            )
            expect_error(
                stub.Reserve,
                pb.ReserveRequest(engine_id="zero"),
                grpc.StatusCode.INVALID_ARGUMENT,
                "zero memory",
            )
            expect_error(
                stub.Reserve,
                pb.ReserveRequest(engine_id="neg", memory_per_gpu_bytes=-1),
                grpc.StatusCode.INVALID_ARGUMENT,
                "negative memory",
            )
            expect_error(
                stub.Reserve,
                pb.ReserveRequest(engine_id="idx", gpu_indexes=[99], memory_per_gpu_bytes=GiB),
                grpc.StatusCode.NOT_FOUND,
                "unknown GPU index",
            )
            expect_error(
                stub.Reserve,
                pb.ReserveRequest(engine_id="check-engine", memory_per_gpu_bytes=GiB),
                grpc.StatusCode.ALREADY_EXISTS,
                "duplicate engine id",
            )
            expect_error(
                stub.Release,
                pb.ReleaseRequest(engine_id="never-reserved"),
                grpc.StatusCode.NOT_FOUND,
                "release of an unknown id",
            )
            held = reservations(stub)
            check(held == [("check-engine", 0, 16 * GiB, owner_pid)], f"ledger unchanged: {held}")

        banner("restart the service")
        stop_service(service)
        saved = home / "llm" / "gpu_reservations.json"
        print(f"  {saved}:\n" + saved.read_text())
        service = start_service(port, log)
        with grpc.insecure_channel(addr) as channel:
            stub = pb_grpc.GpuManagerServiceStub(channel)
            check(reservations(stub) == held, f"reservation survived the restart: {held}")

            banner("sage llm gpu")
            table = subprocess.run(
                [sys.executable, "-m", "sage.llm.cli", "llm", "gpu", "--addr", addr],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            print(table)
            check("check-engine" in table, "table lists the engine")

            if owner is not None:
                banner("the owner exits; reconcile releases its reservation")
                owner.kill()
                owner.wait()
                owner = None
                time.sleep(1)
                released = stub.Reconcile(pb.ReconcileRequest(), timeout=10).released
                print(f"  released: {[(r.engine_id, r.owner_pid) for r in released]}")
                check([r.engine_id for r in released] == ["check-engine"], "reconciled")
                check(reservations(stub) == [], "ledger empty")
                compare(stub.ListGpus(pb.ListGpusRequest(), timeout=10), nvidia_smi(), "after")
            else:
                stub.Release(pb.ReleaseRequest(engine_id="check-engine"), timeout=10)
        stop_service(service)
    finally:
        if owner is not None:
            owner.kill()
        if service.poll() is None:
            service.kill()
        print("\n--- service log (tail) ---")
        print("\n".join(log.read_text(errors="replace").splitlines()[-25:]))
    print("\nALL CHECKS PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
