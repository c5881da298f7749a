"""`sage llm engine list|start|stop|prune`, `sage llm engine adapter load|unload|list` and
`sage llm logs [SERVICE_OR_ENGINE]`.

Everything about engines goes through the gateway's management API (ManagementClient), so
the CLI works against any running stack, local or remote.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Annotated, Literal

import typer

from sage.common.exceptions import EngineNotFoundError, NotFoundError

from .cli_common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    ApiKeyOption,
    JsonOption,
    UrlOption,
    cli_errors,
    err,
    exit_code_for,
    print_json,
    render_table,
    spinner,
)
from .management import EngineInfo, ManagementClient, new_lines
from .supervisor import local_model_path

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "cli_errors",
    "client_for",
    "cmd_logs",
    "describe_engine",
    "engine_app",
    "exit_code_for",
    "new_lines",
    "register_logs",
]

FOLLOW_INTERVAL_S = 0.5
# Lines fetched per poll in --follow; more than this between two polls are skipped.
FOLLOW_WINDOW = 1000

engine_app = typer.Typer(
    name="engine",
    help="Start, list and stop engines at run time (through the gateway).",
    epilog="Example: sage llm engine start Qwen/Qwen2.5-7B-Instruct --tensor-parallel 2",
    no_args_is_help=True,
)


def client_for(url: str | None, api_key: str | None) -> ManagementClient:
    """A ManagementClient for `--url` (else SAGE_UNIFIED_BASE_URL, daemon.json, default)."""
    return ManagementClient(url, api_key=api_key)


def _uptime(started_at: float | None) -> str:
    if not started_at:
        return "-"
    seconds = max(0, int(time.time() - started_at))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


_STATUS_STYLES = {"STARTING": "yellow", "STOPPING": "yellow", "STOPPED": "dim", "FAILED": "red"}


def describe_engine(engine: EngineInfo) -> str:
    """One line about an engine, for messages after start/stop."""
    where = f" at {engine.base_url}" if engine.base_url else ""
    gpus = f" on GPU {','.join(map(str, engine.gpu_ids))}" if engine.gpu_ids else ""
    what = f"{engine.engine_kind} {engine.model_id}, {engine.status}"
    return f"{engine.engine_id} ({what}){where}{gpus}"


@engine_app.command("list", epilog="Example: sage llm engine list --json")
@cli_errors
def cmd_engine_list(
    json_out: JsonOption = False, url: UrlOption = None, api_key: ApiKeyOption = None
) -> int:
    """List engines (a table, or `{engines, count}` JSON)."""
    with client_for(url, api_key) as client:
        engines = client.list_engines()
    if json_out:
        print_json({"engines": [e.model_dump(mode="json") for e in engines], "count": len(engines)})
        return EXIT_OK
    if not engines:
        print("no engines (start one with `sage llm engine start MODEL`)")
        return EXIT_OK
    rows = [
        (
            e.engine_id,
            e.model_id,
            e.engine_kind,
            e.backend or "-",
            e.status,
            e.base_url or "-",
            ",".join(map(str, e.gpu_ids)) or "-",
            e.engine_label or "-",
            _uptime(e.started_at) if e.status == "RUNNING" else "-",
        )
        for e in engines
    ]
    headers = ("ENGINE", "MODEL", "KIND", "BACKEND", "STATUS", "URL", "GPUS", "LABEL", "UP")
    render_table(None, headers, rows, [_STATUS_STYLES.get(e.status) for e in engines])
    for engine in engines:
        if engine.status == "FAILED" and engine.error:
            err(f"{engine.engine_id}: {engine.error}")
    return EXIT_OK


@engine_app.command(
    "start",
    epilog="Example: sage llm engine start BAAI/bge-m3 --engine-kind embedding",
)
@cli_errors
def cmd_engine_start(
    model: Annotated[
        str,
        typer.Argument(
            metavar="MODEL", help="Model id or path (e.g. Qwen/Qwen2.5-7B-Instruct, or sim)."
        ),
    ],
    tensor_parallel: Annotated[
        int | None,
        typer.Option("--tensor-parallel", "-tp", min=1, metavar="N", help="GPUs per engine (TP)."),
    ] = None,
    pipeline_parallel: Annotated[
        int | None,
        typer.Option("--pipeline-parallel", "-pp", min=1, metavar="N", help="Pipeline stages."),
    ] = None,
    engine_kind: Annotated[
        Literal["llm", "embedding"], typer.Option("--engine-kind", help="Engine role.")
    ] = "llm",
    backend: Annotated[
        str, typer.Option("--backend", help="vllm, sglang, sim, embedding, ... (auto picks one).")
    ] = "auto",
    engine_port: Annotated[
        int | None,
        typer.Option(
            "--engine-port", min=1, max=65535, metavar="PORT", help="Port (default: a free one)."
        ),
    ] = None,
    required_memory_gb: Annotated[
        float | None,
        typer.Option(
            "--required-memory-gb", metavar="GB", help="GPU memory to reserve (default: estimate)."
        ),
    ] = None,
    label: Annotated[str | None, typer.Option("--label", help="A label to find it by.")] = None,
    max_concurrent: Annotated[
        int | None,
        typer.Option("--max-concurrent", min=1, metavar="N", help="Max concurrent requests."),
    ] = None,
    use_gpu: Annotated[bool, typer.Option("--use-gpu", help="Require a GPU.")] = False,
    no_gpu: Annotated[bool, typer.Option("--no-gpu", help="Run on CPU.")] = False,
    engine_id: Annotated[
        str | None, typer.Option("--engine-id", help="Engine id (default: generated).")
    ] = None,
    extra_arg: Annotated[
        list[str] | None,
        typer.Option(
            "--extra-arg",
            metavar="ARG",
            help="Argument passed to the engine as is (repeatable; use --extra-arg=--flag).",
        ),
    ] = None,
    startup_timeout: Annotated[
        int | None,
        typer.Option("--startup-timeout", min=1, metavar="S", help="Seconds to wait for ready."),
    ] = None,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Return at once (status STARTING).")
    ] = False,
    role: Annotated[
        Literal["both", "prefill", "decode"],
        typer.Option("--role", help="PD routing: prefill, decode, or both (whole requests)."),
    ] = "both",
    enable_lora: Annotated[
        bool,
        typer.Option(
            "--enable-lora", help="Let LoRA adapters be loaded on it (`engine adapter load`)."
        ),
    ] = False,
    max_lora_rank: Annotated[
        int | None,
        typer.Option("--max-lora-rank", min=1, metavar="N", help="Highest LoRA rank (vLLM's)."),
    ] = None,
    json_out: JsonOption = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> int:
    """Start one engine and wait until it is ready (unless --no-wait)."""
    if use_gpu and no_gpu:
        raise typer.BadParameter("give at most one of --use-gpu and --no-gpu")
    gpu = True if use_gpu else False if no_gpu else None
    # Lifecycle takes local folders only as absolute paths (the launch policy).
    model = local_model_path(model)
    what = f"{engine_kind} engine {model} (backend {backend})"
    with client_for(url, api_key) as client:
        waiting = spinner(f"starting {what}…") if not no_wait else nullcontext()
        with waiting:
            engine = client.start_engine(
                model,
                engine_kind=engine_kind,
                backend=backend,
                tensor_parallel_size=tensor_parallel,
                pipeline_parallel_size=pipeline_parallel,
                port=engine_port,
                required_memory_gb=required_memory_gb,
                engine_label=label,
                max_concurrent_requests=max_concurrent,
                use_gpu=gpu,
                extra_args=extra_arg or None,
                engine_id=engine_id,
                startup_timeout_s=startup_timeout,
                wait=not no_wait,
                role=None if role == "both" else role,
                enable_lora=enable_lora,
                max_lora_rank=max_lora_rank,
            )
    if json_out:
        print_json(engine.model_dump(mode="json"))
    else:
        verb = "starting" if engine.status == "STARTING" else "started"
        print(f"{verb} {describe_engine(engine)}")
    if engine.status == "FAILED":
        err(f"error: engine {engine.engine_id} failed: {engine.error}")
        return EXIT_FAILED
    return EXIT_OK


@contextmanager
def engine_must_exist(engine_id: str) -> Iterator[None]:
    """Say "engine X not found" in those words when the gateway has no such engine."""
    try:
        yield
    except NotFoundError as exc:
        if exc.code == "unknown_url":  # an older gateway without this route: say so
            raise
        raise EngineNotFoundError(
            f"engine {engine_id!r} not found ({exc.message}); see `sage llm engine list`",
            param="engine_id",
        ) from exc


@engine_app.command("stop", epilog="Example: sage llm engine stop engine-abc123 --drain")
@cli_errors
def cmd_engine_stop(
    engine_id: Annotated[str, typer.Argument(metavar="ENGINE_ID", help="Engine id to stop.")],
    drain: Annotated[bool, typer.Option("--drain", help="Let requests in flight finish.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the engine as JSON.")] = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> int:
    """Stop one engine by id."""
    with (
        client_for(url, api_key) as client,
        engine_must_exist(engine_id),
        spinner(f"stopping {engine_id}…"),
    ):
        engine = client.stop_engine(engine_id, drain=drain)
    return _report(engine, json_out, "stopped")


def _report(engine: EngineInfo, json_out: bool, done: str) -> int:
    """Print the engine a command changed: JSON, or `DONE <engine described>`."""
    if json_out:
        print_json(engine.model_dump(mode="json"))
    else:
        print(f"{done} {describe_engine(engine)}")
    return EXIT_OK


@engine_app.command("prune", epilog="Example: sage llm engine prune --json")
@cli_errors
def cmd_engine_prune(
    json_out: JsonOption = False, url: UrlOption = None, api_key: ApiKeyOption = None
) -> int:
    """Forget STOPPED and FAILED engines (moved to $SAGE_HOME/llm/logs/engine-history.jsonl)."""
    with client_for(url, api_key) as client:
        pruned = client.prune()
    if json_out:
        print_json({"pruned": pruned, "count": len(pruned)})
    elif pruned:
        print(f"pruned {len(pruned)} engine(s): {', '.join(pruned)}")
    else:
        print("nothing to prune")
    return EXIT_OK


# --- LoRA adapters -----------------------------------------------------------------------

adapter_app = typer.Typer(
    name="adapter",
    help="Load, unload and list LoRA adapters on engines started with --enable-lora.",
    epilog="Example: sage llm engine adapter load ENGINE_ID my-lora /models/my-lora",
    no_args_is_help=True,
)
engine_app.add_typer(adapter_app)


@adapter_app.command(
    "load", epilog="Example: sage llm engine adapter load qwen-1a2b3c sql-lora ./sql-lora"
)
@cli_errors
def cmd_adapter_load(
    engine_id: Annotated[str, typer.Argument(metavar="ENGINE_ID", help="Engine to load it on.")],
    name: Annotated[str, typer.Argument(metavar="NAME", help="The name requests send as `model`.")],
    path: Annotated[
        str,
        typer.Argument(
            metavar="PATH", help="Adapter folder (adapter_config.json) on the engine's host."
        ),
    ],
    json_out: JsonOption = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> int:
    """Load a LoRA adapter on an engine; requests with `model: NAME` then go to it."""
    with (
        client_for(url, api_key) as client,
        engine_must_exist(engine_id),
        spinner(f"loading {name} on {engine_id}…"),
    ):
        engine = client.load_adapter(engine_id, name, local_model_path(path))
    return _report(engine, json_out, f"loaded adapter {name} on")


@adapter_app.command(
    "unload", epilog="Example: sage llm engine adapter unload qwen-1a2b3c sql-lora"
)
@cli_errors
def cmd_adapter_unload(
    engine_id: Annotated[str, typer.Argument(metavar="ENGINE_ID", help="Engine to unload from.")],
    name: Annotated[str, typer.Argument(metavar="NAME", help="The adapter's name.")],
    json_out: JsonOption = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> int:
    """Unload a LoRA adapter from an engine."""
    with client_for(url, api_key) as client:
        engine = client.unload_adapter(engine_id, name)
    return _report(engine, json_out, f"unloaded adapter {name} from")


@adapter_app.command("list", epilog="Example: sage llm engine adapter list --json")
@cli_errors
def cmd_adapter_list(
    engine_id: Annotated[
        str | None, typer.Argument(metavar="[ENGINE_ID]", help="Only this engine's.")
    ] = None,
    json_out: JsonOption = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> int:
    """List the LoRA adapters loaded on engines (a table, or `{adapters, count}` JSON)."""
    with client_for(url, api_key) as client:
        if engine_id is None:
            engines = client.list_engines()
        else:
            with engine_must_exist(engine_id):
                engines = [client.get_engine(engine_id)]
    rows = [
        {"engine_id": e.engine_id, "name": a.name, "path": a.path, "base_model": e.model_id}
        for e in engines
        for a in e.adapters
    ]
    if json_out:
        print_json({"adapters": rows, "count": len(rows)})
        return EXIT_OK
    if not rows:
        print("no LoRA adapters loaded (load one with `sage llm engine adapter load`)")
        return EXIT_OK
    headers = ("ENGINE", "ADAPTER", "PATH", "BASE MODEL")
    table = [(r["engine_id"], r["name"], r["path"], r["base_model"]) for r in rows]
    render_table(None, headers, table, [None] * len(table))
    return EXIT_OK


# --- logs -------------------------------------------------------------------------------


def _engine_logs(client: ManagementClient, engine: str, tail: int, follow: bool) -> int:
    with engine_must_exist(engine):
        if not follow:
            for line in client.engine_logs(engine, tail) if tail else []:
                print(line)
            return EXIT_OK
        seen = client.engine_logs(engine, max(tail, FOLLOW_WINDOW))
        for line in seen[-tail:] if tail else []:
            print(line, flush=True)
        try:
            while True:
                time.sleep(FOLLOW_INTERVAL_S)
                current = client.engine_logs(engine, max(tail, FOLLOW_WINDOW))
                for line in new_lines(seen, current):
                    print(line, flush=True)
                seen = current
        except KeyboardInterrupt:
            return EXIT_OK


def _service_logs(name: str | None, tail: int, follow: bool) -> int:
    from sage.common.config.settings import load_settings

    from . import supervisor

    log_dir = load_settings().llm_state_dir / "logs"
    names = [name] if name else list(supervisor.service_names())
    paths = [log_dir / f"{n}.log" for n in names]
    present = [p for p in paths if p.exists()]
    if not present:
        err(f"error: no logs under {log_dir}")
        return EXIT_FAILED
    for path in present:
        print(f"==> {path} <==")
        lines = path.read_text(errors="replace").splitlines()
        for line in lines[-tail:] if tail else []:
            print(line)
    sys.stdout.flush()
    if follow:
        return _follow_files(paths)
    return EXIT_OK


def _follow_files(paths: Sequence[Path]) -> int:
    """`tail -f` over several files: print what is appended, naming the file when it changes."""
    offsets = {p: p.stat().st_size if p.exists() else 0 for p in paths}
    last: Path | None = None
    try:
        while True:
            time.sleep(FOLLOW_INTERVAL_S)
            for path in paths:
                try:
                    size = path.stat().st_size
                except FileNotFoundError:
                    continue
                if size < offsets[path]:  # truncated or rotated: start over
                    offsets[path] = 0
                if size == offsets[path]:
                    continue
                with path.open("rb") as handle:
                    handle.seek(offsets[path])
                    chunk = handle.read(size - offsets[path])
                # Print whole lines only; a partial last line waits for its newline.
                complete = chunk[: chunk.rfind(b"\n") + 1]
                if not complete:
                    continue
                offsets[path] += len(complete)
                if len(paths) > 1 and path != last:
                    print(f"\n==> {path} <==")
                    last = path
                sys.stdout.write(complete.decode(errors="replace"))
                sys.stdout.flush()
    except KeyboardInterrupt:
        return EXIT_OK


def _logs_help() -> str:
    from . import supervisor

    return (
        "Show service logs, or one engine's log.\n\n"
        "Without an argument: the services' logs under $SAGE_HOME/llm/logs. With a service "
        f"name ({', '.join(supervisor.service_names())}): that service's log. With an engine "
        "id: that engine's output via the gateway."
    )


@cli_errors
def cmd_logs(
    service_or_engine: Annotated[
        str | None,
        typer.Argument(metavar="SERVICE_OR_ENGINE", help="A service name or an engine id."),
    ] = None,
    tail: Annotated[
        int, typer.Option("--tail", "-n", min=0, metavar="N", help="Lines to show.")
    ] = 100,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines until Ctrl-C.")
    ] = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> int:
    """Service logs from $SAGE_HOME/llm/logs, or one engine's output via the management API."""
    from . import supervisor

    if service_or_engine and service_or_engine not in supervisor.service_names():
        with client_for(url, api_key) as client:
            return _engine_logs(client, service_or_engine, tail, follow)
    return _service_logs(service_or_engine, tail, follow)


def register_logs(app: typer.Typer) -> None:
    """Add `logs` to the `llm` group."""
    app.command(
        "logs",
        help=_logs_help(),
        epilog="Example: sage llm logs --tail 100    (or: sage llm logs engine-abc123 -f)",
    )(cmd_logs)
