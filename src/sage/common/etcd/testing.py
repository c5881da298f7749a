"""Real etcd members as child processes, for tests and benchmarks (Debian: etcd-server).

Each member gets its own data folder and ports; `kill(i)` is a real SIGKILL and `start(i)`
brings the member back with its data, as an operator restarting a crashed member would.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sage.common.utils.processes import free_port


def etcd_binary() -> str | None:
    """The etcd server program, or None when it is not installed."""
    return shutil.which("etcd")


@dataclass
class Member:
    """One member's identity and addresses."""

    name: str
    host: str
    client_port: int
    peer_port: int
    data_dir: Path
    netns: str = ""  # run inside this network namespace (ip netns exec)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        """Where clients dial it."""
        return f"http://{self.host}:{self.client_port}"

    @property
    def endpoint(self) -> str:
        """host:port, as SAGE_ETCD_ENDPOINTS lists it."""
        return f"{self.host}:{self.client_port}"


class EtcdMembers:
    """An etcd cluster of len(hosts) members (one per host address; all loopback by
    default, or addresses inside network namespaces given as `netns`)."""

    def __init__(
        self,
        root: Path,
        *,
        hosts: Sequence[str] = ("127.0.0.1",),
        netns: Sequence[str] = (),
        token: str = "sage-test",
    ) -> None:
        binary = etcd_binary()
        if binary is None:
            raise RuntimeError("etcd is not installed (Debian: apt-get install etcd-server)")
        self.binary = binary
        self.token = token
        self.members = [
            Member(
                name=f"m{i}",
                host=host,
                client_port=free_port(host) if not netns else 2379,
                peer_port=free_port(host) if not netns else 2380,
                data_dir=root / f"m{i}",
                netns=netns[i] if netns else "",
            )
            for i, host in enumerate(hosts)
        ]

    @property
    def endpoints(self) -> str:
        """Comma-separated host:port of every member (SAGE_ETCD_ENDPOINTS)."""
        return ",".join(m.endpoint for m in self.members)

    def _argv(self, member: Member) -> list[str]:
        cluster = ",".join(f"{m.name}=http://{m.host}:{m.peer_port}" for m in self.members)
        argv = [
            self.binary,
            "--name",
            member.name,
            "--data-dir",
            str(member.data_dir),
            "--listen-client-urls",
            member.client_url,
            "--advertise-client-urls",
            member.client_url,
            "--listen-peer-urls",
            f"http://{member.host}:{member.peer_port}",
            "--initial-advertise-peer-urls",
            f"http://{member.host}:{member.peer_port}",
            "--initial-cluster",
            cluster,
            "--initial-cluster-token",
            self.token,
            "--initial-cluster-state",
            "new",
            # Tests kill and partition members: elect a new raft leader in about a second.
            "--heartbeat-interval",
            "100",
            "--election-timeout",
            "1000",
            "--log-level",
            "warn",
        ]
        if member.netns:
            argv = ["ip", "netns", "exec", member.netns, *argv]
        return argv

    def start(self, index: int | None = None) -> None:
        """Start one member (its data kept), or all of them."""
        for i, member in enumerate(self.members):
            if index is not None and i != index:
                continue
            if member.proc is not None and member.proc.poll() is None:
                continue
            member.data_dir.mkdir(parents=True, exist_ok=True)
            log = open(member.data_dir.parent / f"{member.name}.log", "ab")  # noqa: SIM115
            member.proc = subprocess.Popen(
                self._argv(member),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            log.close()

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        """Until every running member answers a linearizable read (so has a leader)."""
        import grpc

        from sage.rpc.etcd.v3 import etcd_pb2, etcd_pb2_grpc

        deadline = time.monotonic() + timeout_s
        pending = [m for m in self.members if m.proc is not None and m.proc.poll() is None]
        while pending:
            member = pending[0]
            if member.proc is not None and member.proc.poll() is not None:
                raise RuntimeError(
                    f"etcd member {member.name} exited with {member.proc.returncode}; "
                    f"log: {member.data_dir.parent / (member.name + '.log')}"
                )
            try:
                with grpc.insecure_channel(member.endpoint) as channel:
                    etcd_pb2_grpc.KVStub(channel).Range(
                        etcd_pb2.RangeRequest(key=b"/health"), timeout=1.0
                    )
                pending.pop(0)
                continue
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd member {member.name} not healthy in {timeout_s:g}s")
            time.sleep(0.1)

    def kill(self, index: int) -> None:
        """SIGKILL one member."""
        proc = self.members[index].proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)

    def stop(self) -> None:
        """Stop every member (SIGTERM, then SIGKILL)."""
        for member in self.members:
            proc = member.proc
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
        for member in self.members:
            proc = member.proc
            if proc is None:
                continue
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
