"""`sage llm engine list|start|stop|prune` and `sage llm logs [ENGINE]`.

Everything here goes through the gateway's management API (ManagementClient), so the CLI
works against any running stack, local or remote. Tables and spinners (rich) only when
stdout is a terminal; scripts get plain lines or `--json`.

Exit codes: 0 ok, 1 the operation failed, 2 usage, configuration or connection error.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from sage.common.exceptions import (
    AuthenticationError,
    ConfigurationError,
    EngineNotFoundError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    SageError,
    ServiceUnavailableError,
)

from .management import EngineInfo, ManagementClient

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "add_engine_command",
    "add_logs_command",
    "cli_errors",
    "exit_code_for",
    "new_lines",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
FOLLOW_INTERVAL_S = 0.5
# Lines fetched per poll in --follow; more than this between two polls are skipped.
FOLLOW_WINDOW = 1000

# Errors that mean "fix the command, the config or the connection", not "it tried and failed".
_USAGE_ERRORS: tuple[type[SageError], ...] = (
    InvalidRequestError,
    ConfigurationError,
    ServiceUnavailableError,
    AuthenticationError,
    PermissionDeniedError,
)

CommandFunc = Callable[[argparse.Namespace], int]


def exit_code_for(error: SageError) -> int:
    """2 for usage/config/connection errors, 1 for operations that were tried and failed."""
    if isinstance(error, _USAGE_ERRORS):
        return EXIT_USAGE
    return EXIT_FAILED


def cli_errors(func: CommandFunc) -> CommandFunc:
    """Turn SageErrors into one `error: ...` line on stderr and the matching exit code."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except SageError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return exit_code_for(exc)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return run


def is_tty() -> bool:
    """Whether stdout is a terminal (rich output) rather than a pipe or file (plain)."""
    return sys.stdout.isatty()


def print_json(doc: Any) -> None:
    """JSON for scripts, one document on stdout."""
    print(json.dumps(doc, indent=2, ensure_ascii=False))


def render_table(
    title: str | None,
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    row_styles: Sequence[str | None] | None = None,
) -> None:
    """A rich table on a terminal, aligned plain columns otherwise."""
    if is_tty():
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        table = Table(title=title, header_style="bold")
        for index, header in enumerate(headers):
            # The first column is the id people copy: never break it across lines.
            table.add_column(header, overflow="fold", no_wrap=index == 0)
        for index, row in enumerate(rows):
            # Text, not markup: model ids and errors may contain "[...]".
            style = row_styles[index] if row_styles else None
            table.add_row(*(Text(cell) for cell in row), style=style)
        Console(highlight=False).print(table)
        return
    widths = [max(len(str(r[i])) for r in (headers, *rows)) for i in range(len(headers))]
    for row in (headers, *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


@contextmanager
def spinner(message: str) -> Iterator[None]:
    """A spinner while something slow runs, on a terminal only."""
    if not is_tty():
        yield
        return
    from rich.console import Console

    with Console(highlight=False).status(message):
        yield


def client_for(args: argparse.Namespace) -> ManagementClient:
    """A ManagementClient for `--url` (else SAGE_UNIFIED_BASE_URL, daemon.json, default)."""
    return ManagementClient(getattr(args, "url", None), api_key=getattr(args, "api_key", None))


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


@cli_errors
def cmd_engine_list(args: argparse.Namespace) -> int:
    """List engines (table, or `{engines, count}` JSON)."""
    with client_for(args) as client:
        engines = client.list_engines()
    if args.json:
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
    failed = [e for e in engines if e.status == "FAILED" and e.error]
    for engine in failed:
        print(f"{engine.engine_id}: {engine.error}", file=sys.stderr)
    return EXIT_OK


@cli_errors
def cmd_engine_start(args: argparse.Namespace) -> int:
    """Start one engine; waits until it is ready unless --no-wait."""
    what = f"{args.engine_kind} engine {args.model} (backend {args.backend})"
    with client_for(args) as client:
        waiting = spinner(f"starting {what}…") if not args.no_wait else nullcontext()
        with waiting:
            engine = client.start_engine(
                args.model,
                engine_kind=args.engine_kind,
                backend=args.backend,
                tensor_parallel_size=args.tensor_parallel,
                pipeline_parallel_size=args.pipeline_parallel,
                port=args.engine_port,
                required_memory_gb=args.required_memory_gb,
                engine_label=args.label,
                max_concurrent_requests=args.max_concurrent,
                use_gpu=args.use_gpu,
                extra_args=args.extra_arg or None,
                engine_id=args.engine_id,
                startup_timeout_s=args.startup_timeout,
                wait=not args.no_wait,
            )
    if args.json:
        print_json(engine.model_dump(mode="json"))
    else:
        verb = "starting" if engine.status == "STARTING" else "started"
        print(f"{verb} {describe_engine(engine)}")
    if engine.status == "FAILED":
        print(f"error: engine {engine.engine_id} failed: {engine.error}", file=sys.stderr)
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


@cli_errors
def cmd_engine_stop(args: argparse.Namespace) -> int:
    """Stop one engine by id."""
    with (
        client_for(args) as client,
        engine_must_exist(args.engine_id),
        spinner(f"stopping {args.engine_id}…"),
    ):
        engine = client.stop_engine(args.engine_id, drain=args.drain)
    if args.json:
        print_json(engine.model_dump(mode="json"))
    else:
        print(f"stopped {describe_engine(engine)}")
    return EXIT_OK


@cli_errors
def cmd_engine_prune(args: argparse.Namespace) -> int:
    """Forget engines that are STOPPED or FAILED."""
    with client_for(args) as client:
        pruned = client.prune()
    if args.json:
        print_json({"pruned": pruned, "count": len(pruned)})
    elif pruned:
        print(f"pruned {len(pruned)} engine(s): {', '.join(pruned)}")
    else:
        print("nothing to prune")
    return EXIT_OK


def add_client_options(parser: argparse.ArgumentParser) -> None:
    """--url and --api-key, for commands that talk to the management API."""
    parser.add_argument(
        "--url",
        default=None,
        help="gateway URL [SAGE_UNIFIED_BASE_URL, else the running stack, else localhost]",
    )
    parser.add_argument("--api-key", default=None, help="admin API key [SAGE_ADMIN_API_KEY]")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {value}")
    return value


def add_engine_command(sub: Any) -> None:
    """Register `sage llm engine ...` on the `llm` subparsers."""
    engine = sub.add_parser("engine", help="start, list and stop engines at run time")
    actions = engine.add_subparsers(dest="engine_command", required=True)

    listing = actions.add_parser("list", help="list engines")
    listing.add_argument("--json", action="store_true", help="print JSON")
    add_client_options(listing)
    listing.set_defaults(func=cmd_engine_list)

    start = actions.add_parser("start", help="start an engine and wait until it is ready")
    start.add_argument("model", help="model id or path (e.g. Qwen/Qwen2.5-7B-Instruct, or sim)")
    start.add_argument(
        "--tensor-parallel",
        "-tp",
        type=_positive_int,
        metavar="N",
        default=None,
        help="GPUs per engine (TP)",
    )
    start.add_argument(
        "--pipeline-parallel",
        "-pp",
        type=_positive_int,
        metavar="N",
        default=None,
        help="pipeline stages",
    )
    start.add_argument(
        "--engine-kind", choices=("llm", "embedding"), default="llm", help="engine role [llm]"
    )
    start.add_argument(
        "--backend", default="auto", help="vllm, sim, embedding, ... (auto = pick) [auto]"
    )
    start.add_argument(
        "--engine-port", type=_port, metavar="PORT", default=None, help="port [a free one]"
    )
    start.add_argument(
        "--required-memory-gb",
        type=float,
        metavar="GB",
        default=None,
        help="GPU memory to reserve [estimate]",
    )
    start.add_argument("--label", default=None, help="a label to find the engine by")
    start.add_argument(
        "--max-concurrent",
        type=_positive_int,
        metavar="N",
        default=None,
        help="max concurrent requests",
    )
    gpu = start.add_mutually_exclusive_group()
    gpu.add_argument(
        "--use-gpu",
        dest="use_gpu",
        action="store_const",
        const=True,
        default=None,
        help="require a GPU",
    )
    gpu.add_argument(
        "--no-gpu", dest="use_gpu", action="store_const", const=False, help="run on CPU"
    )
    start.add_argument("--engine-id", default=None, help="engine id [generated]")
    start.add_argument(
        "--extra-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="argument passed to the engine as is (repeatable; use --extra-arg=--flag)",
    )
    start.add_argument(
        "--startup-timeout",
        type=_positive_int,
        metavar="S",
        default=None,
        help="seconds to wait for ready",
    )
    start.add_argument("--no-wait", action="store_true", help="return at once (status STARTING)")
    start.add_argument("--json", action="store_true", help="print the engine as JSON")
    add_client_options(start)
    start.set_defaults(func=cmd_engine_start)

    stop = actions.add_parser("stop", help="stop an engine")
    stop.add_argument("engine_id", metavar="ENGINE_ID")
    stop.add_argument("--drain", action="store_true", help="let requests in flight finish")
    stop.add_argument("--json", action="store_true", help="print the engine as JSON")
    add_client_options(stop)
    stop.set_defaults(func=cmd_engine_stop)

    prune = actions.add_parser("prune", help="forget stopped and failed engines")
    prune.add_argument("--json", action="store_true", help="print JSON")
    add_client_options(prune)
    prune.set_defaults(func=cmd_engine_prune)


# --- logs -------------------------------------------------------------------------------


def new_lines(previous: Sequence[str], current: Sequence[str]) -> list[str]:
    """Lines of `current` not already seen at the end of `previous` (both are log tails).

    The largest suffix of `previous` that `current` starts with is what both polls saw.
    """
    for overlap in range(min(len(previous), len(current)), 0, -1):
        if list(previous[len(previous) - overlap :]) == list(current[:overlap]):
            return list(current[overlap:])
    return list(current)


def _engine_logs(args: argparse.Namespace) -> int:
    with client_for(args) as client, engine_must_exist(args.engine):
        if not args.follow:
            for line in client.engine_logs(args.engine, args.tail) if args.tail else []:
                print(line)
            return EXIT_OK
        seen = client.engine_logs(args.engine, max(args.tail, FOLLOW_WINDOW))
        for line in seen[-args.tail :] if args.tail else []:
            print(line, flush=True)
        try:
            while True:
                time.sleep(FOLLOW_INTERVAL_S)
                current = client.engine_logs(args.engine, max(args.tail, FOLLOW_WINDOW))
                for line in new_lines(seen, current):
                    print(line, flush=True)
                seen = current
        except KeyboardInterrupt:
            return EXIT_OK


def _service_logs(args: argparse.Namespace) -> int:
    from sage.common.config.settings import load_settings

    from . import supervisor

    log_dir = load_settings().llm_state_dir / "logs"
    names = [args.engine] if args.engine else list(supervisor.service_names())
    paths = [log_dir / f"{name}.log" for name in names]
    present = [p for p in paths if p.exists()]
    if not present:
        print(f"error: no logs under {log_dir}", file=sys.stderr)
        return EXIT_FAILED
    for path in present:
        print(f"==> {path} <==")
        lines = path.read_text(errors="replace").splitlines()
        for line in lines[-args.tail :] if args.tail else []:
            print(line)
    sys.stdout.flush()
    if args.follow:
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


@cli_errors
def cmd_logs(args: argparse.Namespace) -> int:
    """Service logs from $SAGE_HOME/llm/logs, or one engine's output via the management API."""
    from . import supervisor

    if args.engine and args.engine not in supervisor.service_names():
        return _engine_logs(args)
    return _service_logs(args)


def _lines(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_logs_command(sub: Any, service_names: Sequence[str]) -> None:
    """Register `sage llm logs [ENGINE] --tail/-n N --follow/-f`."""
    logs = sub.add_parser(
        "logs",
        help="show service logs, or one engine's log",
        description="Without ENGINE: the services' logs under $SAGE_HOME/llm/logs. With an "
        f"engine id: that engine's output via the gateway. Service names: "
        f"{', '.join(service_names)}.",
    )
    logs.add_argument("engine", nargs="?", metavar="ENGINE", help="engine id (or a service name)")
    logs.add_argument(
        "--tail", "-n", type=_lines, metavar="N", default=100, help="lines to show [100]"
    )
    logs.add_argument(
        "--follow", "-f", action="store_true", help="keep printing new lines until Ctrl-C"
    )
    add_client_options(logs)
    logs.set_defaults(func=cmd_logs)
