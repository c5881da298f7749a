"""The engine's generation thread: admits waiting requests into the running batch between
steps (continuous batching) and keeps vLLM's request metrics.

Admission is FIFO and bounded twice: at most `max_num_seqs` sequences, and a KV budget in
cache columns. Rows are padded to the longest, so the batch holds at most rows x the
largest `reserve` (prompt + max_tokens) of any row; a request joins only while that stays
within `kv_budget_tokens`. The default budget is the context length, the one full-length
sequence lifecycle reserves GPU memory for. A request that needs the whole budget runs
alone. With `max_num_seqs=1` this is the old engine: one request at a time. While a batch
runs, newcomers are gathered into fewer, larger prefills (see `_admit`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import Counter, Histogram, generate_latest

from sage.common.exceptions import InternalError
from sage.engines.vllm_metrics import VllmRequestMetrics

from .model import EngineConfig, Generation, Outcome, SamplingParams, Step

__all__ = ["BatchMetrics", "BatchRunner", "BatchedModel", "Runner", "Submission"]

log = logging.getLogger(__name__)

# Sequences per decode pass: powers of two up to vLLM's default max_num_seqs.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STEP_SECONDS_BUCKETS = (0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 1.0)


class BatchedModel(Protocol):
    """What the runner needs of the model (CausalLM; a fake in tests)."""

    can_batch: bool

    def begin(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        cancelled: threading.Event,
        on_text: Callable[[str], None] | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> Generation: ...

    def step(self, admitted: Sequence[Generation] = ()) -> Step: ...

    def abandon(self) -> list[Generation]: ...


class BatchMetrics(VllmRequestMetrics):
    """vLLM's request metrics plus how many sequences each decode pass carried."""

    def __init__(
        self, name: str, running: Callable[[], float], waiting: Callable[[], float]
    ) -> None:
        super().__init__(
            name,
            running,
            waiting,
            running_help="Requests in the running batch (decoded together each step).",
            waiting_help="Requests queued for a place in the batch.",
            queue_help="Time waiting for a place in the batch.",
            finish_reasons=("stop", "length", "abort"),
        )
        self.batch_size = Histogram(
            "sage:engine_batch_size",
            "Sequences decoded together in one forward pass (one observation per step).",
            self.label,
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        ).labels(**self.values)
        self.step_seconds = Histogram(
            "sage:engine_step_seconds",
            "Wall time of one engine step (prefill of newcomers, if any, plus one decode pass);"
            " its sum over a run against the run's length is how busy the generation thread was.",
            self.label,
            buckets=STEP_SECONDS_BUCKETS,
            registry=self.registry,
        ).labels(**self.values)
        self.prefills = Counter(
            "sage:engine_prefills",
            "Prefill forward passes; each admits one or more waiting requests into the batch.",
            self.label,
            registry=self.registry,
        ).labels(**self.values)


@dataclass
class _Clock:
    """When a request arrived and produced its first and latest tokens (monotonic)."""

    arrival: float
    first_at: float = 0.0
    last_at: float = 0.0


@dataclass(frozen=True)
class Submission:
    """One queued request: the Future of its Outcome (or its error), and `cancel`, for when
    its client has gone: its row leaves the batch before the next step."""

    future: Future[Outcome]
    cancel: Callable[[], None]


class Runner(Protocol):
    """What the HTTP front needs of whatever steps the model: a BatchRunner stepping in the
    front's own process, or CoreProcess, its handle on a generation process (core.py)."""

    # The generation process, if generation runs in one; and whether it exited on its own
    # (the engine then exits as after a crash, so lifecycle restarts it).
    pid: int | None
    died: bool

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        on_text: Callable[[str], None] | None,
    ) -> Submission:
        """Queue one request; `on_text` (streaming) gets its text as steps release it."""
        ...

    def metrics_text(self) -> Future[bytes]:
        """The runner's metrics in Prometheus text format (a generation process answers
        between steps)."""
        ...

    def close(self) -> None:
        """Stop generating and fail what is queued or running."""
        ...


@dataclass(eq=False)  # compared and hashed by identity
class _Job:
    """One request waiting for, or holding, a place in the batch."""

    generation: Generation
    future: Future[Outcome]
    clock: _Clock
    enqueued_step: int = 0


class BatchRunner:
    """Owns the generation thread; `submit` queues a request (a Runner that steps in this
    process)."""

    pid: int | None = None  # no generation process: the thread is this process's
    died = False

    def __init__(
        self,
        model: BatchedModel,
        metrics_factory: Callable[[Callable[[], float], Callable[[], float]], BatchMetrics],
        *,
        max_num_seqs: int,
        kv_budget_tokens: int,
        waiting_served_ratio: float = 0.3,
        max_waiting_steps: int = 20,
        after_step: Callable[[], None] | None = None,
        defer_text: bool = False,
    ) -> None:
        self.model = model
        # Outcomes leave tokens that nothing needed as text until the end undecoded
        # (Outcome.pending): the core process leaves that to the HTTP front.
        self.defer_text = defer_text
        # Called by the generation thread after each step (and before it sleeps): the core
        # process sends the step's text and outcomes in one message from here.
        self.after_step = after_step
        self.max_num_seqs = max(1, max_num_seqs)
        self.kv_budget_tokens = kv_budget_tokens
        self.waiting_served_ratio = waiting_served_ratio
        self.max_waiting_steps = max_waiting_steps
        self._steps = 0  # engine steps so far (a waiting request's age is counted in them)
        self.metrics = metrics_factory(lambda: self.running, lambda: len(self._waiting))
        self._cond = threading.Condition()
        self._waiting: deque[_Job] = deque()
        self._running: dict[Generation, _Job] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="generate", daemon=True)
        self._thread.start()

    @classmethod
    def for_engine(
        cls,
        model: BatchedModel,
        config: EngineConfig,
        max_model_len: int,
        after_step: Callable[[], None] | None = None,
        defer_text: bool = False,
    ) -> BatchRunner:
        """The runner an engine with `config` uses (its limits and vLLM-named metrics)."""
        return cls(
            model,
            lambda running, waiting: BatchMetrics(config.names[0], running, waiting),
            max_num_seqs=config.max_num_seqs,
            kv_budget_tokens=config.kv_budget_tokens or max_model_len,
            waiting_served_ratio=config.waiting_served_ratio,
            max_waiting_steps=config.max_waiting_steps,
            after_step=after_step,
            defer_text=defer_text,
        )

    @property
    def running(self) -> int:
        """Requests in the batch now."""
        return len(self._running)

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        on_text: Callable[[str], None] | None,
    ) -> Submission:
        """Queue one request; its Future gets the Outcome (or the step's exception)."""
        future: Future[Outcome] = Future()
        cancelled = threading.Event()
        clock = _Clock(time.monotonic())
        generation = self.model.begin(prompt_ids, params, cancelled, on_text)
        job = _Job(generation, future, clock)
        with self._cond:
            if self._closed:
                raise InternalError("the engine is shutting down")
            job.enqueued_step = self._steps
            self._waiting.append(job)
            self._cond.notify()
        return Submission(future, cancelled.set)

    def close(self) -> None:
        """Cancel everything queued or running, fail their Futures and let the thread end
        (after the step in hand, which the cancel flags cut short)."""
        with self._cond:
            self._closed = True
            jobs = [*self._waiting, *self._running.values()]
            self._waiting.clear()
            self._cond.notify()
        for job in jobs:
            job.generation.cancelled.set()
            _fail(job.future, InternalError("generation was cancelled (engine shutting down)"))

    # ---- the generation thread

    def _admit(self) -> list[Generation]:
        """Take waiting requests, oldest first, while the batch has room (lock held).

        A prefill is a forward pass of its own, as dear as a decode step, so while the batch
        runs, newcomers are held until they are a fair share of it (`waiting_served_ratio`
        of the running rows), fill every free place, or the oldest has waited
        `max_waiting_steps` steps (TGI's rule): one prefill then serves many.
        """
        for job in [j for j in self._waiting if j.generation.cancelled.is_set()]:
            self._waiting.remove(job)  # the client left while queued
            job.generation.check_cancelled()
            self._finish(job)
        rows = len(self._running)
        limit = self.max_num_seqs if self.model.can_batch else 1
        if rows and self._waiting:
            waiting = len(self._waiting)
            if not (
                waiting >= max(1, int(self.waiting_served_ratio * rows))
                or waiting >= limit - rows
                or self._steps - self._waiting[0].enqueued_step >= self.max_waiting_steps
            ):
                return []
        admitted: list[Generation] = []
        widest = max((g.reserve for g in self._running), default=0)
        now = time.monotonic()
        while self._waiting:
            job = self._waiting[0]
            generation = job.generation
            wider = max(widest, generation.reserve)
            if rows and (rows + 1 > limit or (rows + 1) * wider > self.kv_budget_tokens):
                break
            self._waiting.popleft()
            self.metrics.queue_time.observe(now - job.clock.arrival)
            self._running[generation] = job
            admitted.append(generation)
            rows, widest = rows + 1, wider
        return admitted

    def metrics_text(self) -> Future[bytes]:
        """This runner's metrics in Prometheus text format (done at once)."""
        future: Future[bytes] = Future()
        future.set_result(bytes(generate_latest(self.metrics.registry)))
        return future

    def _loop(self) -> None:
        while True:
            if self.after_step is not None:
                self.after_step()
            with self._cond:
                while not self._closed and not self._waiting and not self._running:
                    self._cond.wait()
                if self._closed:
                    break
                admitted = self._admit()
            if not admitted and not self._running:
                continue
            self._steps += 1
            started = time.perf_counter()
            try:
                step = self.model.step(admitted)
            except Exception as exc:  # a failed forward pass (CUDA OOM...) fails its batch
                log.error("generation step failed", exc_info=exc)
                lost = self.model.abandon()
                with self._cond:
                    jobs = [self._running.pop(g) for g in {*lost, *admitted} if g in self._running]
                for job in jobs:
                    self.metrics.finished("abort")
                    _fail(job.future, exc)
                continue
            # Token timings at step resolution: every row of a step gets its token at once.
            metrics, now = self.metrics, time.monotonic()
            metrics.step_seconds.observe(time.perf_counter() - started)
            for generation in admitted:
                job = self._running[generation]
                if generation.produced:
                    job.clock.first_at = now
                    metrics.ttft.observe(now - job.clock.arrival)
                    metrics.prompt_tokens.inc(len(generation.prompt_ids))
            metrics.generation_tokens.inc(step.sampled)
            if step.sampled > step.decoded:
                metrics.prefills.inc()
            if step.decoded:
                metrics.batch_size.observe(step.decoded)
            with self._cond:
                done = [self._running.pop(g) for g in step.finished if g in self._running]
            for job in done:
                job.clock.last_at = now
                self._finish(job)
        self.model.abandon()
        if self.after_step is not None:
            self.after_step()

    def _finish(self, job: _Job) -> None:
        outcome = job.generation.outcome(defer_text=self.defer_text)
        metrics = self.metrics
        clock = job.clock
        if outcome.completion_tokens > 1:
            metrics.tpot.observe((clock.last_at - clock.first_at) / (outcome.completion_tokens - 1))
        metrics.e2e.observe(time.monotonic() - clock.arrival)
        metrics.finished(outcome.finish_reason)
        # close() may have failed it a moment ago.
        with contextlib.suppress(InvalidStateError):
            job.future.set_result(outcome)


def _fail(future: Future[Outcome], exc: BaseException) -> None:
    with contextlib.suppress(InvalidStateError):
        future.set_exception(exc)
