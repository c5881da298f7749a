"""UnifiedInferenceClient: one client for chat, generation and embeddings via the gateway.

Control-plane only (as the seed says): it talks to the SAGE gateway, never to engines.
The base URL is `control_plane_url` > `SAGE_UNIFIED_BASE_URL` >
`http://localhost:{SagePorts.GATEWAY_DEFAULT}/v1`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from sage.common.config.ports import SagePorts
from sage.common.exceptions import (
    AuthenticationError,
    ConflictError,
    DeadlineExceededError,
    InternalError,
    InvalidRequestError,
    ModelNotFoundError,
    NotFoundError,
    OverloadedError,
    PermissionDeniedError,
    SageError,
    ServiceUnavailableError,
    UpstreamError,
)

_BY_STATUS: dict[int, type[SageError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: InvalidRequestError,
    429: OverloadedError,
    502: UpstreamError,
    503: ServiceUnavailableError,
    504: DeadlineExceededError,
}


def default_base_url(control_plane_url: str | None = None) -> str:
    """The gateway URL by the seed's precedence."""
    if control_plane_url:
        return control_plane_url.rstrip("/")
    env = os.environ.get("SAGE_UNIFIED_BASE_URL")
    if env:
        return env.rstrip("/")
    return f"http://localhost:{SagePorts.GATEWAY_DEFAULT}/v1"


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    try:
        err = resp.json().get("error", {})
    except ValueError:
        err = {}
    message = str(err.get("message") or resp.text[:300] or f"HTTP {resp.status_code}")
    param = err.get("param")
    code = err.get("code")
    if resp.status_code == 404 and code == "model_not_found":
        raise ModelNotFoundError(str(param or "model"), message=message)
    cls = _BY_STATUS.get(resp.status_code, InternalError)
    retry_after = resp.headers.get("retry-after")
    raise cls(
        message,
        param=param if isinstance(param, str) else None,
        code=code if isinstance(code, str) else None,
        retry_after=float(retry_after) if retry_after else None,
    )


class UnifiedInferenceClient:
    """Chat, generate and embed through the SAGE control plane (the gateway)."""

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        embedding_model: str | None = None,
        api_key: str | None = None,
        timeout: float = 600.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.embedding_model = embedding_model
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=self.base_url, timeout=timeout, headers=headers, trust_env=False
        )

    @classmethod
    def create(
        cls,
        control_plane_url: str | None = None,
        *,
        model: str | None = None,
        embedding_model: str | None = None,
        api_key: str | None = None,
        timeout: float = 600.0,
    ) -> UnifiedInferenceClient:
        """A client for `control_plane_url`, else SAGE_UNIFIED_BASE_URL, else the local gateway."""
        return cls(
            default_base_url(control_plane_url),
            model=model or os.environ.get("SAGE_CHAT_MODEL") or None,
            embedding_model=embedding_model or os.environ.get("SAGE_EMBEDDING_MODEL") or None,
            api_key=api_key or os.environ.get("SAGE_CHAT_API_KEY") or None,
            timeout=timeout,
        )

    @classmethod
    def create_for_model(
        cls, model: str, control_plane_url: str | None = None, **kwargs: Any
    ) -> UnifiedInferenceClient:
        """A client whose chat/generate calls default to `model` (still via the gateway)."""
        return cls.create(control_plane_url, model=model, **kwargs)

    def __enter__(self) -> UnifiedInferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _request(self, method: str, path: str, json: Any = None) -> Any:
        try:
            resp = self._http.request(method, path, json=json)
        except httpx.ConnectError as exc:
            raise ServiceUnavailableError(
                f"no SAGE gateway answers at {self.base_url} ({exc}); start one with "
                "`sage llm serve` or set SAGE_UNIFIED_BASE_URL"
            ) from exc
        except httpx.TimeoutException as exc:
            raise DeadlineExceededError(f"the gateway at {self.base_url} timed out") from exc
        _raise_for(resp)
        return resp.json()

    def list_models(self) -> list[dict[str, Any]]:
        """Models the gateway serves (OpenAI model objects plus `kind`)."""
        return list(self._request("GET", "/models")["data"])

    def _default_model(self, kind: str) -> str:
        wanted = self.model if kind == "llm" else self.embedding_model
        if wanted:
            return wanted
        for entry in self.list_models():
            if entry.get("kind", "llm") == kind and entry.get("ready_engines", 1):
                return str(entry["id"])
        raise ModelNotFoundError(
            "model", message=f"the gateway at {self.base_url} serves no ready {kind} model"
        )

    def chat(
        self, messages: Sequence[Mapping[str, Any]], model: str | None = None, **params: Any
    ) -> str:
        """Send a chat and return the assistant's text."""
        body = {"model": model or self._default_model("llm"), "messages": list(messages), **params}
        reply = self._request("POST", "/chat/completions", body)
        return str(reply["choices"][0]["message"].get("content") or "")

    def generate(self, prompt: str, model: str | None = None, **params: Any) -> str:
        """Complete a raw prompt and return the text."""
        body = {"model": model or self._default_model("llm"), "prompt": prompt, **params}
        reply = self._request("POST", "/completions", body)
        return str(reply["choices"][0].get("text") or "")

    def embed(self, texts: str | Sequence[str], model: str | None = None) -> list[list[float]]:
        """Embed one text or many; vectors come back in input order."""
        inputs = [texts] if isinstance(texts, str) else list(texts)
        body = {"model": model or self._default_model("embedding"), "input": inputs}
        reply = self._request("POST", "/embeddings", body)
        return [list(d["embedding"]) for d in sorted(reply["data"], key=lambda d: d["index"])]

    def get_status(self) -> dict[str, Any]:
        """Control-plane status with `llm_available` and `embedding_available` (seed)."""
        return dict(self._request("GET", "/management/status"))
