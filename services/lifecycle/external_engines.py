"""Checks on external engines (`backend external`) before they are registered.

An external engine is a URL the scheduler will send users' prompts to, and that lifecycle
fetches from. Unchecked, registering one is a server-side request forgery (the stack's
loopback services, the cloud metadata endpoint) and a way to hijack a model's traffic. So:

- its address must not be loopback, link-local (cloud metadata included), unspecified,
  multicast, reserved or one of this machine's own interface addresses, unless
  `SAGE_EXTERNAL_ENGINE_ALLOW` lists its host, host:port or a network (CIDR) covering it;
- it is probed before it is registered: `GET {base_url}/v1/models` within a few seconds, a
  small reply, no redirects, must list the model (or one of its aliases). Failures say why
  without echoing what the address answered.

Plain Python (no grpc); the manager calls these. httpx only parses URLs here; the probe
goes through Http1Pool, the client of every engine call.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

import httpx
import orjson

from sage.common.config.settings import SageSettings
from sage.common.exceptions import InvalidRequestError
from sage.common.http.http1 import (
    ConnectError,
    DisconnectedError,
    Http1Error,
    Http1Pool,
    ProtocolError,
)
from sage.common.security import local_interface_addresses, resolves_to

PROBE_TIMEOUT_S = 5.0
PROBE_MAX_BYTES = 1024 * 1024

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Cloud metadata endpoints (AWS/GCP/Azure/OpenStack share the IPv4 one; AWS's IPv6 one is
# a unique-local address, which the generic checks below would let through).
METADATA_ADDRESSES = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")  # Linux dials 0.x.y.z as loopback


def refused_kind(address: IPAddress) -> str | None:
    """Why `address` is no place for an external engine ("loopback", ...), or None."""
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    if address in METADATA_ADDRESSES:
        return "cloud metadata"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_unspecified or (address.version == 4 and address in _THIS_NETWORK):
        return "unspecified"
    if address.is_multicast:
        return "multicast"
    if address.is_reserved:
        return "reserved"
    return None


def _host_of(url: httpx.URL) -> str:
    return url.host.lower().strip("[]").rstrip(".")


@dataclass(frozen=True)
class ExternalEnginePolicy:
    """Which external engine addresses are allowed (see the module docstring)."""

    allowed_hosts: frozenset[str] = frozenset()  # "host" or "host:port", lower case
    allowed_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_settings(cls, settings: SageSettings) -> ExternalEnginePolicy:
        """From SAGE_EXTERNAL_ENGINE_ALLOW: comma-separated hosts, host:port or CIDRs."""
        return cls.parse(settings.lifecycle.external_engine_allow)

    @classmethod
    def parse(cls, text: str) -> ExternalEnginePolicy:
        """`"127.0.0.1, localhost:8000, 10.0.0.0/8"` → a policy."""
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in (e.strip().lower() for e in text.split(",")):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            if entry.startswith("["):  # [::1]:8000
                host, _, port = entry[1:].partition("]")
                hosts.add(f"{host}{port}")
            else:
                hosts.add(entry)
        return cls(frozenset(hosts), tuple(networks))

    def _listed(self, url: httpx.URL, addresses: Iterable[IPAddress]) -> bool:
        host = _host_of(url)
        port = url.port or (443 if url.scheme == "https" else 80)
        if host in self.allowed_hosts or f"{host}:{port}" in self.allowed_hosts:
            return True
        found = list(addresses)
        return bool(found) and all(
            any(address in network for network in self.allowed_networks) for address in found
        )

    def check_address(self, url: httpx.URL) -> None:
        """Refuse a URL whose host resolves to a refused address, unless allow-listed.

        Blocking (it resolves the name): call it in a thread.
        """
        addresses = resolves_to(_host_of(url))
        if self._listed(url, addresses):
            return
        if not addresses:
            raise InvalidRequestError(
                f"base_url host {url.host!r} does not resolve", param="base_url"
            )
        mine = local_interface_addresses()
        for address in addresses:
            # This machine's own LAN or bridge address reaches services bound to 0.0.0.0.
            kind = refused_kind(address) or ("this machine's own" if address in mine else None)
            if kind is not None:
                raise InvalidRequestError(
                    f"base_url host {url.host!r} is a {kind} address ({address}); external "
                    "engines there are refused unless SAGE_EXTERNAL_ENGINE_ALLOW lists it",
                    param="base_url",
                )


def parse_base_url(base_url: str) -> httpx.URL:
    """An http(s) URL with a host and nothing after the path; InvalidRequestError if not."""
    if not base_url.startswith(("http://", "https://")):
        raise InvalidRequestError("base_url must be an http(s) URL", param="base_url")
    try:
        url = httpx.URL(base_url)
    except httpx.InvalidURL as exc:
        raise InvalidRequestError(f"base_url is not a valid URL: {exc}", param="base_url") from None
    if not url.host:
        raise InvalidRequestError("base_url has no host", param="base_url")
    if url.query or url.fragment:
        raise InvalidRequestError("base_url must not carry a query or fragment", param="base_url")
    return url


async def probe_models(
    http: Http1Pool,
    base_url: str,
    names: Iterable[str],
    *,
    timeout_s: float = PROBE_TIMEOUT_S,
    max_bytes: int = PROBE_MAX_BYTES,
) -> None:
    """GET {base_url}/v1/models must list one of `names`; InvalidRequestError (param
    base_url) says what went wrong without quoting the reply."""
    wanted = [n for n in names if n]
    where = f"the engine at {base_url}"
    try:
        async with asyncio.timeout(timeout_s):
            body = await _fetch(http, base_url.rstrip("/"), timeout_s, max_bytes, where)
    except TimeoutError:
        raise InvalidRequestError(
            f"{where} did not answer GET /v1/models within {timeout_s:g}s", param="base_url"
        ) from None
    try:
        data = orjson.loads(body)["data"]
        if not isinstance(data, list):
            raise TypeError
        served = {str(item["id"]) for item in data if isinstance(item, dict) and "id" in item}
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise InvalidRequestError(
            f"{where} did not answer GET /v1/models with an OpenAI model list "
            f"({len(body)} bytes); is it an OpenAI-compatible server?",
            param="base_url",
        ) from None
    if not served.intersection(wanted):
        raise InvalidRequestError(
            f"{where} does not serve model {wanted[0]!r} (its /v1/models lists "
            f"{len(served)} other model(s)); register it under a name it serves",
            param="model_id",
        )


async def _fetch(
    http: Http1Pool, base_url: str, timeout_s: float, max_bytes: int, where: str
) -> bytes:
    try:
        reply = await http.stream(base_url, "/v1/models", b"", {}, timeout_s, method="GET")
    except Http1Error as exc:
        raise InvalidRequestError(
            f"{where} cannot be reached ({_why(exc)})", param="base_url"
        ) from None
    async with reply:  # closed early (a refusal below) means the connection is dropped
        if 300 <= reply.status < 400:
            raise InvalidRequestError(
                f"{where} answered GET /v1/models with a redirect (HTTP "
                f"{reply.status}); register the address it serves from",
                param="base_url",
            )
        if reply.status != 200:
            raise InvalidRequestError(
                f"{where} answered GET /v1/models with HTTP {reply.status}",
                param="base_url",
            )
        body = bytearray()
        try:
            async for chunk in reply:
                body += chunk
                if len(body) > max_bytes:
                    raise InvalidRequestError(
                        f"{where} answered GET /v1/models with more than {max_bytes} bytes",
                        param="base_url",
                    )
        except Http1Error as exc:
            raise InvalidRequestError(
                f"{where} cannot be reached ({_why(exc)})", param="base_url"
            ) from None
        return bytes(body)


def _why(exc: Http1Error) -> str:
    """A short reason without the peer's reply: the exception's class, made readable."""
    if isinstance(exc, ConnectError):  # our side's words (refused, DNS, TLS)
        return f"connection failed: {str(exc)[:200]}"
    if isinstance(exc, ProtocolError):
        return "not an HTTP server"
    if isinstance(exc, DisconnectedError):
        return "it closed the connection before a whole reply"
    return type(exc).__name__
