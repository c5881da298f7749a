"""The launch policy: what a StartEngine caller may make lifecycle run (closed by default).

Whoever can call StartEngine (the edge's management API, or any gRPC client) chooses an
engine's model, arguments and port, and lifecycle runs that program as the stack's user.
So the request is checked before anything starts:

- the model is a Hugging Face Hub id (`org/name` charset) or an existing local folder that
  resolves (symlinks followed) under a configured model root; never a `-`-leading string
  (it would reach the engine's argv as an option), never control or bidi characters;
- `extra_args` name only flags on the backend's allow-list (switches and flags with plain
  values; path-valued flags are checked like models), unless the operator adds flags in
  `SAGE_LAUNCH_ALLOWED_ARGS` (`*` for any). Flags lifecycle owns (`--host`, `--port`,
  `--api-key`), flags that run or fetch foreign code (`--trust-remote-code`,
  `--chat-template`) and anything unknown are refused;
- ports are >= 1024 and inside `SAGE_ENGINE_PORTS` (or one of the engine ports the
  operator configured for `sage llm serve`);
- engines bind to loopback unless the node is part of several hosts.

Everything here is plain Python (no grpc), unit-tested directly.
"""

from __future__ import annotations

import ipaddress
import os
import random
import re
import socket
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from sage.common.config.settings import SageSettings
from sage.common.exceptions import ConfigurationError, InvalidRequestError
from sage.common.security import is_loopback_host, is_wildcard_host

# A Hub id: `name` or `org/name`, each part starting with a letter or digit. `..` is refused
# separately (the Hub refuses it too), so no part can walk up a directory.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(?:/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")
# Unicode categories never legitimate in a model id or served name: controls, format
# characters (bidi overrides U+202A-202E and isolates U+2066-2069, zero-width joiners),
# surrogates, private use, unassigned, line and paragraph separators.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
# A negative number is a value, not an option (`--seed -1`).
_NUMBER = re.compile(r"-\d+(?:\.\d+)?")
MAX_NAME_CHARS = 256

LOWEST_ENGINE_PORT = 1024
DEFAULT_ENGINE_PORTS = "8900-8999"


class Arity(Enum):
    """What follows a flag in extra_args."""

    SWITCH = "switch"  # nothing: `--enforce-eager`
    VALUE = "value"  # exactly one plain value: `--dtype float16` or `--dtype=float16`
    NAMES = "names"  # one or more served names: `--served-model-name a b`
    NAME = "name"  # exactly one served name: `--alias a`
    MODEL = "model"  # one model reference (Hub id or folder under a root): `--tokenizer`
    ANY = "any"  # operator-added flag: zero or more values, unchecked


S, V, NS, N, M = Arity.SWITCH, Arity.VALUE, Arity.NAMES, Arity.NAME, Arity.MODEL

# Per-backend allow-lists. Flags that duplicate a StartEngine field are left out on purpose
# (GPUs are reserved from tensor_parallel_size, gpu_memory_utilization, ...).
ALLOWED_ARGS: dict[str, dict[str, Arity]] = {
    "vllm": {
        "--dtype": V,
        "--max-num-seqs": V,
        "--max-num-batched-tokens": V,
        "--enforce-eager": S,
        "--enable-prefix-caching": S,
        "--no-enable-prefix-caching": S,
        "--enable-chunked-prefill": S,
        "--no-enable-chunked-prefill": S,
        "--kv-cache-dtype": V,
        "--seed": V,
        "--swap-space": V,
        "--cpu-offload-gb": V,
        "--block-size": V,
        "--quantization": V,
        "--served-model-name": NS,
        "--tokenizer": M,
        "--tokenizer-mode": V,
        "--revision": V,
        "--tokenizer-revision": V,
        "--max-logprobs": V,
        "--max-seq-len-to-capture": V,
        "--disable-custom-all-reduce": S,
        "--disable-sliding-window": S,
        "--disable-log-requests": S,
        "--disable-log-stats": S,
        "--override-generation-config": V,
        "--enable-auto-tool-choice": S,
        "--tool-call-parser": V,
        "--reasoning-parser": V,
        "--guided-decoding-backend": V,
        "--limit-mm-per-prompt": V,
        "--scheduling-policy": V,
        "--uvicorn-log-level": V,
    },
    # SGLang 0.5's flags (tests/unit/lifecycle_backends/sglang_0_5_23_flags.txt).
    "sglang": {
        "--dtype": V,
        "--quantization": V,
        "--kv-cache-dtype": V,
        "--chunked-prefill-size": V,
        "--max-prefill-tokens": V,
        "--max-total-tokens": V,
        "--schedule-policy": V,
        "--schedule-conservativeness": V,
        "--random-seed": V,
        "--disable-radix-cache": S,
        "--disable-cuda-graph": S,
        "--enable-torch-compile": S,
        "--attention-backend": V,
        "--tokenizer-path": M,
        "--tokenizer-mode": V,
        "--revision": V,
        "--tool-call-parser": V,
        "--reasoning-parser": V,
        "--stream-interval": V,
        "--log-level": V,
    },
    "sim": {
        "--flavor": V,
        "--ttft-ms": V,
        "--tpot-ms": V,
        "--batch-slowdown": V,
        "--max-num-seqs": V,
        "--max-tokens-default": V,
        "--embedding-dim": V,
        "--seed": V,
        "--served-model-name": NS,
        "--kv-engine-id": V,
        "--kv-block-size": V,
        "--kv-hold-s": V,
        "--startup-delay-s": V,
        "--log-level": V,
    },
    "transformers": {
        "--dtype": V,
        "--max-tokens-default": V,
        "--max-num-seqs": V,
        "--kv-budget-tokens": V,
        "--waiting-served-ratio": V,
        "--max-waiting-steps": V,
        "--served-model-name": NS,
        "--log-level": V,
    },
    "embedding": {
        "--max-batch-size": V,
        "--max-batch-tokens": V,
        "--max-wait-ms": V,
        "--max-inputs": V,
        "--alias": N,
        "--log-level": V,
    },
    "tei": {
        "--revision": V,
        "--dtype": V,
        "--pooling": V,
        "--max-batch-tokens": V,
        "--max-batch-requests": V,
        "--tokenization-workers": V,
        "--default-prompt-name": V,
        "--default-prompt": V,
        "--served-model-name": N,
        "--json-output": S,
        "--disable-spans": S,
    },
    "infinity": {
        "--batch-size": V,
        "--revision": V,
        "--dtype": V,
        "--embedding-dtype": V,
        "--pooling-method": V,
        "--engine": V,
        "--lengths-via-tokenize": S,
        "--no-lengths-via-tokenize": S,
        "--bettertransformer": S,
        "--no-bettertransformer": S,
        "--model-warmup": S,
        "--no-model-warmup": S,
        "--compile": S,
        "--no-compile": S,
        "--no-trust-remote-code": S,
    },
}

# Why some flags are refused whatever the backend (the message names the reason).
REFUSED_ARGS: dict[str, str] = {
    "--trust-remote-code": "it runs Python code shipped with the model",
    "--host": "lifecycle chooses the engine's bind address",
    "--hostname": "lifecycle chooses the engine's bind address",
    "--port": "lifecycle chooses the engine's port (use the port field)",
    "--api-key": "lifecycle sets the engine's API key",
    "--chat-template": "it loads a template from any path or URL",
    "--download-dir": "it writes model files outside the model roots",
    "--huggingface-hub-cache": "it writes model files outside the model roots",
    "--middleware": "it imports Python code",
    "--tool-parser-plugin": "it imports Python code",
    "--worker-cls": "it imports Python code",
    "--worker-extension-cls": "it imports Python code",
    "--config": "it reads further arguments from a file",
    "--allowed-local-media-path": "it lets requests read local files",
    "--ssl-certfile": "it reads files outside the model roots",
    "--ssl-keyfile": "it reads files outside the model roots",
    "--uds-path": "lifecycle chooses the engine's socket path",
    "--device": "lifecycle chooses the device from the GPUs it reserved",
    "--tensor-parallel-size": "use the tensor_parallel_size field (GPUs are reserved from it)",
    "--pipeline-parallel-size": "use the pipeline_parallel_size field (GPUs are reserved from it)",
    "--gpu-memory-utilization": "use the gpu_memory_utilization field (GPU memory is "
    "reserved from it)",
    "--max-model-len": "use the max_model_len field",
    "--model": "use the model_id field",
    "--model-id": "use the model_id field",
    "--role": "use the role field",
    "--task": "use the engine_kind field (embedding engines run vLLM's pooling runner)",
    "--runner": "use the engine_kind field (embedding engines run vLLM's pooling runner)",
    "--convert": "use the engine_kind field (embedding engines run vLLM's pooling runner)",
    "--kv-transfer-config": "use the role field (prefill/decode engines get their connector)",
    "--prometheus-port": "lifecycle chooses the engine's metrics port",
}


def check_name(value: str, param: str, what: str = "name") -> None:
    """A served name or alias: non-empty, no leading `-`, no control or bidi characters."""
    if not value:
        raise InvalidRequestError(f"{what} must not be empty", param=param)
    if len(value) > MAX_NAME_CHARS:
        raise InvalidRequestError(f"{what} is longer than {MAX_NAME_CHARS} characters", param=param)
    if value.startswith("-"):
        raise InvalidRequestError(
            f"{what} {value!r} starts with '-': an engine would read it as an option",
            param=param,
        )
    for char in value:
        if unicodedata.category(char) in _FORBIDDEN_CATEGORIES:
            raise InvalidRequestError(
                f"{what} contains the control or formatting character U+{ord(char):04X} "
                f"({unicodedata.name(char, 'unnamed')})",
                param=param,
            )


def parse_port_range(text: str) -> tuple[int, int]:
    """`"lo-hi"` (or one port) → (lo, hi); ConfigurationError naming SAGE_ENGINE_PORTS."""
    lo_text, _, hi_text = text.strip().partition("-")
    try:
        lo = int(lo_text)
        hi = int(hi_text) if hi_text else lo
    except ValueError:
        raise ConfigurationError(
            f"SAGE_ENGINE_PORTS must look like 8900-8999, got {text!r}"
        ) from None
    if not LOWEST_ENGINE_PORT <= lo <= hi <= 65535:
        raise ConfigurationError(
            f"SAGE_ENGINE_PORTS must be a range within {LOWEST_ENGINE_PORT}-65535, got {text!r}"
        )
    return lo, hi


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def hf_cache_roots(environ: Mapping[str, str]) -> list[Path]:
    """Where Hugging Face keeps downloaded models (HF_HUB_CACHE, HF_HOME, XDG cache)."""
    roots: list[Path] = []
    if environ.get("HF_HUB_CACHE"):
        roots.append(Path(environ["HF_HUB_CACHE"]))
    xdg = Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    roots.append(Path(environ.get("HF_HOME") or xdg / "huggingface"))
    return roots


@dataclass(frozen=True)
class LaunchPolicy:
    """Checks a StartEngine request's model, extra_args and port; see the module docstring."""

    model_roots: tuple[Path, ...] = ()
    port_range: tuple[int, int] = (8900, 8999)
    # Engine ports the operator configured outside the range (serve's --port/--embedding-port).
    extra_ports: frozenset[int] = frozenset()
    # Flags added to every backend's allow-list (SAGE_LAUNCH_ALLOWED_ARGS); "*" = any.
    added_args: frozenset[str] = frozenset()
    allowed: Mapping[str, Mapping[str, Arity]] = field(default_factory=lambda: ALLOWED_ARGS)

    @classmethod
    def from_settings(
        cls, settings: SageSettings, environ: Mapping[str, str] | None = None
    ) -> LaunchPolicy:
        """The policy `settings` describe; $SAGE_HOME/models and the HF cache always count."""
        env = os.environ if environ is None else environ
        roots = [Path(p).expanduser() for p in _split(settings.lifecycle.model_roots)]
        roots += [settings.home / "models", *hf_cache_roots(env)]
        extra = {
            p
            for p in (settings.llm_port, settings.embedding_port)
            if LOWEST_ENGINE_PORT <= p <= 65535
        }
        return cls(
            model_roots=tuple(roots),
            port_range=parse_port_range(settings.lifecycle.engine_ports or DEFAULT_ENGINE_PORTS),
            extra_ports=frozenset(extra),
            added_args=frozenset(
                _normalise(a) for a in _split(settings.lifecycle.launch_allowed_args)
            ),
        )

    # -- models -----------------------------------------------------------------------

    def check_model(self, model: str, param: str = "model_id") -> None:
        """A Hub id, or an existing folder under a model root (symlinks resolved)."""
        check_name(model, param, "model_id")
        if ".." in model:
            raise InvalidRequestError(
                f"model_id {model!r} contains '..': parent-directory traversal is refused",
                param=param,
            )
        if _HUB_ID.fullmatch(model):
            return
        self._check_local_model(model, param)

    def _check_local_model(self, model: str, param: str) -> None:
        path = Path(model).expanduser()
        if not path.is_absolute():
            raise InvalidRequestError(
                f"model_id {model!r} is neither a Hugging Face id (org/name) nor an absolute "
                "path to a local model folder",
                param=param,
            )
        roots = [Path(os.path.realpath(root)) for root in self.model_roots]
        # The literal path first, so a folder outside every root is refused without saying
        # whether it exists; then the real path, so a symlink cannot lead out of a root.
        lexical = Path(os.path.normpath(path))
        real = Path(os.path.realpath(path))
        inside = any(_within(lexical, r) for r in [*roots, *map(Path, self.model_roots)])
        if not inside or not any(_within(real, root) for root in roots):
            listed = ", ".join(str(r) for r in self.model_roots) or "none"
            raise InvalidRequestError(
                f"model path {model} is not inside an allowed model root ({listed}); an "
                "operator can add its folder to SAGE_MODEL_ROOTS",
                param=param,
            )
        if not real.exists():
            raise InvalidRequestError(f"model path {model} does not exist", param=param)

    # -- extra_args -----------------------------------------------------------------------

    def check_extra_args(self, backend: str, args: Sequence[str]) -> None:
        """Every flag on `backend`'s allow-list (or added by the operator), every value where
        its flag expects one; InvalidRequestError(param extra_args) names the first problem."""
        if "*" in self.added_args:
            return
        allowed = self.allowed.get(backend, {})
        i = 0
        while i < len(args):
            arg = args[i]
            if not arg.startswith("-") or _NUMBER.fullmatch(arg):
                raise InvalidRequestError(
                    f"extra_args: {arg!r} is not the value of a flag that takes one",
                    param="extra_args",
                )
            if not arg.startswith("--") or arg == "--":
                raise InvalidRequestError(
                    f"extra_args: {arg!r} is refused; give flags in their long form (--name)",
                    param="extra_args",
                )
            name, has_inline, inline = arg.partition("=")
            flag = _normalise(name)
            arity = self._arity(backend, allowed, flag)
            values: list[str] = [inline] if has_inline else []
            i += 1
            if not has_inline and arity is not Arity.SWITCH:
                while i < len(args) and _is_value(args[i]):
                    values.append(args[i])
                    i += 1
                    if arity is not Arity.NAMES and arity is not Arity.ANY:
                        break
            self._check_values(flag, arity, values)

    def _arity(self, backend: str, allowed: Mapping[str, Arity], flag: str) -> Arity:
        if flag in self.added_args:
            return allowed.get(flag, Arity.ANY)
        if flag in REFUSED_ARGS:
            raise InvalidRequestError(
                f"extra_args: {flag} is not allowed: {REFUSED_ARGS[flag]}", param="extra_args"
            )
        arity = allowed.get(flag)
        if arity is None:
            raise InvalidRequestError(
                f"extra_args: {flag} is not an allowed flag for backend {backend} (an operator "
                "can allow it in SAGE_LAUNCH_ALLOWED_ARGS)",
                param="extra_args",
            )
        return arity

    def _check_values(self, flag: str, arity: Arity, values: list[str]) -> None:
        if arity is Arity.ANY:
            return
        if arity is Arity.SWITCH:
            if values:
                raise InvalidRequestError(f"extra_args: {flag} takes no value", param="extra_args")
            return
        if not values:
            raise InvalidRequestError(f"extra_args: {flag} needs a value", param="extra_args")
        for value in values:
            if arity is Arity.MODEL:
                self.check_model(value, param="extra_args")
            elif arity is Arity.VALUE and _NUMBER.fullmatch(value):
                continue
            else:
                check_name(value, "extra_args", f"the value of {flag}")

    # -- ports ------------------------------------------------------------------------

    def check_port(self, port: int) -> None:
        """A port a caller asked for: >= 1024, inside the engine range or a configured one."""
        lo, hi = self.port_range
        if port < LOWEST_ENGINE_PORT:
            raise InvalidRequestError(
                f"port {port} is below {LOWEST_ENGINE_PORT}: engines never take system ports",
                param="port",
            )
        if not (lo <= port <= hi or port in self.extra_ports):
            raise InvalidRequestError(
                f"port {port} is outside the engine port range {lo}-{hi} (SAGE_ENGINE_PORTS)",
                param="port",
            )

    def candidate_ports(self, rng: random.Random | None = None) -> Iterator[int]:
        """Every port of the range once, from a random start (two stacks sharing a range
        seldom race for the same port)."""
        lo, hi = self.port_range
        count = hi - lo + 1
        start = (rng or random).randrange(count)
        for offset in range(count):
            yield lo + (start + offset) % count


def _normalise(flag: str) -> str:
    """vLLM's parser reads `--max_num_seqs` as `--max-num-seqs`: compare them as one."""
    return flag.strip().replace("_", "-").lower() if flag.startswith("--") else flag.strip()


def _is_value(arg: str) -> bool:
    return not arg.startswith("-") or bool(_NUMBER.fullmatch(arg))


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def engine_bind_host(host: str, advertise_host: str) -> str:
    """The address engines listen on: loopback on a single host, even when the services
    bind every interface; on a node of several hosts (SAGE_ADVERTISE_HOST, or SAGE_HOST set
    to one non-loopback address) the address other hosts reach it at."""
    if advertise_host:
        if _can_bind(advertise_host):
            return advertise_host
        return host  # behind NAT: the operator's bind address
    if is_wildcard_host(host) or is_loopback_host(host):
        return "127.0.0.1"
    return host


def _can_bind(host: str) -> bool:
    """True when `host` is an address of this machine (a listener could bind it)."""
    bare = host.strip().strip("[]")
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(bare).version == 6 else socket.AF_INET
    except ValueError:
        try:
            infos = socket.getaddrinfo(bare, 0, type=socket.SOCK_STREAM)
        except OSError:
            return False
        return any(_can_bind(str(info[4][0])) for info in infos)
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((bare, 0))
    except OSError:
        return False
    return True
