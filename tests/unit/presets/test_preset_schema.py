"""Preset files: built-ins parse, and every mistake is reported with its field and line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sage.llm.presets import (
    Preset,
    PresetError,
    builtin_preset_names,
    list_presets,
    load_preset,
    parse_preset,
)

SEED_EXAMPLE = """\
version: 1
name: qwen-mini-with-embeddings
engines:
  - name: chat
    kind: llm
    model: Qwen/Qwen2.5-1.5B-Instruct
  - name: embed
    kind: embedding
    model: BAAI/bge-small-zh-v1.5
"""


def _error(text: str) -> PresetError:
    with pytest.raises(PresetError) as info:
        parse_preset(text, "p.yaml")
    return info.value


def test_builtins_parse_and_are_named_after_their_files() -> None:
    names = builtin_preset_names()
    assert {"qwen-mini-with-embeddings", "qwen-lite", "cpu-demo"} <= set(names)
    presets = list_presets()
    assert [p.name for p in presets] == names
    assert all(p.version == 1 and p.description for p in presets)


def test_seed_example_matches_the_builtin() -> None:
    seed = parse_preset(SEED_EXAMPLE)
    builtin = load_preset(name="qwen-mini-with-embeddings")
    assert [(e.name, e.kind, e.model) for e in builtin.engines] == [
        ("chat", "llm", "Qwen/Qwen2.5-1.5B-Instruct"),
        ("embed", "embedding", "BAAI/bge-small-zh-v1.5"),
    ]
    assert seed.engines == builtin.engines
    assert all(e.backend == "auto" and e.tensor_parallel == 1 for e in seed.engines)


def test_qwen_lite_and_cpu_demo() -> None:
    lite = load_preset(name="qwen-lite")
    assert [(e.kind, e.model) for e in lite.engines] == [("llm", "Qwen/Qwen2.5-0.5B-Instruct")]
    demo = load_preset(name="cpu-demo")
    assert [(e.kind, e.model, e.backend, e.use_gpu) for e in demo.engines] == [
        ("llm", "sim", "sim", False),
        ("embedding", "sentence-transformers/all-MiniLM-L6-v2", "embedding", False),
    ]


def test_every_field_parses(tmp_path: Path) -> None:
    path = tmp_path / "full.yaml"
    path.write_text(
        """\
version: 1
name: full
description: everything set
engines:
  - name: big
    model: Qwen/Qwen2.5-7B-Instruct
    kind: llm
    backend: vllm
    tensor_parallel: 2
    pipeline_parallel: 2
    port: 8101
    label: team-a
    max_concurrent_requests: 64
    use_gpu: true
    metadata: {owner: team-a}
    extra_args: ["--max-model-len", "4096"]
"""
    )
    preset = load_preset(file=path)
    engine = preset.engines[0]
    assert (engine.tensor_parallel, engine.pipeline_parallel, engine.port) == (2, 2, 8101)
    assert engine.engine_label("full") == "team-a"
    assert engine.metadata == {"owner": "team-a"}
    assert engine.extra_args == ["--max-model-len", "4096"]


def test_default_label_names_preset_and_engine() -> None:
    preset = parse_preset(SEED_EXAMPLE)
    assert preset.engines[1].engine_label(preset.name) == "preset:qwen-mini-with-embeddings/embed"


def test_typo_names_field_line_and_suggestion() -> None:
    error = _error(SEED_EXAMPLE.replace("    model: BAAI", "    modle: BAAI"))
    by_field = {issue.field: issue for issue in error.issues}
    assert by_field["engines[1].modle"].line == 9
    assert "unknown field 'modle'" in by_field["engines[1].modle"].message
    assert "did you mean 'model'" in by_field["engines[1].modle"].message
    # The real field is then missing; it points at the engine's mapping.
    assert by_field["engines[1].model"].line == 7
    assert "p.yaml" in error.message and "line 9" in error.message and "modle" in error.message


def test_top_level_typo() -> None:
    error = _error(SEED_EXAMPLE.replace("name: qwen-mini", "nmae: qwen-mini"))
    fields = {(i.field, i.line) for i in error.issues}
    assert ("nmae", 2) in fields and ("name", 1) in fields


def test_duplicate_engine_names_point_at_the_second() -> None:
    text = SEED_EXAMPLE.replace("name: embed", "name: chat")
    error = _error(text)
    assert len(error.issues) == 1
    issue = error.issues[0]
    assert issue.field == "engines[1].name" and issue.line == 7
    assert "duplicate engine name 'chat'" in issue.message


def test_wrong_version() -> None:
    error = _error(SEED_EXAMPLE.replace("version: 1", "version: 2"))
    assert [(i.field, i.line) for i in error.issues] == [("version", 1)]
    assert "must be 1" in error.issues[0].message


def test_missing_version() -> None:
    error = _error(SEED_EXAMPLE.replace("version: 1\n", ""))
    assert [(i.field, i.message) for i in error.issues] == [
        ("version", "required field is missing")
    ]


def test_bad_kind() -> None:
    error = _error(SEED_EXAMPLE.replace("kind: embedding", "kind: rerank"))
    assert [(i.field, i.line) for i in error.issues] == [("engines[1].kind", 8)]
    assert "'llm' or 'embedding'" in error.issues[0].message


@pytest.mark.parametrize(
    ("replacement", "field"),
    [
        ("    model: Qwen/Qwen2.5-1.5B-Instruct\n    tensor_parallel: 0", "tensor_parallel"),
        ("    model: Qwen/Qwen2.5-1.5B-Instruct\n    port: 70000", "port"),
        ("    model: Qwen/Qwen2.5-1.5B-Instruct\n    use_gpu: maybe", "use_gpu"),
    ],
)
def test_bad_values_name_their_field(replacement: str, field: str) -> None:
    error = _error(SEED_EXAMPLE.replace("    model: Qwen/Qwen2.5-1.5B-Instruct", replacement))
    assert [(i.field, i.line) for i in error.issues] == [(f"engines[0].{field}", 7)]


def test_repeated_yaml_key_is_an_error() -> None:
    error = _error(SEED_EXAMPLE.replace("    kind: llm\n", "    kind: llm\n    kind: embedding\n"))
    assert [(i.field, i.line) for i in error.issues] == [("engines[0].kind", 6)]


def test_no_engines_and_not_a_mapping() -> None:
    assert _error("version: 1\nname: x\nengines: []\n").issues[0].field == "engines"
    assert _error("- just\n- a list\n").issues[0].line == 1


def test_yaml_syntax_error_has_a_line() -> None:
    error = _error("version: 1\nname: x\nengines:\n  - name: [oops\n")
    assert error.issues[0].line >= 4 and "YAML syntax" in error.message


def test_unknown_builtin_lists_the_known_ones() -> None:
    with pytest.raises(PresetError) as info:
        load_preset(name="nope")
    assert "nope" in info.value.message and "qwen-lite" in info.value.message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PresetError) as info:
        load_preset(file=tmp_path / "absent.yaml")
    assert "absent.yaml" in info.value.message


def test_model_round_trips_through_yaml() -> None:
    preset = load_preset(name="cpu-demo")
    again = Preset.model_validate(yaml.safe_load(yaml.safe_dump(preset.model_dump())))
    assert again == preset
