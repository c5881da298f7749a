"""The last minutes of the scheduler's numbers, for the dashboard's charts.

The scheduler keeps only current values (sliding-window rates and percentiles); charts need
their history. The edge samples them here, one GetStatus + GetMetrics pair every few
seconds into a fixed ring, so the scheduler and its protocol stay unchanged and a page
opened now still shows the past ten minutes. Plain logic (no grpc): the sampler task in
`dashboard_routes.py` feeds `Sample`s in; the reply is sage.protocol.management's
TimeSeries, the document's own model.
"""

from __future__ import annotations

import re
from collections import deque

from sage.protocol import management as api
from sage.protocol.management import ErrorEvent, Sample

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
        self._policy: str | None = None

    def add(self, sample: Sample, policy: str) -> None:
        """Record a sample; failed requests since the previous one become an error event
        (a scheduler restart resets its counters: that is not a failure)."""
        previous = self._samples[-1] if self._samples else None
        if self._unreachable:
            self._unreachable = False
            self._errors.append(
                ErrorEvent(t=sample.t, source="scheduler", message="scheduler reachable again")
            )
        if previous is not None and sample.requests_failed > previous.requests_failed:
            failed = sample.requests_failed - previous.requests_failed
            self._errors.append(
                ErrorEvent(
                    t=sample.t,
                    source="scheduler",
                    message=f"{failed} request{'s' if failed != 1 else ''} failed in the last "
                    f"{sample.t - previous.t:.0f} s ({sample.requests_failed} since start)",
                )
            )
        self._samples.append(sample)
        self._policy = policy

    def unreachable(self, t: float, detail: str) -> None:
        """The scheduler did not answer; reported once per outage."""
        if not self._unreachable:
            self._unreachable = True
            message = f"scheduler unreachable: {detail}"
            self._errors.append(ErrorEvent(t=round(t, 3), source="scheduler", message=message))

    @property
    def samples(self) -> list[Sample]:
        """The samples held, oldest first."""
        return list(self._samples)

    def snapshot(self) -> api.TimeSeries:
        """The whole window as the dashboard reads it (the scheduler's latest policy)."""
        return api.TimeSeries(
            interval_s=self.interval_s,
            window_s=self.window_s,
            policy=self._policy,
            samples=list(self._samples),
            errors=list(self._errors),
        )
