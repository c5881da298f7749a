"""Embedding methods by name: each method module contributes one `MethodSpec`.

Choosing a method is configuration (`EmbeddingFactory.create("openai", ...)`), never an
`if` chain; a new method is a new module plus one line in `methods/__init__.py`, or a
`register()` call from outside the package.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from sage.common.components.sage_embedding.base import BaseEmbedding
from sage.common.components.sage_embedding.protocols import EmbeddingModelInfo, ModelAvailability
from sage.common.exceptions import ConflictError, InvalidRequestError

__all__ = ["AvailabilityCheck", "MethodRegistry", "MethodSpec", "available"]

AvailabilityCheck = Callable[[str | None, Mapping[str, str]], ModelAvailability]
"""(model or None, environment) -> what `check_model_availability` reports."""


def available(message: str) -> ModelAvailability:
    """An 'available, nothing to do' answer."""
    return {"status": "available", "message": message, "action": ""}


@dataclass(frozen=True)
class MethodSpec:
    """Everything the factory and the model listing need to know about one method."""

    name: str
    display_name: str
    description: str
    factory: Callable[..., BaseEmbedding]
    requires_api_key: bool = False
    requires_download: bool = False
    default_dimension: int | None = None
    examples: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    check: AvailabilityCheck | None = None

    def info(self) -> EmbeddingModelInfo:
        """The public description used by `list_embedding_models()`."""
        return {
            "display_name": self.display_name,
            "description": self.description,
            "requires_api_key": self.requires_api_key,
            "requires_download": self.requires_download,
            "default_dimension": self.default_dimension,
            "examples": list(self.examples),
        }

    def availability(
        self, model: str | None, env: Mapping[str, str] | None = None
    ) -> ModelAvailability:
        """Whether `model` can be used now, without loading it or calling the provider."""
        environ = os.environ if env is None else env
        if self.check is None:
            return available(f"{self.name} needs no model files and no credentials")
        return self.check(model, environ)


@dataclass
class MethodRegistry:
    """Name (or alias) -> MethodSpec, safe to extend from several threads."""

    _specs: dict[str, MethodSpec] = field(default_factory=dict)
    _aliases: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def of(cls, specs: Iterable[MethodSpec]) -> MethodRegistry:
        """A registry holding `specs`."""
        registry = cls()
        for spec in specs:
            registry.register(spec)
        return registry

    def register(self, spec: MethodSpec) -> None:
        """Add a method; its name and aliases must be new."""
        with self._lock:
            names = [_key(spec.name), *(_key(alias) for alias in spec.aliases)]
            taken = [n for n in names if n in self._specs or n in self._aliases]
            if taken:
                raise ConflictError(f"embedding method name already registered: {taken[0]!r}")
            self._specs[names[0]] = spec
            for alias in names[1:]:
                self._aliases[alias] = names[0]

    def get(self, name: str) -> MethodSpec:
        """The spec for `name` or one of its aliases (case-insensitive)."""
        key = _key(name)
        spec = self._specs.get(self._aliases.get(key, key))
        if spec is None:
            raise InvalidRequestError(
                f"unknown embedding method {name!r}; known methods: {', '.join(self.names())}",
                param="method",
                code="unknown_embedding_method",
            )
        return spec

    def names(self) -> list[str]:
        """Canonical method names in registration order."""
        return list(self._specs)

    def specs(self) -> list[MethodSpec]:
        """All specs in registration order."""
        return list(self._specs.values())

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        key = _key(name)
        return key in self._specs or key in self._aliases


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_")
