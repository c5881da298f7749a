"""apply_preset against an in-memory control plane: idempotency, order, rollback, dry run."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import pytest

from sage.common.exceptions import EngineStartError, InsufficientResourcesError, SageError
from sage.llm.management import EngineInfo, EngineKind, ManagementClient
from sage.llm.presets import (
    ApplyEvent,
    EngineControl,
    Preset,
    PresetApplyError,
    apply_preset,
    parse_preset,
)

PRESET = parse_preset(
    """\
version: 1
name: trio
engines:
  - {name: chat, model: m-chat}
  - {name: embed, model: m-embed, kind: embedding}
  - {name: big, model: m-big, tensor_parallel: 2, metadata: {team: a}}
"""
)


class InMemoryEngines:
    """Keeps engines in a dict, the way the management API reports them."""

    def __init__(self) -> None:
        self.engines: dict[str, EngineInfo] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail: dict[str, SageError] = {}
        self.report_failed: set[str] = set()
        self.stop_fails: set[str] = set()
        self.start_kwargs: list[dict[str, object]] = []
        self._ids = itertools.count(1)

    def list_engines(self) -> list[EngineInfo]:
        self.calls.append(("list", ""))
        return list(self.engines.values())

    def start_engine(
        self,
        model_id: str,
        *,
        engine_kind: EngineKind = "llm",
        backend: str = "auto",
        tensor_parallel_size: int | None = None,
        pipeline_parallel_size: int | None = None,
        port: int | None = None,
        engine_label: str | None = None,
        max_concurrent_requests: int | None = None,
        use_gpu: bool | None = None,
        extra_args: Sequence[str] | None = None,
        metadata: Mapping[str, str] | None = None,
        enable_lora: bool = False,
        max_lora_rank: int | None = None,
    ) -> EngineInfo:
        self.calls.append(("start", model_id))
        self.start_kwargs.append(
            {
                "tp": tensor_parallel_size,
                "label": engine_label,
                "metadata": dict(metadata or {}),
                "lora": (enable_lora, max_lora_rank),
            }
        )
        if model_id in self.fail:
            raise self.fail[model_id]
        engine_id = f"e{next(self._ids)}"
        status = "FAILED" if model_id in self.report_failed else "RUNNING"
        engine = EngineInfo(
            engine_id=engine_id,
            model_id=model_id,
            engine_kind=engine_kind,
            backend=backend,
            status=status,
            engine_label=engine_label,
            error="CUDA out of memory" if status == "FAILED" else None,
        )
        self.engines[engine_id] = engine
        return engine

    def stop_engine(self, engine_id: str, drain: bool = False) -> EngineInfo:
        self.calls.append(("stop", engine_id))
        if engine_id in self.stop_fails:
            raise EngineStartError("stop timed out")
        engine = self.engines[engine_id].model_copy(update={"status": "STOPPED"})
        self.engines[engine_id] = engine
        return engine

    def starts(self) -> list[str]:
        return [arg for op, arg in self.calls if op == "start"]

    def stops(self) -> list[str]:
        return [arg for op, arg in self.calls if op == "stop"]


def test_the_client_and_the_fake_satisfy_the_protocol() -> None:
    as_protocol: list[type[EngineControl]] = [ManagementClient, InMemoryEngines]
    assert len(as_protocol) == 2  # the real check is mypy's, on this assignment


def test_starts_all_in_order_with_labels_and_metadata() -> None:
    plane = InMemoryEngines()
    result = apply_preset(PRESET, plane)
    assert plane.starts() == ["m-chat", "m-embed", "m-big"]
    assert [a.name for a in result.started] == ["chat", "embed", "big"]
    assert result.kept == [] and result.ok
    assert [k["label"] for k in plane.start_kwargs] == [
        "preset:trio/chat",
        "preset:trio/embed",
        "preset:trio/big",
    ]
    assert plane.start_kwargs[2]["tp"] == 2
    assert plane.start_kwargs[2]["metadata"] == {
        "preset": "trio",
        "preset_engine": "big",
        "team": "a",
    }


def test_a_lora_engine_starts_with_lora_enabled() -> None:
    plane = InMemoryEngines()
    preset = parse_preset(
        "version: 1\nname: lora\nengines:\n"
        "  - {name: base, model: m-base, backend: vllm, lora: true, max_lora_rank: 8}\n"
        "  - {name: plain, model: m-plain}\n"
    )
    apply_preset(preset, plane)
    assert [k["lora"] for k in plane.start_kwargs] == [(True, 8), (False, None)]


def test_second_apply_keeps_everything() -> None:
    plane = InMemoryEngines()
    first = apply_preset(PRESET, plane)
    second = apply_preset(PRESET, plane)
    assert len(plane.starts()) == 3
    assert second.started == []
    assert [(a.name, a.engine.engine_id) for a in second.kept] == [
        (a.name, a.engine.engine_id) for a in first.started
    ]


def test_only_missing_engines_start() -> None:
    plane = InMemoryEngines()
    apply_preset(PRESET, plane)
    embed = next(e for e in plane.engines.values() if e.model_id == "m-embed")
    plane.stop_engine(embed.engine_id)
    plane.calls.clear()
    result = apply_preset(PRESET, plane)
    assert plane.starts() == ["m-embed"]
    assert [a.name for a in result.kept] == ["chat", "big"]
    assert [a.name for a in result.started] == ["embed"]


def test_same_model_with_another_label_is_not_kept() -> None:
    plane = InMemoryEngines()
    plane.start_engine("m-chat", engine_label="someone-else")
    plane.calls.clear()
    result = apply_preset(PRESET, plane)
    assert plane.starts() == ["m-chat", "m-embed", "m-big"]
    assert result.kept == []


def test_a_running_engine_is_kept_for_one_preset_engine_only() -> None:
    twins = parse_preset(
        """\
version: 1
name: twins
engines:
  - {name: a, model: m, label: shared}
  - {name: b, model: m, label: shared}
"""
    )
    plane = InMemoryEngines()
    plane.start_engine("m", engine_label="shared")
    plane.calls.clear()
    result = apply_preset(twins, plane)
    assert [a.name for a in result.kept] == ["a"]
    assert [a.name for a in result.started] == ["b"]


def test_failure_rolls_back_in_reverse_order_and_names_the_engine() -> None:
    plane = InMemoryEngines()
    plane.fail["m-big"] = InsufficientResourcesError("need 2 GPUs, 1 free")
    with pytest.raises(PresetApplyError) as info:
        apply_preset(PRESET, plane)
    error = info.value
    started_ids = [a.engine.engine_id for a in error.result.started]
    assert plane.stops() == list(reversed(started_ids)) == ["e2", "e1"]
    assert error.result.failed == "big" and error.param == "big"
    assert error.result.rolled_back == ["e2", "e1"]
    assert "'big'" in error.message and "need 2 GPUs, 1 free" in error.message
    assert "e2, e1" in error.message
    assert all(e.status == "STOPPED" for e in plane.engines.values())


def test_rollback_never_stops_kept_engines() -> None:
    plane = InMemoryEngines()
    kept = plane.start_engine("m-chat", engine_label="preset:trio/chat")
    plane.fail["m-big"] = EngineStartError("exited with code 1")
    with pytest.raises(PresetApplyError) as info:
        apply_preset(PRESET, plane)
    assert kept.engine_id not in plane.stops()
    assert plane.engines[kept.engine_id].status == "RUNNING"
    assert [a.name for a in info.value.result.kept] == ["chat"]


def test_no_rollback_leaves_started_engines() -> None:
    plane = InMemoryEngines()
    plane.fail["m-big"] = EngineStartError("exited with code 1")
    with pytest.raises(PresetApplyError) as info:
        apply_preset(PRESET, plane, rollback=False)
    assert plane.stops() == []
    assert "left running" in info.value.message and "e1, e2" in info.value.message


def test_engine_reported_failed_counts_as_a_failure() -> None:
    plane = InMemoryEngines()
    plane.report_failed.add("m-embed")
    with pytest.raises(PresetApplyError) as info:
        apply_preset(PRESET, plane)
    assert info.value.result.failed == "embed"
    assert "CUDA out of memory" in info.value.message
    assert plane.stops() == ["e1"]
    assert "m-big" not in plane.starts()


def test_rollback_errors_are_reported_and_do_not_stop_the_rollback() -> None:
    plane = InMemoryEngines()
    plane.fail["m-big"] = EngineStartError("boom")
    plane.stop_fails.add("e2")
    with pytest.raises(PresetApplyError) as info:
        apply_preset(PRESET, plane)
    assert plane.stops() == ["e2", "e1"]
    assert info.value.result.rolled_back == ["e1"]
    assert "could not stop: e2: stop timed out" in info.value.message


def test_dry_run_starts_nothing() -> None:
    plane = InMemoryEngines()
    plane.start_engine("m-embed", engine_kind="embedding", engine_label="preset:trio/embed")
    plane.calls.clear()
    events: list[ApplyEvent] = []
    result = apply_preset(PRESET, plane, dry_run=True, progress=events.append)
    assert plane.starts() == [] and plane.stops() == []
    assert result.dry_run and [e.name for e in result.planned] == ["chat", "big"]
    assert [a.name for a in result.kept] == ["embed"]
    assert [(e.kind, e.name) for e in events] == [
        ("would_start", "chat"),
        ("keep", "embed"),
        ("would_start", "big"),
    ]
    assert result.to_json()["planned"][0]["model"] == "m-chat"


def test_progress_events_in_order() -> None:
    plane = InMemoryEngines()
    plane.start_engine("m-chat", engine_label="preset:trio/chat")
    plane.fail["m-big"] = EngineStartError("boom")
    events: list[ApplyEvent] = []
    with pytest.raises(PresetApplyError):
        apply_preset(PRESET, plane, progress=events.append)
    assert [(e.kind, e.name) for e in events] == [
        ("keep", "chat"),
        ("starting", "embed"),
        ("started", "embed"),
        ("starting", "big"),
        ("failed", "big"),
        ("stopping", "embed"),
        ("stopped", "embed"),
    ]
    assert events[4].error == "boom"
    assert events[2].engine is not None and events[2].engine.status == "RUNNING"


def test_result_json_is_plain_data() -> None:
    import json

    result = apply_preset(PRESET, InMemoryEngines())
    doc = json.loads(json.dumps(result.to_json()))
    assert doc["ok"] and [s["name"] for s in doc["started"]] == ["chat", "embed", "big"]
    assert doc["started"][0]["engine"]["engine_id"] == "e1"


def test_preset_type_is_frozen() -> None:
    with pytest.raises(ValueError, match="frozen"):
        PRESET.name = "other"  # type: ignore[misc]
    assert isinstance(PRESET, Preset)
