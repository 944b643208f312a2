"""One thread per engine that runs its (blocking) calls one at a time, in submission order,
interleaved with continuous-batching sampling.

Results are handed back to the event loop with `call_soon_threadsafe`. Consecutive queued
forward/forward_backward items of different models that share the loss function, its
config and the mode are merged into one engine call, which is how several training runs
share a step of the accelerator.

Sample requests skip the job queue: each loop hands every newly arrived one to the engine's
scheduler, runs the next job (if any), then one decode chunk (if any sequence is running).
So training and the samplers of many sessions progress together, a long generation never
holds up training for more than one chunk, and a training job delays sampling by one job.
Backpressure: beyond `max_queued_sample_rows` samples waiting for a decode row, `sample`
raises CapacityError (HTTP 429, which the SDK retries with the same seq_id).

A job the engine refuses with SlotsBusy (every adapter slot is read by running samples; the
engine changed nothing) goes back to the front of the queue and runs again after the next
decode chunk, so no client sees a failure it could not have avoided.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from server.engine_api import EngineAPI
from server.metrics import Metrics
from tuft_jax.errors import CapacityError, SlotsBusy
from tuft_jax.types import Datum, ForwardResult, SampleResult, SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class ForwardBackwardItem(Generic[T]):
    """One model's share of a (possibly merged) forward_backward engine call."""

    model_id: str
    slot: Callable[[], int]
    """Looked up on the worker thread, once the adapter's creation has run."""
    data: list[Datum]
    loss_fn: str
    loss_config: dict[str, float]
    forward_only: bool
    finish: Callable[[ForwardResult], T]
    """Turns the engine's result into the reply (e.g. protobuf); runs on the worker thread."""

    @property
    def batch_key(self) -> tuple[Any, ...]:
        return (self.loss_fn, self.forward_only, tuple(sorted(self.loss_config.items())))


@dataclass
class SampleItem(Generic[T]):
    """One asample request (already validated with `check_sample`)."""

    slot: int
    prompt: np.ndarray
    num_samples: int
    params: SamplingParams
    prompt_logprobs: bool
    topk_prompt_logprobs: int
    finish: Callable[[SampleResult], T]
    """Turns the engine's result into the reply (e.g. protobuf); runs on the worker thread."""
    topk_sample_logprobs: int = 0


@dataclass
class _Job:
    work: Callable[[EngineAPI], Any] | ForwardBackwardItem[Any] | SampleItem[Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


class EngineWorker:
    def __init__(
        self, engine: EngineAPI, *, max_batch_datums: int, max_queued_sample_rows: int, metrics: Metrics | None = None
    ) -> None:
        self.engine = engine
        self._metrics = metrics
        self._sampled_tokens = 0
        """Tokens of the sample requests completed during the current decode step."""
        self._settled: list[tuple[_Job, Any, BaseException | None]] = []
        """Sample results of the current decode step, handed to their callers once the count of
        waiting samples is updated, so a caller woken by its result sees the queue as it is now."""
        self._max_batch_datums = max_batch_datums
        self.max_queued_sample_rows = max_queued_sample_rows
        self._jobs: deque[_Job] = deque()
        self._samples: deque[_Job] = deque()
        self._inbox_rows = 0
        """Samples of the requests in `_samples`."""
        self._waiting_rows = 0
        """Samples not yet in a decode row: in `_samples` or in the engine's queue."""
        self._sampling = False
        """Whether the engine had sampling work after the last loop (read under the lock)."""
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"engine-{engine.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def queue_depth(self) -> int:
        """Engine calls and samples waiting for the engine."""
        with self._wakeup:
            return len(self._jobs) + self._waiting_rows

    def _record(self, call: str, started: float, tokens: int) -> None:
        if self._metrics is not None:
            self._metrics.record_call(self.engine.name, call, time.perf_counter() - started, tokens)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Finish the running call, abandon queued ones and end the thread."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def call(self, fn: Callable[[EngineAPI], T]) -> asyncio.Future[T]:
        """Queue `fn(engine)`; must be called on the event loop that awaits the result."""
        return self._submit(fn)

    def forward_backward(self, item: ForwardBackwardItem[T]) -> asyncio.Future[T]:
        return self._submit(item)

    def sample(self, item: SampleItem[T]) -> asyncio.Future[T]:
        """Queue a sample request for the engine's decode rows; raises CapacityError while too many
        samples wait for a row (a request is always accepted when none wait)."""
        loop = asyncio.get_running_loop()
        with self._wakeup:
            waiting = self._waiting_rows
            if waiting and waiting + item.num_samples > self.max_queued_sample_rows:
                raise CapacityError(
                    f"the sampling queue of {self.engine.name} is full ({waiting} samples waiting, limit "
                    f"{self.max_queued_sample_rows}); retry later"
                )
            job = _Job(item, loop.create_future(), loop)
            self._samples.append(job)
            self._inbox_rows += item.num_samples
            self._waiting_rows += item.num_samples
            self._wakeup.notify()
        return job.future

    def _submit(self, work: Callable[[EngineAPI], Any] | ForwardBackwardItem[Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        job = _Job(work, loop.create_future(), loop)
        with self._wakeup:
            self._jobs.append(job)
            self._wakeup.notify()
        return job.future

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not (self._jobs or self._samples or self._sampling or self._stopping):
                    self._wakeup.wait()
                if self._stopping:
                    return
                samples = list(self._samples)
                self._samples.clear()
                self._inbox_rows = 0
                batch = self._take_batch() if self._jobs else []
            # Samples first: one that arrived before a job (e.g. the release of its slot) reaches
            # the engine before that job runs.
            for job in samples:
                self._submit_sample(job)
            if batch:
                self._run_batch(batch)
            if self.engine.has_sampling_work():
                started, self._sampled_tokens = time.perf_counter(), 0
                try:
                    self.engine.step_sampling()
                except Exception:
                    logger.exception("a sampling step failed (the requests it was running have failed)")
                self._record("sample", started, self._sampled_tokens)
            with self._wakeup:
                self._sampling = self.engine.has_sampling_work()
                self._waiting_rows = self.engine.queued_sample_rows() + self._inbox_rows
            settled, self._settled = self._settled, []
            for job, value, exc in settled:
                _resolve(job, value, exc)

    def _run_batch(self, batch: list[_Job]) -> None:
        if isinstance(batch[0].work, ForwardBackwardItem):
            self._run_forward_backward(batch)
            return
        job = batch[0]
        try:
            _resolve(job, job.work(self.engine), None)  # type: ignore[operator]
        except SlotsBusy as exc:
            self._retry_later([job], exc)
        except Exception as exc:
            _resolve(job, None, exc)

    def _retry_later(self, jobs: list[_Job], exc: SlotsBusy) -> None:
        """Put jobs refused for pinned slots back in front; they run after the next decode chunk,
        which frees slots (without sampling work no slot is pinned, so that is a real failure)."""
        if not self.engine.has_sampling_work():
            for job in jobs:
                _resolve(job, None, exc)
            return
        with self._wakeup:
            self._jobs.extendleft(reversed(jobs))

    def _submit_sample(self, job: _Job) -> None:
        item = job.work
        assert isinstance(item, SampleItem)

        def done(result: SampleResult | None, error: BaseException | None) -> None:
            if error is not None:
                self._settled.append((job, None, error))
                return
            self._sampled_tokens += sum(len(sequence.tokens) for sequence in result.sequences)  # type: ignore[union-attr]
            try:
                self._settled.append((job, item.finish(result), None))  # type: ignore[arg-type]
            except Exception as exc:
                self._settled.append((job, None, exc))

        try:
            self.engine.submit_sample(
                item.slot,
                item.prompt,
                item.num_samples,
                item.params,
                prompt_logprobs=item.prompt_logprobs,
                topk_prompt_logprobs=item.topk_prompt_logprobs,
                on_done=done,
                topk_sample_logprobs=item.topk_sample_logprobs,
            )
        except Exception as exc:
            _resolve(job, None, exc)

    def _take_batch(self) -> list[_Job]:
        """The next job, plus the compatible forward_backward items queued right behind it."""
        batch = [self._jobs.popleft()]
        first = batch[0].work
        if not isinstance(first, ForwardBackwardItem):
            return batch
        models, datums = {first.model_id}, len(first.data)
        while self._jobs:
            item = self._jobs[0].work
            if (
                not isinstance(item, ForwardBackwardItem)
                or item.batch_key != first.batch_key
                or item.model_id in models
                or datums + len(item.data) > self._max_batch_datums
            ):
                break
            batch.append(self._jobs.popleft())
            models.add(item.model_id)
            datums += len(item.data)
        return batch

    def _run_forward_backward(self, batch: list[_Job]) -> None:
        ready: list[tuple[_Job, ForwardBackwardItem[Any], int]] = []
        for job in batch:
            item = job.work
            assert isinstance(item, ForwardBackwardItem)
            try:
                ready.append((job, item, item.slot()))
            except Exception as exc:
                _resolve(job, None, exc)
        if not ready:
            return
        first = ready[0][1]
        started = time.perf_counter()
        try:
            results = self.engine.forward_backward(
                [(slot, item.data) for _, item, slot in ready], first.loss_fn, first.loss_config, first.forward_only
            )
            if len(results) != len(ready):
                raise RuntimeError(f"engine returned {len(results)} results for {len(ready)} batch items")
        except SlotsBusy as exc:
            self._retry_later([job for job, _, _ in ready], exc)
            return
        except Exception as exc:
            for job, _, _ in ready:
                _resolve(job, None, exc)
            return
        tokens = sum(len(datum.tokens) for _, item, _ in ready for datum in item.data)
        self._record("forward" if first.forward_only else "forward_backward", started, tokens)
        for (job, item, _), result in zip(ready, results, strict=True):
            try:
                _resolve(job, item.finish(result), None)
            except Exception as exc:
                _resolve(job, None, exc)


def _resolve(job: _Job, value: Any, exc: BaseException | None) -> None:
    """Complete the job's future on its event loop (a no-op if the caller gave up on it)."""

    def settle() -> None:
        if job.future.done():
            return
        if exc is None:
            job.future.set_result(value)
        else:
            job.future.set_exception(exc)

    try:
        job.loop.call_soon_threadsafe(settle)
    except RuntimeError:
        logger.warning("event loop closed before an engine result could be delivered")
