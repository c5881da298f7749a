"""Before an engine is launched for a Hub model: can this host get the model at all?

An engine asked for a Hub id that is not in the local Hugging Face cache downloads it; with
no network (or HF_HUB_OFFLINE=1) vLLM and the transformers engine retry the Hub for most of
a minute per file and then fail with a message that does not say what to do. Lifecycle asks
once, briefly, before it launches anything, and otherwise says what to do: point
HF_ENDPOINT at a Hub mirror that answers, download the model where the network is
reachable, or pass a local folder. Plain Python (httpx, no grpc), unit-tested directly.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

from sage.common.exceptions import EngineStartError

log = logging.getLogger("sage.lifecycle")

OFFICIAL_ENDPOINT = "https://huggingface.co"
# Backends whose engine downloads a Hub id itself (sim serves no files; the embedding
# engine resolves its bundled model locally and says what to do on its own).
HUB_BACKENDS = frozenset({"vllm", "transformers"})
PROBE_ATTEMPTS = 2
PROBE_TIMEOUT_S = 3.0
PROBE_PAUSE_S = 1.0

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_TRUE = frozenset({"1", "true", "yes", "on"})


def is_hub_id(model: str) -> bool:
    """`org/name` or `name` (a Hub id), as opposed to a local path."""
    return not os.path.isabs(model) and _HUB_ID.fullmatch(model) is not None


def hub_cache_dirs(environ: Mapping[str, str]) -> list[Path]:
    """Where huggingface_hub keeps downloads: HF_HUB_CACHE, else HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub."""
    if environ.get("HF_HUB_CACHE"):
        return [Path(environ["HF_HUB_CACHE"]).expanduser()]
    if environ.get("HF_HOME"):
        return [Path(environ["HF_HOME"]).expanduser() / "hub"]
    xdg = Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return [xdg / "huggingface" / "hub"]


# A snapshot holding one of these is a model an engine can load without the Hub
# (config.json: transformers layout; params.json: Mistral's; a GGUF file: llama.cpp's).
_MODEL_FILES = ("*/config.json", "*/params.json", "*/*.gguf")


def is_cached(model: str, environ: Mapping[str, str]) -> bool:
    """A snapshot of the model is in the local Hub cache."""
    folder = "models--" + model.replace("/", "--")
    for root in hub_cache_dirs(environ):
        snapshots = root / folder / "snapshots"
        if snapshots.is_dir() and any(any(snapshots.glob(p)) for p in _MODEL_FILES):
            return True
    return False


def cached_file(model: str, name: str, environ: Mapping[str, str]) -> Path | None:
    """`name` (e.g. config.json) of the Hub model's cached snapshot: the one refs/main
    names, else the newest that has it; None when the host has none. Reads no network."""
    folder = "models--" + model.replace("/", "--")
    for root in hub_cache_dirs(environ):
        snapshots = root / folder / "snapshots"
        try:
            main = (root / folder / "refs" / "main").read_text().strip()
        except OSError:
            main = ""
        if main and (snapshots / main / name).is_file():
            return snapshots / main / name
        found = [path for path in snapshots.glob(f"*/{name}") if path.is_file()]
        if found:
            return max(found, key=lambda path: path.stat().st_mtime)
    return None


def what_to_do(model: str) -> str:
    """The three ways to get a model to an engine that cannot reach the Hub."""
    return (
        "set HF_ENDPOINT to a Hub mirror this host can reach, download the model where the "
        f"network is reachable (`sage llm model download {model}`, into this host's "
        "HF_HUB_CACHE/HF_HOME), or pass a local model folder (an absolute path)"
    )


def check_hub_model(
    model: str,
    environ: Mapping[str, str] | None = None,
    *,
    attempts: int = PROBE_ATTEMPTS,
    timeout_s: float = PROBE_TIMEOUT_S,
    pause_s: float = PROBE_PAUSE_S,
) -> None:
    """Return when an engine can get `model` (a local path, a cached Hub id, or a Hub that
    answers); else raise EngineStartError saying what to do. Blocks for at most
    `attempts` probes of `timeout_s` each (run it in a thread)."""
    env = os.environ if environ is None else environ
    if not is_hub_id(model) or is_cached(model, env):
        return
    if env.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        raise EngineStartError(
            f"model {model!r} is not in this host's Hugging Face cache and HF_HUB_OFFLINE "
            f"is set; {what_to_do(model)}",
            param="model_id",
        )
    endpoint = (env.get("HF_ENDPOINT") or OFFICIAL_ENDPOINT).rstrip("/")
    reason = ""
    with httpx.Client(timeout=timeout_s, follow_redirects=False) as client:
        for attempt in range(1, attempts + 1):
            try:
                client.head(f"{endpoint}/api/models/{model}")
                return  # any answer: the engine reports what the Hub says
            except httpx.HTTPError as exc:
                reason = str(exc) or type(exc).__name__
                log.warning(
                    "Hub unreachable",
                    extra={
                        "model": model,
                        "endpoint": endpoint,
                        "attempt": f"{attempt}/{attempts}",
                        "error": reason,
                    },
                )
            if attempt < attempts:
                time.sleep(pause_s)
    raise EngineStartError(
        f"model {model!r} is not in this host's Hugging Face cache and {endpoint} cannot be "
        f"reached ({reason}); {what_to_do(model)}",
        param="model_id",
    )
