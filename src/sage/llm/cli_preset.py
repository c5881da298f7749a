"""`sage llm preset list|show|apply`: several engines from one YAML preset.

`apply` changes what runs on the machine, so it asks first; without a terminal to ask on
it refuses unless `--yes` is given, rather than guessing.
"""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Annotated, Any

import typer

from .cli_common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    ApiKeyOption,
    JsonOption,
    UrlOption,
    cli_errors,
    err,
    is_tty,
    print_json,
    render_table,
)
from .cli_engine import client_for, describe_engine
from .presets import (
    ApplyEvent,
    ApplyResult,
    Preset,
    PresetApplyError,
    apply_preset,
    list_presets,
    load_preset,
)

__all__ = ["preset_app"]

preset_app = typer.Typer(
    name="preset",
    help="Start several engines from one YAML preset.",
    epilog="Example: sage llm preset apply -n qwen-mini-with-embeddings",
    no_args_is_help=True,
)

NameOption = Annotated[
    str | None, typer.Option("--name", "-n", metavar="NAME", help="Built-in preset name.")
]
FileOption = Annotated[
    Path | None, typer.Option("--file", "-f", metavar="FILE", help="Preset YAML file.")
]


def _preset_from(name: str | None, file: Path | None) -> Preset:
    """Exactly one of -n/-f (a usage error otherwise), loaded and validated."""
    if (name is None) == (file is None):
        raise typer.BadParameter(
            "give exactly one of -n NAME (built-in preset) or -f FILE (preset YAML)",
            param_hint="-n/--name, -f/--file",
        )
    return load_preset(name=name, file=file)


def _engine_rows(preset: Preset) -> list[tuple[str, ...]]:
    return [
        (
            e.name,
            e.kind,
            e.model,
            e.backend,
            str(e.tensor_parallel),
            str(e.pipeline_parallel),
            str(e.port) if e.port else "auto",
            {True: "yes", False: "no", None: "auto"}[e.use_gpu],
            e.engine_label(preset.name),
        )
        for e in preset.engines
    ]


_ENGINE_HEADERS = ("NAME", "KIND", "MODEL", "BACKEND", "TP", "PP", "PORT", "GPU", "LABEL")


@preset_app.command("list", epilog="Example: sage llm preset list --json")
@cli_errors
def cmd_preset_list(json_out: JsonOption = False) -> int:
    """List the built-in presets."""
    presets = list_presets()
    if json_out:
        print_json([p.model_dump(mode="json") for p in presets])
        return EXIT_OK
    rows = [
        (p.name, ", ".join(f"{e.name}={e.model}" for e in p.engines), p.description)
        for p in presets
    ]
    render_table(None, ("PRESET", "ENGINES", "DESCRIPTION"), rows)
    return EXIT_OK


@preset_app.command("show", epilog="Example: sage llm preset show -n qwen-mini-with-embeddings")
@cli_errors
def cmd_preset_show(
    name: NameOption = None, file: FileOption = None, json_out: JsonOption = False
) -> int:
    """Show one preset's engines."""
    preset = _preset_from(name, file)
    if json_out:
        print_json(preset.model_dump(mode="json"))
        return EXIT_OK
    print(f"preset: {preset.name} (version {preset.version})")
    if preset.description:
        print(f"description: {preset.description}")
    render_table(None, _ENGINE_HEADERS, _engine_rows(preset))
    return EXIT_OK


class _Progress:
    """Prints apply events as they happen, with a spinner while an engine starts (TTY)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = is_tty()
        self._status: AbstractContextManager[Any] | None = None

    def _say(self, message: str) -> None:
        if not self.quiet:
            print(message, flush=True)

    def _spin(self, message: str) -> None:
        self.stop()
        if self.tty and not self.quiet:
            from rich.console import Console

            self._status = Console(highlight=False).status(message)
            self._status.__enter__()

    def stop(self) -> None:
        """End the spinner, if one runs."""
        if self._status is not None:
            self._status.__exit__(None, None, None)
            self._status = None

    def __call__(self, event: ApplyEvent) -> None:
        what = f"{event.name} ({event.spec.kind} {event.spec.model})"
        if event.kind == "starting":
            self._spin(f"starting {what}…")
            if not self.tty:
                self._say(f"starting {what}")
            return
        self.stop()
        engine = event.engine
        if event.kind == "keep" and engine is not None:
            self._say(f"kept     {event.name}: {describe_engine(engine)}")
        elif event.kind == "would_start":
            self._say(f"would start {what}")
        elif event.kind == "started" and engine is not None:
            self._say(f"started  {event.name}: {describe_engine(engine)}")
        elif event.kind == "failed":
            self._say(f"FAILED   {what}: {event.error}")
        elif event.kind == "stopping" and engine is not None:
            self._spin(f"rolling back {engine.engine_id}…")
        elif event.kind == "stopped" and engine is not None:
            self._say(f"stopped  {event.name}: {engine.engine_id} (rolled back)")
        elif event.kind == "stop_failed":
            self._say(f"could not stop {event.name}: {event.error}")


def _confirm(preset: Preset, plan: ApplyResult) -> bool:
    if not plan.planned:
        return True  # nothing would start: nothing to confirm
    starts = ", ".join(f"{e.name} ({e.model})" for e in plan.planned)
    answer = input(f"apply preset {preset.name!r}: start {starts}? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def _summary(result: ApplyResult) -> str:
    if result.dry_run:
        return (
            f"dry run of {result.preset.name!r}: would start {len(result.planned)}, "
            f"keep {len(result.kept)}"
        )
    return (
        f"preset {result.preset.name!r} applied: started {len(result.started)}, "
        f"kept {len(result.kept)}"
    )


@preset_app.command(
    "apply", epilog="Example: sage llm preset apply -n qwen-mini-with-embeddings --yes"
)
@cli_errors
def cmd_preset_apply(
    name: NameOption = None,
    file: FileOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only show what would be started and kept.")
    ] = False,
    no_rollback: Annotated[
        bool,
        typer.Option(
            "--no-rollback", help="On failure, leave the engines this apply started running."
        ),
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> int:
    """Start the preset's engines that are not running; roll back on failure."""
    preset = _preset_from(name, file)
    if not (yes or dry_run) and not sys.stdin.isatty():
        err(
            f"error: refusing to apply preset {preset.name!r} without confirmation; "
            "pass --yes (or --dry-run to see what would happen)"
        )
        return EXIT_USAGE
    progress = _Progress(quiet=json_out)
    with client_for(url, api_key) as client:
        if not (yes or dry_run):
            plan = apply_preset(preset, client, dry_run=True)
            if not _confirm(preset, plan):
                err("aborted; nothing was started")
                return EXIT_FAILED
        try:
            result = apply_preset(
                preset,
                client,
                dry_run=dry_run,
                rollback=not no_rollback,
                progress=progress,
            )
        except PresetApplyError as exc:
            progress.stop()
            if json_out:
                print_json(exc.result.to_json())
            err(f"error: {exc.message}")
            return EXIT_FAILED
        finally:
            progress.stop()
    if json_out:
        print_json(result.to_json())
    else:
        print(_summary(result))
    return EXIT_OK
