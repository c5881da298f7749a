"""`sage llm preset list|show|apply`: several engines from one YAML preset.

`apply` changes what runs on the machine, so it asks first; without a terminal to ask on
it refuses unless `--yes` is given, rather than guessing.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import AbstractContextManager
from typing import Any

from sage.common.exceptions import ConfigurationError

from .cli_engine import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    add_client_options,
    cli_errors,
    client_for,
    describe_engine,
    is_tty,
    print_json,
    render_table,
)
from .presets import (
    ApplyEvent,
    ApplyResult,
    Preset,
    PresetApplyError,
    apply_preset,
    list_presets,
    load_preset,
)

__all__ = ["add_preset_command"]


def _preset_from(args: argparse.Namespace) -> Preset:
    if args.name is None and args.file is None:
        raise ConfigurationError("name a preset with -n NAME or give a file with -f FILE")
    return load_preset(name=args.name, file=args.file)


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


@cli_errors
def cmd_preset_list(args: argparse.Namespace) -> int:
    """The built-in presets."""
    presets = list_presets()
    if args.json:
        print_json([p.model_dump(mode="json") for p in presets])
        return EXIT_OK
    rows = [
        (p.name, ", ".join(f"{e.name}={e.model}" for e in p.engines), p.description)
        for p in presets
    ]
    render_table(None, ("PRESET", "ENGINES", "DESCRIPTION"), rows)
    return EXIT_OK


@cli_errors
def cmd_preset_show(args: argparse.Namespace) -> int:
    """One preset's engines."""
    preset = _preset_from(args)
    if args.json:
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


@cli_errors
def cmd_preset_apply(args: argparse.Namespace) -> int:
    """Start the preset's missing engines; roll back on failure unless --no-rollback."""
    preset = _preset_from(args)
    if not (args.yes or args.dry_run) and not sys.stdin.isatty():
        print(
            f"error: refusing to apply preset {preset.name!r} without confirmation; "
            "pass --yes (or --dry-run to see what would happen)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    progress = _Progress(quiet=args.json)
    with client_for(args) as client:
        if not (args.yes or args.dry_run):
            plan = apply_preset(preset, client, dry_run=True)
            if not _confirm(preset, plan):
                print("aborted; nothing was started", file=sys.stderr)
                return EXIT_FAILED
        try:
            result = apply_preset(
                preset,
                client,
                dry_run=args.dry_run,
                rollback=not args.no_rollback,
                progress=progress,
            )
        except PresetApplyError as exc:
            progress.stop()
            if args.json:
                print_json(exc.result.to_json())
            print(f"error: {exc.message}", file=sys.stderr)
            return EXIT_FAILED
        finally:
            progress.stop()
    if args.json:
        print_json(result.to_json())
    else:
        print(_summary(result))
    return EXIT_OK


def _add_source(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("-n", "--name", default=None, help="built-in preset name")
    source.add_argument("-f", "--file", default=None, help="preset YAML file")


def add_preset_command(sub: Any) -> None:
    """Register `sage llm preset ...` on the `llm` subparsers."""
    preset = sub.add_parser("preset", help="start several engines from a preset")
    actions = preset.add_subparsers(dest="preset_command", required=True)

    listing = actions.add_parser("list", help="list built-in presets")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=cmd_preset_list)

    show = actions.add_parser("show", help="show a preset's engines")
    _add_source(show)
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=cmd_preset_show)

    apply = actions.add_parser("apply", help="start the preset's engines that are not running")
    _add_source(apply)
    apply.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    apply.add_argument(
        "--dry-run", action="store_true", help="only show what would be started and kept"
    )
    apply.add_argument(
        "--no-rollback",
        action="store_true",
        help="on failure, leave the engines this apply started running",
    )
    apply.add_argument("--json", action="store_true", help="print the result as JSON")
    add_client_options(apply)
    apply.set_defaults(func=cmd_preset_apply)
