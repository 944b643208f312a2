"""Requests of the sizes users send: a cookbook multi-turn recipe's (guess_number: ~40 datums x
~1.9k tokens) trains on the tiny model on a 24 GB machine (the CI machine): before blockwise
attention and chunked logits the step asked for 76 GB; `scripts/bench/memory.py --model tiny
--batch 40 --seq 2048` now reports 1.2 GB. Mixed lengths are packed into shared rows."""

from __future__ import annotations

import numpy as np
import pytest
from engine_testing import assert_close_rel, next_token_datum, random_sequences, slot_arrays

from tuft_jax.engine import Engine
from tuft_jax.model_registry import BaseModelSpec
from tuft_jax.types import AdamParams, Datum, LoraConfig

DATUMS, TOKENS = 40, 1900


def test_a_forty_datum_two_thousand_token_request_fits_and_trains(tiny_checkpoint) -> None:
    spec = BaseModelSpec("tiny-long", tiny_checkpoint("qwen3", False, seed=0), 2048, 8, 2, family="qwen3")
    engine = Engine(spec)
    adapter = engine.create_adapter(LoraConfig(rank=8, seed=0))
    rng = np.random.default_rng(0)
    data = []
    for _ in range(DATUMS):
        seq = rng.integers(0, 400, size=TOKENS + 1)
        data.append(Datum(seq[:-1].astype(np.int32), {"target_tokens": seq[1:], "weights": np.ones(TOKENS, np.float32)}))

    (result,) = engine.forward_backward([(adapter, data)], "cross_entropy", {}, False)
    assert np.isfinite(result.metrics["loss:sum"]) and len(result.outputs) == DATUMS
    assert result.outputs[0]["logprobs"].shape == (TOKENS,)
    engine.optim_step(adapter, AdamParams(learning_rate=1e-3))


def test_packed_datums_get_what_each_gets_alone(make_engine) -> None:
    """Six datums of one adapter share rows (segments keep them apart); each datum's logprobs and
    loss, and the summed gradients, equal running every datum in a call of its own."""
    sequences = random_sequences([50, 9, 23, 31, 14, 40], seed=21)
    data = [next_token_datum(s) for s in sequences]

    packed = make_engine()
    adapter = packed.create_adapter(LoraConfig(rank=4, seed=2))
    (together,) = packed.forward_backward([(adapter, data)], "cross_entropy", {}, False)

    alone = make_engine()
    single = alone.create_adapter(LoraConfig(rank=4, seed=2))
    for datum, output in zip(data, together.outputs, strict=True):
        (result,) = alone.forward_backward([(single, [datum])], "cross_entropy", {}, False)
        np.testing.assert_allclose(output["logprobs"], result.outputs[0]["logprobs"], rtol=0, atol=1e-5)
    total = sum(float(-output["logprobs"].sum()) for output in together.outputs)
    assert together.metrics["loss:sum"] == pytest.approx(total, rel=1e-5)
    ours, reference = slot_arrays(packed.grads, packed.device_slot(adapter)), slot_arrays(alone.grads, alone.device_slot(single))
    for key, grad in ours.items():
        if reference[key].any():
            assert_close_rel(grad, reference[key], 1e-5, key)


@pytest.mark.parametrize("form", ["single", "grouped"])
def test_accelerator_lora_forms_give_the_cpu_forms_step(make_engine, monkeypatch: pytest.MonkeyPatch, form: str) -> None:
    """The forms an accelerator engine picks (one adapter: `single`, whose gradients are one slot's
    and are added at that slot; `grouped`) train exactly as XLA:CPU's `per_row`, leaving every
    other slot's accumulated gradients untouched."""
    data = [next_token_datum(s) for s in random_sequences([30, 12, 45], seed=8)]

    def step(engine: Engine) -> tuple:
        other = engine.create_adapter(LoraConfig(rank=2, seed=1))
        adapter = engine.create_adapter(LoraConfig(rank=4, seed=2))
        (pending,) = engine.forward_backward([(other, data[:1])], "cross_entropy", {}, False)
        (result,) = engine.forward_backward([(adapter, data)], "cross_entropy", {}, False)
        slots = (engine.device_slot(other), engine.device_slot(adapter))
        return result, [slot_arrays(engine.grads, slot) for slot in slots]

    reference, reference_grads = step(make_engine())
    monkeypatch.setattr("tuft_jax.engine.lora_form", lambda slots: form)
    result, grads = step(make_engine())
    assert result.metrics["loss:sum"] == pytest.approx(reference.metrics["loss:sum"], rel=1e-5)
    for ours, expected in zip(result.outputs, reference.outputs, strict=True):
        np.testing.assert_allclose(ours["logprobs"], expected["logprobs"], rtol=0, atol=1e-5)
    for slot_grads, slot_reference in zip(grads, reference_grads, strict=True):
        for key, grad in slot_grads.items():
            if slot_reference[key].any():
                assert_close_rel(grad, slot_reference[key], 1e-5, key)
            else:
                assert not grad.any(), key
