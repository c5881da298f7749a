"""Schemathesis against the live edge: every operation of /openapi.json gets generated
requests (valid and invalid), with the right key, with none and with a wrong one; every
built-in schemathesis check runs on every reply (no 5xx, status code, content type, headers
and body match the document, ...), and afterwards every service still answers and nothing
logged a traceback.

`SAGE_FUZZ_EXAMPLES` is the total number of cases over all operations (CI default 200;
`scripts/fuzz_nightly.sh` runs thousands). `SAGE_FUZZ_REPORT` names a JSON file that gets
the run's figures: cases per operation, auth mode and status class, failures per check,
tracebacks logged.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    positive_data_acceptance,
    response_schema_conformance,
)

from sage.services.edge.openapi import openapi_document

from .conftest import ADMIN_KEY, API_KEY, FUZZ_EXAMPLES, SIM_MODEL, ThreadedPlane

DOCUMENT = openapi_document()
SCHEMA = schemathesis.openapi.from_dict(DOCUMENT)
DOCUMENTED = {
    f"{method.upper()} {path}" for path, methods in DOCUMENT["paths"].items() for method in methods
}
OPERATIONS = len(DOCUMENTED)
# Most cases carry the right key; a fifth go without a key or with a wrong one.
PER_OPERATION = max(5, math.ceil(FUZZ_EXAMPLES * 0.8 / OPERATIONS))
PER_OPERATION_UNAUTHORIZED = max(2, math.ceil(FUZZ_EXAMPLES * 0.2 / OPERATIONS))
START_PATH = "/v1/management/engines"
REGISTER_PATH = "/v1/management/engines/register"
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")
# Operations anyone may call (security is only `{}`): health, the document, static files.
PUBLIC_PATHS = {
    path
    for path, methods in DOCUMENT["paths"].items()
    if all(op.get("security") == [{}] for op in methods.values())
}

load_all_checks()
# Every built-in check schemathesis has (its CLI's `--checks all`), each run on its own so
# the report counts failures per check.
CHECK_FUNCTIONS: list[Callable[..., Any]] = [c for c in CHECKS.get_all() if callable(c)]


@dataclass
class Tally:
    """What the fuzz run did and found; written to SAGE_FUZZ_REPORT at the module's end."""

    cases: Counter[str] = field(default_factory=Counter)  # by auth mode
    operations: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)  # "2xx", "4xx", "5xx"
    by_status: dict[str, Counter[int]] = field(default_factory=dict)  # operation -> status
    failures: Counter[str] = field(default_factory=Counter)  # failing cases per check
    examples: dict[str, str] = field(default_factory=dict)  # the first failure per check
    tracebacks: list[str] = field(default_factory=list)  # log records with exc_info

    def summary(self) -> dict[str, Any]:
        return {
            "cases": sum(self.cases.values()),
            "cases_by_auth": dict(self.cases),
            "documented_operations": OPERATIONS,
            "documented_operations_fuzzed": len(DOCUMENTED & set(self.operations)),
            # method/path pairs sent: the documented ones plus unsupported methods
            "method_path_pairs": len(self.operations),
            "cases_by_operation": dict(sorted(self.operations.items())),
            "statuses": dict(sorted(self.statuses.items())),
            "statuses_by_operation": {
                op: dict(sorted(c.items())) for op, c in sorted(self.by_status.items())
            },
            "server_errors": self.statuses.get("5xx", 0),
            "checks": [c.__name__ for c in CHECK_FUNCTIONS],
            "failures_by_check": {c.__name__: self.failures[c.__name__] for c in CHECK_FUNCTIONS},
            "failure_examples": self.examples,
            "tracebacks_logged": len(self.tracebacks),
            "traceback_examples": self.tracebacks[:5],
        }


class _TracebackCounter(logging.Handler):
    """Counts ERROR records with an exception attached (an unhandled error somewhere)."""

    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.ERROR)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info is not None or record.exc_text:
            self.into.append(f"{record.name}: {record.getMessage()[:300]}")


@pytest.fixture(scope="module", autouse=True)
def tally() -> Iterator[Tally]:
    """The module's figures (a report even when no fuzz case ran); tracebacks logged in
    this process (edge and gRPC services)."""
    result = Tally()
    handler = _TracebackCounter(result.tracebacks)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield result
    finally:
        root.removeHandler(handler)
        report = os.environ.get("SAGE_FUZZ_REPORT")
        if report:
            Path(report).write_text(json.dumps(result.summary(), indent=2) + "\n")


def _integral_floats_to_ints(value: Any) -> Any:
    """JSON Schema counts 3.0 as an integer; OpenAI (and the edge) want integers written as
    integers, so valid cases are generated without integral floats."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, list):
        return [_integral_floats_to_ints(v) for v in value]
    if isinstance(value, dict):
        return {k: _integral_floats_to_ints(v) for k, v in value.items()}
    return value


def _is_negative(case: Any) -> bool:
    meta = case._meta  # schemathesis keeps the generation mode only here
    return meta is not None and meta.generation.mode.is_negative


_HI = {"role": "user", "content": "hi"}


def _auth_for(path: str) -> str:
    return f"Bearer {ADMIN_KEY if path.startswith('/v1/management') else API_KEY}"


def _wrong_auth_for(path: str) -> str:
    """A tenant key on admin routes (403), an unknown key elsewhere (401)."""
    return f"Bearer {API_KEY if path.startswith('/v1/management') else 'not-a-key-0123456789'}"


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    """One keep-alive HTTP session for every generated case."""
    with requests.Session() as http:
        http.trust_env = False
        yield http


def _fuzz_case(
    case: Any,
    plane: ThreadedPlane,
    http: requests.Session,
    tally: Tally,
    auth: str,
    headers: dict[str, str],
) -> int:
    """Send `case`, run every check on the reply, count; raise the failures found."""
    to_engine = False
    if not _is_negative(case) and isinstance(case.body, dict):
        case.body = _integral_floats_to_ints(case.body)
        # Every other valid generation request names the served model, so it goes past
        # validation through the scheduler to the engine and back (else almost all are 404s).
        to_engine = case.path in GENERATION_PATHS and sum(tally.cases.values()) % 2 == 0
        if to_engine:
            case.body["model"] = SIM_MODEL
    # Random bodies must not launch engines (vLLM, transformers): a dry run goes through the
    # same parsing, validation and placement and starts nothing.
    starts = case.path == START_PATH and case.method == "POST" and isinstance(case.body, dict)
    if starts and isinstance(case.body.get("dry_run", False), bool):
        case.body["dry_run"] = True
    response = case.call(base_url=plane.base_url, session=http, headers=headers, timeout=30)
    operation = f"{case.method} {case.path}"
    tally.cases[auth] += 1
    tally.operations[operation] += 1
    tally.statuses[f"{response.status_code // 100}xx"] += 1
    if operation in DOCUMENTED:
        tally.by_status.setdefault(operation, Counter())[response.status_code] += 1
    # The router serves /engines/{id} and /engines/{id}/logs from one prefix route, so a
    # 405 on .../logs lists DELETE too (DELETE there answers 404); a known router limit.
    excluded = [allow_header_conformance] if case.path.endswith("/logs") else []
    if case.path == REGISTER_PATH or to_engine:
        # Valid bodies an engine may still refuse: register without an engine at base_url;
        # generation past the engine's limits (max_tokens > its context, the sim's n=1).
        excluded.append(positive_data_acceptance)
    errors: list[str] = []
    for check in CHECK_FUNCTIONS:
        if check in excluded:
            continue
        try:
            case.validate_response(response, checks=[check])
        except FailureGroup as exc:
            tally.failures[check.__name__] += 1
            tally.examples.setdefault(check.__name__, str(exc)[:2000])
            errors.append(str(exc))
    assert response.status_code < 500, (response.status_code, response.text[:500])
    assert not errors, "\n".join(errors)
    return int(response.status_code)


@SCHEMA.parametrize()
@settings(
    max_examples=PER_OPERATION,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=FUZZ_EXAMPLES <= 500,
)
def test_edge_conforms_to_its_openapi(
    case: Any, threaded_plane: ThreadedPlane, session: requests.Session, tally: Tally
) -> None:
    """Generated requests with real keys: no 5xx, status/content-type/body match the spec."""
    headers = {"Authorization": _auth_for(case.path)}
    _fuzz_case(case, threaded_plane, session, tally, "keyed", headers)


@SCHEMA.parametrize()
@settings(
    max_examples=PER_OPERATION_UNAUTHORIZED,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=FUZZ_EXAMPLES <= 500,
)
def test_edge_without_a_valid_key_conforms_to_its_openapi(
    case: Any, threaded_plane: ThreadedPlane, session: requests.Session, tally: Tally
) -> None:
    """The same without a key, or with a wrong one (a tenant's on admin routes): 401/403
    as documented, never 5xx, and nothing reaches a service (no engine starts)."""
    wrong = tally.cases["unauthorized"] % 2 == 1  # alternate: no key, wrong key
    headers = {"Authorization": _wrong_auth_for(case.path)} if wrong else {}
    status = _fuzz_case(case, threaded_plane, session, tally, "unauthorized", headers)
    if case.path not in PUBLIC_PATHS:
        # Only the router (405) and the content-type gate (415) may answer before the key is
        # checked; a 400, 404 or 2xx would mean the request went further.
        assert status in (401, 403, 405, 415), (case.method, case.path, status)


def test_served_document_is_the_fuzzed_one(threaded_plane: ThreadedPlane) -> None:
    """The fuzzer's schema is what /openapi.json serves, so the fuzz covers the real API."""
    served = httpx.get(f"{threaded_plane.base_url}/openapi.json", trust_env=False).json()
    assert served == DOCUMENT
    assert OPERATIONS >= 10


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/v1/chat/completions", {"x-sage-slo-ttft-ms": "\xb2"}),
        ("/v1/chat/completions", {"x-sage-slo-e2e-ms": "\xb9\xb2"}),
        ("/v1/management/engines/sim-fuzz-1/logs?lines=%C2%B2", {}),
    ],
)
def test_digit_lookalikes_are_400s(
    threaded_plane: ThreadedPlane, path: str, headers: dict[str, str]
) -> None:
    """Found by fuzzing: "²" passes str.isdigit() but not int(); it was a 500."""
    url = f"{threaded_plane.base_url}{path}"
    auth = {"Authorization": _auth_for(path)}
    with httpx.Client(trust_env=False, timeout=30) as client:
        if "chat" in path:
            body = {"model": "sim-fuzz", "messages": [{"role": "user", "content": "hi"}]}
            raw = {k.encode(): v.encode("latin-1") for k, v in headers.items()}  # wire bytes
            raw[b"authorization"] = auth["Authorization"].encode()
            reply = client.post(url, json=body, headers=raw)
        else:
            reply = client.get(url, headers=auth)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] in ("x-sage-slo-ttft-ms", "x-sage-slo-e2e-ms", "lines")


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/chat/completions", {"model": "m" * 100_000, "messages": [_HI]}, 404),
        ("/v1/embeddings", {"model": "m" * 100_000, "input": "x"}, 404),
        ("/v1/management/engines", {"model_id": "x" * 100_000, "backend": "sim"}, 400),
        (
            "/v1/management/engines/register",
            {"model_id": "q", "base_url": "http://[::1"},
            400,
        ),
    ],
)
def test_huge_or_broken_inputs_are_4xx(
    threaded_plane: ThreadedPlane, path: str, body: dict[str, Any], status: int
) -> None:
    """Found by probing: an error echoing a 100 kB model name overflowed gRPC's trailer
    limit ("Stream removed", a 500); an unparseable base_url was an INTERNAL error."""
    reply = httpx.post(
        f"{threaded_plane.base_url}{path}",
        json=body,
        headers={"Authorization": _auth_for(path)},
        trust_env=False,
        timeout=60,
    )
    assert reply.status_code == status, reply.text[:300]
    assert len(reply.json()["error"]["message"]) < 5000


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model_id": "sim", "engine_label": None, "label": {}}, "label"),
        ({"model_id": "sim", "model": 5}, "model"),
        ({"model_id": "sim", "engine_kind": "llm", "kind": "chat"}, "kind"),
    ],
)
def test_start_checks_both_names_of_an_alias(
    threaded_plane: ThreadedPlane, body: dict[str, Any], param: str
) -> None:
    """Found by the deep fuzz run: with both names of a field given (label/engine_label,
    ...), the second was never checked, so `"label": {}` started (here: placed) an engine."""
    reply = httpx.post(
        f"{threaded_plane.base_url}{START_PATH}",
        json={**body, "backend": "sim", "dry_run": True},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        trust_env=False,
        timeout=30,
    )
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


def test_register_on_an_unknown_node_is_a_documented_404(threaded_plane: ThreadedPlane) -> None:
    """Found by the deep fuzz run: the 404 (no such node) was missing from the document."""
    reply = httpx.post(
        f"{threaded_plane.base_url}{REGISTER_PATH}",
        json={"model_id": SIM_MODEL, "base_url": threaded_plane.sim_url, "node": "nowhere"},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        trust_env=False,
        timeout=30,
    )
    assert reply.status_code == 404, reply.text
    assert reply.json()["error"]["code"] == "node_not_found"
    assert "404" in DOCUMENT["paths"][REGISTER_PATH]["post"]["responses"]


@pytest.mark.parametrize(
    ("body", "status"), [(b"", 200), (b"{}", 200), (b"\t", 400), (b"\n\n", 400)]
)
def test_prune_body_is_nothing_or_json(
    threaded_plane: ThreadedPlane, body: bytes, status: int
) -> None:
    """Found by the deep fuzz run: a whitespace-only JSON body was taken for no body."""
    reply = httpx.post(
        f"{threaded_plane.base_url}/v1/management/engines/prune",
        content=body,
        headers={"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"},
        trust_env=False,
        timeout=30,
    )
    assert reply.status_code == status, reply.text


def test_parallel_sizes_past_int32_are_placed_not_a_500(threaded_plane: ThreadedPlane) -> None:
    """Found by the deep fuzz run: tensor x pipeline parallel size, each within int32, made
    a GPU count past int32 for the placement request, a ValueError and a 500."""
    reply = httpx.post(
        f"{threaded_plane.base_url}{START_PATH}",
        json={
            "model_id": "m",
            "tensor_parallel_size": 2**31 - 1,
            "pipeline_parallel_size": 2**31 - 1,
            "node": "nowhere",
            "dry_run": True,
        },
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        trust_env=False,
        timeout=30,
    )
    assert reply.status_code == 404, reply.text
    assert reply.json()["error"]["code"] == "node_not_found"


@pytest.mark.parametrize(
    ("model", "status"), [("\x1f", 400), ("\xa0", 400), ("\u3000 ", 400), ("\ufeff", 404)]
)
def test_document_and_edge_agree_on_blank_model_names(
    threaded_plane: ThreadedPlane, model: str, status: int
) -> None:
    """Found by the deep fuzz run: the document's `\\S` took "\\x1f" for a character (so
    did schemathesis), the edge's str.strip() for a blank: valid data answered 400."""
    pattern = DOCUMENT["components"]["schemas"]["ChatCompletionRequest"]["properties"]["model"]
    blank = status == 400
    for flags in (0, re.ASCII):  # Python's reading and schemathesis'
        assert (re.search(pattern["pattern"], model, flags) is None) == blank
    reply = httpx.post(
        f"{threaded_plane.base_url}/v1/chat/completions",
        json={"model": model, "messages": [_HI]},
        headers={"Authorization": f"Bearer {API_KEY}"},
        trust_env=False,
        timeout=30,
    )
    assert reply.status_code == status, reply.text


def test_a_streamed_reply_matches_the_document(
    threaded_plane: ThreadedPlane, session: requests.Session
) -> None:
    """Found by the deep fuzz run once valid requests reached the engine: the document gave
    each server-sent event a string's schema; tools read it per event, an object."""
    body: dict[str, Any] = {"model": SIM_MODEL, "messages": [_HI], "stream": True, "max_tokens": 4}
    case = SCHEMA["/v1/chat/completions"]["POST"].Case(body=body)
    response = case.call(
        base_url=threaded_plane.base_url,
        session=session,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=30,
    )
    assert response.status_code == 200 and response.text.rstrip().endswith("data: [DONE]")
    case.validate_response(response, checks=[response_schema_conformance])


@pytest.mark.parametrize(
    "extra", [{"top_p": 0}, {"messages": [{"role": "user", "content": [{"text": "hi"}]}]}]
)
def test_what_engines_refuse_the_document_does_not_promise(
    threaded_plane: ThreadedPlane, extra: dict[str, Any]
) -> None:
    """Found by the deep fuzz run: top_p 0 and a content part without a type were valid in
    the document, but vLLM (and the sim) answer 400."""
    body: dict[str, Any] = {"model": SIM_MODEL, "messages": [_HI], **extra}
    request = {"$ref": "#/components/schemas/ChatCompletionRequest", **DOCUMENT}
    assert not jsonschema_rs.Draft202012Validator(request).is_valid(body)
    reply = httpx.post(
        f"{threaded_plane.base_url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {API_KEY}"},
        trust_env=False,
        timeout=30,
    )
    assert reply.status_code == 400, reply.text


def test_edge_healthy_after_fuzzing(
    threaded_plane: ThreadedPlane, module_sim_engine: Callable[..., str], tally: Tally
) -> None:
    """Runs after the fuzz cases of this module: every service still answers, the engine
    process never died, its engine is still routed, and nothing logged a traceback."""
    base = threaded_plane.base_url
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(trust_env=False, timeout=30) as client:
        health = client.get(f"{base}/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        status = client.get(f"{base}/v1/management/status", headers=admin)  # every service
        assert status.status_code == 200, status.text
        engine = client.get(f"{base}/v1/management/engines/sim-fuzz-1", headers=admin)
        assert engine.status_code == 200 and engine.json()["status"] == "RUNNING", engine.text
        assert engine.json()["restart_count"] == 0
        chat = client.post(
            f"{base}/v1/chat/completions",
            json={"model": SIM_MODEL, "messages": [_HI]},
            headers={"Authorization": f"Bearer {API_KEY}"},
        )
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"]
    sims = module_sim_engine.procs  # type: ignore[attr-defined]
    assert sims and all(proc.poll() is None for proc in sims), "the sim engine died"
    for log in module_sim_engine.log_dir.glob("*.log"):  # type: ignore[attr-defined]
        text = log.read_text(errors="replace")
        tally.tracebacks.extend(f"{log.name}: traceback" for _ in range(text.count("Traceback")))
    assert not tally.tracebacks, tally.tracebacks[:5]
