"""SigV4 by hand, checked against AWS's published examples."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from sage.common.components.sage_embedding.aws_sigv4 import (
    AwsCredentials,
    canonical_uri,
    sign_request,
)

# The credentials and clock of AWS's SigV4 test suite and documentation examples.
EXAMPLE = AwsCredentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
WHEN = datetime(2015, 8, 30, 12, 36, 0, tzinfo=UTC)


def test_get_vanilla() -> None:
    signed = sign_request(
        method="GET",
        url="https://example.amazonaws.com/",
        headers={},
        body=b"",
        credentials=EXAMPLE,
        region="us-east-1",
        service="service",
        now=WHEN,
    )
    assert signed.headers["authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
        "SignedHeaders=host;x-amz-date, "
        "Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
    )
    assert signed.headers["x-amz-date"] == "20150830T123600Z"
    assert signed.headers["host"] == "example.amazonaws.com"


def test_get_vanilla_query_order_key_case() -> None:
    signed = sign_request(
        method="GET",
        url="https://example.amazonaws.com/?Param2=value2&Param1=value1",
        headers={},
        body=b"",
        credentials=EXAMPLE,
        region="us-east-1",
        service="service",
        now=WHEN,
    )
    assert signed.signature == "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"


def test_iam_list_users_documentation_example() -> None:
    """The worked example of AWS's "create a signed request" guide, step by step."""
    signed = sign_request(
        method="GET",
        url="https://iam.amazonaws.com/?Action=ListUsers&Version=2010-05-08",
        headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"},
        body=b"",
        credentials=EXAMPLE,
        region="us-east-1",
        service="iam",
        now=WHEN,
    )
    assert signed.canonical_request == "\n".join(
        [
            "GET",
            "/",
            "Action=ListUsers&Version=2010-05-08",
            "content-type:application/x-www-form-urlencoded; charset=utf-8",
            "host:iam.amazonaws.com",
            "x-amz-date:20150830T123600Z",
            "",
            "content-type;host;x-amz-date",
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        ]
    )
    canonical_hash = hashlib.sha256(signed.canonical_request.encode()).hexdigest()
    assert canonical_hash == "f536975d06c0309214f805bb90ccff089219ecd68b2577efef23edd43b7e1a59"
    assert signed.string_to_sign == (
        "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/iam/aws4_request\n"
        "f536975d06c0309214f805bb90ccff089219ecd68b2577efef23edd43b7e1a59"
    )
    assert signed.signature == "5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"


def test_session_token_is_signed() -> None:
    creds = AwsCredentials("AKIDEXAMPLE", "secret", session_token="token/with+chars")
    signed = sign_request(
        method="POST",
        url="https://bedrock-runtime.us-west-2.amazonaws.com/model/m/invoke",
        headers={"content-type": "application/json"},
        body=b"{}",
        credentials=creds,
        region="us-west-2",
        service="bedrock",
        now=WHEN,
    )
    assert signed.headers["x-amz-security-token"] == "token/with+chars"
    assert (
        "SignedHeaders=content-type;host;x-amz-date;x-amz-security-token,"
        in (signed.headers["authorization"])
    )


def test_canonical_uri_encodes_twice_except_for_s3() -> None:
    wire_path = "/model/amazon.titan-embed-text-v2%3A0/invoke"
    assert canonical_uri(wire_path, "bedrock") == "/model/amazon.titan-embed-text-v2%253A0/invoke"
    assert canonical_uri(wire_path, "s3") == "/model/amazon.titan-embed-text-v2%3A0/invoke"
    assert canonical_uri("", "bedrock") == "/"


def test_host_keeps_non_default_port() -> None:
    signed = sign_request(
        method="POST",
        url="http://127.0.0.1:8123/x",
        headers={},
        body=b"",
        credentials=EXAMPLE,
        region="us-east-1",
        service="bedrock",
        now=WHEN,
    )
    assert signed.headers["host"] == "127.0.0.1:8123"
