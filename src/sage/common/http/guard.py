"""Refusing what a web page can make a browser send to a server on the user's machine.

A page on any site can make the browser POST a "simple" request (form or text/plain body,
no preflight) to `http://127.0.0.1:8889`, and with DNS rebinding it can even read the
replies (its own host name, now resolving to 127.0.0.1, makes the request same-origin).
So the edge accepts:

- a Host header naming a loopback address, an IP literal (a rebound name is never one), its
  bind host, or a name the operator listed (`SAGE_ALLOWED_HOSTS`, `*` for any): else 421;
- no cross-site request: an `Origin` that is neither this server's nor allowed by the CORS
  policy, or `Sec-Fetch-Site: cross-site` without such an origin, is a 403;
- state-changing requests (every POST, PUT, PATCH, and a DELETE with a body) only with
  `Content-Type: application/json`, which a page cannot send without a CORS preflight: 415.

Checks are a few dict lookups per request; host verdicts are cached.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from sage.common.exceptions import InvalidRequestError, PermissionDeniedError
from sage.common.security import is_loopback_host, is_wildcard_host

from .cors import CorsPolicy

# Methods that never change state; everything else must carry a JSON body type.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_DEFAULT_PORTS = {"http": "80", "https": "443"}
_MAX_CACHED_HOSTS = 256


class MisdirectedRequestError(InvalidRequestError):
    """The Host header names a server this is not (DNS rebinding, or a missing allow-list
    entry)."""

    http_status = 421
    default_code = "host_not_allowed"


class CrossSiteRequestError(PermissionDeniedError):
    """A browser sent this request on behalf of another site."""

    default_code = "cross_site_request"


class UnsupportedMediaTypeError(InvalidRequestError):
    """A state-changing request whose body is not declared as JSON."""

    http_status = 415
    default_code = "unsupported_media_type"


def split_host(value: str) -> tuple[str, str]:
    """`host[:port]` (IPv6 in brackets) → (lower-case host without brackets, port or "")."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return value, ""
        port = value[end + 2 :] if value[end + 1 : end + 2] == ":" else ""
        return value[1:end], port
    name, sep, port = value.rpartition(":")
    if sep and ":" not in name and port.isdigit():
        return name, port
    return value, ""


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _origin_authority(origin: str) -> tuple[str, str, str] | None:
    """`scheme://host[:port]` → (scheme, host, port with the scheme's default filled in)."""
    scheme, sep, rest = origin.partition("://")
    if not sep or not rest or "/" in rest:
        return None
    scheme = scheme.lower()
    host, port = split_host(rest)
    return scheme, host, port or _DEFAULT_PORTS.get(scheme, "")


@dataclass(slots=True)
class BrowserGuard:
    """The Host, Origin and Content-Type rules above for one server."""

    allowed_hosts: frozenset[str] = frozenset()
    any_host: bool = False
    cors: CorsPolicy | None = None
    _verdicts: dict[str, bool] = field(default_factory=dict)

    @classmethod
    def build(
        cls, allowed_hosts: str, bind_hosts: Iterable[str], cors: CorsPolicy | None
    ) -> BrowserGuard:
        """From `SAGE_ALLOWED_HOSTS` (comma-separated names, `*` for any) and the addresses
        the server binds (a name among them is accepted too)."""
        names = {h.strip().lower().rstrip(".") for h in allowed_hosts.split(",") if h.strip()}
        for bind in bind_hosts:
            if bind and not is_wildcard_host(bind):
                names.add(split_host(bind)[0].rstrip("."))
        return cls(frozenset(names - {"*"}), "*" in names, cors)

    def host_allowed(self, host_header: str) -> bool:
        """True when the Host header names this server (see the module doc)."""
        verdict = self._verdicts.get(host_header)
        if verdict is None:
            host = split_host(host_header)[0]
            verdict = (
                self.any_host
                or not host  # no authority at all: not something a browser sends
                or is_loopback_host(host)
                or _is_ip_literal(host)
                or host.rstrip(".") in self.allowed_hosts
            )
            if len(self._verdicts) >= _MAX_CACHED_HOSTS:
                self._verdicts.clear()
            self._verdicts[host_header] = verdict
        return verdict

    def check_source(self, method: str, headers: Mapping[str, str]) -> None:
        """Raise for a request with a foreign Host or from another site."""
        host = headers.get("host")
        if host is not None and not self.host_allowed(host):
            raise MisdirectedRequestError(
                f"the Host header {host[:100]!r} does not name this server; if clients reach "
                "it under that name, add the name to SAGE_ALLOWED_HOSTS"
            )
        if method == "OPTIONS":
            return  # preflights: the CORS policy answers them, and they change nothing
        origin = headers.get("origin")
        cors_allowed = origin is not None and self.cors is not None and self.cors.allows(origin)
        if origin is not None and not cors_allowed and not _same_origin(origin, host):
            raise CrossSiteRequestError(
                f"cross-site request from origin {origin[:100]!r} refused; to let a web app "
                "call this server, list its origin in SAGE_CORS_ORIGINS"
            )
        if not cors_allowed and headers.get("sec-fetch-site") == "cross-site":
            raise CrossSiteRequestError(
                "cross-site request refused (Sec-Fetch-Site: cross-site); to let a web app "
                "call this server, list its origin in SAGE_CORS_ORIGINS"
            )

    @staticmethod
    def check_body_type(method: str, headers: Mapping[str, str]) -> None:
        """Raise unless a state-changing request declares a JSON body (a DELETE without a
        body needs none)."""
        if method in SAFE_METHODS:
            return
        content_type = headers.get("content-type")
        if content_type is not None:
            media = content_type.partition(";")[0].strip().lower()
            if media == "application/json":
                return
        elif method == "DELETE" and _no_body(headers):
            return
        raise UnsupportedMediaTypeError(
            f"{method} requests must send Content-Type: application/json, got "
            f"{(content_type or 'none')[:100]!r}",
            param="content-type",
        )


def _no_body(headers: Mapping[str, str]) -> bool:
    return "transfer-encoding" not in headers and headers.get("content-length", "0") == "0"


def _same_origin(origin: str, host_header: str | None) -> bool:
    """True when `origin` is the server the request was sent to (the Host header)."""
    if host_header is None:
        return False
    parsed = _origin_authority(origin)  # "null" (sandboxed pages, files) never matches
    if parsed is None:
        return False
    scheme, origin_host, origin_port = parsed
    host, port = split_host(host_header)
    # A Host without a port means the default port of the scheme the browser used (also
    # behind a TLS-terminating proxy, where this server's own scheme differs): a page on
    # another port of the same name (http://localhost:3000) is another origin.
    return origin_host == host and (port or _DEFAULT_PORTS.get(scheme, "")) == origin_port
