"""The generation process: the model and its BatchRunner apart from the HTTP front.

Why a process of its own (vLLM's EngineCore split): on a GPU a small model's step is bound
by the host launching kernels, and every torch call gives up and retakes the GIL. Measured
on an H100, the same runner stepped 32 rows in 6.9 ms alone but 11 ms beside the HTTP
server in one process. Here the front parses, renders and tokenises; the core only steps.

Wire (a duplex `multiprocessing` pipe, pickled tuples):
- front -> core: ("submit", rid, prompt_ids, params, stream), ("cancel", rid),
  ("metrics", rid);
- core -> front: one list per step of ("text", rid, str), ("done", rid, Outcome) (a
  non-streamed answer without stop strings comes as tokens, Outcome.pending, decoded here),
  ("error", rid, class name, message, param), ("metrics", rid, bytes); first ("ready", facts) or
  ("failed", message) once the model is loaded and warmed up.

Either side gone ends the other: the core exits on EOF, and the front fails what is in
flight and stops (lifecycle restarts the engine, as after any crash).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Any

from sage.common.exceptions import (
    ConfigurationError,
    InternalError,
    SageError,
    error_class_by_name,
)

from .batching import BatchRunner, Submission
from .model import EngineConfig, Outcome, SamplingParams, load_tokenizer, text_decoder

__all__ = ["CoreFacts", "CoreProcess"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CoreFacts:
    """What the front needs to know of the loaded model."""

    device: str
    dtype: str
    max_model_len: int
    vocab_size: int
    can_batch: bool
    warm_up_s: float
    decode: str = "dynamic"  # how decode passes run: cuda-graphs | slots | dynamic


@dataclass
class _Pending:
    future: Future[Outcome]
    on_text: Callable[[str], None] | None


class CoreProcess:
    """The front's handle on the generation process: a Runner, as BatchRunner is."""

    def __init__(
        self, config: EngineConfig, *, log_level: str = "INFO", start_timeout_s: float = 1800.0
    ) -> None:
        # The core leaves a non-streamed answer's text to us (Outcome.pending): decoded here,
        # it is off the generation process's critical path. A tokenizer of our own: the
        # front's encodes in another thread.
        self._decode = text_decoder(load_tokenizer(config))
        context = multiprocessing.get_context("spawn")  # no CUDA or threads forked
        self._conn, child = context.Pipe(duplex=True)
        self._process = context.Process(
            target=_core_main, args=(config, child, log_level), name="sage-engine-core", daemon=True
        )
        self._process.start()
        child.close()
        self.pid: int | None = self._process.pid
        if not self._conn.poll(start_timeout_s):
            self._process.kill()
            raise ConfigurationError("the generation process did not start in time")
        try:
            message = self._conn.recv()
        except EOFError:
            self._process.join(5)
            raise ConfigurationError(
                f"the generation process died while loading the model "
                f"(exit code {self._process.exitcode})"
            ) from None
        if message[0] == "failed":
            self._process.join(5)
            raise ConfigurationError(message[1], param="model")
        self.facts = CoreFacts(**message[1])
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._metrics: dict[int, Future[bytes]] = {}
        self._ids = itertools.count()
        self._closed = False
        self.died = False  # the core exited on its own: the engine's exit status says so
        self.on_core_exit: Callable[[], None] = _stop_this_process
        self._reader = threading.Thread(target=self._read, name="core-reader", daemon=True)
        self._reader.start()

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        on_text: Callable[[str], None] | None,
    ) -> Submission:
        """Queue one request in the core; its Future gets the Outcome or the error."""
        future: Future[Outcome] = Future()
        with self._lock:
            if self._closed:
                raise InternalError("the engine is shutting down")
            rid = next(self._ids)
            self._pending[rid] = _Pending(future, on_text)
        self._send(("submit", rid, tuple(prompt_ids), params, on_text is not None))
        return Submission(future, functools.partial(self._cancel, rid, future))

    def _cancel(self, rid: int, future: Future[Outcome]) -> None:
        """The client left: the core sets the request's flag, so its row leaves the batch
        before the next step."""
        if not future.done():
            self._send(("cancel", rid))

    def metrics_text(self) -> Future[bytes]:
        """The core's metrics in Prometheus text format (a Future: the core answers between
        steps)."""
        future: Future[bytes] = Future()
        with self._lock:
            if self._closed:
                future.set_exception(InternalError("the engine is shutting down"))
                return future
            rid = next(self._ids)
            self._metrics[rid] = future
        self._send(("metrics", rid))
        return future

    def close(self) -> None:
        """Stop the core and fail what is still in flight."""
        with self._lock:
            self._closed = True
        with contextlib.suppress(OSError):
            self._conn.close()
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._fail_all(InternalError("generation was cancelled (engine shutting down)"))

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError) as exc:  # the core is gone; _read reports it
            raise InternalError("the engine's generation process is gone") from exc

    def _read(self) -> None:
        while True:
            try:
                batch = self._conn.recv()
            except (EOFError, OSError):
                break
            for message in batch:
                self._deliver(message)
        with self._lock:
            closing = self._closed
        self._fail_all(InternalError("the engine's generation process stopped"))
        if not closing:
            self.died = True
            log.error("the generation process exited (code %s)", self._process.exitcode)
            self.on_core_exit()

    def _deliver(self, message: tuple[Any, ...]) -> None:
        kind, rid = message[0], message[1]
        if kind == "metrics":
            with self._lock:
                waiter = self._metrics.pop(rid, None)
            if waiter is not None:
                _settle(waiter, message[2])
            return
        with self._lock:
            pending = self._pending.get(rid) if kind == "text" else self._pending.pop(rid, None)
        if pending is None:
            return
        if kind == "text":
            if pending.on_text is not None:
                pending.on_text(message[2])
        elif kind == "done":
            outcome: Outcome = message[2]
            try:
                outcome = outcome.resolved(self._decode)
            except Exception as exc:  # never lose the reader thread to a bad decode
                log.error("decoding an answer failed", exc_info=exc)
                _settle(pending.future, error=InternalError("decoding the answer failed"))
                return
            _settle(pending.future, outcome)
        else:
            _settle(pending.future, error=_rebuild(message[2], message[3], message[4]))

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
            metrics, self._metrics = self._metrics, {}
        for item in pending.values():
            _settle(item.future, error=error)
        for waiter in metrics.values():
            _settle(waiter, error=error)


def _settle(future: Future[Any], result: Any = None, *, error: BaseException | None = None) -> None:
    with contextlib.suppress(InvalidStateError):
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


def _rebuild(name: str, message: str, param: str | None) -> SageError:
    """An error the core raised, as the front raises it (same class, message and param)."""
    cls = error_class_by_name(name)
    if cls is not None:
        with contextlib.suppress(TypeError):
            return cls(message, param=param)
    return InternalError(message, param=param)


def _stop_this_process() -> None:
    """The front without its core serves nothing: stop, and let lifecycle restart us."""
    os.kill(os.getpid(), signal.SIGTERM)


# ---- the core process


def _core_main(config: EngineConfig, conn: Connection, log_level: str) -> None:
    """Load and warm up the model, then step until the front goes away."""
    from sage.common.utils.logging import configure_logging

    configure_logging("transformers-engine-core", log_level)
    from .model import CausalLM

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the front; it stops us
    try:
        model = CausalLM(config)
        warm_s = model.warm_up()
    except ConfigurationError as exc:
        conn.send(("failed", exc.message))
        return
    except Exception as exc:  # anything else while loading: say it, do not hang the front
        conn.send(("failed", f"cannot load model {config.model!r}: {exc}"))
        return
    outbox: list[tuple[Any, ...]] = []
    outbox_lock = threading.Lock()
    send_lock = threading.Lock()

    def post(message: tuple[Any, ...]) -> None:
        with outbox_lock:
            outbox.append(message)

    def flush() -> None:
        with outbox_lock:
            if not outbox:
                return
            batch = outbox[:]
            outbox.clear()
        try:
            with send_lock:
                conn.send(batch)
        except (OSError, ValueError):
            os._exit(0)  # the front is gone

    runner = BatchRunner.for_engine(
        model, config, model.max_model_len, after_step=flush, defer_text=True
    )
    facts = CoreFacts(
        device=model.device,
        dtype=model.dtype,
        max_model_len=model.max_model_len,
        vocab_size=model.vocab_size,
        can_batch=model.can_batch,
        warm_up_s=warm_s,
        decode=model.decode_mode,
    )
    conn.send(("ready", asdict(facts)))
    cancels: dict[int, Callable[[], None]] = {}

    def post_text(rid: int, text: str) -> None:
        post(("text", rid, text))

    def finished(rid: int, future: Future[Outcome]) -> None:
        cancels.pop(rid, None)
        error = future.exception()
        if error is None:
            post(("done", rid, future.result()))
        else:
            if not isinstance(error, SageError):
                log.error("generation failed", exc_info=error)
                error = InternalError("generation failed; see the engine log")
            post(("error", rid, type(error).__name__, error.message, error.param))

    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            os._exit(0)  # the front is gone: nothing to serve
        kind, rid = message[0], message[1]
        if kind == "submit":
            _, _, prompt_ids, params, stream = message
            on_text = functools.partial(post_text, rid) if stream else None
            try:
                submission = runner.submit(prompt_ids, params, on_text)
            except SageError as exc:
                post(("error", rid, type(exc).__name__, exc.message, exc.param))
                flush()
                continue
            cancels[rid] = submission.cancel
            submission.future.add_done_callback(functools.partial(finished, rid))
        elif kind == "cancel":
            cancel = cancels.get(rid)  # None once finished
            if cancel is not None:
                cancel()
        elif kind == "metrics":
            post(("metrics", rid, runner.metrics_text().result()))
            flush()
