"""CORS for the edge: off unless origins are configured; preflights answered in the app."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import orjson

from sage.common.exceptions import openai_error_body

# Headers a browser client may read from responses besides the CORS-safelisted ones.
_EXPOSE = b"x-request-id, retry-after"
_DEFAULT_METHODS = ("DELETE", "GET", "POST")


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    """Which origins may call the app from a browser; `*` allows any."""

    origins: frozenset[str]
    any_origin: bool = False
    max_age_s: int = 600

    @classmethod
    def parse(cls, spec: str) -> CorsPolicy | None:
        """`*` or a comma-separated origin list → a policy; empty → None (CORS off)."""
        items = [item.strip().rstrip("/") for item in spec.split(",") if item.strip()]
        if not items:
            return None
        return cls(frozenset(i for i in items if i != "*"), any_origin="*" in items)

    def allows(self, origin: str) -> bool:
        """True when `origin` may read responses."""
        return self.any_origin or origin in self.origins

    def response_headers(self, origin: str) -> list[tuple[bytes, bytes]]:
        """Headers for an actual (non-preflight) response to a request from `origin`."""
        if self.any_origin:
            return [
                (b"access-control-allow-origin", b"*"),
                (b"access-control-expose-headers", _EXPOSE),
            ]
        if origin in self.origins:
            return [
                (b"access-control-allow-origin", origin.encode("latin-1")),
                (b"access-control-expose-headers", _EXPOSE),
                (b"vary", b"Origin"),
            ]
        return [(b"vary", b"Origin")]

    def preflight(
        self, origin: str, headers: dict[str, str], methods: Iterable[str] = _DEFAULT_METHODS
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """(status, headers, body) answering an OPTIONS preflight from `origin`."""
        if not self.allows(origin):
            body = orjson.dumps(
                openai_error_body(
                    f"origin {origin!r} is not allowed",
                    "invalid_request_error",
                    None,
                    "cors_origin_not_allowed",
                )
            )
            return 400, [(b"content-type", b"application/json"), (b"vary", b"Origin")], body
        allowed = ", ".join(sorted({*methods, "OPTIONS"}))
        out = [
            (b"access-control-allow-origin", b"*" if self.any_origin else origin.encode("latin-1")),
            (b"access-control-allow-methods", allowed.encode()),
            (b"access-control-max-age", str(self.max_age_s).encode()),
        ]
        # Echo what the browser asks for (the OpenAI SDK sends x-stainless-* headers).
        requested = headers.get("access-control-request-headers")
        if requested:
            out.append((b"access-control-allow-headers", requested.encode("latin-1")))
        if not self.any_origin:
            out.append((b"vary", b"Origin"))
        return 204, out, b""
