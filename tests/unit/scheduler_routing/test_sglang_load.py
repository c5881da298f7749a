"""The load view reads SGLang engines: its gauge names, its rank labels, its /metrics/ filter."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from sage.engines.vllm_metrics import LOAD_METRICS_PATH, VllmLoad, read_load
from sage.services.scheduler.load import parse_queue_depth

# As SGLang 0.5 writes it (labels sorted; engine_type and moe_ep_rank left out here); two
# data-parallel ranks, and
# a second pipeline stage whose scheduler reports the same requests as stage 0.
PAGE = """# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{dp_rank="0",model_name="m",pp_rank="0",tp_rank="0"} 3.0
sglang:num_running_reqs{dp_rank="1",model_name="m",pp_rank="0",tp_rank="0"} 2.0
sglang:num_running_reqs{dp_rank="0",model_name="m",pp_rank="1",tp_rank="0"} 3.0
sglang:num_queue_reqs{dp_rank="0",model_name="m",pp_rank="0",tp_rank="0"} 4.0
sglang:num_queue_reqs{dp_rank="1",model_name="m",pp_rank="0",tp_rank="0"} 1.0
sglang:num_grammar_queue_reqs{model_name="m",pp_rank="0"} 7.0
sglang:token_usage{dp_rank="0",model_name="m",pp_rank="0",tp_rank="0"} 0.25
sglang:token_usage{dp_rank="1",model_name="m",pp_rank="0",tp_rank="0"} 0.5
sglang:full_token_usage{model_name="m",pp_rank="0"} 0.9
"""


def test_sglang_gauges_read_as_running_waiting_and_kv_usage() -> None:
    # Ranks summed, stage 1 not counted again, look-alike names (grammar queue, full usage)
    # not read; the fullest rank's token usage.
    assert read_load(PAGE) == VllmLoad(running=5.0, waiting=5.0, kv_cache_usage=0.5)
    assert parse_queue_depth(PAGE) == 10.0


def test_a_single_gpu_sglang_page_without_rank_labels_is_read() -> None:
    page = "sglang:num_running_reqs 1\nsglang:num_queue_reqs 2\nsglang:token_usage 0.1\n"
    assert read_load(page) == VllmLoad(running=1.0, waiting=2.0, kv_cache_usage=0.1)


def test_the_filtered_scrape_names_sglangs_series_too() -> None:
    url = urlsplit(LOAD_METRICS_PATH)
    assert url.path == "/metrics/"  # SGLang mounts prometheus_client's app there too
    names = set(parse_qs(url.query)["name[]"])
    assert {"sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage"} <= names
