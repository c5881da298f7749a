"""The stack's secrets and address checks, shared by every process (closed by default).

Two secrets live in `$SAGE_HOME/llm/` as 0600 files that `sage llm serve` creates:

- `admin.key`: the admin API key for `/v1/management/*` when `SAGE_ADMIN_API_KEY` is unset;
  the CLI and the client read it from there, so the operator never types it.
- `internal.token`: the credential every gRPC call between the stack's services carries;
  engines that lifecycle starts get a key derived from it (`engine_api_key`), so only the
  services holding the token can call them.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import os
import secrets
import socket
import stat
from pathlib import Path

from sage.common.config.settings import SageSettings
from sage.common.exceptions import ConfigurationError

ADMIN_KEY_FILE = "admin.key"
INTERNAL_TOKEN_FILE = "internal.token"
SECRET_FILE_MODE = 0o600


def new_secret(prefix: str = "") -> str:
    """A fresh random secret (256 bits, URL-safe)."""
    return prefix + secrets.token_urlsafe(32)


def read_secret_file(path: Path) -> str | None:
    """The secret in `path`, or None when the file does not exist.

    A file other users can read is refused: it would hand them the stack.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigurationError(f"cannot read secret file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "r", encoding="utf-8") as handle:
        mode = os.fstat(handle.fileno()).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigurationError(
                f"secret file {path} is readable by other users (mode {stat.S_IMODE(mode):o}); "
                f"run `chmod 600 {path}`"
            )
        value = handle.read().strip()
    if not value:
        raise ConfigurationError(f"secret file {path} is empty")
    return value


def ensure_secret_file(path: Path, prefix: str = "") -> str:
    """The secret in `path`, creating it (mode 0600, atomically) when missing."""
    existing = read_secret_file(path)
    if existing is not None:
        return existing
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    value = new_secret(prefix)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, SECRET_FILE_MODE)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(value + "\n")
        # Another process may have won the race: keep its secret, not ours.
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    found = read_secret_file(path)
    assert found is not None
    return found


def admin_key_path(settings: SageSettings) -> Path:
    """Where the generated admin key lives (`SAGE_ADMIN_API_KEY_FILE` overrides)."""
    return settings.admin_api_key_file or settings.llm_state_dir / ADMIN_KEY_FILE


def internal_token_path(settings: SageSettings) -> Path:
    """Where the stack's internal gRPC token lives (`SAGE_INTERNAL_TOKEN_FILE` overrides)."""
    return settings.internal_token_file or settings.llm_state_dir / INTERNAL_TOKEN_FILE


def resolve_admin_key(settings: SageSettings) -> str | None:
    """The admin key: `SAGE_ADMIN_API_KEY`, else the key file, else None (management closed)."""
    if settings.admin_api_key:
        return settings.admin_api_key
    return read_secret_file(admin_key_path(settings))


def resolve_internal_token(settings: SageSettings) -> str | None:
    """The internal token: `SAGE_INTERNAL_TOKEN`, else the token file, else None."""
    if settings.internal_token:
        return settings.internal_token
    return read_secret_file(internal_token_path(settings))


def engine_api_key(internal_token: str, engine_id: str) -> str:
    """The API key an engine lifecycle started requires: derived from the stack's token,
    so the scheduler and embedding service compute it without it travelling anywhere."""
    digest = hmac.new(internal_token.encode(), f"engine:{engine_id}".encode(), hashlib.sha256)
    return "sk-engine-" + digest.hexdigest()


def is_loopback_host(host: str) -> bool:
    """True for `localhost` and any loopback address (127.0.0.0/8, ::1)."""
    host = host.strip().strip("[]").lower()
    if host in ("localhost", "localhost.", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_wildcard_host(host: str) -> bool:
    """True for bind addresses that listen on every interface (0.0.0.0, ::, empty)."""
    return host.strip().strip("[]") in ("", "0.0.0.0", "::", "*")


def resolves_to(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address `host` resolves to (an IP literal is itself); empty when it does not."""
    bare = host.strip().strip("[]")
    try:
        return [ipaddress.ip_address(bare)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(bare, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        return []
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


def listener_uid(port: int) -> int | None:
    """The user id of the process listening on TCP `port` on this machine, or None when
    nothing listens there or its owner cannot be seen (another user's process, for a
    non-root caller). Lets a client check, before it sends a local secret, that the
    listener is its own user's and not a squatter's on a free port."""
    import psutil  # only here: the socket table is read when a secret is about to be sent

    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return None
    for conn in connections:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            if conn.pid is None:
                return None
            try:
                return int(psutil.Process(conn.pid).uids().effective)
            except psutil.Error:
                return None
    return None


def local_interface_addresses() -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address assigned to one of this machine's interfaces (LAN, bridges, loopback)."""
    import psutil  # only here: most callers never need the interface list

    mine: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family in (socket.AF_INET, socket.AF_INET6):
                mine.add(ipaddress.ip_address(address.address.split("%")[0]))
    return mine
