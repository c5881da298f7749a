"""`bedrock`: Amazon Bedrock `InvokeModel` for Titan text embeddings, signed with SigV4.

`POST https://bedrock-runtime.{region}.amazonaws.com/model/{modelId}/invoke` with
`{"inputText", "dimensions", "normalize"}` -> `{"embedding", "inputTextTokenCount"}`, one
text per request (the adapter runs requests concurrently). Credentials: a Bedrock API key
(`api_key`, `BEDROCK_API_KEY` or `AWS_BEARER_TOKEN_BEDROCK`, sent as a Bearer token), else
an access key pair (arguments, or `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` /
`AWS_SESSION_TOKEN`) used for SigV4 signing with service name `bedrock`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, ClassVar, Unpack
from urllib.parse import quote

from sage.common.components.sage_embedding.aws_sigv4 import AwsCredentials, sign_request
from sage.common.components.sage_embedding.credentials import find_api_key
from sage.common.components.sage_embedding.protocols import ModelAvailability, Vector
from sage.common.components.sage_embedding.registry import MethodSpec
from sage.common.components.sage_embedding.remote import (
    RemoteEmbedding,
    RemoteOptions,
    float_vectors,
    require_key,
)
from sage.common.exceptions import AuthenticationError

__all__ = ["SPEC", "BedrockEmbedding", "aws_credentials", "aws_region"]

SIGNING_SERVICE = "bedrock"
_BEARER_ENV = ("BEDROCK_API_KEY", "AWS_BEARER_TOKEN_BEDROCK")
_KEYS_HINT = (
    "set BEDROCK_API_KEY (or AWS_BEARER_TOKEN_BEDROCK), or AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY (plus AWS_SESSION_TOKEN for temporary credentials)"
)


def aws_region(region: str | None, env: Mapping[str, str]) -> str:
    """`region`, else AWS_REGION, else AWS_DEFAULT_REGION, else us-east-1."""
    return region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"


def aws_credentials(
    access_key_id: str | None,
    secret_access_key: str | None,
    session_token: str | None,
    env: Mapping[str, str],
) -> AwsCredentials | None:
    """The key pair from the arguments, else from the standard AWS variables, or None."""
    key_id = access_key_id or env.get("AWS_ACCESS_KEY_ID")
    secret = secret_access_key or env.get("AWS_SECRET_ACCESS_KEY")
    if not key_id or not secret:
        return None
    token = session_token if access_key_id else (session_token or env.get("AWS_SESSION_TOKEN"))
    return AwsCredentials(key_id, secret, token or None)


class BedrockEmbedding(RemoteEmbedding):
    """Titan text embeddings on Bedrock; `dimensions` (256/512/1024) and `normalize` apply
    to Titan V2 only."""

    method = "bedrock"
    default_base_url = "https://bedrock-runtime.us-east-1.amazonaws.com"
    default_model = "amazon.titan-embed-text-v2:0"
    api_key_env = _BEARER_ENV
    requires_api_key = False  # a key pair works instead; checked in __init__
    max_batch_size = 1  # InvokeModel embeds one inputText per call
    default_batch_size = 1
    max_concurrency = 8
    known_dimensions: ClassVar[Mapping[str, int]] = {
        "amazon.titan-embed-text-v2:0": 1024,
        "amazon.titan-embed-text-v1": 1536,
    }

    def __init__(
        self,
        *,
        region: str | None = None,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        aws_session_token: str | None = None,
        normalize: bool = True,
        **options: Unpack[RemoteOptions],
    ) -> None:
        env_option = options.get("env")
        env = os.environ if env_option is None else env_option
        self.region = aws_region(region, env)
        self.normalize = normalize
        self._credentials: AwsCredentials | None = None
        if find_api_key(options.get("api_key"), _BEARER_ENV, env) is None:
            self._credentials = aws_credentials(
                aws_access_key_id, aws_secret_access_key, aws_session_token, env
            )
            if self._credentials is None:
                raise AuthenticationError(
                    f"the 'bedrock' embedding method needs AWS credentials: pass api_key=... "
                    f"or aws_access_key_id=/aws_secret_access_key=, or {_KEYS_HINT}",
                    param="api_key",
                    code="missing_api_key",
                )
        if not options.get("base_url"):
            options["base_url"] = f"https://bedrock-runtime.{self.region}.amazonaws.com"
        super().__init__(**options)

    @property
    def _is_titan_v2(self) -> bool:
        return self._model.startswith("amazon.titan-embed-text-v2")

    def _embed_chunk(self, texts: list[str]) -> list[Vector]:
        vectors: list[Vector] = []
        url = f"{self.base_url}/model/{quote(self._model, safe='')}/invoke"
        for text in texts:
            body: dict[str, Any] = {"inputText": text}
            if self._is_titan_v2:
                if self.dimensions is not None:
                    body["dimensions"] = self.dimensions
                body["normalize"] = self.normalize
            doc = self._post(url, body)
            vectors.extend(float_vectors([require_key(doc, "embedding", self.method)], "bedrock"))
        return vectors

    def _headers(self, url: str, body: bytes) -> Mapping[str, str]:
        """Bearer for Bedrock API keys, else a fresh SigV4 signature for this attempt."""
        if self._credentials is None:
            return super()._headers(url, body)
        signed = sign_request(
            method="POST",
            url=url,
            # Sign exactly what JsonPoster sends alongside, so AWS sees the same values.
            headers={"content-type": "application/json", "accept": "application/json"},
            body=body,
            credentials=self._credentials,
            region=self.region,
            service=SIGNING_SERVICE,
        )
        return signed.headers


def _check(model: str | None, env: Mapping[str, str]) -> ModelAvailability:
    name = model or BedrockEmbedding.default_model
    if find_api_key(None, _BEARER_ENV, env) or aws_credentials(None, None, None, env):
        return {
            "status": "available",
            "message": f"bedrock model {name!r} can be called in region {aws_region(None, env)}",
            "action": "",
        }
    return {
        "status": "needs_api_key",
        "message": f"bedrock model {name!r} needs AWS credentials and none are configured",
        "action": _KEYS_HINT[0].upper() + _KEYS_HINT[1:],
    }


SPEC = MethodSpec(
    name="bedrock",
    display_name="Amazon Bedrock",
    description="Amazon Bedrock Titan text embeddings (InvokeModel, SigV4 or Bedrock API key)",
    factory=BedrockEmbedding,
    requires_api_key=True,
    default_dimension=1024,
    examples=("amazon.titan-embed-text-v2:0", "amazon.titan-embed-text-v1"),
    check=_check,
)
