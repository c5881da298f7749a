"""`hf`: local sentence-transformers models, from a folder or a Hugging Face model id.

torch and sentence-transformers are imported only when a model is created, so the
package (and `list_embedding_models`) works on machines without them. Model files come
from a local folder, else the Hugging Face cache, else a download through
`huggingface_hub` that honours `HF_ENDPOINT` (mirrors), `HF_TOKEN` and offline mode
(`HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE`): offline, a model that is not on disk fails
at once with a `needs_download` error instead of hanging on the network.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sage.common.components.sage_embedding.base import BaseEmbedding
from sage.common.components.sage_embedding.protocols import (
    AvailabilityStatus,
    ModelAvailability,
    Vector,
)
from sage.common.components.sage_embedding.registry import MethodSpec
from sage.common.exceptions import (
    AuthenticationError,
    ConfigurationError,
    InvalidRequestError,
    ModelNotFoundError,
    ServiceUnavailableError,
    UpstreamError,
)

__all__ = ["SPEC", "HFEmbedding", "LocatedModel", "hf_cache_dir", "hf_offline", "locate_model"]

OFFLINE_ENV_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
INSTALL_HINT = "pip install 'sage-llm-control-plane[engines]' (torch + sentence-transformers)"
# Weights for other runtimes that sentence-transformers never reads on the torch backend.
_IGNORE_PATTERNS = [
    "*.onnx",
    "onnx/*",
    "openvino/*",
    "*.msgpack",
    "*.h5",
    "tf_model*",
    "flax_model*",
    "rust_model*",
    "*.ot",
    "coreml/*",
]


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hf_offline(env: Mapping[str, str]) -> bool:
    """True when the environment forbids Hugging Face network access."""
    return any(_truthy(env.get(name)) for name in OFFLINE_ENV_VARS)


def hf_cache_dir(env: Mapping[str, str]) -> str | None:
    """HF_HUB_CACHE, else HF_HOME/hub, else None (huggingface_hub's own default).

    Read here rather than left to huggingface_hub, which reads them once at import.
    """
    if env.get("HF_HUB_CACHE"):
        return env["HF_HUB_CACHE"]
    if env.get("HF_HOME"):
        return str(Path(env["HF_HOME"]).expanduser() / "hub")
    return None


def _sentence_transformers_installed() -> bool:
    return importlib.util.find_spec("sentence_transformers") is not None


def _looks_like_path(model: str) -> bool:
    # Hub ids are `name` or `org/name`; anything else that does not exist is a bad path.
    return model.startswith(("/", ".", "~")) or "\\" in model or model.count("/") > 1


@dataclass(frozen=True)
class LocatedModel:
    """Where a model's files are (or why they are not there)."""

    status: AvailabilityStatus
    path: str | None
    message: str
    action: str
    offline: bool = False

    def availability(self) -> ModelAvailability:
        """The public answer of `check_model_availability`."""
        return {"status": self.status, "message": self.message, "action": self.action}


def locate_model(
    model: str, *, env: Mapping[str, str], cache_dir: str | None = None, revision: str | None = None
) -> LocatedModel:
    """Find `model` on disk without any network call."""
    cache_dir = cache_dir or hf_cache_dir(env)
    local = Path(model).expanduser()
    if local.is_dir():
        return LocatedModel("available", str(local), f"hf model folder {str(local)!r}", "")
    if _looks_like_path(model):
        return LocatedModel(
            "unavailable",
            None,
            f"hf model path {model!r} does not exist",
            "pass an existing model folder or a Hugging Face model id",
        )
    try:
        hub = importlib.import_module("huggingface_hub")
        errors = importlib.import_module("huggingface_hub.errors")
    except ImportError:
        return LocatedModel("unavailable", None, "huggingface_hub is not installed", INSTALL_HINT)
    try:
        path = hub.snapshot_download(
            model, cache_dir=cache_dir, revision=revision, local_files_only=True
        )
    except errors.HFValidationError as exc:
        return LocatedModel(
            "unavailable",
            None,
            f"{model!r} is neither a model folder nor a valid Hugging Face id: {exc}",
            "pass an existing model folder or a Hugging Face model id",
        )
    except (errors.LocalEntryNotFoundError, OSError):
        offline = hf_offline(env)
        endpoint = env.get("HF_ENDPOINT") or "https://huggingface.co"
        if offline:
            message = (
                f"hf model {model!r} is not in the Hugging Face cache and offline mode "
                f"({' / '.join(OFFLINE_ENV_VARS)}) forbids downloading it"
            )
            action = (
                f"download it where the network is reachable (`huggingface-cli download "
                f"{model}`, or `sage llm model download {model}`) and copy the cache, or "
                f"pass a local model folder"
            )
        else:
            message = f"hf model {model!r} is not cached; it will be downloaded from {endpoint}"
            action = (
                f"let create() download it, or pre-fetch with `huggingface-cli download {model}`"
                "; set HF_ENDPOINT to use a mirror"
            )
        return LocatedModel("needs_download", None, message, action, offline=offline)
    return LocatedModel("cached", str(path), f"hf model {model!r} is in the local cache", "")


def _download(
    model: str,
    *,
    env: Mapping[str, str],
    cache_dir: str | None,
    revision: str | None,
    token: str | None,
) -> str:
    """Fetch `model` into the cache and return its snapshot folder."""
    hub = importlib.import_module("huggingface_hub")
    errors = importlib.import_module("huggingface_hub.errors")
    endpoint = env.get("HF_ENDPOINT") or None
    try:
        return str(
            hub.snapshot_download(
                model,
                cache_dir=cache_dir,
                revision=revision,
                token=token,
                endpoint=endpoint,
                ignore_patterns=_IGNORE_PATTERNS,
            )
        )
    except errors.GatedRepoError as exc:
        raise AuthenticationError(
            f"hf model {model!r} is gated: accept its licence on the Hub and set HF_TOKEN ({exc})",
            param="token",
        ) from exc
    except errors.RepositoryNotFoundError as exc:
        raise ModelNotFoundError(
            model, message=f"no Hugging Face model named {model!r} (or it is private): {exc}"
        ) from exc
    except errors.RevisionNotFoundError as exc:
        raise ModelNotFoundError(
            model, message=f"hf model {model!r} has no revision {revision!r}: {exc}"
        ) from exc
    except (errors.HfHubHTTPError, OSError) as exc:
        raise ServiceUnavailableError(
            f"hf model {model!r} is not cached (needs_download) and could not be downloaded "
            f"from {endpoint or 'https://huggingface.co'}: {exc}. Set HF_ENDPOINT to a "
            "reachable mirror, or pass a local model folder.",
            code="model_download_failed",
        ) from exc


class HFEmbedding(BaseEmbedding):
    """A sentence-transformers model; `embed`/`embed_batch` run in the calling thread.

    `normalize=True` returns unit vectors; `batch_size` is the forward-pass size; `device`
    is passed to sentence-transformers (None lets it pick CUDA when there is one).
    """

    method = "hf"
    default_batch_size = 32
    max_concurrency = 1  # one model: parallel calls would only contend for the same cores

    def __init__(
        self,
        model: str,
        *,
        device: str | None = None,
        normalize: bool = True,
        batch_size: int = 32,
        cache_dir: str | None = None,
        revision: str | None = None,
        token: str | None = None,
        trust_remote_code: bool = False,
        local_files_only: bool = False,
        truncate_dim: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        environ = os.environ if env is None else env
        if not model or not model.strip():
            raise InvalidRequestError("hf needs model=<folder or Hugging Face id>", param="model")
        if batch_size <= 0:
            raise InvalidRequestError("batch_size must be positive", param="batch_size")
        if not _sentence_transformers_installed():
            raise ConfigurationError(
                f"the 'hf' embedding method needs sentence-transformers: {INSTALL_HINT}",
                code="missing_dependency",
            )
        self._model = model.strip()
        self.normalize = normalize
        self.batch_size = batch_size
        located = locate_model(self._model, env=environ, cache_dir=cache_dir, revision=revision)
        if located.status == "unavailable":
            raise ModelNotFoundError(
                self._model, message=f"{located.message}; {located.action}".rstrip("; ")
            )
        path = located.path
        if path is None:
            if local_files_only or located.offline:
                reason = "" if located.offline else " and local_files_only=True"
                raise ConfigurationError(
                    f"{located.message}{reason} (needs_download). Action: {located.action}",
                    code="model_needs_download",
                )
            path = _download(
                self._model,
                env=environ,
                cache_dir=cache_dir or hf_cache_dir(environ),
                revision=revision,
                token=token or environ.get("HF_TOKEN") or None,
            )
        self.path = path
        self._encoder = self._load(path, device, trust_remote_code, truncate_dim)

    def _load(
        self, path: str, device: str | None, trust_remote_code: bool, truncate_dim: int | None
    ) -> Any:
        st = importlib.import_module("sentence_transformers")
        try:
            # Files are on disk by now, so loading never touches the network.
            return st.SentenceTransformer(
                path,
                device=device,
                trust_remote_code=trust_remote_code,
                local_files_only=True,
                truncate_dim=truncate_dim,
            )
        except (OSError, ValueError, RuntimeError, KeyError, ImportError) as exc:
            raise ConfigurationError(
                f"could not load hf model {self._model!r} from {path}: {exc}",
                code="model_load_failed",
            ) from exc

    @property
    def model_name(self) -> str:
        """The folder or Hub id it was created with."""
        return self._model

    def embed(self, text: str) -> Vector:
        """One forward pass for one text."""
        return self._encode([text])[0]

    def embed_batch(self, texts: Sequence[str]) -> list[Vector]:
        """One `encode` call for all `texts` (sentence-transformers splits by `batch_size`)."""
        if not texts:
            return []
        return self._encode(list(texts))

    def _encode(self, texts: list[str]) -> list[Vector]:
        array = self._encoder.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=self.normalize,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        rows = array.tolist()
        if not isinstance(rows, list) or len(rows) != len(texts):
            raise UpstreamError(f"hf model {self._model!r} returned a malformed batch")
        return [[float(x) for x in row] for row in rows]

    def get_dim(self) -> int:
        """The model's output size (after `truncate_dim`)."""
        for name in ("get_embedding_dimension", "get_sentence_embedding_dimension"):
            getter = getattr(self._encoder, name, None)
            if getter is not None:
                dim = getter()
                if isinstance(dim, int) and dim > 0:
                    return dim
                break
        return len(self.embed("dimension probe"))

    def close(self) -> None:
        """Drop the model so its memory can be freed."""
        self._encoder = None


def _check(model: str | None, env: Mapping[str, str]) -> ModelAvailability:
    if not _sentence_transformers_installed():
        return {
            "status": "unavailable",
            "message": "the hf method needs sentence-transformers and torch, not installed",
            "action": INSTALL_HINT,
        }
    if not model:
        return {
            "status": "available",
            "message": "sentence-transformers is installed; name a model to check its files",
            "action": "",
        }
    return locate_model(model, env=env).availability()


SPEC = MethodSpec(
    name="hf",
    display_name="Hugging Face (sentence-transformers)",
    description="Local sentence-transformers models from a folder or the Hugging Face Hub",
    factory=HFEmbedding,
    requires_download=True,
    default_dimension=None,
    examples=(
        "BAAI/bge-small-zh-v1.5",
        "BAAI/bge-m3",
        "sentence-transformers/all-MiniLM-L6-v2",
    ),
    aliases=("huggingface", "sentence_transformers"),
    check=_check,
)
