"""The last minutes of the scheduler's numbers, for the dashboard's charts.

The scheduler keeps only current values (sliding-window rates and percentiles); charts need
their history. The edge samples them here, one GetStatus + GetMetrics pair every few
seconds into a fixed ring, so the scheduler and its protocol stay unchanged and a page
opened now still shows the past ten minutes. Plain logic (no grpc): the sampler task in
`dashboard_routes.py` feeds `Sample`s in.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any

# One sample every 2 s for 10 minutes.
DEFAULT_INTERVAL_S = 2.0
DEFAULT_WINDOW_S = 600.0
MAX_EVENTS = 50

# The two per-label gauges the charts need that ModelStats does not carry; the sampler asks
# the scheduler for these families only (the whole text is megabytes at 1024 engines).
GAUGE_FAMILIES = ("sage:engine_in_flight", "sage:scheduler_generation_tokens_per_second")
_GAUGE_LINE = re.compile(
    r'^(sage:engine_in_flight|sage:scheduler_generation_tokens_per_second)\{(?:engine|model)="'
    r'((?:[^"\\]|\\.)*)"\} (\S+)$',
    re.MULTILINE,
)
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def _unescape(value: str) -> str:
    return re.sub(r'\\[\\"n]', lambda m: _UNESCAPE[m.group(0)], value)


def parse_gauges(prometheus_text: str) -> tuple[dict[str, float], dict[str, float]]:
    """(requests in flight per engine, generated tokens/s per model) from the scheduler's
    Prometheus text; lines it cannot read are skipped."""
    in_flight: dict[str, float] = {}
    tokens: dict[str, float] = {}
    for name, label, value in _GAUGE_LINE.findall(prometheus_text):
        try:
            number = float(value)
        except ValueError:
            continue
        target = in_flight if name == "sage:engine_in_flight" else tokens
        target[_unescape(label)] = number
    return in_flight, tokens


@dataclass(frozen=True)
class ModelPoint:
    """One model's numbers at one sample (the scheduler's ModelStats plus tokens/s)."""

    rps: float
    tokens_per_s: float
    ttft_p50_ms: float
    tpot_p50_ms: float
    p95_ms: float
    slo_attainment: float
    queued: int


@dataclass(frozen=True)
class Sample:
    """The control plane at one moment (unix seconds `t`)."""

    t: float
    policy: str
    queued: int
    in_flight: int
    requests_total: int
    requests_failed: int
    models: dict[str, ModelPoint] = field(default_factory=dict)
    engine_in_flight: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Plain data for the JSON endpoint."""
        return {
            "t": round(self.t, 3),
            "queued": self.queued,
            "in_flight": self.in_flight,
            "requests_total": self.requests_total,
            "requests_failed": self.requests_failed,
            "models": {
                name: {
                    "rps": p.rps,
                    "tokens_per_s": p.tokens_per_s,
                    "ttft_p50_ms": p.ttft_p50_ms,
                    "tpot_p50_ms": p.tpot_p50_ms,
                    "p95_ms": p.p95_ms,
                    "slo_attainment": p.slo_attainment,
                    "queued": p.queued,
                }
                for name, p in self.models.items()
            },
            "engine_in_flight": self.engine_in_flight,
        }


@dataclass(frozen=True)
class ErrorEvent:
    """Something an operator should see in "recent errors"."""

    t: float
    source: str
    message: str


class TimeSeries:
    """A ring of samples plus the errors noticed between them (failed requests, the
    scheduler unreachable); appended to from one task, read by request handlers."""

    def __init__(
        self, interval_s: float = DEFAULT_INTERVAL_S, window_s: float = DEFAULT_WINDOW_S
    ) -> None:
        self.interval_s = interval_s
        self.window_s = window_s
        self._samples: deque[Sample] = deque(maxlen=max(1, round(window_s / interval_s)))
        self._errors: deque[ErrorEvent] = deque(maxlen=MAX_EVENTS)
        self._unreachable = False

    def add(self, sample: Sample) -> None:
        """Record a sample; failed requests since the previous one become an error event
        (a scheduler restart resets its counters: that is not a failure)."""
        previous = self._samples[-1] if self._samples else None
        if self._unreachable:
            self._unreachable = False
            self._errors.append(ErrorEvent(sample.t, "scheduler", "scheduler reachable again"))
        if previous is not None and sample.requests_failed > previous.requests_failed:
            failed = sample.requests_failed - previous.requests_failed
            self._errors.append(
                ErrorEvent(
                    sample.t,
                    "scheduler",
                    f"{failed} request{'s' if failed != 1 else ''} failed in the last "
                    f"{sample.t - previous.t:.0f} s ({sample.requests_failed} since start)",
                )
            )
        self._samples.append(sample)

    def unreachable(self, t: float, detail: str) -> None:
        """The scheduler did not answer; reported once per outage."""
        if not self._unreachable:
            self._unreachable = True
            self._errors.append(ErrorEvent(t, "scheduler", f"scheduler unreachable: {detail}"))

    @property
    def samples(self) -> list[Sample]:
        """The samples held, oldest first."""
        return list(self._samples)

    def to_json(self) -> dict[str, Any]:
        """The whole window as the dashboard reads it."""
        latest = self._samples[-1] if self._samples else None
        return {
            "interval_s": self.interval_s,
            "window_s": self.window_s,
            "policy": latest.policy if latest is not None else None,
            "samples": [s.to_json() for s in self._samples],
            "errors": [
                {"t": round(e.t, 3), "source": e.source, "message": e.message} for e in self._errors
            ],
        }
