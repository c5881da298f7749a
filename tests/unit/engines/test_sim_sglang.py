"""The sim's SGLang flavor against SGLang's own definitions: the /metrics names and labels
the scheduler and lifecycle read, its health routes, and the load they make of it.

A real SGLang server cannot run here (CUDA kernels), so names and labels are read from
SGLang's source (observability/metrics_collector.py) where a side venv has it installed
(SAGE_TEST_SGLANG_PYTHON, default .venv-sglang/bin/python in the repo, which
scripts/install_sglang_parser.sh builds), else from what that file says in SGLang 0.5.23
(pinned below).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sage.engines.sim import SimConfig, create_app
from sage.engines.sim.app import main
from sage.engines.vllm_metrics import LOAD_METRICS_PATH, read_load

# scripts/test.sh builds it (scripts/install_sglang_parser.sh) and exports the variable.
SGLANG_PYTHON = os.environ.get(
    "SAGE_TEST_SGLANG_PYTHON", str(Path(__file__).parents[3] / ".venv-sglang" / "bin" / "python")
)
# What sglang/srt/observability/metrics_collector.py (0.5.23) names and labels: the three
# scheduler gauges the load view reads, and the labels SchedulerMetricsCollector.init_new
# gives them on one GPU (priority / dp_rank only with those features on).
READ_BY_SCHEDULER = {"sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage"}
LABELS_0_5_23 = {"model_name", "engine_type", "tp_rank", "pp_rank", "moe_ep_rank"}
_FIND = "import importlib.util as u; print(u.find_spec('sglang').submodule_search_locations[0])"


def _sglang_source() -> tuple[set[str], set[str]] | None:
    """(gauge names, label names) from the installed SGLang's source, or None."""
    if not Path(SGLANG_PYTHON).is_file():
        return None
    found = subprocess.run([SGLANG_PYTHON, "-c", _FIND], capture_output=True, text=True, timeout=60)
    if found.returncode != 0:
        return None
    source = (
        Path(found.stdout.strip()) / "srt" / "observability" / "metrics_collector.py"
    ).read_text()
    names = set(re.findall(r'name="(sglang:[a-z_]+)"', source))
    block = re.search(r"labels = \{(.*?)\}", source[source.index("def init_new") :], re.S)
    assert block is not None, "SGLang's init_new no longer builds a labels dict"
    return names, set(re.findall(r'"([a-z_]+)":', block.group(1)))


def _client(config: SimConfig) -> httpx.AsyncClient:
    app = create_app(config)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sim")


def _series(text: str) -> dict[str, dict[str, str]]:
    return {
        sample.name: sample.labels
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_sglang_source_still_names_what_the_flavor_pins() -> None:
    read = _sglang_source()
    if read is None:
        pytest.skip(f"no SGLang at {SGLANG_PYTHON}; the pinned 0.5.23 names are used")
    names, labels = read
    assert names >= READ_BY_SCHEDULER
    assert labels == LABELS_0_5_23


async def test_flavor_serves_sglangs_load_gauges_and_no_vllm_series() -> None:
    async with _client(SimConfig(model="m", flavor="sglang")) as client:
        page = (await client.get("/metrics")).text
        for path in ("/health", "/health_generate"):
            assert (await client.get(path)).status_code == 200
    series = _series(page)
    assert set(series) >= READ_BY_SCHEDULER
    assert not [name for name in series if name.startswith("vllm:")]
    for name in READ_BY_SCHEDULER:
        assert set(series[name]) == LABELS_0_5_23
        assert series[name]["model_name"] == "m"
    async with _client(SimConfig()) as vllm_flavor:  # the default flavor is unchanged
        assert (await vllm_flavor.get("/health_generate")).status_code == 404
        assert "vllm:num_requests_running" in (await vllm_flavor.get("/metrics")).text


async def test_a_busy_sglang_sim_reads_as_its_running_and_queued_requests() -> None:
    # One batch slot and a slow first token: of three requests, one runs and two wait.
    config = SimConfig(model="m", flavor="sglang", max_num_seqs=1, ttft_ms=3000)
    body = {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    async with _client(config) as client:
        calls = [
            asyncio.create_task(client.post("/v1/chat/completions", json=body)) for _ in range(3)
        ]
        try:
            for _ in range(200):
                filtered = await client.get(LOAD_METRICS_PATH)
                if read_load(filtered.text).queued == 3.0:
                    break
                await asyncio.sleep(0.01)
            full = await client.get("/metrics")
        finally:
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
    assert set(_series(filtered.text)) == READ_BY_SCHEDULER  # the scrape's name[] filter
    load = read_load(filtered.text)
    assert (load.running, load.waiting, load.kv_cache_usage) == (1.0, 2.0, 1.0)
    assert read_load(full.text) == load


async def test_finished_requests_are_counted_as_sglang_counts_them() -> None:
    body = {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    async with _client(SimConfig(model="m", flavor="sglang")) as client:
        for _ in range(2):
            assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
        page = (await client.get("/metrics")).text
    assert 'sglang:num_requests_total{model_name="m"} 2.0' in page


def test_unknown_flavor_is_refused() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--flavor", "tgi"])
    assert exc.value.code == 2
