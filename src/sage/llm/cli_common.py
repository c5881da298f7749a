"""Pieces every `sage llm` command shares: exit codes, error mapping, JSON, tables, spinners.

Exit codes: 0 ok, 1 the operation was tried and failed, 2 usage, configuration or connection
error. Tables and spinners (rich) only when stdout is a terminal; scripts get plain lines or
`--json`.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Annotated, Any, ParamSpec

import pydantic
import typer

from sage.common.exceptions import (
    AuthenticationError,
    ConfigurationError,
    InvalidRequestError,
    PermissionDeniedError,
    SageError,
    ServiceUnavailableError,
)

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "ApiKeyOption",
    "JsonOption",
    "UrlOption",
    "cli_errors",
    "err",
    "exit_code_for",
    "is_tty",
    "print_json",
    "render_table",
    "spinner",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# Errors that mean "fix the command, the config or the connection", not "it tried and failed".
_USAGE_ERRORS: tuple[type[SageError], ...] = (
    InvalidRequestError,
    ConfigurationError,
    ServiceUnavailableError,
    AuthenticationError,
    PermissionDeniedError,
)

P = ParamSpec("P")

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        help="Gateway URL (default: SAGE_UNIFIED_BASE_URL, else the running stack, "
        "else localhost).",
    ),
]
ApiKeyOption = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        help="Admin API key (default: SAGE_ADMIN_API_KEY, else the local stack's "
        "$SAGE_HOME/llm/admin.key).",
    ),
]


def exit_code_for(error: SageError) -> int:
    """2 for usage/config/connection errors, 1 for operations that were tried and failed."""
    if isinstance(error, _USAGE_ERRORS):
        return EXIT_USAGE
    return EXIT_FAILED


def err(message: str) -> None:
    """One line for the person, on stderr."""
    print(message, file=sys.stderr, flush=True)


def cli_errors(func: Callable[P, int | None]) -> Callable[P, None]:
    """Run a command body: its return value is the exit code; SageErrors become one
    `error: ...` line on stderr and the matching code (raised as typer.Exit)."""

    @functools.wraps(func)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            code = func(*args, **kwargs) or EXIT_OK
        except SageError as exc:
            err(f"error: {exc.message}")
            code = exit_code_for(exc)
        except pydantic.ValidationError as exc:
            err(f"error: invalid SAGE_* setting:\n{exc}")
            code = EXIT_USAGE
        except KeyboardInterrupt:
            err("interrupted")
            code = EXIT_INTERRUPTED
        if code:
            raise typer.Exit(code)

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
    if title:
        print(title)
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
