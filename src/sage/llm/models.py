"""Models in the local Hugging Face cache: download, inspect, search the Hub, delete.

Backs `sage llm model ...`. Uses the standard Hub cache layout (the one vLLM, transformers
and sentence-transformers read), so a model downloaded here is found by every engine.

The Hub endpoint, cache folder and token are resolved on each call from the environment
(HF_ENDPOINT, HF_HUB_CACHE / HF_HOME, HF_TOKEN) rather than taken from huggingface_hub's
import-time constants: `ensure_hf_mirror_configured()` may set HF_ENDPOINT after the
library was imported, and the mirror must still be used.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sage.common.exceptions import (
    AuthenticationError,
    NotFoundError,
    SageError,
    ServiceUnavailableError,
    UpstreamError,
)

__all__ = [
    "OFFICIAL_ENDPOINT",
    "CachedFile",
    "CachedModel",
    "CachedRevision",
    "DeleteResult",
    "DownloadResult",
    "HubConfig",
    "RemoteModel",
    "cached_model",
    "cached_models",
    "delete_model",
    "download_model",
    "hub_config",
    "search_models",
]

OFFICIAL_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class HubConfig:
    """Where models come from and where they are kept."""

    endpoint: str | None
    """Hub base URL; None means huggingface.co."""
    cache_dir: Path
    token: str | None = field(default=None, repr=False)
    """None lets huggingface_hub fall back to the token saved by `hf auth login`."""

    @property
    def endpoint_url(self) -> str:
        """The endpoint for messages."""
        return self.endpoint or OFFICIAL_ENDPOINT


def hub_config(
    cache_dir: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> HubConfig:
    """The endpoint, cache folder and token in effect, from `environ` (default os.environ).

    Cache folder: `cache_dir` > HF_HUB_CACHE > HUGGINGFACE_HUB_CACHE > $HF_HOME/hub >
    $XDG_CACHE_HOME/huggingface/hub > ~/.cache/huggingface/hub (huggingface_hub's order).
    """
    env = os.environ if environ is None else environ
    endpoint = (env.get("HF_ENDPOINT") or "").strip().rstrip("/") or None
    token = env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN") or None
    if cache_dir is not None:
        folder = Path(cache_dir)
    elif env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        folder = Path(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"])
    else:
        xdg = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        folder = Path(env.get("HF_HOME") or Path(xdg) / "huggingface") / "hub"
    return HubConfig(endpoint, folder.expanduser(), token)


@dataclass(frozen=True)
class CachedFile:
    """One file of a cached revision."""

    name: str
    size_bytes: int
    path: Path


@dataclass(frozen=True)
class CachedRevision:
    """One snapshot (commit) of a model in the cache."""

    commit: str
    refs: tuple[str, ...]
    path: Path
    size_bytes: int
    files: tuple[CachedFile, ...]
    last_modified: float

    def to_json(self) -> dict[str, Any]:
        """Plain data for `--json`."""
        return {
            "commit": self.commit,
            "refs": list(self.refs),
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "last_modified": self.last_modified,
            "files": [
                {"name": f.name, "size_bytes": f.size_bytes, "path": str(f.path)}
                for f in self.files
            ],
        }


@dataclass(frozen=True)
class CachedModel:
    """A model repository in the cache with its revisions (newest first)."""

    model: str
    path: Path
    size_bytes: int
    nb_files: int
    last_modified: float
    revisions: tuple[CachedRevision, ...]

    def to_json(self) -> dict[str, Any]:
        """Plain data for `--json`."""
        return {
            "model": self.model,
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "nb_files": self.nb_files,
            "last_modified": self.last_modified,
            "revisions": [r.to_json() for r in self.revisions],
        }


@dataclass(frozen=True)
class DownloadResult:
    """What `download_model` fetched and where it is."""

    model: str
    revision: str
    commit: str
    path: Path
    files: tuple[CachedFile, ...]
    downloaded_files: int
    downloaded_bytes: int

    @property
    def size_bytes(self) -> int:
        """Total size of the snapshot's files."""
        return sum(f.size_bytes for f in self.files)

    def to_json(self) -> dict[str, Any]:
        """Plain data for `--json`."""
        return {
            "model": self.model,
            "revision": self.revision,
            "commit": self.commit,
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "downloaded_files": self.downloaded_files,
            "downloaded_bytes": self.downloaded_bytes,
            "files": [{"name": f.name, "size_bytes": f.size_bytes} for f in self.files],
        }


@dataclass(frozen=True)
class RemoteModel:
    """A model as the Hub's search lists it."""

    model: str
    downloads: int | None
    likes: int | None
    pipeline_tag: str | None
    last_modified: str | None
    tags: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """Plain data for `--json`."""
        return {
            "model": self.model,
            "downloads": self.downloads,
            "likes": self.likes,
            "pipeline_tag": self.pipeline_tag,
            "last_modified": self.last_modified,
            "tags": list(self.tags),
        }


@dataclass(frozen=True)
class DeleteResult:
    """What `delete_model` removed."""

    model: str
    commits: tuple[str, ...]
    freed_bytes: int

    def to_json(self) -> dict[str, Any]:
        """Plain data for `--json`."""
        return {"model": self.model, "commits": list(self.commits), "freed_bytes": self.freed_bytes}


@contextmanager
def hub_errors(
    config: HubConfig, model: str | None = None, revision: str | None = None
) -> Iterator[None]:
    """Turn huggingface_hub and transport errors into SageErrors that name what went wrong."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = config.endpoint_url
    try:
        yield
    except GatedRepoError as exc:
        raise AuthenticationError(
            f"model {model!r} on {where} is gated: accept its terms on the Hub and set HF_TOKEN"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise NotFoundError(
            f"model {model!r} not found on {where} (a private model needs HF_TOKEN)",
            param="model",
        ) from exc
    except RevisionNotFoundError as exc:
        raise NotFoundError(
            f"revision {revision!r} of model {model!r} not found on {where}", param="revision"
        ) from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        if status in (401, 403):
            raise AuthenticationError(f"{where} refused access ({status}); check HF_TOKEN") from exc
        raise UpstreamError(f"the Hub at {where} answered {status}: {_first_line(exc)}") from exc
    except LocalEntryNotFoundError as exc:
        # snapshot_download's way of saying "the Hub is unreachable and the cache lacks it".
        raise ServiceUnavailableError(
            f"cannot reach the Hugging Face Hub at {where} and {model!r} is not fully cached "
            f"(set HF_ENDPOINT for a mirror): {_first_line(exc)}"
        ) from exc
    except (httpx2.TransportError, ConnectionError) as exc:
        raise ServiceUnavailableError(
            f"cannot reach the Hugging Face Hub at {where} (set HF_ENDPOINT for a mirror): {exc}"
        ) from exc
    except OSError as exc:
        raise SageError(f"download of {model!r} failed: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _blobs(storage: Path) -> dict[str, int]:
    folder = storage / "blobs"
    if not folder.is_dir():
        return {}
    return {
        p.name: p.stat().st_size
        for p in folder.iterdir()
        if p.is_file() and not p.name.endswith(".incomplete")
    }


def _snapshot_files(snapshot: Path) -> tuple[CachedFile, ...]:
    files = [
        CachedFile(p.relative_to(snapshot).as_posix(), p.stat().st_size, p)
        for p in snapshot.rglob("*")
        if p.is_file()
    ]
    return tuple(sorted(files, key=lambda f: f.name))


def _storage_folder(config: HubConfig, model: str) -> Path:
    return config.cache_dir / ("models--" + model.replace("/", "--"))


def download_model(
    model: str,
    config: HubConfig,
    *,
    revision: str | None = None,
    progress: bool = True,
) -> DownloadResult:
    """Download every file of `model` at `revision` into the cache; files already there are
    kept (an interrupted download resumes with what is missing)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils.tqdm import tqdm as hf_tqdm

    class _Silent(hf_tqdm):  # type: ignore[misc]
        """Progress bars off (for --json / --quiet) without touching global state."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]

    storage = _storage_folder(config, model)
    before = _blobs(storage)
    with hub_errors(config, model, revision):
        path = Path(
            snapshot_download(
                model,
                revision=revision,
                cache_dir=config.cache_dir,
                endpoint=config.endpoint,
                token=config.token,
                tqdm_class=None if progress else _Silent,
            )
        )
    after = _blobs(storage)
    new = {name: size for name, size in after.items() if name not in before}
    return DownloadResult(
        model=model,
        revision=revision or "main",
        commit=path.name,
        path=path,
        files=_snapshot_files(path),
        downloaded_files=len(new),
        downloaded_bytes=sum(new.values()),
    )


def cached_models(config: HubConfig) -> list[CachedModel]:
    """Every model repository in the cache, sorted by name."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(config.cache_dir)
    except CacheNotFound:
        return []
    models = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        revisions = sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)
        models.append(
            CachedModel(
                model=repo.repo_id,
                path=repo.repo_path,
                size_bytes=repo.size_on_disk,
                nb_files=repo.nb_files,
                last_modified=repo.last_modified,
                revisions=tuple(
                    CachedRevision(
                        commit=r.commit_hash,
                        refs=tuple(sorted(r.refs)),
                        path=r.snapshot_path,
                        size_bytes=r.size_on_disk,
                        files=tuple(
                            sorted(
                                (
                                    CachedFile(
                                        f.file_path.relative_to(r.snapshot_path).as_posix(),
                                        f.size_on_disk,
                                        f.file_path,
                                    )
                                    for f in r.files
                                ),
                                key=lambda f: f.name,
                            )
                        ),
                        last_modified=r.last_modified,
                    )
                    for r in revisions
                ),
            )
        )
    return sorted(models, key=lambda m: m.model)


def cached_model(model: str, config: HubConfig) -> CachedModel:
    """One model from the cache; NotFoundError if it is not there."""
    for cached in cached_models(config):
        if cached.model == model:
            return cached
    raise NotFoundError(
        f"model {model!r} is not in the cache at {config.cache_dir} "
        f"(download it with `sage llm model download {model}`)",
        param="model",
    )


def search_models(
    config: HubConfig, search: str | None = None, limit: int = 20
) -> list[RemoteModel]:
    """Models on the Hub whose id matches `search` (the Hub's own ranking)."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=config.endpoint, token=config.token)
    with hub_errors(config):
        found = list(api.list_models(search=search or None, limit=limit))
    return [
        RemoteModel(
            model=m.id,
            downloads=m.downloads,
            likes=m.likes,
            pipeline_tag=m.pipeline_tag,
            last_modified=m.last_modified.isoformat() if m.last_modified else None,
            tags=tuple(m.tags or ()),
        )
        for m in found
    ]


def delete_model(model: str, config: HubConfig, revision: str | None = None) -> DeleteResult:
    """Delete the cached revisions of `model` (all, or the one whose commit or ref is
    `revision`); with no revision left the whole repository folder goes."""
    from huggingface_hub import scan_cache_dir

    cached = cached_model(model, config)
    chosen = [
        r
        for r in cached.revisions
        if revision is None or r.commit.startswith(revision) or revision in r.refs
    ]
    if not chosen:
        raise NotFoundError(
            f"revision {revision!r} of {model!r} is not in the cache", param="revision"
        )
    commits = tuple(r.commit for r in chosen)
    strategy = scan_cache_dir(config.cache_dir).delete_revisions(*commits)
    freed = strategy.expected_freed_size
    strategy.execute()
    if not any(r.commit not in commits for r in cached.revisions):
        # Nothing of the model is left worth keeping (refs, locks, tree listings).
        import shutil

        shutil.rmtree(cached.path, ignore_errors=True)
    return DeleteResult(model, commits, freed)
