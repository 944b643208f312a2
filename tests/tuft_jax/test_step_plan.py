"""The memory planner: a batch that does not fit runs as micro-batches (with remat) whose summed
gradients equal one pass, and a batch of which not even the smallest micro-batch fits is a 400."""

from __future__ import annotations

import numpy as np
import pytest
from engine_testing import assert_close_rel, next_token_datum, random_sequences, slot_arrays

from tuft_jax import step_plan
from tuft_jax.engine import Engine
from tuft_jax.errors import InputError
from tuft_jax.types import LoraConfig

SEQUENCES = random_sequences([60, 33, 47, 12, 58, 25, 40, 51], seed=11)


def _run(engine: Engine) -> tuple[list, dict[str, np.ndarray]]:
    adapter = engine.create_adapter(LoraConfig(rank=4, seed=5))
    (result,) = engine.forward_backward([(adapter, [next_token_datum(s) for s in SEQUENCES])], "cross_entropy", {}, False)
    return result, slot_arrays(engine.grads, engine.device_slot(adapter))


def test_micro_batches_equal_one_pass(make_engine) -> None:
    whole, whole_grads = _run(make_engine())

    engine = make_engine()
    engine.planner = step_plan.StepPlanner(lambda: 0)
    with pytest.raises(InputError, match="GB of device memory"):
        _run(engine)
    # The refused plan compiled and measured every variant of this shape: allow only the smallest.
    sizes = {variant: size for (_, variant), size in engine.planner.allocations.items()}
    smallest = min(sizes, key=lambda v: v.rows)
    assert smallest.remat and sizes[smallest] < min(size for v, size in sizes.items() if v.rows > smallest.rows)
    engine.planner.free_bytes = lambda: int(sizes[smallest] / step_plan.HEADROOM) + 1
    split, split_grads = _run(engine)

    assert split.metrics["loss:sum"] == pytest.approx(whole.metrics["loss:sum"], rel=1e-5)
    for ours, reference in zip(split.outputs, whole.outputs, strict=True):
        np.testing.assert_allclose(ours["logprobs"], reference["logprobs"], rtol=0, atol=1e-5)
    for key, grad in split_grads.items():
        if whole_grads[key].any():  # (A of a LoRA whose B is still zero gets no gradient)
            assert_close_rel(grad, whole_grads[key], 1e-5, key)
        else:
            assert not grad.any(), key


def test_remat_is_kept_out_of_passes_that_fit(make_engine) -> None:
    engine = make_engine()
    _run(engine)
    # 8 datums of up to 60 tokens pack into 6 rows of 64, padded to 8.
    assert [variant for _, variant in engine.planner.allocations] == [step_plan.Variant(rows=8, remat=False)]
