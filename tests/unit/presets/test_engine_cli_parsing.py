"""The seed's `sage llm engine|preset|logs` forms parse to the right commands (parse only)."""

from __future__ import annotations

import argparse

import pytest

from sage.llm import cli_engine, cli_preset
from sage.llm.cli import build_parser


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["llm", *argv])


def test_engine_list() -> None:
    args = parse("engine", "list")
    assert args.func is cli_engine.cmd_engine_list and not args.json and args.url is None
    assert parse("engine", "list", "--json").json


def test_engine_start_tensor_parallel() -> None:
    args = parse("engine", "start", "Qwen/Qwen2.5-7B-Instruct", "--tensor-parallel", "2")
    assert args.func is cli_engine.cmd_engine_start
    assert (args.model, args.tensor_parallel, args.engine_kind, args.backend) == (
        "Qwen/Qwen2.5-7B-Instruct",
        2,
        "llm",
        "auto",
    )
    assert args.use_gpu is None and args.pipeline_parallel is None and not args.no_wait


def test_engine_start_embedding() -> None:
    args = parse("engine", "start", "BAAI/bge-m3", "--engine-kind", "embedding")
    assert (args.model, args.engine_kind) == ("BAAI/bge-m3", "embedding")


def test_engine_start_every_flag() -> None:
    args = parse(
        "engine", "start", "m", "-tp", "4", "-pp", "2", "--backend", "vllm",
        "--engine-port", "8123", "--required-memory-gb", "20.5", "--label", "l",
        "--max-concurrent", "32", "--no-gpu", "--json", "--extra-arg=--enforce-eager",
        "--url", "http://h:1/v1",
    )  # fmt: skip
    assert (args.tensor_parallel, args.pipeline_parallel, args.backend) == (4, 2, "vllm")
    assert (args.engine_port, args.required_memory_gb, args.label) == (8123, 20.5, "l")
    assert (args.max_concurrent, args.use_gpu, args.json) == (32, False, True)
    assert args.extra_arg == ["--enforce-eager"] and args.url == "http://h:1/v1"
    assert parse("engine", "start", "m", "--use-gpu").use_gpu is True


@pytest.mark.parametrize(
    "argv",
    [
        ("engine", "start", "m", "--engine-kind", "rerank"),
        ("engine", "start", "m", "--tensor-parallel", "0"),
        ("engine", "start", "m", "--engine-port", "70000"),
        ("engine", "start", "m", "--use-gpu", "--no-gpu"),
        ("engine", "start"),
        ("engine", "stop"),
        ("preset", "show"),
        ("preset", "apply", "-n", "a", "-f", "b.yaml"),
        ("logs", "-n", "-1"),
    ],
)
def test_usage_errors_exit_2(argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse(*argv)
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_engine_stop_and_prune() -> None:
    args = parse("engine", "stop", "engine-abc123")
    assert args.func is cli_engine.cmd_engine_stop
    assert (args.engine_id, args.drain) == ("engine-abc123", False)
    assert parse("engine", "stop", "x", "--drain").drain
    assert parse("engine", "prune").func is cli_engine.cmd_engine_prune


def test_preset_forms() -> None:
    assert parse("preset", "list").func is cli_preset.cmd_preset_list
    show = parse("preset", "show", "-n", "qwen-mini-with-embeddings")
    assert show.func is cli_preset.cmd_preset_show
    assert (show.name, show.file) == ("qwen-mini-with-embeddings", None)
    apply = parse("preset", "apply", "-n", "qwen-mini-with-embeddings")
    assert apply.func is cli_preset.cmd_preset_apply
    assert (apply.name, apply.yes, apply.dry_run, apply.no_rollback) == (
        "qwen-mini-with-embeddings",
        False,
        False,
        False,
    )
    flags = parse("preset", "apply", "-f", "p.yaml", "--yes", "--dry-run", "--no-rollback")
    assert (flags.file, flags.yes, flags.dry_run, flags.no_rollback) == ("p.yaml", True, True, True)
    assert parse("preset", "show", "-f", "p.yaml", "--json").json


def test_logs_forms() -> None:
    seed = parse("logs", "--tail", "100")
    assert seed.func is cli_engine.cmd_logs
    assert (seed.engine, seed.tail, seed.follow) == (None, 100, False)
    engine = parse("logs", "engine-1", "-n", "5", "-f")
    assert (engine.engine, engine.tail, engine.follow) == ("engine-1", 5, True)
    assert parse("logs", "edge").engine == "edge"


@pytest.mark.parametrize(
    ("previous", "current", "new"),
    [
        ([], ["a", "b"], ["a", "b"]),
        (["a", "b"], ["a", "b"], []),
        (["a", "b"], ["a", "b", "c"], ["c"]),
        (["a", "b", "c"], ["b", "c", "d", "e"], ["d", "e"]),  # window slid
        (["a", "b"], ["x", "y"], ["x", "y"]),  # more than a window arrived
        (["x", "x"], ["x", "x", "x"], ["x"]),
    ],
)
def test_follow_prints_only_new_lines(
    previous: list[str], current: list[str], new: list[str]
) -> None:
    assert cli_engine.new_lines(previous, current) == new
