"""Engine worker: serial execution off the event loop, merging of forward_backward items, and
sampling chunks interleaved with training jobs under a bounded sample queue."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from server.worker import EngineWorker, ForwardBackwardItem, SampleItem
from tuft_jax.errors import CapacityError, InputError, SlotsBusy
from tuft_jax.types import AdamParams, Datum, ForwardResult, LoraConfig, SampledSequence, SampleResult, SamplingParams


def datum(n: int = 3) -> Datum:
    inputs = {"target_tokens": np.arange(n), "weights": np.ones(n)}
    return Datum(tokens=np.arange(n, dtype=np.int32), loss_inputs=inputs)


def item(model_id: str, slot: int, *, config: dict[str, float] | None = None, n: int = 1) -> ForwardBackwardItem[float]:
    return ForwardBackwardItem(
        model_id=model_id,
        slot=lambda: slot,
        data=[datum() for _ in range(n)],
        loss_fn="cross_entropy",
        loss_config=config or {},
        forward_only=False,
        finish=lambda result: result.metrics["loss:sum"],
    )


def test_call_runs_on_worker_thread_and_propagates_errors(engine) -> None:
    async def scenario() -> None:
        worker = EngineWorker(engine, max_batch_datums=16, max_queued_sample_rows=64)
        worker.start()
        try:
            thread = await worker.call(lambda e: threading.current_thread().name)
            assert thread == f"engine-{engine.name}"
            slot = await worker.call(lambda e: e.create_adapter(LoraConfig(rank=4)))
            assert slot == 1
            with pytest.raises(InputError):
                await worker.call(lambda e: e.create_adapter(LoraConfig(rank=1000)))
        finally:
            worker.stop()

    asyncio.run(scenario())


def test_merges_consecutive_compatible_items_of_different_models(engine) -> None:
    async def scenario() -> None:
        slots = [engine.create_adapter(LoraConfig(rank=4)) for _ in range(3)]
        engine.gate = threading.Event()
        worker = EngineWorker(engine, max_batch_datums=4, max_queued_sample_rows=64)
        worker.start()
        try:
            blocker = worker.call(lambda e: e.optim_step(slots[0], AdamParams()))
            futures = [
                worker.forward_backward(item("a", slots[0])),
                worker.forward_backward(item("b", slots[1])),
                worker.forward_backward(item("a", slots[0])),  # same model: starts a new call
                worker.forward_backward(item("c", slots[2], config={"x": 1.0})),  # other config
                worker.forward_backward(item("b", slots[1], n=2)),
                worker.forward_backward(item("a", slots[0], n=2)),  # 4 datums: still fits
                worker.forward_backward(item("c", slots[2], n=1)),  # 5 datums: new call
            ]
            await asyncio.sleep(0.05)
            engine.gate.set()
            await blocker
            losses = await asyncio.gather(*futures)
        finally:
            worker.stop()
        assert engine.forward_batches == [
            [slots[0], slots[1]],
            [slots[0]],
            [slots[2]],
            [slots[1], slots[0]],
            [slots[2]],
        ]
        assert losses == [3.0, 3.0, 3.0, 3.0, 6.0, 6.0, 3.0]

    asyncio.run(scenario())


def test_item_without_slot_fails_alone(engine) -> None:
    async def scenario() -> None:
        slot = engine.create_adapter(LoraConfig(rank=4))
        engine.gate = threading.Event()
        worker = EngineWorker(engine, max_batch_datums=16, max_queued_sample_rows=64)
        worker.start()
        try:
            blocker = worker.call(lambda e: e.create_adapter(LoraConfig(rank=4)))  # holds the queue
            broken = item("broken", 0)
            broken.slot = lambda: (_ for _ in ()).throw(InputError("model has no adapter"))
            bad = worker.forward_backward(broken)
            good = worker.forward_backward(item("ok", slot))
            engine.gate.set()
            await blocker
            with pytest.raises(InputError, match="no adapter"):
                await bad
            assert await good == 3.0
            assert engine.forward_batches == [[slot]]
        finally:
            worker.stop()

    asyncio.run(scenario())


def test_engine_failure_fails_every_item_of_the_call(engine) -> None:
    async def scenario() -> None:
        worker = EngineWorker(engine, max_batch_datums=16, max_queued_sample_rows=64)
        worker.start()
        try:
            # Slots 7 and 8 hold no adapter, so the merged engine call raises.
            results = await asyncio.gather(
                worker.forward_backward(item("a", 7)), worker.forward_backward(item("b", 8)), return_exceptions=True
            )
            assert all(isinstance(r, InputError) for r in results)
            assert isinstance(await worker.call(lambda e: ForwardResult([], {})), ForwardResult)
        finally:
            worker.stop()

    asyncio.run(scenario())


class ChunkedFakeEngine:
    """Sampling like the real scheduler: every `step_sampling` advances all running requests by one
    chunk and a request needs `max_tokens` chunks. Engine calls are logged in order; `gate`, when
    set, holds the first logged call until released."""

    name = "chunked"

    def __init__(self) -> None:
        self.log: list[str] = []
        self.running: list[list] = []  # [name, chunks left, on_done, num_samples]
        self.gate: threading.Event | None = None

    def _record(self, entry: str) -> None:
        self.log.append(entry)
        if self.gate is not None and len(self.log) == 1:
            assert self.gate.wait(10), "test gate never released"

    def job(self, name: str):
        return lambda engine: engine._record(name)

    def submit_sample(
        self, slot, prompt, num_samples, params, *, prompt_logprobs, topk_prompt_logprobs, on_done, topk_sample_logprobs=0
    ) -> None:
        if slot != 0:
            raise InputError(f"no adapter in slot {slot}")
        self.running.append([f"s{len(self.log)}", params.max_tokens, on_done, num_samples])

    def has_sampling_work(self) -> bool:
        return bool(self.running)

    def queued_sample_rows(self) -> int:
        return 0

    def step_sampling(self) -> None:
        self._record("chunk")
        for request in self.running:
            request[1] -= 1
        for request in [r for r in self.running if r[1] == 0]:
            self.running.remove(request)
            request[2](SampleResult([SampledSequence([1], [-0.5], "length")] * request[3]), None)


def sample_item(max_tokens: int = 1, slot: int = 0, n: int = 1) -> SampleItem[int]:
    return SampleItem(
        slot=slot,
        prompt=np.arange(3, dtype=np.int32),
        num_samples=n,
        params=SamplingParams(max_tokens=max_tokens),
        prompt_logprobs=False,
        topk_prompt_logprobs=0,
        finish=lambda result: len(result.sequences),
    )


def test_training_jobs_run_between_sampling_chunks() -> None:
    async def scenario() -> None:
        engine = ChunkedFakeEngine()
        engine.gate = threading.Event()
        worker = EngineWorker(engine, max_batch_datums=16, max_queued_sample_rows=64)  # type: ignore[arg-type]
        worker.start()
        try:
            blocker = worker.call(engine.job("blocker"))
            await asyncio.sleep(0.05)
            long = worker.sample(sample_item(max_tokens=3, n=2))
            jobs = [worker.call(engine.job("train-1")), worker.call(engine.job("train-2"))]
            short = worker.sample(sample_item(max_tokens=1))
            engine.gate.set()
            await asyncio.gather(blocker, *jobs)
            assert await long == 2 and await short == 1
        finally:
            worker.stop()
        # Both samples joined the running batch at once; each training job ran between two chunks.
        assert engine.log == ["blocker", "train-1", "chunk", "train-2", "chunk", "chunk"]

    asyncio.run(scenario())


def test_calls_refused_for_pinned_slots_run_after_the_samples_release_them() -> None:
    """A job or forward_backward the engine refuses with SlotsBusy (running samples read every
    slot) is retried after each decode chunk, in its place in the queue, and succeeds once the
    samples end; with no sampling work left, SlotsBusy is a real failure."""

    async def scenario() -> None:
        engine = ChunkedFakeEngine()
        refusals: list[str] = []

        def needs_a_slot(name: str):
            def run(e: ChunkedFakeEngine) -> str:
                if e.running:
                    refusals.append(name)
                    raise SlotsBusy("all adapter slots are read by running samples")
                e._record(name)
                return name

            return run

        def forward_backward(batch, loss_fn, loss_config, forward_only):
            if engine.running:
                refusals.append("fb")
                raise SlotsBusy("all adapter slots are read by running samples")
            engine._record("fb")
            return [ForwardResult([], {"loss:sum": float(slot)}) for slot, _ in batch]

        engine.forward_backward = forward_backward  # type: ignore[attr-defined]
        worker = EngineWorker(engine, max_batch_datums=16, max_queued_sample_rows=64)  # type: ignore[arg-type]
        worker.start()
        engine.gate = threading.Event()
        try:
            blocker = worker.call(engine.job("blocker"))
            await asyncio.sleep(0.05)
            sample = worker.sample(sample_item(max_tokens=3))
            jobs = [worker.call(needs_a_slot("create")), worker.forward_backward(item("a", 5)), worker.forward_backward(item("b", 6))]
            engine.gate.set()
            await blocker
            assert await asyncio.gather(sample, *jobs) == [1, "create", 5.0, 6.0]
            with pytest.raises(SlotsBusy):
                await worker.call(lambda e: (_ for _ in ()).throw(SlotsBusy("no samples are running")))
        finally:
            worker.stop()
        assert engine.log == ["blocker", "chunk", "chunk", "chunk", "create", "fb"]
        assert refusals == ["create"] * 3

    asyncio.run(scenario())


def test_sample_failures_reach_the_caller_and_the_worker_keeps_going() -> None:
    async def scenario() -> None:
        engine = ChunkedFakeEngine()
        worker = EngineWorker(engine, max_batch_datums=16, max_queued_sample_rows=64)  # type: ignore[arg-type]
        worker.start()
        try:
            with pytest.raises(InputError, match="no adapter"):
                await worker.sample(sample_item(slot=3))
            failing = sample_item()
            failing.finish = lambda result: 1 / 0
            with pytest.raises(ZeroDivisionError):
                await worker.sample(failing)
            assert await worker.sample(sample_item(max_tokens=2)) == 1
        finally:
            worker.stop()

    asyncio.run(scenario())


def test_sample_queue_bound_raises_capacity_error(engine) -> None:
    """Samples waiting for a decode row are bounded; a request is accepted whenever none wait."""

    async def scenario() -> None:
        engine.gate = threading.Event()
        worker = EngineWorker(engine, max_batch_datums=16, max_queued_sample_rows=4)
        worker.start()
        try:
            first = worker.sample(sample_item(n=3))
            second = worker.sample(sample_item(n=1))
            with pytest.raises(CapacityError, match="full"):
                worker.sample(sample_item(n=1))
            engine.gate.set()
            assert await first == 3 and await second == 1
            assert await worker.sample(sample_item(n=10)) == 10  # larger than the bound, but alone
        finally:
            worker.stop()

    asyncio.run(scenario())
