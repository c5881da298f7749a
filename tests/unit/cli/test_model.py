"""`sage llm model download|show|list|list-remote|delete` against a fake Hugging Face Hub."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from sage.common.utils.processes import free_port
from sage.llm import cli_model
from sage.llm.cli import main

from .fake_hub import FakeFile, FakeHub, FakeRepo

CONFIG = b'{"model_type": "llama", "hidden_size": 8}\n'
WEIGHTS = bytes(range(256)) * 40  # 10 kB: served like an LFS file, through the "CDN"
TOKENIZER = b'{"version": "1.0"}\n'


def _tiny(hub: FakeHub, repo_id: str = "org/tiny-model") -> FakeRepo:
    return hub.add(
        FakeRepo(
            repo_id,
            [
                FakeFile("config.json", CONFIG),
                FakeFile("model.safetensors", WEIGHTS),
                FakeFile("tokenizer/tokenizer.json", TOKENIZER),
            ],
            downloads=1234,
            likes=5,
        )
    )


def sage(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run `sage llm ARGV...` in this process; returns (exit code, stdout, stderr)."""
    code = main(["llm", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def sage_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = sage(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def _cache() -> Path:
    return Path(os.environ["HF_HUB_CACHE"])


def test_download_show_list_redownload_delete(
    fake_hub: FakeHub, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = _tiny(fake_hub)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token")

    done = sage_json(capsys, "model", "download", repo.repo_id)
    assert done["commit"] == repo.commit and done["revision"] == "main"
    names = [f["name"] for f in done["files"]]
    assert names == ["config.json", "model.safetensors", "tokenizer/tokenizer.json"]
    assert done["downloaded_files"] == 3
    assert done["downloaded_bytes"] == len(CONFIG) + len(WEIGHTS) + len(TOKENIZER)
    snapshot = Path(done["path"])
    assert snapshot == _cache() / "models--org--tiny-model" / "snapshots" / repo.commit
    assert (snapshot / "model.safetensors").read_bytes() == WEIGHTS
    assert (snapshot / "tokenizer" / "tokenizer.json").read_bytes() == TOKENIZER
    # The weights came from the CDN host, the token went to the Hub only.
    assert [r.method for r in fake_hub.seen(prefix="/cdn/")] == ["GET"]
    info = fake_hub.seen("GET", "/api/models/org/tiny-model/revision/main")
    assert info and info[0].headers["authorization"] == "Bearer hf_fake_token"

    shown = sage_json(capsys, "model", "show", repo.repo_id)
    assert shown["model"] == repo.repo_id
    assert shown["size_bytes"] == done["downloaded_bytes"]
    (revision,) = shown["revisions"]
    assert (revision["commit"], revision["refs"]) == (repo.commit, ["main"])
    assert {f["name"]: f["size_bytes"] for f in revision["files"]} == {
        "config.json": len(CONFIG),
        "model.safetensors": len(WEIGHTS),
        "tokenizer/tokenizer.json": len(TOKENIZER),
    }
    code, out, _ = sage(capsys, "model", "show", repo.repo_id)
    assert code == 0 and "model.safetensors" in out and repo.commit in out

    listed = sage_json(capsys, "model", "list")
    assert listed["count"] == 1 and listed["models"][0]["model"] == repo.repo_id

    # Everything is cached: the second download fetches no file at all.
    fake_hub.clear()
    again = sage_json(capsys, "model", "download", repo.repo_id)
    assert again["downloaded_files"] == 0 and again["commit"] == repo.commit
    assert not fake_hub.seen(prefix="/org/tiny-model/resolve/")
    assert not fake_hub.seen(prefix="/cdn/")
    code, out, _ = sage(capsys, "model", "download", repo.repo_id)
    assert code == 0 and "already up to date" in out

    # Deleting asks first; without a terminal to ask on it refuses.
    code, _, err = sage(capsys, "model", "delete", repo.repo_id)
    assert code == 2 and "--yes" in err
    assert snapshot.exists()
    deleted = sage_json(capsys, "model", "delete", repo.repo_id, "--yes")
    assert deleted["commits"] == [repo.commit] and deleted["freed_bytes"] > len(WEIGHTS)
    assert not (_cache() / "models--org--tiny-model").exists()
    code, _, err = sage(capsys, "model", "show", repo.repo_id)
    assert code == 1 and "not in the cache" in err
    assert sage_json(capsys, "model", "list")["count"] == 0


def test_interrupted_download_resumes(
    fake_hub: FakeHub, capsys: pytest.CaptureFixture[str]
) -> None:
    """A failed file fails the command; the next run fetches only what is missing, and a
    connection cut mid-file continues from where it stopped (HTTP Range)."""
    # Bigger than huggingface_hub's 10 MiB read chunk, so a cut happens after bytes landed.
    big = bytes(range(256)) * (64 * 1024)
    repo = fake_hub.add(
        FakeRepo("org/big-model", [FakeFile("config.json", CONFIG), FakeFile("w.bin", big)])
    )
    weights = repo.file("w.bin")
    assert weights is not None
    cdn_path = f"/cdn/{weights.sha256}"

    fake_hub.fail[cdn_path] = [500]
    code, _, err = sage(capsys, "model", "download", repo.repo_id, "--quiet")
    assert code == 1 and "500" in err
    snapshot = _cache() / "models--org--big-model" / "snapshots" / repo.commit
    assert (snapshot / "config.json").exists() and not (snapshot / "w.bin").exists()

    fake_hub.clear()
    fake_hub.fail[cdn_path] = ["truncate"]
    done = sage_json(capsys, "model", "download", repo.repo_id)
    assert done["downloaded_files"] == 1
    assert (snapshot / "w.bin").read_bytes() == big
    # Only the missing file was fetched, and its second request asked for the rest only.
    assert not fake_hub.seen("GET", "/org/big-model/resolve/main/config.json")
    cdn = fake_hub.seen("GET", cdn_path)
    assert len(cdn) == 2 and "range" not in cdn[0].headers
    start = int(cdn[1].headers["range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= len(big) * 3 // 4


def test_download_a_revision_into_a_cache_dir(
    fake_hub: FakeHub, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    repo = _tiny(fake_hub)
    target = tmp_path / "elsewhere"
    done = sage_json(
        capsys, "model", "download", repo.repo_id, "--revision", repo.commit, "--cache-dir",
        str(target),
    )  # fmt: skip
    assert done["revision"] == repo.commit
    assert Path(done["path"]).is_relative_to(target)
    assert not _cache().exists()
    shown = sage_json(capsys, "model", "show", repo.repo_id, "--cache-dir", str(target))
    assert shown["revisions"][0]["refs"] == []  # fetched by commit: no branch name recorded


def test_list_remote(fake_hub: FakeHub, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("org/tiny-model", "org/tiny-embedder", "other/big-model"):
        _tiny(fake_hub, name)
    found = sage_json(capsys, "model", "list-remote", "--search", "tiny", "--limit", "5")
    assert [m["model"] for m in found["models"]] == ["org/tiny-model", "org/tiny-embedder"]
    assert found["count"] == 2 and found["models"][0]["downloads"] == 1234
    (search,) = fake_hub.seen("GET", "/api/models")
    assert search.query["search"] == ["tiny"] and search.query["limit"] == ["5"]

    limited = sage_json(capsys, "model", "list-remote", "--limit", "1")
    assert limited["count"] == 1
    code, out, _ = sage(capsys, "model", "list-remote", "-s", "big")
    assert code == 0 and "other/big-model" in out and "MODEL" in out


def test_hub_errors_have_exit_codes(
    fake_hub: FakeHub, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = _tiny(fake_hub)
    code, _, err = sage(capsys, "model", "download", "org/missing", "-q")
    assert code == 1 and "'org/missing' not found" in err
    code, _, err = sage(capsys, "model", "download", repo.repo_id, "--revision", "nope", "-q")
    assert code == 1 and "revision 'nope'" in err

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    code, _, err = sage(capsys, "model", "download", repo.repo_id, "-q")
    assert code == 2 and "cannot reach" in err
    monkeypatch.setattr("time.sleep", lambda _: None)  # huggingface_hub's retry back-off
    code, _, err = sage(capsys, "model", "list-remote")
    assert code == 2 and "cannot reach" in err


def test_download_sets_up_the_mirror_first(
    fake_hub: FakeHub, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The seed: `sage llm model download` calls ensure_hf_mirror_configured(), and the
    endpoint it sets is used even though huggingface_hub was imported before."""
    repo = _tiny(fake_hub)
    monkeypatch.delenv("HF_ENDPOINT")
    calls: list[str] = []

    def pick_mirror() -> str:
        calls.append("called")
        os.environ["HF_ENDPOINT"] = fake_hub.endpoint  # monkeypatch restores it
        return fake_hub.endpoint

    monkeypatch.setattr(cli_model, "ensure_hf_mirror_configured", pick_mirror)
    done = sage_json(capsys, "model", "download", repo.repo_id)
    assert calls == ["called"] and done["downloaded_files"] == 3


def test_human_size() -> None:
    assert cli_model.human_size(999) == "999 B"
    assert cli_model.human_size(1234567) == "1.2 MB"
    assert cli_model.human_size(5 * 10**12) == "5.0 TB"
