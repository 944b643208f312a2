"""One tenant never breaks another: more adapters in a call than slots, calls that need a slot
while running samples pin all of them, a sample request the device arrays cannot hold, a prefill
that fails for one request, and an engine call that fails inside the device computation.

The engine has 4 adapter slots, 4 decode rows and 4-token chunks (see `engine_testing`).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from engine_testing import CONTEXT, MAX_ADAPTERS, next_token_datum, random_sequences, slot_arrays

from tuft_jax import decode_scheduler, losses, train_step
from tuft_jax.engine import Engine
from tuft_jax.errors import InputError, SlotsBusy
from tuft_jax.model_registry import BaseModelSpec
from tuft_jax.types import AdamParams, LoraConfig, SampleResult, SamplingParams

ROWS, CHUNK = 4, 4
SEQS = random_sequences([9, 12, 7, 10, 11, 8, 13], seed=3)


@pytest.fixture
def make(tiny_checkpoint):
    path = tiny_checkpoint("qwen3", False, seed=0)
    spec = BaseModelSpec("tiny", path, max_context_length=CONTEXT, max_lora_rank=8, max_adapters=MAX_ADAPTERS, family="qwen3")
    return lambda: Engine(spec, decode_rows=ROWS, decode_chunk=CHUNK)


def adapters_for(engine: Engine, n: int) -> list[int]:
    return [engine.create_adapter(LoraConfig(rank=4, seed=100 + i)) for i in range(n)]


def weights(engine: Engine, adapter: int) -> dict[str, np.ndarray]:
    return slot_arrays(engine.lora, engine.device_slot(adapter))


class Samples:
    """Submits sample requests and records each outcome."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.outcomes: dict[int, SampleResult | BaseException] = {}

    def submit(self, key: int, adapter: int, prompt: np.ndarray, params: SamplingParams) -> None:
        def done(result: SampleResult | None, error: BaseException | None) -> None:
            self.outcomes[key] = error if error is not None else result  # type: ignore[assignment]

        self.engine.submit_sample(adapter, prompt, 1, params, prompt_logprobs=False, topk_prompt_logprobs=0, on_done=done)

    def drain(self) -> None:
        while self.engine.has_sampling_work():
            self.engine.step_sampling()


def tokens(result: SampleResult | BaseException) -> list[int]:
    assert isinstance(result, SampleResult), result
    return result.sequences[0].tokens


PARAMS = SamplingParams(max_tokens=14, temperature=1.0, seed=5)


def test_a_call_with_more_adapters_than_slots_equals_separate_calls(make) -> None:
    """7 adapters in one forward_backward on 4 slots run in groups, parking between them."""
    alone, merged = make(), make()
    ids_alone, ids_merged = adapters_for(alone, 7), adapters_for(merged, 7)
    data = [[next_token_datum(seq)] for seq in SEQS]
    expected = [alone.forward_backward([(a, d)], "cross_entropy", {}, False)[0] for a, d in zip(ids_alone, data, strict=True)]
    results = merged.forward_backward(list(zip(ids_merged, data, strict=True)), "cross_entropy", {}, False)
    assert len(results) == 7
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_allclose(got.metrics["loss:sum"], want.metrics["loss:sum"], rtol=1e-5)
        np.testing.assert_allclose(got.outputs[0]["logprobs"], want.outputs[0]["logprobs"], rtol=0, atol=1e-5)
    for engine, ids in ((alone, ids_alone), (merged, ids_merged)):
        for adapter in ids:
            engine.optim_step(adapter, AdamParams(learning_rate=1e-2))
    for a, m in zip(ids_alone, ids_merged, strict=True):
        want, got = weights(alone, a), weights(merged, m)
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-6, err_msg=key)


def test_calls_wait_while_running_samples_pin_every_slot(make) -> None:
    engine = make()
    samplers = adapters_for(engine, MAX_ADAPTERS)
    trainee = engine.create_adapter(LoraConfig(rank=4, seed=9))  # parks one sampler
    expected = {}
    for i, adapter in enumerate(samplers):
        expected[i] = engine.sample(adapter, SEQS[i][:5].astype(np.int32), 1, PARAMS, prompt_logprobs=False, topk_prompt_logprobs=0)
    samples = Samples(engine)
    for i, adapter in enumerate(samplers):
        samples.submit(i, adapter, SEQS[i][:5].astype(np.int32), PARAMS)
    engine.step_sampling()  # all four admitted: every slot pinned
    before = weights(engine, samplers[0])
    with pytest.raises(SlotsBusy):
        engine.forward_backward([(trainee, [next_token_datum(SEQS[0])])], "cross_entropy", {}, False)
    with pytest.raises(SlotsBusy):
        engine.create_adapter(LoraConfig(rank=2, seed=1))
    samples.submit(9, samplers[0], SEQS[5][:5].astype(np.int32), PARAMS)  # held back until the refused call ran
    engine.step_sampling()
    assert engine.decoder.queued_rows == 1
    while engine.decoder.queued_rows:  # once the pinned rows end, the waiting call can go first
        try:
            engine.forward_backward([(trainee, [next_token_datum(SEQS[0])])], "cross_entropy", {}, False)
            break
        except SlotsBusy:
            engine.step_sampling()
    else:
        pytest.fail("the refused call never got a slot")
    samples.drain()
    for i in range(MAX_ADAPTERS):
        assert tokens(samples.outcomes[i]) == tokens(expected[i])
    assert tokens(samples.outcomes[9])
    for key, value in before.items():
        np.testing.assert_array_equal(weights(engine, samplers[0])[key], value)


def test_more_samplers_than_slots_all_finish_as_alone(make) -> None:
    engine = make()
    samplers = adapters_for(engine, 6)
    expected = [
        engine.sample(a, SEQS[i][:6].astype(np.int32), 1, PARAMS, prompt_logprobs=False, topk_prompt_logprobs=0)
        for i, a in enumerate(samplers)
    ]
    samples = Samples(engine)
    for i, adapter in enumerate(samplers):
        samples.submit(i, adapter, SEQS[i][:6].astype(np.int32), PARAMS)
    samples.drain()
    assert [tokens(samples.outcomes[i]) for i in range(6)] == [tokens(e) for e in expected]


def test_controls_the_device_cannot_hold_fail_only_their_request(make) -> None:
    engine = make()
    (adapter,) = adapters_for(engine, 1)
    prompt = SEQS[1][:6].astype(np.int32)
    expected = engine.sample(adapter, prompt, 1, PARAMS, prompt_logprobs=False, topk_prompt_logprobs=0)
    samples = Samples(engine)
    samples.submit(0, adapter, prompt, PARAMS)
    engine.step_sampling()
    job = decode_scheduler.SampleJob(adapter, prompt, 1, SamplingParams(max_tokens=4, top_k=10**12), 1, False, 0, print)
    with pytest.raises(InputError, match="out of range"):
        engine.decoder.submit(job)  # past the engine's own check, straight into the scheduler
    samples.drain()
    assert tokens(samples.outcomes[0]) == tokens(expected)


def test_a_prefill_that_fails_for_one_request_fails_it_alone(make, monkeypatch) -> None:
    engine = make()
    good, bad = adapters_for(engine, 2)
    poison = 459
    prompts = [SEQS[2][:6].astype(np.int32), np.array([poison, 1, 2, 3], np.int32)]
    expected = engine.sample(good, prompts[0], 1, PARAMS, prompt_logprobs=False, topk_prompt_logprobs=0)
    real_prefill = decode_scheduler.sampler.prefill

    def prefill(graphdef, base, lora, pool, chunk, **kwargs):
        if (np.asarray(chunk.tokens)[:, 0] == poison).any():
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory in prefill")
        return real_prefill(graphdef, base, lora, pool, chunk, **kwargs)

    monkeypatch.setattr(decode_scheduler.sampler, "prefill", prefill)
    samples = Samples(engine)
    samples.submit(0, good, prompts[0], PARAMS)
    samples.submit(1, bad, prompts[1], PARAMS)
    samples.drain()
    assert tokens(samples.outcomes[0]) == tokens(expected)
    assert "out of memory" in str(samples.outcomes[1])
    assert not engine.decoder.uses_adapter(bad)


def test_an_engine_call_that_fails_on_the_device_changes_nothing(make, monkeypatch) -> None:
    """A failure inside the jitted forward_backward (as an out-of-memory is) fails that call
    alone: weights, pending gradients, optimizer state and running samples are untouched, and
    the next call works."""
    failing = {"on": False}

    def explode(mask: np.ndarray) -> np.ndarray:
        if failing["on"]:
            raise MemoryError("RESOURCE_EXHAUSTED: forced")
        return mask

    real_token_loss = train_step.token_loss

    def token_loss(loss_fn, lp, inputs, mask, config, segments):
        if loss_fn == "exploding_cross_entropy":  # a fresh static argument, so this is traced anew
            mask = jax.pure_callback(explode, jax.ShapeDtypeStruct(mask.shape, mask.dtype), mask)
            loss_fn = "cross_entropy"
        return real_token_loss(loss_fn, lp, inputs, mask, config, segments)

    monkeypatch.setattr(train_step, "token_loss", token_loss)
    assert "exploding_cross_entropy" not in losses.LOSSES
    engine = make()
    a, b = adapters_for(engine, 2)
    data = [next_token_datum(SEQS[3])]
    engine.forward_backward([(a, data)], "exploding_cross_entropy", {}, False)
    engine.optim_step(a, AdamParams(learning_rate=1e-2))
    engine.forward_backward([(a, data), (b, data)], "exploding_cross_entropy", {}, False)  # pending grads
    expected_sample = engine.sample(b, SEQS[4][:5].astype(np.int32), 1, PARAMS, prompt_logprobs=False, topk_prompt_logprobs=0)
    samples = Samples(engine)
    samples.submit(0, b, SEQS[4][:5].astype(np.int32), PARAMS)
    engine.step_sampling()
    state = jax.tree.map(np.array, (engine.lora, engine.grads, engine.opt_state))

    failing["on"] = True
    with pytest.raises(Exception, match="RESOURCE_EXHAUSTED"):
        engine.forward_backward([(a, data), (b, data)], "exploding_cross_entropy", {}, False)
    failing["on"] = False

    after = jax.tree.map(np.array, (engine.lora, engine.grads, engine.opt_state))
    for x, y in zip(jax.tree.leaves(after), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(x, y)
    samples.drain()
    assert tokens(samples.outcomes[0]) == tokens(expected_sample)
    (result,) = engine.forward_backward([(a, data)], "exploding_cross_entropy", {}, False)
    assert np.isfinite(result.metrics["loss:sum"])
    engine.optim_step(a, AdamParams(learning_rate=1e-2))
