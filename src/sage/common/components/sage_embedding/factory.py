"""EmbeddingFactory and the module-level helpers of the seed API.

`EmbeddingFactory.create(method, **kwargs)` looks the method up by name and builds it;
options are checked against what the method accepts first, so a typo is a clear
InvalidRequestError instead of a TypeError from deep inside a constructor.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from sage.common.components.sage_embedding.base import BaseEmbedding
from sage.common.components.sage_embedding.methods import BUILTIN_METHODS
from sage.common.components.sage_embedding.protocols import EmbeddingModelInfo, ModelAvailability
from sage.common.components.sage_embedding.registry import MethodRegistry, MethodSpec
from sage.common.exceptions import InvalidRequestError, SageError

__all__ = [
    "EmbeddingFactory",
    "check_model_availability",
    "default_registry",
    "get_embedding_model",
    "list_embedding_models",
]

default_registry: MethodRegistry = MethodRegistry.of(BUILTIN_METHODS)
"""The built-in methods; `default_registry.register(spec)` adds one for the whole process."""


class EmbeddingFactory:
    """Builds embedders by method name (`hash`, `hf`, `openai`, ...)."""

    @staticmethod
    def create(method: str, **kwargs: Any) -> BaseEmbedding:
        """A new embedder of `method`, configured by `kwargs` (see each method's class)."""
        spec = default_registry.get(method)
        _check_options(spec, kwargs)
        return spec.factory(**kwargs)

    @staticmethod
    def list_methods() -> list[str]:
        """Registered method names."""
        return default_registry.names()


def get_embedding_model(method: str, **kwargs: Any) -> BaseEmbedding:
    """Alias of `EmbeddingFactory.create`, the name older SAGE code uses."""
    return EmbeddingFactory.create(method, **kwargs)


def list_embedding_models() -> dict[str, EmbeddingModelInfo]:
    """`{method: {display_name, description, requires_api_key, requires_download,
    default_dimension, examples}}` for every registered method."""
    return {spec.name: spec.info() for spec in default_registry.specs()}


def check_model_availability(
    method: str, model: str | None = None, *, env: Mapping[str, str] | None = None
) -> ModelAvailability:
    """Whether `method` (and `model`) can be used now: `available`, `cached`,
    `needs_api_key`, `needs_download` or `unavailable`, with a message and the action to
    take. Never loads a model or calls a provider."""
    try:
        spec = default_registry.get(method)
    except SageError as exc:
        return {
            "status": "unavailable",
            "message": exc.message,
            "action": "pick one of the methods listed by list_embedding_models()",
        }
    return spec.availability(model, env)


def _accepted_options(factory: Callable[..., Any]) -> tuple[set[str], set[str], bool]:
    """(accepted names, required names, open-ended) from the constructor chain.

    A subclass that forwards `**options` to its parent accepts the parent's names too, so
    walk the MRO until a constructor without `**kwargs` closes the list.
    """
    accepted: set[str] = set()
    required: set[str] = set()
    classes = inspect.getmro(factory) if inspect.isclass(factory) else ()
    targets: list[Callable[..., Any]] = [
        vars(cls)["__init__"] for cls in classes if "__init__" in vars(cls) and cls is not object
    ] or [factory]
    for index, target in enumerate(targets):
        params = list(inspect.signature(target).parameters.values())
        if classes:
            params = params[1:]  # self
        open_ended = False
        for param in params:
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                open_ended = True
            elif param.kind is not inspect.Parameter.VAR_POSITIONAL:
                accepted.add(param.name)
                if param.default is inspect.Parameter.empty and index == 0:
                    required.add(param.name)
        if not open_ended:
            return accepted, required, False
    return accepted, required, True


def _check_options(spec: MethodSpec, kwargs: Mapping[str, Any]) -> None:
    accepted, required, open_ended = _accepted_options(spec.factory)
    unknown = sorted(set(kwargs) - accepted)
    if unknown and not open_ended:
        raise InvalidRequestError(
            f"embedding method {spec.name!r} does not take option(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(sorted(accepted)) or '(none)'}",
            param=unknown[0],
            code="unknown_embedding_option",
        )
    missing = sorted(required - set(kwargs))
    if missing:
        raise InvalidRequestError(
            f"embedding method {spec.name!r} needs option(s) {', '.join(missing)}",
            param=missing[0],
            code="missing_embedding_option",
        )
