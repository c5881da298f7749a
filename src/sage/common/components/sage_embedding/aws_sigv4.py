"""AWS Signature Version 4, by hand (hashlib + hmac), so Bedrock needs no boto3.

Follows the published algorithm: canonical request -> string to sign -> HMAC chain over
date, region, service and "aws4_request" -> `Authorization` header. Checked against
AWS's own test vectors in tests/unit/sage_embedding/test_aws_sigv4.py.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import quote, unquote, urlsplit

__all__ = ["ALGORITHM", "AwsCredentials", "SignedRequest", "canonical_uri", "sign_request"]

ALGORITHM = "AWS4-HMAC-SHA256"
_UNRESERVED = "-_.~"
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class AwsCredentials:
    """An access key pair and, for temporary credentials, the session token."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class SignedRequest:
    """The headers to add, plus the intermediate strings (useful when a signature fails)."""

    headers: dict[str, str]
    canonical_request: str
    string_to_sign: str
    signature: str


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


def canonical_uri(raw_path: str, service: str) -> str:
    """The path as signed: every segment URI-encoded once more (S3 alone is encoded once).

    `raw_path` is the path as sent on the wire, already percent-encoded; AWS services
    other than S3 sign it encoded a second time, so Bedrock's
    `/model/amazon.titan-embed-text-v2%3A0/invoke` is signed as `...v2%253A0/invoke`.
    """
    path = raw_path or "/"
    if service == "s3":
        return quote(unquote(path), safe="/" + _UNRESERVED)
    return "/".join(quote(segment, safe=_UNRESERVED) for segment in path.split("/"))


def _canonical_query(raw_query: str) -> str:
    pairs: list[tuple[str, str]] = []
    for part in raw_query.split("&") if raw_query else []:
        name, _, value = part.partition("=")
        pairs.append(
            (
                quote(unquote(name.replace("+", " ")), safe=_UNRESERVED),
                quote(unquote(value.replace("+", " ")), safe=_UNRESERVED),
            )
        )
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))


def _host_header(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    default_port = {"http": 80, "https": 443}.get(parts.scheme)
    if parts.port is not None and parts.port != default_port:
        host = f"{host}:{parts.port}"
    return host


def sign_request(
    *,
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    credentials: AwsCredentials,
    region: str,
    service: str,
    now: datetime | None = None,
) -> SignedRequest:
    """Sign one request; returns the `host`, `x-amz-date`, `authorization` headers to send.

    Every header in `headers` is signed, plus `host`, `x-amz-date` and (for temporary
    credentials) `x-amz-security-token`; send exactly these headers with `body`.
    """
    when = (now or datetime.now(UTC)).astimezone(UTC)
    amz_date = when.strftime("%Y%m%dT%H%M%SZ")
    datestamp = when.strftime("%Y%m%d")
    parts = urlsplit(url)

    signed: dict[str, str] = {k.lower(): v for k, v in headers.items()}
    signed["host"] = _host_header(url)
    signed["x-amz-date"] = amz_date
    if credentials.session_token:
        signed["x-amz-security-token"] = credentials.session_token
    names = sorted(signed)
    canonical_headers = "".join(f"{n}:{_SPACES.sub(' ', signed[n].strip())}\n" for n in names)
    signed_headers = ";".join(names)

    canonical_request = "\n".join(
        [
            method.upper(),
            canonical_uri(parts.path, service),
            _canonical_query(parts.query),
            canonical_headers,
            signed_headers,
            _sha256_hex(body),
        ]
    )
    scope = f"{datestamp}/{region}/{service}/aws4_request"
    string_to_sign = "\n".join(
        [ALGORITHM, amz_date, scope, _sha256_hex(canonical_request.encode("utf-8"))]
    )
    key = _hmac(("AWS4" + credentials.secret_access_key).encode("utf-8"), datestamp)
    for part in (region, service, "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()

    out: dict[str, str] = {
        n: signed[n] for n in ("host", "x-amz-date", "x-amz-security-token") if n in signed
    }
    out["authorization"] = (
        f"{ALGORITHM} Credential={credentials.access_key_id}/{scope}, "
        f"SignedHeaders={signed_headers}, Signature={signature}"
    )
    return SignedRequest(out, canonical_request, string_to_sign, signature)
