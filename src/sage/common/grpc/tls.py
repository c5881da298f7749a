"""TLS / mTLS material for gRPC between services and for the HTTPS edge, from PEM files.

Settings (`SAGE_TLS_CERT_FILE`, `SAGE_TLS_KEY_FILE`, `SAGE_TLS_CA_FILE`,
`SAGE_TLS_CLIENT_AUTH`, `SAGE_TLS_SERVER_NAME`) are read into one `TlsConfig` when a process
starts, so a missing or broken file stops it at once with a message naming the file instead
of failing later on the first connection. Each service process sets it once
(`set_process_tls`); `create_server` / `create_channel` use it unless given one explicitly.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc

from sage.common.config.settings import SageSettings, load_settings
from sage.common.exceptions import ConfigurationError

_PEM_MARK: Final = b"-----BEGIN "


@dataclass(frozen=True)
class TlsConfig:
    """PEM bytes (validated) plus the policy: serve TLS, verify peers, demand client certs."""

    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""
    cert_pem: bytes | None = None
    key_pem: bytes | None = None
    ca_pem: bytes | None = None
    client_auth: bool = False
    server_name: str = ""

    @property
    def serves_tls(self) -> bool:
        """Servers listen with TLS when a certificate and key are configured."""
        return self.cert_pem is not None and self.key_pem is not None

    @property
    def dials_tls(self) -> bool:
        """Clients use TLS when they have a CA to trust or a certificate of their own."""
        return self.ca_pem is not None or self.cert_pem is not None

    # --- gRPC --------------------------------------------------------------------------
    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials for `add_secure_port`; with client_auth, peers need a cert from the CA."""
        assert self.cert_pem is not None and self.key_pem is not None
        return grpc.ssl_server_credentials(
            [(self.key_pem, self.cert_pem)],
            root_certificates=self.ca_pem,
            require_client_auth=self.client_auth,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials for a secure channel: trust the CA (system roots without one) and
        present our own certificate, which mTLS servers require."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem,
            private_key=self.key_pem,
            certificate_chain=self.cert_pem,
        )

    def channel_options(self) -> list[tuple[str, str]]:
        """Override the name checked in server certificates (dialling an IP, a proxy)."""
        if self.server_name:
            return [("grpc.ssl_target_name_override", self.server_name)]
        return []

    # --- HTTP --------------------------------------------------------------------------
    @property
    def http_scheme(self) -> str:
        """`https` when the edge serves TLS, else `http`."""
        return "https" if self.serves_tls else "http"

    def uvicorn_kwargs(self) -> dict[str, object]:
        """uvicorn.Config arguments that make it serve HTTPS (and demand client certs)."""
        if not self.serves_tls:
            return {}
        kwargs: dict[str, object] = {
            "ssl_certfile": self.cert_file,
            "ssl_keyfile": self.key_file,
        }
        if self.ca_file:
            kwargs["ssl_ca_certs"] = self.ca_file
        if self.client_auth:
            kwargs["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        return kwargs

    def httpx_verify(self) -> ssl.SSLContext | bool:
        """What an HTTP client passes as `verify`: the CA (plus our cert for mTLS), or True."""
        if not self.dials_tls:
            return True
        ctx = ssl.create_default_context(cafile=self.ca_file or None)
        if self.cert_file and self.key_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


NO_TLS: Final = TlsConfig()


def _read_pem(path: str, setting: str) -> bytes:
    """File contents, or a ConfigurationError naming the setting, the file and the problem."""
    try:
        data = Path(path).expanduser().read_bytes()
    except FileNotFoundError:
        raise ConfigurationError(f"{setting}={path}: file not found", param=setting) from None
    except OSError as exc:
        raise ConfigurationError(
            f"{setting}={path}: cannot read it ({exc.strerror or exc})", param=setting
        ) from None
    if _PEM_MARK not in data:
        raise ConfigurationError(
            f"{setting}={path}: not a PEM file (no '-----BEGIN' block)", param=setting
        )
    return data


def tls_from_settings(settings: SageSettings) -> TlsConfig:
    """Read and check the TLS files the settings name; raises ConfigurationError naming one."""
    cert_file, key_file = settings.tls.cert_file.strip(), settings.tls.key_file.strip()
    ca_file = settings.tls.ca_file.strip()
    if not (cert_file or key_file or ca_file):
        if settings.tls.client_auth:
            raise ConfigurationError(
                "SAGE_TLS_CLIENT_AUTH needs SAGE_TLS_CERT_FILE, SAGE_TLS_KEY_FILE and "
                "SAGE_TLS_CA_FILE",
                param="SAGE_TLS_CLIENT_AUTH",
            )
        return NO_TLS
    if bool(cert_file) != bool(key_file):
        missing = "SAGE_TLS_KEY_FILE" if cert_file else "SAGE_TLS_CERT_FILE"
        raise ConfigurationError(
            f"{missing} is empty: a certificate and its key go together", param=missing
        )
    if settings.tls.client_auth and not (cert_file and ca_file):
        raise ConfigurationError(
            "SAGE_TLS_CLIENT_AUTH needs SAGE_TLS_CA_FILE (the CA client certificates are "
            "checked against) and a certificate/key",
            param="SAGE_TLS_CLIENT_AUTH",
        )
    cert_pem = _read_pem(cert_file, "SAGE_TLS_CERT_FILE") if cert_file else None
    key_pem = _read_pem(key_file, "SAGE_TLS_KEY_FILE") if key_file else None
    ca_pem = _read_pem(ca_file, "SAGE_TLS_CA_FILE") if ca_file else None
    # grpc only reports bad PEM as a failed handshake much later; ssl says which file now.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if cert_file:
        try:
            ctx.load_cert_chain(cert_file, key_file)
        except ssl.SSLError as exc:
            raise ConfigurationError(
                f"SAGE_TLS_CERT_FILE={cert_file} / SAGE_TLS_KEY_FILE={key_file}: not a valid "
                f"certificate and matching private key ({exc.reason or exc})",
                param="SAGE_TLS_CERT_FILE",
            ) from None
    if ca_file:
        try:
            ctx.load_verify_locations(cafile=ca_file)
        except ssl.SSLError as exc:
            raise ConfigurationError(
                f"SAGE_TLS_CA_FILE={ca_file}: not a valid CA certificate ({exc.reason or exc})",
                param="SAGE_TLS_CA_FILE",
            ) from None
    return TlsConfig(
        cert_file=cert_file,
        key_file=key_file,
        ca_file=ca_file,
        cert_pem=cert_pem,
        key_pem=key_pem,
        ca_pem=ca_pem,
        client_auth=settings.tls.client_auth,
        server_name=settings.tls.server_name.strip(),
    )


_process_tls: TlsConfig | None = None


def set_process_tls(config: TlsConfig | None) -> None:
    """Fix this process's TLS config (done once at start by the service runner / edge)."""
    global _process_tls
    _process_tls = config


def process_tls() -> TlsConfig:
    """The TLS config set at start, else the one the environment (SAGE_TLS_*) describes.

    The fallback covers processes that never ran a service main (the CLI); it re-reads the
    environment each time so it never goes stale.
    """
    if _process_tls is not None:
        return _process_tls
    return tls_from_settings(load_settings())
