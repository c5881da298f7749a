"""Structured logging (key=value or JSON) with the request id and trace id on every line.

The request id lives in a ContextVar set by the edge and the gRPC server interceptor, so
a log line written anywhere during a request carries it without passing it around.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import threading
import time
from typing import Any

import orjson

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("sage_request_id", default="")

_STD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "request_id", "trace_id", "service"}
)


def _trace_id() -> str:
    try:
        from opentelemetry import trace
    except ImportError:  # pragma: no cover - opentelemetry is a base dependency
        return ""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


class _ContextFilter(logging.Filter):
    """Adds request_id, trace_id and the service name to each record."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        record.trace_id = _trace_id()
        record.service = self.service
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STD_ATTRS}


class KeyValueFormatter(logging.Formatter):
    """`ts level service logger msg key=value ...`; easy to grep, easy to read."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        parts = [
            f"{ts}.{int(record.msecs):03d}",
            record.levelname,
            getattr(record, "service", "") or "-",
            record.name,
            record.getMessage(),
        ]
        rid = getattr(record, "request_id", "")
        if rid:
            parts.append(f"request_id={rid}")
        tid = getattr(record, "trace_id", "")
        if tid:
            parts.append(f"trace_id={tid}")
        parts.extend(
            f"{k}={v!r}" if isinstance(v, str) and " " in v else f"{k}={v}"
            for k, v in _extras(record).items()
        )
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": record.created,
            "level": record.levelname,
            "service": getattr(record, "service", ""),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("request_id", "trace_id"):
            value = getattr(record, key, "")
            if value:
                doc[key] = value
        doc.update(_extras(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


# huggingface_hub's logger of Hub requests (its retries, when the Hub cannot be reached).
HUB_HTTP_LOGGER = "huggingface_hub.utils._http"


class _HubRetryLines(logging.Filter):
    """One line per failed Hub attempt, through our handlers only.

    huggingface_hub writes each retry as two records ("'<error>' thrown while requesting
    HEAD <url>", then "Retrying in 1s [Retry 1/5]."), and every record twice: to the stderr
    handler it adds to its own logger (at import, which may come after us) and, propagated,
    to ours. As a filter on the logger that makes them, this joins the pair into one record,
    hands it to the root logger's handlers and drops the original, so no other handler sees
    it. The last attempt's error line is dropped: the exception it raises says it again.
    """

    def __init__(self) -> None:
        super().__init__()
        self._pending = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if " thrown while requesting " in message:
            self._pending.message = message  # its retry line follows, unless it was the last
            return False
        pending = getattr(self._pending, "message", "")
        self._pending.message = ""
        if pending and message.startswith(("Retrying in", "Rate limited")):
            record.msg = f"Hub request failed: {pending}; {message[0].lower()}{message[1:]}"
            record.args = ()
        logging.getLogger().handle(record)
        return False


def configure_logging(service: str, level: str = "INFO", fmt: str = "text") -> None:
    """Install the structured handler on the root logger (idempotent)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_sage", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._sage = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    handler.addFilter(_ContextFilter(service))
    root.addHandler(handler)
    root.setLevel(level.upper())
    # grpc and httpx are chatty at INFO; their warnings still show.
    for noisy in ("httpx", "httpcore", "grpc._cython"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    hub_http = logging.getLogger(HUB_HTTP_LOGGER)
    if not any(isinstance(f, _HubRetryLines) for f in hub_http.filters):
        hub_http.addFilter(_HubRetryLines())


def get_logger(name: str) -> logging.Logger:
    """SAGE's logger accessor (plain stdlib loggers underneath)."""
    return logging.getLogger(name)
