"""`sage llm model download|show|list|list-remote|delete`: the local Hugging Face cache.

Downloads land in the standard Hub cache (HF_HUB_CACHE / HF_HOME), where vLLM and the other
engines look first. Commands that talk to the Hub call `ensure_hf_mirror_configured()` first,
so mainland China uses the mirror without extra flags; HF_ENDPOINT and HF_TOKEN are honoured.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from sage.common.config.network import ensure_hf_mirror_configured

from . import models
from .cli_common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    JsonOption,
    cli_errors,
    err,
    print_json,
    render_table,
)

__all__ = ["human_size", "model_app"]

model_app = typer.Typer(
    name="model",
    help="Download, inspect and delete models in the local Hugging Face cache.",
    epilog="Example: sage llm model download Qwen/Qwen2.5-0.5B-Instruct",
    no_args_is_help=True,
)

ModelArgument = Annotated[
    str, typer.Argument(metavar="MODEL", help="Hub model id, e.g. BAAI/bge-m3.")
]
CacheDirOption = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        metavar="DIR",
        help="Hub cache folder (default: HF_HUB_CACHE, else $HF_HOME/hub).",
    ),
]


def human_size(size: int) -> str:
    """1234567 -> '1.2 MB' (decimal units, as the Hub shows sizes)."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))


@model_app.command(
    "download",
    epilog="Example: sage llm model download BAAI/bge-small-zh-v1.5 --revision main",
)
@cli_errors
def cmd_model_download(
    model: ModelArgument,
    revision: Annotated[
        str | None,
        typer.Option("--revision", metavar="REV", help="Branch, tag or commit (default: main)."),
    ] = None,
    cache_dir: CacheDirOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> int:
    """Download a model's files into the cache (files already there are skipped, so an
    interrupted download resumes)."""
    ensure_hf_mirror_configured()
    config = models.hub_config(cache_dir)
    if not json_out:
        err(f"downloading {model} from {config.endpoint_url} into {config.cache_dir}")
    result = models.download_model(
        model, config, revision=revision, progress=not (quiet or json_out)
    )
    if json_out:
        print_json(result.to_json())
        return EXIT_OK
    if result.downloaded_files:
        what = (
            f"downloaded {result.downloaded_files} file(s), {human_size(result.downloaded_bytes)}"
        )
    else:
        what = "already up to date"
    print(f"{model}@{result.commit[:12]}: {what}")
    print(f"{len(result.files)} files, {human_size(result.size_bytes)} in {result.path}")
    return EXIT_OK


@model_app.command("show", epilog="Example: sage llm model show BAAI/bge-m3 --json")
@cli_errors
def cmd_model_show(
    model: ModelArgument, cache_dir: CacheDirOption = None, json_out: JsonOption = False
) -> int:
    """Show a cached model: folder, size, revisions and files."""
    cached = models.cached_model(model, models.hub_config(cache_dir))
    if json_out:
        print_json(cached.to_json())
        return EXIT_OK
    print(f"model: {cached.model}")
    print(f"path:  {cached.path}")
    print(f"size:  {human_size(cached.size_bytes)} ({cached.nb_files} files)")
    for revision in cached.revisions:
        refs = f" ({', '.join(revision.refs)})" if revision.refs else ""
        print(f"\nrevision {revision.commit}{refs}, {_when(revision.last_modified)}")
        print(f"  {revision.path}")
        render_table(
            None,
            ("FILE", "SIZE"),
            [(f.name, human_size(f.size_bytes)) for f in revision.files],
        )
    return EXIT_OK


@model_app.command("list", epilog="Example: sage llm model list --json")
@cli_errors
def cmd_model_list(cache_dir: CacheDirOption = None, json_out: JsonOption = False) -> int:
    """List the models in the local cache."""
    config = models.hub_config(cache_dir)
    cached = models.cached_models(config)
    if json_out:
        print_json(
            {
                "cache_dir": str(config.cache_dir),
                "models": [m.to_json() for m in cached],
                "count": len(cached),
            }
        )
        return EXIT_OK
    if not cached:
        print(f"no models in {config.cache_dir} (see `sage llm model download MODEL`)")
        return EXIT_OK
    rows = [
        (
            m.model,
            ", ".join(ref for r in m.revisions for ref in r.refs) or m.revisions[0].commit[:12],
            str(m.nb_files),
            human_size(m.size_bytes),
            _when(m.last_modified),
        )
        for m in cached
    ]
    render_table(None, ("MODEL", "REVISIONS", "FILES", "SIZE", "MODIFIED"), rows)
    return EXIT_OK


@model_app.command(
    "list-remote", epilog="Example: sage llm model list-remote --search qwen2.5 --limit 10"
)
@cli_errors
def cmd_model_list_remote(
    search: Annotated[
        str | None, typer.Option("--search", "-s", metavar="QUERY", help="Text in the model id.")
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", "-l", min=1, metavar="N", help="At most N models.")
    ] = 20,
    json_out: JsonOption = False,
) -> int:
    """Search models on the Hub (or the mirror in HF_ENDPOINT)."""
    ensure_hf_mirror_configured()
    found = models.search_models(models.hub_config(), search, limit)
    if json_out:
        print_json({"models": [m.to_json() for m in found], "count": len(found)})
        return EXIT_OK
    if not found:
        print("no models found")
        return EXIT_OK
    rows = [
        (
            m.model,
            "-" if m.downloads is None else str(m.downloads),
            "-" if m.likes is None else str(m.likes),
            m.pipeline_tag or "-",
            (m.last_modified or "-")[:10],
        )
        for m in found
    ]
    render_table(None, ("MODEL", "DOWNLOADS", "LIKES", "TASK", "UPDATED"), rows)
    return EXIT_OK


@model_app.command("delete", epilog="Example: sage llm model delete BAAI/bge-m3 --yes")
@cli_errors
def cmd_model_delete(
    model: ModelArgument,
    revision: Annotated[
        str | None,
        typer.Option("--revision", metavar="REV", help="Only this commit or ref (default: all)."),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    cache_dir: CacheDirOption = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> int:
    """Delete a model's cached revisions (all of them unless --revision)."""
    config = models.hub_config(cache_dir)
    cached = models.cached_model(model, config)
    if not yes:
        if not sys.stdin.isatty():
            err(f"error: refusing to delete {model!r} without confirmation; pass --yes")
            return EXIT_USAGE
        which = f"revision {revision}" if revision else f"all {len(cached.revisions)} revision(s)"
        answer = input(f"delete {which} of {model} ({human_size(cached.size_bytes)})? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            err("aborted; nothing was deleted")
            return EXIT_FAILED
    result = models.delete_model(model, config, revision)
    if json_out:
        print_json(result.to_json())
    else:
        print(
            f"deleted {len(result.commits)} revision(s) of {model}, "
            f"freed {human_size(result.freed_bytes)}"
        )
    return EXIT_OK
