"""Network environment detection: whether to download Hugging Face models via a mirror.

huggingface.co is blocked or very slow from mainland China, so the CLI (`sage llm serve`,
`sage llm model download`) calls `ensure_hf_mirror_configured()` before anything touches
the Hub. Environment variables decide without any network call; only when they are silent
do we spend a short probe, and its answer is cached for the life of the process.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Final
from urllib.parse import urlsplit

import httpx

logger = logging.getLogger(__name__)

HF_MIRROR_URL: Final = "https://hf-mirror.com"
"""Mirror used when we decide the process runs in mainland China."""

HF_OFFICIAL_URL: Final = "https://huggingface.co"
"""The official Hub, probed first."""

CHINA_ENV_VAR: Final = "SAGE_CHINA_MAINLAND"
"""Set to 1/true/yes/on or 0/false/no/off to skip detection entirely."""

HF_ENDPOINT_ENV_VAR: Final = "HF_ENDPOINT"
"""What huggingface_hub reads to pick the Hub base URL."""

Probe = Callable[[float], bool]
"""A detector: given a timeout in seconds, return True if in mainland China."""

_TRUE: Final = frozenset({"1", "true", "yes", "on", "y", "t"})
_FALSE: Final = frozenset({"0", "false", "no", "off", "n", "f"})
_OFFICIAL_HOSTS: Final = ("huggingface.co",)

_cache: dict[Probe | None, bool] = {}
_cache_lock = threading.Lock()


def _env_decision() -> bool | None:
    """What the environment says, or None when it is silent (then we must probe)."""
    raw = os.environ.get(CHINA_ENV_VAR)
    if raw is not None and raw.strip():
        value = raw.strip().lower()
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        logger.warning("ignoring %s=%r: expected 1/0/true/false", CHINA_ENV_VAR, raw)
    endpoint = os.environ.get(HF_ENDPOINT_ENV_VAR)
    if endpoint is not None and endpoint.strip():
        return is_mirror_endpoint(endpoint)
    return None


def is_mirror_endpoint(endpoint: str) -> bool:
    """True if `endpoint` points anywhere but the official huggingface.co host."""
    text = endpoint.strip()
    if "://" not in text:
        text = "https://" + text
    try:
        host = (urlsplit(text).hostname or "").lower()
    except ValueError:
        return False
    if not host:
        return False
    return not any(host == h or host.endswith("." + h) for h in _OFFICIAL_HOSTS)


def _reachable(client: httpx.Client, url: str) -> bool:
    """Any HTTP answer at all counts as reachable; errors and timeouts do not."""
    try:
        client.head(url)
    except (httpx.HTTPError, OSError):
        return False
    return True


def default_probe(timeout: float) -> bool:
    """True if huggingface.co is unreachable but hf-mirror.com answers within `timeout`."""
    with httpx.Client(timeout=httpx.Timeout(timeout), follow_redirects=False) as client:
        if _reachable(client, HF_OFFICIAL_URL):
            return False
        return _reachable(client, HF_MIRROR_URL)


def detect_china_mainland(*, timeout: float = 1.5, probe: Probe | None = None) -> bool:
    """Best guess whether this process runs in mainland China; never raises.

    Order: SAGE_CHINA_MAINLAND (1/0/true/false), then an already set HF_ENDPOINT (True if
    it is a mirror), and only then a network probe (`probe`, default `default_probe`)
    whose answer is cached per probe for the rest of the process. A failing probe is False.
    """
    decided = _env_decision()
    if decided is not None:
        return decided
    with _cache_lock:
        if probe in _cache:
            return _cache[probe]
        run = probe if probe is not None else default_probe
        try:
            result = bool(run(timeout))
        except Exception as exc:  # any probe failure means "not detected"
            logger.debug("China mainland probe failed: %s", exc)
            result = False
        _cache[probe] = result
        return result


def clear_detection_cache() -> None:
    """Forget cached probe results (tests, or after the network changed)."""
    with _cache_lock:
        _cache.clear()


def ensure_hf_mirror_configured(*, timeout: float = 1.5, probe: Probe | None = None) -> str | None:
    """Set HF_ENDPOINT to the mirror when in mainland China; return the endpoint in effect.

    An HF_ENDPOINT the user already set is never touched. Returns None when the official
    Hub is used. Never raises: failing to pick a mirror must not stop the CLI.
    """
    try:
        current = os.environ.get(HF_ENDPOINT_ENV_VAR)
        if current is not None and current.strip():
            return current
        if detect_china_mainland(timeout=timeout, probe=probe):
            os.environ[HF_ENDPOINT_ENV_VAR] = HF_MIRROR_URL
            logger.info("mainland China detected; using %s=%s", HF_ENDPOINT_ENV_VAR, HF_MIRROR_URL)
            return HF_MIRROR_URL
        return None
    except Exception as exc:
        logger.debug("ensure_hf_mirror_configured failed: %s", exc)
        return os.environ.get(HF_ENDPOINT_ENV_VAR) or None
