"""API-key protection for the engines this project ships (sim, embedding, transformers).

Lifecycle starts each engine with its own key (derived from the stack's internal token:
`sage.common.security.engine_api_key`) in `SAGE_ENGINE_API_KEY`, never on the command line,
which other local users can read in `ps`. With a key, every route but `/health` (process
supervisors probe it) needs `Authorization: Bearer <key>`, `/metrics` included: the
scheduler sends the key when it scrapes. Without one the engine is open, as vLLM is
without `--api-key`.
"""

from __future__ import annotations

import argparse
import hmac
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping

import orjson

from sage.common.apikeys import bearer_token
from sage.common.exceptions import openai_error_body
from sage.common.http.asgi import Receive, Scope, Send

AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ENGINE_KEY_ENV = "SAGE_ENGINE_API_KEY"
OPEN_PATHS: frozenset[str] = frozenset({"/health"})


def add_api_key_argument(parser: argparse.ArgumentParser) -> None:
    """`--api-key`, which defaults to $SAGE_ENGINE_API_KEY (the way lifecycle passes it)."""
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"require `Authorization: Bearer KEY` on every route but /health (default: "
        f"${ENGINE_KEY_ENV}; prefer the variable: argv is visible to other users)",
    )


def resolve_api_key(flag: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The key from `--api-key`, else the environment; None (open) when neither is set."""
    env = os.environ if environ is None else environ
    key = flag if flag is not None else env.get(ENGINE_KEY_ENV, "")
    return key.strip() or None


class ApiKeyGate:
    """ASGI middleware: refuses requests without the engine's bearer key (401, OpenAI JSON)
    before the app sees them; lifespan and the open paths pass straight through."""

    def __init__(
        self,
        app: AsgiApp,
        api_key: str,
        open_paths: Iterable[str] = OPEN_PATHS,
        refusal: Mapping[str, object] | None = None,
    ) -> None:
        if not api_key:
            raise ValueError("api_key must not be empty")
        self.app = app
        self._expected = api_key.encode()
        self._open = frozenset(open_paths)
        self._body = orjson.dumps(
            refusal
            if refusal is not None
            else openai_error_body(
                "this engine requires its API key (Authorization: Bearer <key>)",
                "authentication_error",
                code="invalid_api_key",
            )
        )

    def allows(self, headers: Iterable[tuple[bytes, bytes]]) -> bool:
        """True when the Authorization header carries the key (scheme case-insensitive)."""
        for name, value in headers:
            if name.lower() == b"authorization":
                token = bearer_token(value.decode("latin-1"))
                return token is not None and hmac.compare_digest(
                    token.encode("latin-1"), self._expected
                )
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope.get("path", "") in self._open
            or self.allows(scope.get("headers") or ())
        ):
            await self.app(scope, receive, send)
            return
        body = self._body
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def protect(
    app: AsgiApp,
    api_key: str | None,
    open_paths: Iterable[str] = OPEN_PATHS,
    refusal: Mapping[str, object] | None = None,
) -> AsgiApp:
    """`app` behind an ApiKeyGate when `api_key` is set, else `app` unchanged; `refusal` is
    the 401 body (default: an OpenAI error object)."""
    return ApiKeyGate(app, api_key, open_paths, refusal) if api_key else app
