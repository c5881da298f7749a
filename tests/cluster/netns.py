"""Hosts made of Linux network namespaces, for fault tests that need real networks.

A `Network` is a bridge in a namespace of its own with one veth per host namespace (its
`eth0`, an address in a private /24 picked so that it overlaps nothing this machine routes)
and one more veth into the root namespace, so the test process itself dials every host
directly. The bridge lives in its own namespace so the root namespace's firewall (Docker's
FORWARD DROP with br_netfilter, say) never sees the bridged traffic.

`Processes` runs programs inside a host (`ip netns exec`, which execs: the child's pid is the
program's own, so `kill9` is a real SIGKILL of it), and `link_down`/`link_up` pull and plug a
host's cable at the bridge (a partition: its packets are dropped, nothing is refused).
`Network.teardown` kills whatever still runs in the namespaces (engines that outlived a
killed parent included) and deletes them with their links, even after a failed test.
Everything waits at most a bounded time.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

IP_TIMEOUT_S = 10.0


def netns_unavailable() -> str:
    """Why network namespaces cannot be used here ("" when they can)."""
    if sys.platform != "linux":
        return "network namespaces are Linux-only"
    if os.geteuid() != 0:
        return "needs root to create network namespaces and veth links"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"sage-probe-{uuid.uuid4().hex[:6]}"
    steps = (
        ["ip", "netns", "add", probe],
        ["ip", "netns", "exec", probe, "true"],
        ["ip", "-n", probe, "link", "add", "br0", "type", "bridge"],
        ["ip", "-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1"],
    )
    try:
        for step in steps:
            try:
                done = subprocess.run(step, capture_output=True, timeout=IP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                return f"`{' '.join(step[:3])} ...` hangs here"
            if done.returncode != 0:
                return f"`{' '.join(step)}` fails here: {done.stderr.decode().strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=IP_TIMEOUT_S)
    return ""


def cluster_unavailable() -> str:
    """Why the etcd cluster tests cannot run here ("" when they can)."""
    from sage.common.etcd.testing import etcd_binary

    if etcd_binary() is None:
        return "etcd is not installed (Debian: etcd-server)"
    return netns_unavailable()


def ip(*args: str) -> str:
    """Run `ip ARGS` (bounded); its stdout. A failure raises with ip's own message."""
    done = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _routed_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the root namespace has an address in or a route to."""
    nets: list[ipaddress.IPv4Network] = []
    for line in ip("-4", "route", "show", "table", "all").splitlines():
        word = line.split()[0] if line.split() else ""
        if word in ("broadcast", "local", "unreachable", "blackhole", "prohibit"):
            word = line.split()[1]
        if word == "default":
            continue
        with contextlib.suppress(ValueError):
            nets.append(ipaddress.IPv4Network(word, strict=False))
    for line in ip("-4", "-o", "addr").splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.append(ipaddress.IPv4Interface(parts[parts.index("inet") + 1]).network)
    return nets


def pick_subnet() -> str:
    """A private 10.x.y.0/24 (as "10.x.y") that nothing here routes yet; random, so that two
    runs on one machine (or a leftover of a crashed run) do not collide."""
    used = _routed_networks()
    for _ in range(200):
        candidate = ipaddress.IPv4Network(
            f"10.{random.randint(160, 250)}.{random.randint(1, 254)}.0/24"
        )
        if not any(candidate.overlaps(net) for net in used):
            return str(candidate.network_address).rsplit(".", 1)[0]
    raise RuntimeError("no free private 10.x.y.0/24 found for the test network")


@dataclass
class Host:
    """One namespace on the bridge."""

    name: str
    ns: str
    addr: str
    cable: str  # the bridge-side end of its veth (in the bridge namespace)


class Network:
    """The bridge, its host namespaces and the root namespace's own link to it."""

    def __init__(self, tag: str | None = None) -> None:
        self.tag = tag or uuid.uuid4().hex[:6]
        self.subnet = pick_subnet()
        self.bridge_ns = f"sage-{self.tag}-br"
        self.root_link = f"sg{self.tag}r"  # <= 15 characters, as Linux wants
        self.root_addr = f"{self.subnet}.254"
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []

    def create(self) -> None:
        """The bridge namespace and the root namespace's link to it."""
        self._add_ns(self.bridge_ns)
        ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        inner = f"sg{self.tag}rb"
        ip("link", "add", self.root_link, "type", "veth", "peer", "name", inner)
        ip("link", "set", inner, "netns", self.bridge_ns)
        ip("-n", self.bridge_ns, "link", "set", inner, "master", "br0")
        ip("-n", self.bridge_ns, "link", "set", inner, "up")
        ip("addr", "add", f"{self.root_addr}/24", "dev", self.root_link)
        ip("link", "set", self.root_link, "up")

    def _add_ns(self, ns: str) -> None:
        ip("netns", "add", ns)
        self._namespaces.append(ns)
        ip("-n", ns, "link", "set", "lo", "up")

    def add_host(self, name: str, octet: int) -> Host:
        """A namespace with `eth0` at SUBNET.octet on the bridge."""
        ns = f"sage-{self.tag}-{name}"
        self._add_ns(ns)
        index = len(self.hosts)
        cable, inner = f"sg{self.tag}{index:02d}b", f"sg{self.tag}{index:02d}h"
        ip("link", "add", cable, "type", "veth", "peer", "name", inner)
        ip("link", "set", cable, "netns", self.bridge_ns)
        ip("link", "set", inner, "netns", ns)
        ip("-n", self.bridge_ns, "link", "set", cable, "master", "br0")
        ip("-n", self.bridge_ns, "link", "set", cable, "up")
        ip("-n", ns, "link", "set", inner, "name", "eth0")
        addr = f"{self.subnet}.{octet}"
        ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        host = self.hosts[name] = Host(name, ns, addr, cable)
        return host

    def link_down(self, name: str) -> None:
        """Pull `name`'s cable at the bridge: nothing reaches it, nothing leaves it."""
        ip("-n", self.bridge_ns, "link", "set", self.hosts[name].cable, "down")

    def link_up(self, name: str) -> None:
        """Plug it back."""
        ip("-n", self.bridge_ns, "link", "set", self.hosts[name].cable, "up")

    def pids(self, ns: str) -> list[int]:
        """Processes running inside a namespace."""
        done = subprocess.run(
            ["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=IP_TIMEOUT_S
        )
        return [int(p) for p in done.stdout.split()]

    def teardown(self) -> None:
        """SIGKILL everything left in our namespaces, then delete them and the root link.
        Never raises: it runs after failed tests too."""
        for ns in self._namespaces:
            with contextlib.suppress(Exception):
                for pid in self.pids(ns):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        for ns in reversed(self._namespaces):
            with contextlib.suppress(Exception):
                deadline = time.monotonic() + 5
                while self.pids(ns) and time.monotonic() < deadline:
                    time.sleep(0.05)
            with contextlib.suppress(Exception):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        with contextlib.suppress(Exception):
            subprocess.run(["ip", "link", "del", self.root_link], capture_output=True, timeout=10)
        self._namespaces.clear()


@dataclass
class Proc:
    """One program running inside a host."""

    name: str
    host: Host
    argv: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    @property
    def alive(self) -> bool:
        """Started and not exited."""
        return self.popen is not None and self.popen.poll() is None

    @property
    def pid(self) -> int:
        """Its process id (the program's own: `ip netns exec` execs it)."""
        assert self.popen is not None
        return self.popen.pid


@dataclass
class Processes:
    """Programs run in hosts, by name; each logs to WORKDIR/<name>.log (appended across
    restarts)."""

    workdir: Path
    procs: dict[str, Proc] = field(default_factory=dict)

    def add(
        self, host: Host, name: str, argv: Sequence[str], env: Mapping[str, str], cwd: Path
    ) -> Proc:
        """Define (not start) a program; `start(name)` runs it."""
        proc = Proc(name, host, list(argv), dict(env), self.workdir / f"{name}.log")
        cwd.mkdir(parents=True, exist_ok=True)
        proc.env.setdefault("PWD", str(cwd))
        self.procs[name] = proc
        return proc

    def start(self, name: str) -> Proc:
        """Run it (again) inside its host."""
        proc = self.procs[name]
        if proc.alive:
            return proc
        with open(proc.log, "ab") as log:
            proc.popen = subprocess.Popen(
                ["ip", "netns", "exec", proc.host.ns, *proc.argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=proc.env,
                cwd=proc.env["PWD"],
                start_new_session=True,
            )
        return proc

    def kill9(self, name: str) -> None:
        """SIGKILL it and reap it."""
        proc = self.procs[name]
        if proc.popen is not None and proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGKILL)
            proc.popen.wait(10)

    def stop(self, name: str, timeout_s: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after `timeout_s`."""
        proc = self.procs[name]
        if proc.popen is None or proc.popen.poll() is not None:
            return
        proc.popen.terminate()
        try:
            proc.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill9(name)

    def tail(self, name: str, lines: int = 20) -> str:
        """The end of its log."""
        path = self.procs[name].log
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def tails(self, lines: int = 15) -> str:
        """The end of every log, for assertion messages."""
        return "\n".join(f"--- {n}\n{self.tail(n, lines)}" for n in self.procs)

    def kill_all(self) -> None:
        """SIGKILL every program still running (teardown)."""
        for name in self.procs:
            with contextlib.suppress(Exception):
                self.kill9(name)
