"""`bedrock`: InvokeModel for Titan embeddings, SigV4-signed (or a Bedrock API key).

The fake checks the wire format and verifies each signature the way AWS does, with
botocore's independent SigV4 implementation recomputing it from the received request.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from sage.common.components.sage_embedding import BedrockEmbedding, EmbeddingFactory
from sage.common.exceptions import AuthenticationError, PermissionDeniedError

from .fakes import FakeFactory, Recorded, Reply, expect, fake_vector

ACCESS_KEY = "AKIDEXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
AUTH_FORMAT = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[A-Z0-9]+)/(?P<date>\d{8})/(?P<region>[a-z0-9-]+)"
    r"/(?P<service>[a-z0-9-]+)/aws4_request, SignedHeaders=(?P<signed>[a-z0-9;-]+), "
    r"Signature=(?P<signature>[0-9a-f]{64})"
)
TITAN_V2_PATH = "/model/amazon.titan-embed-text-v2%3A0/invoke"


def botocore_signature(request: Recorded, url: str, signed: list[str], region: str) -> str:
    """The signature AWS would expect, computed by botocore from what was received."""
    auth_module: Any = pytest.importorskip("botocore.auth")
    awsrequest: Any = pytest.importorskip("botocore.awsrequest")
    credentials_module: Any = pytest.importorskip("botocore.credentials")
    headers = {name: request.headers[name] for name in signed}
    aws_request = awsrequest.AWSRequest(
        method=request.method, url=url + request.path, data=request.body, headers=headers
    )
    aws_request.context["timestamp"] = request.headers["x-amz-date"]
    token = request.headers.get("x-amz-security-token")
    signer = auth_module.SigV4Auth(
        credentials_module.Credentials(ACCESS_KEY, SECRET_KEY, token), "bedrock", region
    )
    canonical = signer.canonical_request(aws_request)
    return str(signer.signature(signer.string_to_sign(aws_request, canonical), aws_request))


def make_handler(base_url: list[str], region: str = "us-east-1") -> Any:
    def handler(request: Recorded) -> Reply:
        expect(request.method == "POST", request.method)
        expect(request.path.endswith("/invoke"), f"path {request.path}")
        auth = request.headers.get("authorization", "")
        if auth.startswith("Bearer "):
            expect(auth == "Bearer bedrock-api-key", "wrong Bedrock API key")
        else:
            match = AUTH_FORMAT.fullmatch(auth)
            expect(match is not None, f"malformed Authorization header {auth!r}")
            assert match is not None
            amz_date = request.headers.get("x-amz-date", "")
            expect(re.fullmatch(r"\d{8}T\d{6}Z", amz_date) is not None, "x-amz-date")
            expect(match["key"] == ACCESS_KEY, "access key id")
            expect(match["date"] == amz_date[:8], "scope date must match x-amz-date")
            expect(match["region"] == region and match["service"] == "bedrock", "scope")
            signed = match["signed"].split(";")
            expect({"host", "x-amz-date", "content-type"} <= set(signed), f"signed {signed}")
            expected = botocore_signature(request, base_url[0], signed, region)
            if match["signature"] != expected:
                return Reply(
                    403,
                    {
                        "message": "The request signature we calculated does not "
                        "match the signature you provided."
                    },
                )
        body = request.json()
        if request.path == TITAN_V2_PATH:
            expect(
                set(body) <= {"inputText", "dimensions", "normalize", "embeddingTypes"}, str(body)
            )
        else:
            expect(set(body) == {"inputText"}, f"Titan v1 takes only inputText: {body}")
        text = body["inputText"]
        expect(isinstance(text, str), "inputText must be a string")
        return Reply(200, {"embedding": fake_vector(text), "inputTextTokenCount": 3})

    return handler


def test_sigv4_signed_invoke_model(fake_provider: FakeFactory) -> None:
    base: list[str] = []
    server = fake_provider(make_handler(base))
    base.append(server.url)
    embedder = EmbeddingFactory.create(
        "bedrock",
        base_url=server.url,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        dimensions=512,
    )
    texts = ["hello", "bedrock"]

    assert embedder.embed_batch(texts) == [fake_vector(t) for t in texts]
    assert server.failures == []
    assert [r.path for r in server.requests] == [TITAN_V2_PATH, TITAN_V2_PATH]
    assert server.requests[0].json() == {"inputText": "hello", "dimensions": 512, "normalize": True}
    assert embedder.get_dim() == 512


def test_credentials_from_env_with_session_token_and_region(
    fake_provider: FakeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    base: list[str] = []
    server = fake_provider(make_handler(base, region="eu-central-1"))
    base.append(server.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "FwoGZXIvYXdzEJr//session")
    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    embedder = BedrockEmbedding(base_url=server.url, model="amazon.titan-embed-text-v1")

    assert embedder.embed("x") == fake_vector("x")
    assert server.failures == []
    request = server.requests[0]
    assert request.path == "/model/amazon.titan-embed-text-v1/invoke"
    assert request.headers["x-amz-security-token"] == "FwoGZXIvYXdzEJr//session"
    assert "x-amz-security-token" in request.headers["authorization"]


def test_wrong_secret_is_rejected_by_the_verifier(fake_provider: FakeFactory) -> None:
    base: list[str] = []
    server = fake_provider(make_handler(base))
    base.append(server.url)
    embedder = BedrockEmbedding(
        base_url=server.url, aws_access_key_id=ACCESS_KEY, aws_secret_access_key="not-the-secret"
    )
    with pytest.raises(PermissionDeniedError, match="signature we calculated does not match"):
        embedder.embed("x")


def test_bedrock_api_key_is_a_bearer_token(
    fake_provider: FakeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    base: list[str] = []
    server = fake_provider(make_handler(base))
    base.append(server.url)
    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", "bedrock-api-key")
    embedder = BedrockEmbedding(base_url=server.url, normalize=False)
    embedder.embed("x")
    request = server.requests[0]
    assert request.headers["authorization"] == "Bearer bedrock-api-key"
    assert "x-amz-date" not in request.headers
    assert request.json() == {"inputText": "x", "normalize": False}


def test_default_endpoint_follows_the_region() -> None:
    embedder = BedrockEmbedding(
        region="ap-northeast-1", aws_access_key_id="AKID", aws_secret_access_key="s"
    )
    assert embedder.base_url == "https://bedrock-runtime.ap-northeast-1.amazonaws.com"
    assert embedder.get_dim() == 1024


def test_missing_credentials_name_the_variables() -> None:
    with pytest.raises(AuthenticationError, match="AWS_ACCESS_KEY_ID") as caught:
        EmbeddingFactory.create("bedrock")
    assert "BEDROCK_API_KEY" in caught.value.message
