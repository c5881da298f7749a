"""The operators' dashboard: static files at /dashboard and the two JSON routes it adds.

The page is plain HTML/JS/CSS shipped in `sage.services.edge.dashboard` (no build step) and
served without a key, under a strict Content-Security-Policy (scripts and styles from this
origin only, no framing). Everything it shows comes from the admin-keyed management API;
it adds `GET /v1/management/timeseries` (the sampled history in `timeseries.py`) and
`GET /v1/management/presets` (built-in presets with the start bodies the page POSTs to
/v1/management/engines, so applying one goes through the existing API).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

import grpc

from sage.common.exceptions import SageError
from sage.common.http import App, Request, Response
from sage.protocol import management as api
from sage.protocol.management import ModelPoint, Sample
from sage.rpc.scheduler.v1 import scheduler_pb2 as spb

from .management import PREFIX, AdminGate, reply
from .timeseries import GAUGE_FAMILIES, TimeSeries, parse_gauges

if TYPE_CHECKING:
    from sage.llm.presets import Preset, PresetEngine
    from sage.rpc.scheduler.v1.scheduler_pb2_grpc import SchedulerServiceAsyncStub

log = logging.getLogger("sage.edge.dashboard")

# Scripts, styles and fetches from this origin only; no inline script, no framing.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"cache-control", b"no-cache"),
]
# URL path → (file in the package, content type).
ASSETS = {
    "/dashboard": ("index.html", b"text/html; charset=utf-8"),
    "/dashboard/app.js": ("app.js", b"text/javascript; charset=utf-8"),
    "/dashboard/style.css": ("style.css", b"text/css; charset=utf-8"),
}


def load_assets() -> dict[str, Response]:
    """The dashboard's files as ready responses, read once from the installed package."""
    folder = resources.files("sage.services.edge.dashboard")
    return {
        path: Response(
            folder.joinpath(name).read_bytes(), 200, content_type, list(SECURITY_HEADERS)
        )
        for path, (name, content_type) in ASSETS.items()
    }


class Sampler:
    """Feeds `series` from the scheduler every `series.interval_s` seconds."""

    def __init__(
        self, series: TimeSeries, scheduler: Callable[[], SchedulerServiceAsyncStub]
    ) -> None:
        self.series = series
        self._scheduler = scheduler
        self._task: asyncio.Task[None] | None = None

    async def sample_once(self) -> None:
        """Read the scheduler's status and metrics into one sample (or note the outage)."""
        now = time.time()
        try:
            scheduler = self._scheduler()
            status = await scheduler.GetStatus(spb.GetStatusRequest(), timeout=2.0)
            metrics = await scheduler.GetMetrics(
                spb.GetMetricsRequest(families=GAUGE_FAMILIES), timeout=2.0
            )
        except grpc.RpcError as exc:
            self.series.unreachable(now, str(exc.details() or exc.code()))
            return
        except SageError as exc:
            self.series.unreachable(now, exc.message)
            return
        in_flight, tokens = parse_gauges(metrics.prometheus_text.decode("utf-8", "replace"))
        self.series.add(
            Sample(
                t=round(now, 3),
                queued=status.queued,
                in_flight=status.in_flight,
                requests_total=status.requests_total,
                requests_failed=status.requests_failed,
                models={
                    m.model: ModelPoint(
                        rps=m.rps,
                        tokens_per_s=tokens.get(m.model, 0.0),
                        ttft_p50_ms=m.ttft_p50_ms,
                        tpot_p50_ms=m.tpot_p50_ms,
                        p95_ms=m.p95_ms,
                        slo_attainment=m.slo_attainment,
                        queued=m.queued,
                    )
                    for m in metrics.models
                },
                engine_in_flight=in_flight,
            ),
            status.policy,
        )

    async def _run(self) -> None:
        while True:
            try:
                await self.sample_once()
            except Exception:  # a sampler bug must not end the history for good
                log.exception("dashboard sample failed")
            await asyncio.sleep(self.series.interval_s)

    def start(self) -> None:
        """Start sampling on the running loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop sampling."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def preset_start_body(preset: Preset, spec: PresetEngine) -> dict[str, Any]:
    """The /v1/management/engines POST body that starts `spec` as `sage llm preset apply`
    does (same label and metadata, so either one recognises the other's engines)."""
    body: dict[str, Any] = {
        "model_id": spec.model,
        "engine_kind": spec.kind,
        "backend": spec.backend,
        "tensor_parallel_size": spec.tensor_parallel,
        "pipeline_parallel_size": spec.pipeline_parallel,
        "engine_label": spec.engine_label(preset.name),
        "use_gpu": spec.use_gpu,
        "metadata": {"preset": preset.name, "preset_engine": spec.name, **spec.metadata},
    }
    optional = {
        "port": spec.port,
        "max_concurrent_requests": spec.max_concurrent_requests,
        "extra_args": spec.extra_args or None,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    return body


def preset_list() -> api.PresetList:
    """The built-in presets, each engine with its label and start body."""
    from sage.llm.presets import list_presets  # the client library; loaded on first use

    return api.PresetList(
        presets=[
            api.Preset(
                name=preset.name,
                description=preset.description,
                engines=[
                    api.PresetEngine(
                        name=spec.name,
                        model_id=spec.model,
                        engine_kind=spec.kind,
                        engine_label=spec.engine_label(preset.name),
                        start=preset_start_body(preset, spec),
                    )
                    for spec in preset.engines
                ],
            )
            for preset in list_presets()
        ]
    )


def add_dashboard_routes(app: App, admin: AdminGate, series: TimeSeries) -> None:
    """Register the page (no key) and its JSON routes (admin key) on `app`."""
    assets = load_assets()

    def static(response: Response) -> Callable[[Request], Any]:
        async def serve(request: Request) -> Response:
            return response

        return serve

    for path, response in assets.items():
        app.add("GET", path, static(response))

    async def timeseries(request: Request) -> Response:
        admin.check(request.headers)
        return reply(series.snapshot())

    async def presets(request: Request) -> Response:
        admin.check(request.headers)
        return reply(preset_list())

    app.add("GET", f"{PREFIX}/timeseries", timeseries)
    app.add("GET", f"{PREFIX}/presets", presets)
