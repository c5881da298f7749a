"""China-mainland detection and HF mirror configuration, with injected probes only."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest

from sage.common.config import detect_china_mainland, ensure_hf_mirror_configured, network
from sage.common.config.network import (
    HF_MIRROR_URL,
    clear_detection_cache,
    default_probe,
    is_mirror_endpoint,
)


class RecordingProbe:
    """Counts calls and returns a fixed answer (or raises)."""

    def __init__(self, answer: bool = True, exc: Exception | None = None) -> None:
        self.answer = answer
        self.exc = exc
        self.calls: list[float] = []

    def __call__(self, timeout: float) -> bool:
        self.calls.append(timeout)
        if self.exc is not None:
            raise self.exc
        return self.answer


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("SAGE_CHINA_MAINLAND", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    clear_detection_cache()
    yield
    clear_detection_cache()


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", True), ("true", True), ("TRUE", True), (" yes ", True), ("0", False), ("false", False)],
)
def test_env_flag_decides_without_probe(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: bool
) -> None:
    monkeypatch.setenv("SAGE_CHINA_MAINLAND", value)
    probe = RecordingProbe(answer=not expected)
    assert detect_china_mainland(probe=probe) is expected
    assert probe.calls == []


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("https://hf-mirror.com", True),
        ("https://hf-mirror.com/", True),
        ("http://my-mirror.internal:8080", True),
        ("https://huggingface.co", False),
        ("https://huggingface.co/", False),
        ("https://cdn.huggingface.co", False),
    ],
)
def test_hf_endpoint_decides_without_probe(
    monkeypatch: pytest.MonkeyPatch, endpoint: str, expected: bool
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    probe = RecordingProbe(answer=not expected)
    assert detect_china_mainland(probe=probe) is expected
    assert probe.calls == []


def test_env_flag_beats_hf_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGE_CHINA_MAINLAND", "0")
    monkeypatch.setenv("HF_ENDPOINT", HF_MIRROR_URL)
    assert detect_china_mainland(probe=RecordingProbe()) is False


def test_unrecognised_env_flag_falls_through_to_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGE_CHINA_MAINLAND", "maybe")
    probe = RecordingProbe(answer=True)
    assert detect_china_mainland(probe=probe) is True
    assert len(probe.calls) == 1


def test_probe_called_with_timeout_and_cached() -> None:
    probe = RecordingProbe(answer=True)
    assert detect_china_mainland(timeout=0.25, probe=probe) is True
    assert detect_china_mainland(timeout=0.25, probe=probe) is True
    assert probe.calls == [0.25]
    clear_detection_cache()
    assert detect_china_mainland(probe=probe) is True
    assert len(probe.calls) == 2


def test_cache_is_per_probe() -> None:
    yes, no = RecordingProbe(answer=True), RecordingProbe(answer=False)
    assert detect_china_mainland(probe=yes) is True
    assert detect_china_mainland(probe=no) is False


def test_env_checked_before_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    probe = RecordingProbe(answer=True)
    assert detect_china_mainland(probe=probe) is True
    monkeypatch.setenv("SAGE_CHINA_MAINLAND", "0")
    assert detect_china_mainland(probe=probe) is False


def test_failing_probe_means_false() -> None:
    probe = RecordingProbe(exc=RuntimeError("boom"))
    assert detect_china_mainland(probe=probe) is False
    assert len(probe.calls) == 1


def test_default_probe_used_and_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[float] = []

    def fake_default(timeout: float) -> bool:
        calls.append(timeout)
        return False

    monkeypatch.setattr(network, "default_probe", fake_default)
    assert detect_china_mainland() is False
    assert detect_china_mainland() is False
    assert calls == [1.5]


def _mock_client_factory(monkeypatch: pytest.MonkeyPatch, handler: httpx.MockTransport) -> None:
    """Route the default probe's httpx.Client through a mock transport."""
    real_client = httpx.Client

    def make_client(**kwargs: object) -> httpx.Client:
        timeout = kwargs.get("timeout")
        assert isinstance(timeout, httpx.Timeout)
        return real_client(transport=handler, timeout=timeout)

    monkeypatch.setattr(httpx, "Client", make_client)


@pytest.mark.parametrize(
    ("hf_ok", "mirror_ok", "expected"),
    [(True, True, False), (True, False, False), (False, True, True), (False, False, False)],
)
def test_default_probe_logic(
    monkeypatch: pytest.MonkeyPatch, hf_ok: bool, mirror_ok: bool, expected: bool
) -> None:
    methods: list[tuple[str, str]] = []

    def handle(request: httpx.Request) -> httpx.Response:
        methods.append((request.method, request.url.host))
        ok = hf_ok if request.url.host == "huggingface.co" else mirror_ok
        if not ok:
            raise httpx.ConnectTimeout("timed out", request=request)
        return httpx.Response(200)

    _mock_client_factory(monkeypatch, httpx.MockTransport(handle))
    assert default_probe(0.1) is expected
    assert methods[0] == ("HEAD", "huggingface.co")
    assert all(m == "HEAD" for m, _ in methods)


def test_ensure_keeps_existing_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "https://huggingface.co")
    probe = RecordingProbe(answer=True)
    assert ensure_hf_mirror_configured(probe=probe) == "https://huggingface.co"
    assert os.environ["HF_ENDPOINT"] == "https://huggingface.co"
    assert probe.calls == []


def test_ensure_sets_mirror_in_china() -> None:
    probe = RecordingProbe(answer=True)
    assert ensure_hf_mirror_configured(probe=probe) == HF_MIRROR_URL
    assert os.environ["HF_ENDPOINT"] == HF_MIRROR_URL
    # later calls see HF_ENDPOINT and don't probe again
    assert ensure_hf_mirror_configured(probe=probe) == HF_MIRROR_URL
    assert len(probe.calls) == 1


def test_ensure_sets_mirror_from_env_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGE_CHINA_MAINLAND", "1")
    probe = RecordingProbe(answer=False)
    assert ensure_hf_mirror_configured(probe=probe) == HF_MIRROR_URL
    assert probe.calls == []


def test_ensure_outside_china_returns_none() -> None:
    assert ensure_hf_mirror_configured(probe=RecordingProbe(answer=False)) is None
    assert "HF_ENDPOINT" not in os.environ


def test_ensure_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(**kwargs: object) -> bool:
        raise RuntimeError("unexpected")

    monkeypatch.setattr(network, "detect_china_mainland", broken)
    assert network.ensure_hf_mirror_configured(probe=RecordingProbe()) is None


def test_is_mirror_endpoint_edge_cases() -> None:
    assert is_mirror_endpoint("hf-mirror.com") is True
    assert is_mirror_endpoint("huggingface.co") is False
    assert is_mirror_endpoint("") is False
    assert is_mirror_endpoint("https://evilhuggingface.co") is True
