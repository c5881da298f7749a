"""The scheduler's view of engines: who serves which model, at which URL, in which state."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from enum import StrEnum

from sage.common.exceptions import (
    InvalidRequestError,
    ModelNotFoundError,
    NotFoundError,
    ServiceUnavailableError,
)

# The label lifecycle (or any registrant) sets to an engine's own concurrency: the requests
# it runs at once (vLLM's and the sim's --max-num-seqs, TEI's --max-concurrent-requests).
CONCURRENCY_LABEL = "max_concurrent_requests"
# Each backend's concurrency when the registration does not say: the engine's own default
# (vLLM's max_num_seqs is at most 256 on most hardware; our transformers engine decodes up
# to 64 sequences together). Anything else counts as vLLM-like.
BACKEND_CONCURRENCY = {
    "vllm": 256,
    "sim": 256,
    "tei": 512,
    "infinity": 256,
    "embedding": 64,
    "transformers": 64,
}
DEFAULT_CONCURRENCY = 256


def _positive_int(text: str) -> int:
    """`text` as a positive decimal integer, or 0."""
    value = int(text) if text.isascii() and text.isdigit() and len(text) <= 9 else 0
    return max(0, value)


class EngineKind(StrEnum):
    """What an engine serves."""

    LLM = "llm"
    EMBEDDING = "embedding"


class EngineState(StrEnum):
    """Only READY engines receive traffic."""

    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(frozen=True)
class EngineRecord:
    """One engine as the scheduler routes to it."""

    engine_id: str
    model: str
    kind: EngineKind
    base_url: str
    state: EngineState = EngineState.READY
    role: str = "both"
    backend: str = ""
    aliases: tuple[str, ...] = ()
    port: int = 0
    pid: int = 0
    node_id: str = ""
    gpu_indexes: tuple[int, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    registered_at: float = field(default_factory=time.time)
    adapters: dict[str, str] = field(default_factory=dict)  # LoRA adapters: name → path
    lora_enabled: bool = False  # adapters can be loaded on it at run time

    def serves(self, model: str) -> bool:
        """True when `model` is this engine's model, one of its aliases or adapters."""
        return model == self.model or model in self.aliases or model in self.adapters

    @functools.cached_property
    def declared_concurrency(self) -> int:
        """Its registered max_concurrent_requests label; 0 when not declared (parsed once:
        admission reads it per request)."""
        return _positive_int(self.labels.get(CONCURRENCY_LABEL, ""))

    @functools.cached_property
    def concurrency(self) -> int:
        """Requests the engine runs at once at most: declared, else its backend's default."""
        return self.declared_concurrency or BACKEND_CONCURRENCY.get(
            self.backend, DEFAULT_CONCURRENCY
        )


@dataclass(frozen=True)
class ModelEntry:
    """A model name clients may ask for, and how many ready engines serve it."""

    id: str
    kind: EngineKind
    created: int
    ready_engines: int
    alias_of: str = ""
    parent: str = ""  # a LoRA adapter's base model


@dataclass(frozen=True)
class AdapterEntry:
    """A LoRA adapter the stack knows: its base model and where it loads from. Kept while
    an engine's registration lists it and after that engine stops or crashes (so a request
    can load it on another engine); forgotten once it is unloaded from the last engine."""

    name: str
    base_model: str
    path: str
    created: int


class EngineRegistry:
    """Thread-safe engine table with per-model and per-(model, kind) indexes updated on
    change: reads are per request, so they return a stored tuple (the same object until
    a change touches that model or kind, which lets callers cache what they derive from it
    by identity). One engine's change costs the size of its models' entries, not of the
    whole table (an etcd-mode replica applies every engines/ put one by one)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._engines: dict[str, EngineRecord] = {}
        self._by_model: dict[str, tuple[EngineRecord, ...]] = {}
        self._by_model_kind: dict[tuple[str, EngineKind], tuple[EngineRecord, ...]] = {}
        self._adapters: dict[str, AdapterEntry] = {}
        self._ready: dict[EngineKind, tuple[EngineRecord, ...]] = {}
        # The ready engines behind each index entry, by id in the order they became ready:
        # one engine's change rebuilds only the entries of its names and kind from these
        # (a C-level copy), not every index from every engine.
        self._members: dict[str, dict[str, EngineRecord]] = {}
        self._members_kind: dict[tuple[str, EngineKind], dict[str, EngineRecord]] = {}
        self._ready_members: dict[EngineKind, dict[str, EngineRecord]] = {}
        # Why the table cannot be trusted yet (an etcd-mode replica before its first listing
        # of engines/): a model with no engine is then a 503 naming this, which a caller
        # retries on another replica, not a 404 that says the model does not exist.
        self.unsynced = ""

    @staticmethod
    def validate(record: EngineRecord) -> None:
        """Raise InvalidRequestError naming the field when `record` cannot be routed to."""
        if not record.engine_id:
            raise InvalidRequestError("engine_id must not be empty", param="engine.engine_id")
        if not record.model:
            raise InvalidRequestError("model must not be empty", param="engine.model")
        declared = record.labels.get(CONCURRENCY_LABEL)
        if declared is not None and not _positive_int(declared):
            raise InvalidRequestError(
                f"label {CONCURRENCY_LABEL} must be a positive integer, got {declared!r}",
                param=f"engine.labels.{CONCURRENCY_LABEL}",
            )
        if not record.base_url.startswith(("http://", "https://")):
            raise InvalidRequestError(
                f"base_url must be an http(s) URL, got {record.base_url!r}", param="engine.base_url"
            )

    def register(self, record: EngineRecord) -> bool:
        """Add or replace an engine; returns True when it replaced one with the same id."""
        self.validate(record)
        with self._lock:
            old = self._engines.get(record.engine_id)
            new = self._engines[record.engine_id] = replace(
                record, base_url=record.base_url.rstrip("/")
            )
            self._catalogue_adapters(old, record)
            self._update(old, new)
        return old is not None

    def register_many(self, records: Iterable[EngineRecord]) -> int:
        """Add or replace validated engines with one reindex, not one each (an etcd
        listing of thousands would otherwise cost time quadratic in their number); how
        many replaced one."""
        replaced = 0
        with self._lock:
            for record in records:
                old = self._engines.get(record.engine_id)
                self._engines[record.engine_id] = replace(
                    record, base_url=record.base_url.rstrip("/")
                )
                self._catalogue_adapters(old, record)
                replaced += old is not None
            self._reindex()
        return replaced

    def _catalogue_adapters(self, old: EngineRecord | None, new: EngineRecord) -> None:
        """Learn the adapters `new` lists; forget those it dropped that no engine has."""
        for name, path in new.adapters.items():
            known = self._adapters.get(name)
            if known is None or (known.base_model, known.path) != (new.model, path):
                self._adapters[name] = AdapterEntry(name, new.model, path, int(time.time()))
        if old is None:
            return
        for name in old.adapters.keys() - new.adapters.keys():
            if not any(name in e.adapters for e in self._engines.values()):
                self._adapters.pop(name, None)

    def adapter(self, name: str) -> AdapterEntry | None:
        """The LoRA adapter called `name`, if the stack knows one."""
        return self._adapters.get(name)

    def deregister(self, engine_id: str) -> EngineRecord:
        """Remove an engine; raises NotFoundError naming the id if unknown."""
        with self._lock:
            record = self._engines.pop(engine_id, None)
            if record is None:
                raise NotFoundError(
                    f"no engine with id {engine_id!r}", param="engine_id", code="engine_not_found"
                )
            self._update(record, None)
        return record

    def set_state(self, engine_id: str, state: EngineState) -> None:
        """Change an engine's state (e.g. DRAINING stops new traffic)."""
        with self._lock:
            record = self._engines.get(engine_id)
            if record is not None:
                new = self._engines[engine_id] = replace(record, state=state)
                self._update(record, new)

    @staticmethod
    def _names(record: EngineRecord | None) -> tuple[str, ...]:
        """The names a ready `record` is routed under (none when it is not ready)."""
        if record is None or record.state is not EngineState.READY:
            return ()
        return (record.model, *record.aliases, *record.adapters)

    def _update(self, old: EngineRecord | None, new: EngineRecord | None) -> None:
        """Index one engine's change from `old` to `new` (None: absent): only the entries
        of the names and the kind either is ready under are rebuilt (an engine that stays
        ready under a name keeps its place in that name's tuple)."""
        old_names, new_names = self._names(old), self._names(new)
        kinds: set[EngineKind] = set()
        if old is not None and old_names:
            same_kind = new is not None and bool(new_names) and new.kind is old.kind
            kept = set(new_names) if same_kind else set()
            for name in old_names:
                if name not in kept:
                    self._members[name].pop(old.engine_id, None)
                    self._members_kind[name, old.kind].pop(old.engine_id, None)
            if not same_kind:
                self._ready_members[old.kind].pop(old.engine_id, None)
            kinds.add(old.kind)
        if new is not None and new_names:
            for name in new_names:
                self._members.setdefault(name, {})[new.engine_id] = new
                self._members_kind.setdefault((name, new.kind), {})[new.engine_id] = new
            self._ready_members.setdefault(new.kind, {})[new.engine_id] = new
            kinds.add(new.kind)
        # In place: a reader takes one entry with one dict lookup.
        for name in dict.fromkeys((*old_names, *new_names)):
            self._index_name(name, self._by_model, self._by_model_kind)
        for kind in kinds:
            members = self._ready_members.get(kind)
            if members:
                self._ready[kind] = tuple(members.values())
            else:
                self._ready_members.pop(kind, None)
                self._ready.pop(kind, None)

    def _index_name(
        self,
        name: str,
        by_model: dict[str, tuple[EngineRecord, ...]],
        by_kind: dict[tuple[str, EngineKind], tuple[EngineRecord, ...]],
    ) -> None:
        """Rebuild `name`'s entries in `by_model`/`by_kind` from its members."""
        members = self._members.get(name)
        if not members:
            self._members.pop(name, None)
            by_model.pop(name, None)
            for kind in EngineKind:
                self._members_kind.pop((name, kind), None)
                by_kind.pop((name, kind), None)
            return
        records = by_model[name] = tuple(members.values())
        for kind in EngineKind:
            of_kind = self._members_kind.get((name, kind))
            if not of_kind:
                self._members_kind.pop((name, kind), None)
                by_kind.pop((name, kind), None)
            else:
                by_kind[name, kind] = (
                    records if len(of_kind) == len(records) else tuple(of_kind.values())
                )

    def _reindex(self) -> None:
        """Every index from every engine (a batch of changes: one pass, not one each)."""
        members: dict[str, dict[str, EngineRecord]] = {}
        members_kind: dict[tuple[str, EngineKind], dict[str, EngineRecord]] = {}
        ready_members: dict[EngineKind, dict[str, EngineRecord]] = {}
        for engine_id, record in self._engines.items():
            names = self._names(record)
            if not names:
                continue
            ready_members.setdefault(record.kind, {})[engine_id] = record
            for name in names:
                members.setdefault(name, {})[engine_id] = record
                members_kind.setdefault((name, record.kind), {})[engine_id] = record
        self._members, self._members_kind = members, members_kind
        self._ready_members = ready_members
        by_model: dict[str, tuple[EngineRecord, ...]] = {}
        by_kind: dict[tuple[str, EngineKind], tuple[EngineRecord, ...]] = {}
        for name in members:
            self._index_name(name, by_model, by_kind)
        self._ready = {kind: tuple(m.values()) for kind, m in ready_members.items()}
        self._by_model, self._by_model_kind = by_model, by_kind

    def ready(self, kind: EngineKind) -> tuple[EngineRecord, ...]:
        """Every ready engine of `kind`, any model: the same tuple until the next change
        (the load scraper looks at it ten times a second)."""
        return self._ready.get(kind, ())

    def ready_for(self, model: str, kind: EngineKind | None = None) -> tuple[EngineRecord, ...]:
        """Ready engines serving `model`; raises ModelNotFoundError if there are none."""
        if kind is None:
            engines = self._by_model.get(model, ())
        else:
            engines = self._by_model_kind.get((model, kind), ())
        if not engines:
            if self.unsynced:
                raise ServiceUnavailableError(self.unsynced)
            known = self.engines(model)
            if known:
                raise ModelNotFoundError(
                    model,
                    message=f"The model `{model}` has no ready {kind.value if kind else ''} engine "
                    f"({len(known)} registered, none ready).",
                )
            raise ModelNotFoundError(model)
        return engines

    def counts(self) -> tuple[int, int]:
        """(engines registered, engines ready), without copying or sorting the table
        (GetStatus answers it for the edge every 2 s and for every /health)."""
        return len(self._engines), sum(len(engines) for engines in self._ready.values())

    def engines(self, model: str = "") -> list[EngineRecord]:
        """All engines, or those serving `model`."""
        with self._lock:
            records: Iterable[EngineRecord] = list(self._engines.values())
        return sorted(
            (r for r in records if not model or r.serves(model)), key=lambda r: r.engine_id
        )

    def models(self) -> list[ModelEntry]:
        """Every model and alias with at least one registered engine."""
        entries: dict[str, ModelEntry] = {}
        for record in self.engines():
            ready = len(self._by_model.get(record.model, ()))
            if record.model not in entries:
                entries[record.model] = ModelEntry(
                    record.model, record.kind, int(record.registered_at), ready
                )
            for alias in record.aliases:
                if alias not in entries:
                    entries[alias] = ModelEntry(
                        alias,
                        record.kind,
                        int(record.registered_at),
                        len(self._by_model.get(alias, ())),
                        alias_of=record.model,
                    )
        for adapter in list(self._adapters.values()):
            if adapter.name not in entries:
                entries[adapter.name] = ModelEntry(
                    adapter.name,
                    EngineKind.LLM,
                    adapter.created,
                    len(self._by_model.get(adapter.name, ())),
                    parent=adapter.base_model,
                )
        return sorted(entries.values(), key=lambda m: m.id)
