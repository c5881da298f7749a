"""OpenTelemetry setup: one call per process, chosen by `SAGE_OTEL_EXPORTER`.

Interceptors always create spans and propagate `traceparent`; without an exporter the
API's no-op tracer makes that nearly free.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from sage.common.exceptions import ConfigurationError


def configure_tracing(service: str, exporter: str) -> TracerProvider | None:
    """Install a tracer provider exporting to `exporter` (none | console | otlp)."""
    if exporter == "none":
        return None
    span_exporter: SpanExporter
    if exporter == "console":
        span_exporter = ConsoleSpanExporter()
    elif exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found]
                OTLPSpanExporter,
            )
        except ImportError:
            raise ConfigurationError(
                "SAGE_OTEL_EXPORTER=otlp needs opentelemetry-exporter-otlp installed",
                param="otel_exporter",
            ) from None
        span_exporter = OTLPSpanExporter()
    else:
        raise ConfigurationError(
            f"unknown SAGE_OTEL_EXPORTER {exporter!r}; use none, console or otlp",
            param="otel_exporter",
        )
    provider = TracerProvider(resource=Resource.create({"service.name": f"sage-{service}"}))
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(provider)
    return provider
