"""Engine worker: serial execution off the event loop, and merging of forward_backward items."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from server.worker import EngineWorker, ForwardBackwardItem
from tuft_jax.errors import InputError
from tuft_jax.types import AdamParams, Datum, ForwardResult, LoraConfig


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
        worker = EngineWorker(engine, max_batch_datums=16)
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
        worker = EngineWorker(engine, max_batch_datums=4)
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
        worker = EngineWorker(engine, max_batch_datums=16)
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
        worker = EngineWorker(engine, max_batch_datums=16)
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
