"""LoRA in launch plans and specs: vLLM gets --enable-lora [--max-lora-rank N] and runtime
updating, the sim the same flags, backends without LoRA refuse it (no process started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sage.common.exceptions import InvalidRequestError
from sage.services.lifecycle.backends import BACKENDS
from sage.services.lifecycle.manager import EngineLifecycleManager
from sage.services.lifecycle.spec import EngineSpec, validate_spec

from .conftest import FakePrograms


def test_vllm_with_lora_enables_runtime_loading(fake_programs: FakePrograms) -> None:
    plan = BACKENDS["vllm"].plan(EngineSpec(model="m", enable_lora=True, max_lora_rank=8), 8000, [])
    at = plan.argv.index("--enable-lora")
    assert plan.argv[at : at + 3] == ["--enable-lora", "--max-lora-rank", "8"]
    assert plan.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    default_rank = BACKENDS["vllm"].plan(EngineSpec(model="m", enable_lora=True), 8000, [])
    assert "--enable-lora" in default_rank.argv and "--max-lora-rank" not in default_rank.argv
    plain = BACKENDS["vllm"].plan(EngineSpec(model="m"), 8000, [])
    assert "--enable-lora" not in plain.argv
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in plain.env


def test_sim_takes_the_same_flags() -> None:
    plan = BACKENDS["sim"].plan(
        EngineSpec(model="sim", enable_lora=True, max_lora_rank=4), 8000, []
    )
    at = plan.argv.index("--enable-lora")
    assert plan.argv[at : at + 3] == ["--enable-lora", "--max-lora-rank", "4"]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_lora_rank": 8}, "max_lora_rank"),
        ({"enable_lora": True, "max_lora_rank": -1}, "max_lora_rank"),
    ],
)
def test_bad_lora_specs_name_the_field(fields: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        validate_spec(EngineSpec(model="m", **fields))  # type: ignore[arg-type]
    assert info.value.param == param


async def test_a_backend_without_lora_refuses_it(tmp_path: Path) -> None:
    manager = EngineLifecycleManager(tmp_path)
    with pytest.raises(InvalidRequestError) as info:
        await manager.start(EngineSpec(model="org/m", backend="transformers", enable_lora=True))
    assert info.value.param == "enable_lora" and "vllm and sim" in info.value.message
    assert manager.instances() == []
