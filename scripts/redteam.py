#!/usr/bin/env python3
"""Replay issue 16's attacks against a running stack and check each outcome is the secure one.

Bounded: every loop has a count and a deadline; traffic goes to loopback only. With
`--start` it runs its own `sage llm serve` (sim chat engine, sim embeddings, tenant keys
from a file) on free ports under a temporary SAGE_HOME and stops it at the end; otherwise
point it at a stack with `--base-url` and `--home` (where admin.key / internal.token are).

Exit status: 0 when every check holds, 1 when any fails (each printed as one line).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import httpx

TENANT_A = "sk-redteam-tenant-a-0123456789"
TENANT_B = "sk-redteam-tenant-b-0123456789"
ATTACKER_HOST = "127.0.0.2"  # the stack allows external engines here, as an operator might


@dataclass
class Result:
    """One replayed attack and whether the stack answered securely."""

    finding: str
    attack: str
    ok: bool
    seen: str


@dataclass
class Target:
    """The stack under test: its gateway, state dir and internal ports."""

    base: str  # http://127.0.0.1:PORT (no /v1)
    home: Path
    grpc_ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def admin_key(self) -> str:
        return (self.home / "llm" / "admin.key").read_text().strip()

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"}


class Run:
    """Collects results; one line per check."""

    def __init__(self) -> None:
        self.results: list[Result] = []

    def check(self, finding: str, attack: str, ok: bool, seen: str) -> None:
        self.results.append(Result(finding, attack, ok, seen))
        mark = "ok  " if ok else "FAIL"
        print(f"{mark} [{finding}] {attack} -> {seen}", flush=True)

    def safely(self, finding: str, attack: str, probe: Callable[[], tuple[bool, str]]) -> None:
        try:
            ok, seen = probe()
        except Exception as exc:  # a crashed probe is a failed check, not a crashed run
            ok, seen = False, f"probe raised {type(exc).__name__}: {exc}"
        self.check(finding, attack, ok, seen)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _listener(
    body: bytes, host: str = "127.0.0.1", serves: str = ""
) -> Iterator[tuple[str, list[str]]]:
    """An 'internal service' (or, with `serves`, an attacker's engine whose /v1/models lists
    that model) on a loopback address, recording what reaches it."""
    seen: list[str] = []
    models = json.dumps({"object": "list", "data": [{"id": serves, "object": "model"}]})

    class Handler(BaseHTTPRequestHandler):
        def _reply(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            seen.append(self.rfile.read(length).decode(errors="replace") if length else self.path)
            reply = models.encode() if serves and self.path == "/v1/models" else body
            self.send_response(200)
            self.send_header("content-type", "text/plain")
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        do_GET = do_POST = _reply

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((host, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def _error(resp: httpx.Response) -> dict[str, Any]:
    try:
        error = resp.json().get("error")
    except ValueError:
        return {}
    return error if isinstance(error, dict) else {}


def refused(resp: httpx.Response, status: int, param: str | None = None) -> bool:
    """The exact refusal: this status, an OpenAI error body, naming `param` when given."""
    error = _error(resp)
    return (
        resp.status_code == status
        and bool(error.get("message"))
        and (param is None or error.get("param") == param)
    )


def start_stack(work: Path) -> Target:
    """`sage llm serve` on free ports with tenant keys (tenant-b limited to 5 rpm)."""
    home = work / "sage"
    keys = work / "keys.yaml"
    keys.write_text(
        f"- key: {TENANT_A}\n  tenant: tenant-a\n"
        f"- key: {TENANT_B}\n  tenant: tenant-b\n  rate_limit_rpm: 5\n"
    )
    ports = {name: _free_port() for name in ("scheduler", "lifecycle", "gpu_manager", "embedding")}
    gateway = _free_port()
    env = {
        **os.environ,
        "SAGE_HOME": str(home),
        "SAGE_SCHEDULER_PORT": str(ports["scheduler"]),
        "SAGE_LIFECYCLE_PORT": str(ports["lifecycle"]),
        "SAGE_GPU_MANAGER_PORT": str(ports["gpu_manager"]),
        "SAGE_EMBEDDING_SERVICE_PORT": str(ports["embedding"]),
        "SAGE_DISABLE_NVML": "1",
        "SAGE_API_KEYS_FILE": str(keys),
        "SAGE_SCHEDULER_MAX_QUEUE": "64",
        "SAGE_EXTERNAL_ENGINE_ALLOW": ATTACKER_HOST,
    }
    for name in ("SAGE_ADMIN_API_KEY", "SAGE_API_KEYS", "SAGE_UNIFIED_BASE_URL", "SAGE_INSECURE"):
        env.pop(name, None)
    log = open(work / "serve.log", "wb")  # noqa: SIM115 - lives as long as the stack
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sage.llm.cli",
            "llm",
            "serve",
            "--model",
            "sim",
            "--embedding-model",
            "sim-embedding",
            "--gateway-port",
            str(gateway),
            "--port",
            str(_free_port()),
            "--embedding-port",
            str(_free_port()),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    target = Target(f"http://127.0.0.1:{gateway}", home, ports, proc)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("serve exited:\n" + (work / "serve.log").read_text()[-3000:])
        with contextlib.suppress(httpx.HTTPError):
            health = httpx.get(target.base + "/health", timeout=2)
            if health.status_code == 200 and health.json().get("engines_ready", 0) >= 2:
                return target
        time.sleep(0.5)
    stop_stack(target)
    raise RuntimeError("serve did not become ready:\n" + (work / "serve.log").read_text()[-3000:])


def stop_stack(target: Target) -> None:
    """SIGINT the serve process (its clean stop), then make sure its group is gone."""
    proc = target.proc
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _status(resp: httpx.Response) -> str:
    return f"HTTP {resp.status_code} {resp.text[:120]!r}"


def management_attacks(run: Run, t: Target, client: httpx.Client, model_dir: Path) -> None:
    """Code execution, exposure and argv injection through /v1/management."""
    finding = "code execution through management"
    body = {
        "model_id": str(model_dir),
        "backend": "transformers",
        "extra_args": ["--trust-remote-code"],
        "wait": False,
    }
    for who, headers, status, param in (
        ("no key", {}, 401, None),
        ("tenant key", {"Authorization": f"Bearer {TENANT_A}"}, 401, None),
        # The folder lies under $SAGE_HOME/models (an allowed root): the flag is what stops it.
        ("admin key", t.admin(), 400, "extra_args"),
    ):
        resp = client.post("/v1/management/engines", json=body, headers=headers)
        run.check(
            finding,
            f"start engine with --trust-remote-code ({who})",
            refused(resp, status, param),
            _status(resp),
        )
    resp = client.post(
        "/v1/management/engines",
        json={"model_id": "sim", "backend": "sim", "extra_args": ["--host", "0.0.0.0"]},
        headers=t.admin(),
    )
    run.check(
        finding,
        "extra_args --host 0.0.0.0 (admin key)",
        refused(resp, 400, "extra_args"),
        _status(resp),
    )
    for method, path in (
        ("GET", "/v1/management/engines"),
        ("GET", "/v1/management/engines/x/logs"),
        ("DELETE", "/v1/management/engines/x"),
    ):
        resp = client.request(method, path)
        run.check(finding, f"{method} {path} without a key", refused(resp, 401), _status(resp))

    finding = "argv and ids"
    for model_id in ("--trust-remote-code", "-h", "../../../../etc/passwd", "evil\u202egpj.sh"):
        resp = client.post(
            "/v1/management/engines",
            json={"model_id": model_id, "backend": "sim", "wait": False},
            headers=t.admin(),
        )
        run.check(finding, f"model_id {model_id!r}", refused(resp, 400, "model_id"), _status(resp))
    resp = client.post(
        "/v1/management/engines",
        json={"model_id": "sim", "backend": "sim", "port": 22, "wait": False},
        headers=t.admin(),
    )
    run.check(finding, "engine port 22", refused(resp, 400, "port"), _status(resp))


def browser_attacks(run: Run, t: Target, client: httpx.Client) -> None:
    """CSRF (simple POST from a web page) and DNS rebinding (foreign Host)."""
    finding = "browser-borne requests"
    payload = json.dumps({"model_id": "x", "base_url": "http://example.com"})
    resp = client.post(
        "/v1/management/engines/register",
        content=payload,
        headers={**t.admin(), "content-type": "text/plain", "origin": "http://evil.example"},
    )
    run.check(finding, "text/plain + evil Origin on register", refused(resp, 403), _status(resp))
    resp = client.post(
        "/v1/chat/completions",
        content=json.dumps({"model": "sim", "messages": [{"role": "user", "content": "hi"}]}),
        headers={"Authorization": f"Bearer {TENANT_A}", "content-type": "text/plain"},
    )
    run.check(finding, "text/plain chat completion", refused(resp, 415), _status(resp))
    resp = client.get(
        "/v1/models",
        headers={"Host": "attacker.example:8889", "Authorization": f"Bearer {TENANT_A}"},
    )
    run.check(finding, "Host: attacker.example (DNS rebinding)", refused(resp, 421), _status(resp))
    resp = client.post(
        "/v1/chat/completions",
        json={"model": "sim", "messages": [{"role": "user", "content": "hi"}]},
        headers={
            "Authorization": f"Bearer {TENANT_A}",
            "sec-fetch-site": "cross-site",
            "origin": "http://evil.example",
        },
    )
    run.check(finding, "Sec-Fetch-Site: cross-site", refused(resp, 403), _status(resp))


def key_attacks(run: Run, t: Target, client: httpx.Client) -> None:
    """Management with API keys set; inference and /metrics without keys; bearer case."""
    finding = "API keys set, management open"
    resp = client.get("/v1/management/status")
    run.check(finding, "management status with no key", refused(resp, 401), _status(resp))
    resp = client.get("/v1/management/status", headers={"Authorization": f"Bearer {TENANT_A}"})
    run.check(finding, "management status with a tenant key", refused(resp, 401), _status(resp))
    resp = client.get("/v1/management/status", headers={"Authorization": f"bearer {t.admin_key}"})
    run.check(
        "logs and info leaks",
        "lowercase `bearer` admin key",
        resp.status_code == 200,
        _status(resp),
    )
    resp = client.get("/metrics")
    run.check("logs and info leaks", "/metrics without a key", refused(resp, 401), _status(resp))
    resp = client.get("/v1/models", headers={"x-request-id": "evil level=ERROR msg=forged"})
    rid = resp.headers.get("x-request-id", "")
    run.check(
        "logs and info leaks",
        "forged x-request-id",
        " " not in rid and "=" not in rid,
        f"x-request-id echoed as {rid!r}",
    )


def external_engine_attacks(run: Run, t: Target, client: httpx.Client) -> None:
    """SSRF and traffic hijack through registered external engines."""
    finding = "traffic hijack and SSRF via external engines"
    with _listener(b"INTERNAL-SECRET-PAYLOAD") as (url, seen):
        for base_url in (url, "http://169.254.169.254/latest", "http://[::1]:9/"):
            resp = client.post(
                "/v1/management/engines/register",
                json={"model_id": "probe", "base_url": base_url},
                headers=t.admin(),
            )
            run.check(
                finding, f"register {base_url}", refused(resp, 400, "base_url"), _status(resp)
            )
            run.check(
                finding,
                f"no internal body echoed for {base_url}",
                "INTERNAL-SECRET-PAYLOAD" not in resp.text,
                f"{len(resp.text)} bytes",
            )
        run.check(finding, "the internal service was never asked", not seen, f"{len(seen)} hits")
    # An allowed address whose /v1/models lists `sim`: registering it under the managed
    # model would split sim's traffic with it; one that does not serve the model is refused
    # by the probe, its body not echoed.
    with _listener(b"INTERNAL-SECRET-PAYLOAD", ATTACKER_HOST, serves="sim") as (url, seen):
        resp = client.post(
            "/v1/management/engines/register",
            json={"model_id": "other", "base_url": url},
            headers=t.admin(),
        )
        run.check(
            finding,
            "register an address that does not serve the model",
            refused(resp, 400, "model_id") and "INTERNAL-SECRET-PAYLOAD" not in resp.text,
            _status(resp),
        )
        resp = client.post(
            "/v1/management/engines/register",
            json={"model_id": "sim", "base_url": url},
            headers=t.admin(),
        )
        run.check(
            finding, "register under the managed model `sim`", refused(resp, 409), _status(resp)
        )
        for _ in range(6):
            client.post(
                "/v1/chat/completions",
                json={
                    "model": "sim",
                    "max_tokens": 2,
                    "messages": [{"role": "user", "content": "tenant secret"}],
                },
                headers={"Authorization": f"Bearer {TENANT_A}"},
            )
        leaked = [s for s in seen if "tenant secret" in s]
        run.check(
            finding,
            "tenant prompts reaching the attacker's listener",
            not leaked,
            f"{len(leaked)} of 6 prompts",
        )


def grpc_attacks(run: Run, t: Target) -> None:
    """Every internal service refuses calls without the stack's credential."""
    from sage.rpc.lifecycle.v1 import lifecycle_pb2, lifecycle_pb2_grpc
    from sage.rpc.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

    finding = "gRPC bypasses everything"
    if not t.grpc_ports:
        run.check(finding, "internal ports", False, "unknown (use --start)")
        return

    def call(port: int, invoke: Callable[[grpc.Channel], Any]) -> tuple[bool, str]:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                invoke(channel)
            except grpc.RpcError as exc:
                code = exc.code()  # type: ignore[attr-defined]
                return code == grpc.StatusCode.UNAUTHENTICATED, f"{code.name}"
        return False, "OK (accepted)"

    life = t.grpc_ports["lifecycle"]
    sched = t.grpc_ports["scheduler"]
    run.safely(
        finding,
        "lifecycle StartEngine(--host 0.0.0.0) without a token",
        lambda: call(
            life,
            lambda ch: lifecycle_pb2_grpc.LifecycleServiceStub(ch).StartEngine(
                lifecycle_pb2.StartEngineRequest(
                    model="sim", backend="sim", extra_args=["--host", "0.0.0.0"]
                ),
                timeout=10,
            ),
        ),
    )
    run.safely(
        finding,
        "scheduler RegisterEngine without a token",
        lambda: call(
            sched,
            lambda ch: scheduler_pb2_grpc.SchedulerServiceStub(ch).RegisterEngine(
                scheduler_pb2.RegisterEngineRequest(), timeout=10
            ),
        ),
    )
    run.safely(
        finding,
        "scheduler Chat as tenant-b with rate_limit_rpm 0, no token",
        lambda: call(
            sched,
            lambda ch: scheduler_pb2_grpc.SchedulerServiceStub(ch).Chat(
                scheduler_pb2.ChatRequest(
                    model="sim",
                    body=b'{"model":"sim","messages":[{"role":"user","content":"x"}]}',
                    options=scheduler_pb2.RequestOptions(tenant="tenant-b", rate_limit_rpm=0),
                ),
                timeout=10,
            ),
        ),
    )
    from sage.rpc.embedding.v1 import embedding_pb2, embedding_pb2_grpc
    from sage.rpc.gpu_manager.v1 import gpu_manager_pb2, gpu_manager_pb2_grpc

    run.safely(
        finding,
        "gpu_manager Reserve without a token",
        lambda: call(
            t.grpc_ports["gpu_manager"],
            lambda ch: gpu_manager_pb2_grpc.GpuManagerServiceStub(ch).Reserve(
                gpu_manager_pb2.ReserveRequest(), timeout=10
            ),
        ),
    )
    run.safely(
        finding,
        "embedding EmbedBatch without a token",
        lambda: call(
            t.grpc_ports["embedding"],
            lambda ch: embedding_pb2_grpc.EmbeddingServiceStub(ch).EmbedBatch(
                embedding_pb2.EmbedBatchRequest(), timeout=10
            ),
        ),
    )
    engines = httpx.get(t.base + "/v1/management/engines", headers=t.admin(), timeout=10).json()
    for engine in engines.get("engines", []):
        if engine.get("backend") == "external" or not engine.get("base_url"):
            continue
        resp = httpx.post(
            engine["base_url"].rstrip("/") + "/v1/chat/completions",
            json={"model": engine["model_id"], "messages": [{"role": "user", "content": "x"}]},
            timeout=10,
        )
        run.check(
            finding,
            f"engine {engine['engine_id']} called directly without its key",
            resp.status_code in (401, 403),
            _status(resp),
        )


def tenant_limit_attack(run: Run, t: Target, client: httpx.Client) -> None:
    """tenant-b is limited to 5 requests a minute, however it asks."""
    finding = "gRPC bypasses everything"
    codes = []
    for _ in range(8):
        resp = client.post(
            "/v1/chat/completions",
            json={"model": "sim", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]},
            headers={"Authorization": f"Bearer {TENANT_B}", "x-sage-tenant": "tenant-a"},
        )
        codes.append(resp.status_code)
    run.check(
        finding,
        "tenant-b (5 rpm) sends 8 requests",
        codes.count(200) <= 5 and 429 in codes,
        f"{codes}",
    )


def slowloris_attacks(run: Run, t: Target, header_timeout_s: float) -> None:
    """Slow headers, huge headers, many headers."""
    finding = "slow-loris, header size"
    host, port = t.base.removeprefix("http://").split(":")
    socks = []
    for _ in range(50):
        sock = socket.create_connection((host, int(port)), timeout=5)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        socks.append(sock)
    deadline = time.monotonic() + header_timeout_s + 10
    open_socks = list(socks)
    while open_socks and time.monotonic() < deadline:
        still = []
        for sock in open_socks:
            sock.settimeout(0.05)
            try:
                if sock.recv(4096) == b"":
                    continue  # closed by the server
            except TimeoutError:
                still.append(sock)
                continue
            except OSError:
                continue
            still.append(sock)
        open_socks = still
        time.sleep(0.2)
    for sock in socks:
        sock.close()
    run.check(
        finding,
        f"50 slow-header connections closed within {header_timeout_s + 10:g}s",
        not open_socks,
        f"{len(open_socks)} still open",
    )
    for name, headers in (
        ("1 MB header", {"x-big": "a" * 1_000_000}),
        ("10k headers", {f"x-h{i}": "v" for i in range(10_000)}),
    ):
        try:
            resp = httpx.get(t.base + "/health", headers=headers, timeout=10)
            run.check(finding, name, refused(resp, 431), _status(resp))
        except httpx.HTTPError as exc:  # closed without a reply is also a refusal
            run.check(finding, name, True, f"connection closed ({type(exc).__name__})")


def embedding_attack(run: Run, t: Target, client: httpx.Client) -> None:
    """Huge embedding requests are refused (token cap, body limit) instead of holding the
    engine for everyone; a small one right after is served at once."""
    finding = "one embedding request blocks all"
    headers = {"Authorization": f"Bearer {TENANT_A}"}
    for count, status, param in ((256, 400, "input"), (2048, 413, None)):
        resp = client.post(
            "/v1/embeddings",
            json={"model": "sim-embedding", "input": ["x" * 8192] * count},
            headers=headers,
            timeout=60,
        )
        run.check(finding, f"{count} x 8 KB inputs", refused(resp, status, param), _status(resp))
    resp = client.post(
        "/v1/embeddings", json={"model": "sim-embedding", "input": "hello"}, headers=headers
    )
    run.check(finding, "a 1-input request afterwards", resp.status_code == 200, _status(resp))


def cancellation_attack(run: Run, t: Target) -> None:
    """Aborted non-streamed clients stop their work on the engine."""
    finding = "non-streamed requests not cancelled"
    body = {"model": "sim", "max_tokens": 500, "messages": [{"role": "user", "content": "x"}]}
    headers = {"Authorization": f"Bearer {TENANT_A}"}

    def fire() -> None:
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(t.base + "/v1/chat/completions", json=body, headers=headers, timeout=0.5)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda _: fire(), range(32)))
    deadline = time.monotonic() + 10
    running = -1.0
    while time.monotonic() < deadline:
        status = httpx.get(t.base + "/v1/management/status", headers=t.admin(), timeout=10).json()
        running = float(status["control_plane"]["running_requests"])
        if running == 0:
            break
        time.sleep(0.5)
    run.check(
        finding,
        "32 clients abort non-streamed requests (max_tokens 500)",
        running == 0,
        f"scheduler still running {running:g}",
    )


def shedding_attack(run: Run, t: Target, burst: int = 450) -> None:
    """A burst past every engine slot (the sim's 256) and the queue (64) is shed with 429 +
    Retry-After by default, and every admitted request completes."""
    finding = "no load shedding by default"
    # Long replies keep the first 320 in flight while the rest arrive, even on a busy machine.
    body = {"model": "sim", "max_tokens": 1024, "messages": [{"role": "user", "content": "x"}]}
    headers = {"Authorization": f"Bearer {TENANT_A}"}

    async def flood() -> list[tuple[int, float, bool]]:
        limits = httpx.Limits(max_connections=burst, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=t.base, limits=limits, timeout=120) as http:

            async def one() -> tuple[int, float, bool]:
                started = time.perf_counter()
                try:
                    resp = await http.post("/v1/chat/completions", json=body, headers=headers)
                except httpx.HTTPError:
                    return 0, time.perf_counter() - started, False
                return (
                    resp.status_code,
                    time.perf_counter() - started,
                    "retry-after" in resp.headers,
                )

            return await asyncio.gather(*(one() for _ in range(burst)))

    results = asyncio.run(flood())
    shed = sorted(r[1] for r in results if r[0] == 429)
    failed = [r[0] for r in results if r[0] not in (200, 429)]
    p50 = f"{shed[len(shed) // 2] * 1000:.0f} ms" if shed else "-"
    run.check(
        finding,
        f"{burst} concurrent requests (256 engine slots + queue 64)",
        bool(shed) and not failed and all(r[2] for r in results if r[0] == 429),
        f"{len(shed)} shed with Retry-After (p50 {p50} in the burst), "
        f"{sum(r[0] == 200 for r in results)} served, other: {failed[:5]}",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", action="store_true", help="start a stack of its own")
    parser.add_argument("--base-url", help="gateway, e.g. http://127.0.0.1:8889")
    parser.add_argument("--home", type=Path, help="the stack's SAGE_HOME")
    parser.add_argument("--header-timeout", type=float, default=10.0)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if not args.start and not (args.base_url and args.home):
        parser.error("give --start, or --base-url and --home")
    run = Run()
    with tempfile.TemporaryDirectory(prefix="sage-redteam-") as tmp:
        work = Path(tmp)
        target = start_stack(work) if args.start else Target(args.base_url.rstrip("/"), args.home)
        # A model folder with code behind auto_map, inside an allowed root ($SAGE_HOME/models):
        # only the refusal of --trust-remote-code stands between it and the stack's user.
        model_dir = target.home / "models" / f"evil-model-{os.getpid()}"
        model_dir.mkdir(parents=True)
        (model_dir / "config.json").write_text(
            json.dumps({"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig"}})
        )
        marker = work / "pwned"
        (model_dir / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
        try:
            with httpx.Client(base_url=target.base, timeout=30) as client:
                management_attacks(run, target, client, model_dir)
                browser_attacks(run, target, client)
                key_attacks(run, target, client)
                external_engine_attacks(run, target, client)
                grpc_attacks(run, target)
                tenant_limit_attack(run, target, client)
                slowloris_attacks(run, target, args.header_timeout)
                embedding_attack(run, target, client)
                cancellation_attack(run, target)
                shedding_attack(run, target)
            time.sleep(1)
            run.check(
                "code execution through management",
                "the model folder's code never ran",
                not marker.exists(),
                "marker file absent" if not marker.exists() else "RAN",
            )
        finally:
            shutil.rmtree(model_dir, ignore_errors=True)
            if args.start:
                stop_stack(target)
    failed = [r for r in run.results if not r.ok]
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in run.results], indent=2))
    print(f"{len(run.results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
