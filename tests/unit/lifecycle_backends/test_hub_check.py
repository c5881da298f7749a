"""Lifecycle's check before launching an engine for a Hub model: offline it fails fast with
what to do (one log line per attempt), and it stays out of the way of models the host has.
The Hub is a real HTTP server on loopback, or a closed port (what no network looks like)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from sage.common.exceptions import EngineStartError
from sage.common.utils.processes import free_port
from sage.services.lifecycle.hub import check_hub_model, is_hub_id

MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
REMEDIES = ("HF_ENDPOINT", f"sage llm model download {MODEL}", "local model folder")


def _offline(tmp_path: Path) -> dict[str, str]:
    """An empty Hub cache and a Hub endpoint nothing answers on."""
    return {
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
    }


@pytest.fixture
def hub() -> Iterator[str]:
    """A Hub stand-in that answers 404 to everything (any answer means reachable)."""

    class NotFound(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return None

    server = HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_offline_fails_with_what_to_do_and_one_line_per_attempt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sage.lifecycle")
    with pytest.raises(EngineStartError) as caught:
        check_hub_model(MODEL, _offline(tmp_path), attempts=3, pause_s=0.01)
    message = caught.value.message
    assert "\n" not in message and "cannot be reached" in message
    assert all(remedy in message for remedy in REMEDIES), message
    assert [r.getMessage() for r in caplog.records] == ["Hub unreachable"] * 3


def test_hf_hub_offline_fails_at_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="sage.lifecycle")
    env = {**_offline(tmp_path), "HF_HUB_OFFLINE": "1"}
    with pytest.raises(EngineStartError) as caught:
        check_hub_model(MODEL, env)
    assert "HF_HUB_OFFLINE" in caught.value.message
    assert all(remedy in caught.value.message for remedy in REMEDIES)
    assert caplog.records == []  # nothing was tried


def test_models_the_host_has_or_can_get_pass(tmp_path: Path, hub: str) -> None:
    env = _offline(tmp_path)
    # In the Hub cache: no network needed, even with HF_HUB_OFFLINE.
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B-Instruct" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    check_hub_model(MODEL, {**env, "HF_HUB_OFFLINE": "1"})
    gguf = tmp_path / "hub" / "models--org--tiny-GGUF" / "snapshots" / "abc"
    gguf.mkdir(parents=True)
    (gguf / "tiny.Q4_K_M.gguf").write_bytes(b"GGUF")
    check_hub_model("org/tiny-GGUF", {**env, "HF_HUB_OFFLINE": "1"})
    # An interrupted download (no model file yet) is not a model the engine can load.
    partial = tmp_path / "hub" / "models--org--partial" / "snapshots" / "abc"
    partial.mkdir(parents=True)
    (partial / "README.md").write_text("")
    with pytest.raises(EngineStartError):
        check_hub_model("org/partial", {**env, "HF_HUB_OFFLINE": "1"})
    # A local folder is not the Hub's business.
    check_hub_model(str(tmp_path), {**env, "HF_HUB_OFFLINE": "1"})
    # A Hub (mirror) that answers: the engine downloads, and reports what the Hub says.
    check_hub_model("org/not-cached", {**env, "HF_ENDPOINT": hub})


@pytest.mark.parametrize(
    ("model", "hub_id"),
    [("Qwen/Qwen2.5-0.5B-Instruct", True), ("gpt2", True), ("/models/qwen", False)],
)
def test_hub_ids(model: str, hub_id: bool) -> None:
    assert is_hub_id(model) is hub_id
