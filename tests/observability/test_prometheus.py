"""deploy/observability against a real Prometheus: promtool accepts the config and rules,
the Grafana dashboard is well formed, and on a live stack under load every panel's query
returns series and every shipped alert fires when the test causes its condition."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from sage.common.grpc import create_channel
from sage.common.utils.processes import free_port
from sage.rpc.gpu_manager.v1 import gpu_manager_pb2, gpu_manager_pb2_grpc
from tests.conftest import SimFactory

from .conftest import ENGINE_SLOTS, PROMTOOL, PrometheusFactory, needs_prometheus

ROOT = Path(__file__).resolve().parents[2]
OBSERVABILITY = ROOT / "deploy" / "observability"
DASHBOARD = OBSERVABILITY / "grafana" / "dashboards" / "sage-llm.json"
RULES = OBSERVABILITY / "sage-alerts.yml"
GiB = 1 << 30
# Grafana's built-in variables as a 1 s scrape interval makes them, and "All" models.
GRAFANA_VARIABLES = {"$__rate_interval": "10s", "$__interval": "1s", "$model": ".*"}
# Chats sent at once, many times what the engines' slots take: the queue grows past 10.
FLOOD = 20 * ENGINE_SLOTS
CHAT = {"messages": [{"role": "user", "content": "写一份日报"}], "max_tokens": 8}

pytestmark = needs_prometheus


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


def test_promtool_accepts_the_rules_and_the_config() -> None:
    rules = _promtool("check", "rules", str(RULES))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    config = _promtool("check", "config", str(OBSERVABILITY / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr
    # check config also loads the rule files it names: ours, found beside it.
    assert "1 rule files found" in config.stdout


def _dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def _panel_queries() -> list[tuple[str, str]]:
    """(panel title/refId, PromQL with Grafana's variables substituted) of every target."""
    out = []
    for panel in _dashboard()["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            out.append((f"{panel['title']} [{target['refId']}]", expr))
    return out


def test_grafana_dashboard_is_well_formed() -> None:
    doc = _dashboard()
    assert isinstance(doc["schemaVersion"], int) and doc["schemaVersion"] >= 36
    assert doc["uid"] and doc["title"]
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["datasource"]["uid"] == "${datasource}"
    ids = [panel["id"] for panel in doc["panels"]]
    assert len(ids) == len(set(ids)), f"panel ids repeat: {ids}"
    known = {f"${name}" for name in variables} | set(GRAFANA_VARIABLES)
    for panel in doc["panels"]:
        title = panel["title"]
        assert isinstance(panel["id"], int) and title and panel["type"] == "timeseries"
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}, title
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, title
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        assert panel["targets"], f"{title} has no queries"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), title
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], title
            assert target["expr"].strip(), title
            used = set(re.findall(r"\$\w+", target["expr"]))
            assert used <= known, f"{title}: unknown variables {used - known}"
    # The panels the operators' view needs, each by what it shows.
    titles = " | ".join(p["title"].lower() for p in doc["panels"])
    for subject in (
        "queue",
        "slo",
        "first token",
        "per output token",
        "requests per second",
        "tokens per second",
        "engines by status",
        "circuit breaker",
        "gpu memory",
        "errors",
    ):
        assert subject in titles, subject


# --- the live scenario ------------------------------------------------------------------------
def _rules_for_the_test() -> tuple[str, set[str]]:
    """The shipped rules, unchanged but for `for:` (0 s: a test cannot wait minutes)."""
    doc = yaml.safe_load(RULES.read_text())
    names = set()
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule["for"] = "0s"
            names.add(rule["alert"])
    return yaml.safe_dump(doc, sort_keys=False), names


def _prometheus_config(edge: str, dead: str) -> str:
    """The shipped prometheus.yml with a 1 s scrape and evaluation interval, its `sage` job
    pointed at this stack's edge plus an address nothing answers (a gateway that is down)."""
    doc = yaml.safe_load((OBSERVABILITY / "prometheus.yml").read_text())
    doc["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    doc["scrape_configs"] = [job for job in doc["scrape_configs"] if job["job_name"] == "sage"]
    doc["scrape_configs"][0]["static_configs"] = [{"targets": [edge, dead]}]
    return yaml.safe_dump(doc, sort_keys=False)


async def _start_engine(plane: Any, model: str) -> dict[str, Any]:
    reply = await plane.client.post(
        "/v1/management/engines",
        json={
            "model_id": model,
            "backend": "sim",
            "extra_args": ["--ttft-ms", "20", "--tpot-ms", "25"],
        },
    )
    assert reply.status_code == 201, reply.text
    engine: dict[str, Any] = reply.json()
    return engine


async def _crash_until_failed(plane: Any, engine: dict[str, Any]) -> None:
    """SIGKILL the engine each time lifecycle brings it back, until lifecycle gives up
    (full_plane allows two crashes: the third marks it FAILED)."""
    engine_id = engine["engine_id"]
    for restarts in (1, 2):
        os.kill(engine["pid"], signal.SIGKILL)

        def back(e: dict[str, Any], n: int = restarts) -> bool:
            return bool(e["status"] == "RUNNING" and e["restart_count"] == n)

        engine = await plane.wait_engine(engine_id, back)
    os.kill(engine["pid"], signal.SIGKILL)
    await plane.wait_engine(engine_id, lambda e: e["status"] == "FAILED")


async def _chat(
    client: httpx.AsyncClient, model: str, *, slo_ms: int, stream: bool, tokens: int = 8
) -> int:
    body = {"model": model, **CHAT, "max_tokens": tokens}
    headers = {"x-sage-slo-e2e-ms": str(slo_ms)}
    if not stream:
        reply = await client.post("/v1/chat/completions", json=body, headers=headers)
        return reply.status_code
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as reply:
        async for _ in reply.aiter_bytes():
            pass
        return reply.status_code


async def _query(http: httpx.AsyncClient, expr: str) -> list[dict[str, Any]]:
    reply = await http.get("/api/v1/query", params={"query": expr})
    assert reply.status_code == 200, f"{expr}: {reply.text}"
    result: list[dict[str, Any]] = reply.json()["data"]["result"]
    return result


async def _query_range(http: httpx.AsyncClient, expr: str, start: float) -> list[dict[str, Any]]:
    """`expr`'s series at 1 s steps from unix time `start` until now (a dashboard's view)."""
    params = {"query": expr, "start": f"{start:.3f}", "end": f"{time.time():.3f}", "step": "1"}
    reply = await http.get("/api/v1/query_range", params=params)
    assert reply.status_code == 200, f"{expr}: {reply.text}"
    result: list[dict[str, Any]] = reply.json()["data"]["result"]
    return result


async def _watch_alerts(
    http: httpx.AsyncClient, names: set[str], fired: dict[str, float], t0: float
) -> None:
    """Record when each alert is first seen firing (some conditions pass: a queue drains),
    until all of `names` have."""
    while set(fired) != names:
        for alert in (await http.get("/api/v1/alerts")).json()["data"]["alerts"]:
            if alert["state"] == "firing":
                fired.setdefault(alert["labels"]["alertname"], time.monotonic() - t0)
        await asyncio.sleep(0.25)


async def _wait_for_series(http: httpx.AsyncClient, expr: str, count: int) -> None:
    """Until `expr` has `count` series: Prometheus has scraped what the scenario needs as
    its baseline (its first scrape comes seconds after start: target discovery is batched)."""
    deadline = time.monotonic() + 30
    while len(await _query(http, expr)) < count:
        assert time.monotonic() < deadline, f"Prometheus never saw {count} series of {expr}"
        await asyncio.sleep(0.2)


async def test_panels_return_series_and_every_alert_fires_on_a_live_stack(
    full_plane: Any, prometheus: PrometheusFactory, sim_engine: SimFactory
) -> None:
    plane = full_plane
    client = plane.client
    rules, alert_names = _rules_for_the_test()
    edge = f"127.0.0.1:{client.base_url.port}"
    config = _prometheus_config(edge, f"127.0.0.1:{free_port()}")
    t0, started = time.monotonic(), time.time()
    prom_url, (alive, doomed) = await asyncio.gather(
        prometheus(config, {"sage-alerts.yml": rules}),
        asyncio.gather(_start_engine(plane, "sim"), _start_engine(plane, "sim-b")),
    )
    # An engine the scheduler routes to that no lifecycle supervises, killed: its calls
    # fail until its breaker opens and stays open (failover keeps clients whole).
    await plane.register("sim-external", "sim", sim_engine())
    launcher: Any = sim_engine  # tests/conftest.py's _SimLauncher
    launcher.procs[-1].kill()

    http = httpx.AsyncClient(base_url=prom_url, timeout=10)
    fired: dict[str, float] = {}
    watcher = asyncio.ensure_future(_watch_alerts(http, alert_names, fired, t0))
    try:
        # The baseline: both models ready, no restarts, the queue empty.
        await _wait_for_series(http, "sage:model_ready_engines == 1", 2)

        # Load: plain and streamed chats within a generous SLO, one unknown model (a 404).
        codes = await asyncio.gather(
            *(
                _chat(client, model, slo_ms=60_000, stream=i % 2 == 0)
                for i in range(12)
                for model in ("sim", "sim-b")
            ),
            _chat(client, "no-such-model", slo_ms=60_000, stream=False),
        )
        assert codes == [200] * 24 + [404], codes

        # The faults, together: sim-b's engine crashes until lifecycle gives up; a flood
        # of chats with a 150 ms SLO far beyond the engines' slots; most of the GPU reserved.
        async def flood() -> list[int]:
            tasks = []
            for _ in range(FLOOD):
                chat = _chat(client, "sim", slo_ms=150, stream=False, tokens=16)
                tasks.append(asyncio.ensure_future(chat))
                await asyncio.sleep(0.08)
            return list(await asyncio.gather(*tasks))

        async def reserve_gpu() -> None:
            channel = create_channel(plane.settings.gpu_manager_addr)
            gpus = gpu_manager_pb2_grpc.GpuManagerServiceStub(channel)
            await gpus.Reserve(
                gpu_manager_pb2.ReserveRequest(
                    engine_id="batch-job",
                    gpu_indexes=[0],
                    memory_per_gpu_bytes=74 * GiB,
                    owner_pid=os.getpid(),
                )
            )
            await channel.close(None)

        flooded, _, _ = await asyncio.gather(
            flood(), _crash_until_failed(plane, doomed), reserve_gpu()
        )
        assert flooded == [200] * FLOOD

        await asyncio.wait({watcher}, timeout=30)
        rules = (await http.get("/api/v1/rules")).json()["data"]["groups"][0]["rules"]
        states = {rule["name"]: rule["state"] for rule in rules}
        assert set(fired) == alert_names, f"fired {sorted(fired)}; rules now {states}"

        # Every panel's query had series while the stack saw load and faults, over the
        # window a dashboard shows (gauges like sage:engine_in_flight exist only while
        # requests run, so an instant query at the end may find none).
        empty = [
            f"{title}: {expr}"
            for title, expr in _panel_queries()
            if not await _query_range(http, expr, started)
        ]
        assert not empty, "panels without series:\n" + "\n".join(empty)

        # The alerts name what is wrong.
        firing = (await http.get("/api/v1/alerts")).json()["data"]["alerts"]
        labels = {(a["labels"]["alertname"], a["labels"].get("model", "")) for a in firing}
        assert ("SageModelNoReadyEngine", "sim-b") in labels
        assert ("SageModelNoReadyEngine", "sim") not in labels
        engines = {a["labels"].get("engine") for a in firing}
        assert {"sim-external", doomed["engine_id"]} <= engines
        assert alive["engine_id"] not in engines
    finally:
        watcher.cancel()
        await http.aclose()
    print("alerts firing after (s):", {k: round(v, 1) for k, v in sorted(fired.items())})
