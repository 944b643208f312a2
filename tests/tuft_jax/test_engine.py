"""The engine facade: adapter lifecycle (init, capacity, release, snapshot) and request validation."""

from __future__ import annotations

import numpy as np
import pytest
from engine_testing import CONTEXT, MAX_ADAPTERS, MAX_RANK, next_token_datum, random_sequences, slot_arrays, tree_slot

from tuft_jax.adapters import leaf_group
from tuft_jax.errors import InputError
from tuft_jax.engine import Engine
from tuft_jax.types import AdamParams, Datum, LoraConfig, SamplingParams

(SEQ,) = random_sequences([12], seed=40)


def _train(engine: Engine, slot: int, steps: int) -> None:
    for _ in range(steps):
        engine.forward_backward([(slot, [next_token_datum(SEQ)])], "cross_entropy", {}, False)
        engine.optim_step(slot, AdamParams(learning_rate=2e-2))


def _logprobs(engine: Engine, slot: int) -> np.ndarray:
    (result,) = engine.forward_backward([(slot, [next_token_datum(SEQ)])], "cross_entropy", {}, True)
    return result.outputs[0]["logprobs"]


def test_create_adapter_uses_peft_init(engine: Engine) -> None:
    rank = 3
    slot = engine.create_adapter(LoraConfig(rank=rank, seed=7, train_attn=False))
    arrays = slot_arrays(engine.lora, slot)
    for key, value in arrays.items():
        group = leaf_group(tuple(key.split(".")))
        if key.endswith("lora_b"):
            assert not np.any(value), key  # B = 0: a new adapter is the base model
        elif group == "attn":
            assert not np.any(value), key  # untrained target group: no A either
        else:
            bound = 1.0 / np.sqrt(value.shape[0])  # kaiming-uniform(a=sqrt(5)) = U(±1/sqrt(fan_in))
            assert np.all(value[:, :rank] != 0) and np.abs(value).max() <= bound, key
            assert np.abs(value[:, :rank]).max() > 0.8 * bound, key
            assert not np.any(value[:, rank:]), key
    np.testing.assert_allclose(engine.slots.scales[slot], [0.0, 32.0 / rank, 32.0 / rank], rtol=1e-7)  # alpha / rank
    same = engine.create_adapter(LoraConfig(rank=rank, seed=7, train_attn=False))
    other = engine.create_adapter(LoraConfig(rank=rank, seed=8, train_attn=False))
    again, different = slot_arrays(engine.lora, same), slot_arrays(engine.lora, other)
    assert all(np.array_equal(arrays[k], again[k]) for k in arrays)
    assert not np.array_equal(arrays["lm_head.lora.lora_a"], different["lm_head.lora.lora_a"])
    # Distinct tensors get distinct draws, not one shared matrix.
    assert not np.array_equal(arrays["model.layers.0.mlp.up_proj.lora.lora_a"], arrays["model.layers.1.mlp.up_proj.lora.lora_a"])


def test_adapter_config_is_validated(engine: Engine) -> None:
    for bad in (LoraConfig(rank=0), LoraConfig(rank=MAX_RANK + 1)):
        with pytest.raises(InputError, match="rank"):
            engine.create_adapter(bad)
    with pytest.raises(InputError, match="at least one"):
        engine.create_adapter(LoraConfig(rank=4, train_attn=False, train_mlp=False, train_unembed=False))
    assert engine.slots.configs == {}


def test_release_clears_the_slot_for_reuse(engine: Engine) -> None:
    first = engine.create_adapter(LoraConfig(rank=MAX_RANK, seed=0))
    _train(engine, first, steps=1)
    engine.forward_backward([(first, [next_token_datum(SEQ)])], "cross_entropy", {}, False)  # pending grads
    slot = engine.device_slot(first)
    engine.release_adapter(first)
    for tree in (engine.lora, engine.grads):
        assert not any(np.any(x) for x in slot_arrays(tree, slot).values())
    assert not any(np.any(x) for x in tree_slot(engine.opt_state, slot))
    with pytest.raises(InputError, match="does not exist"):
        engine.forward_backward([(first, [next_token_datum(SEQ)])], "cross_entropy", {}, True)
    with pytest.raises(InputError, match="does not exist"):
        engine.optim_step(first, AdamParams())

    reused = engine.create_adapter(LoraConfig(rank=2, seed=0))
    assert reused != first and engine.device_slot(reused) == slot and engine.steps[reused] == 0
    fresh = slot_arrays(engine.lora, slot)
    assert not any(np.any(v) for k, v in fresh.items() if k.endswith("lora_b"))
    assert not any(np.any(v[:, 2:]) for k, v in fresh.items() if k.endswith("lora_a"))
    engine.release_adapter(0)  # the base model cannot be released
    assert len(engine.slots.configs) == 1


def test_more_adapters_than_slots_park_the_least_recently_used(engine: Engine) -> None:
    """Past the slot count, the least recently used adapter moves to host memory with its
    optimizer state and pending gradients, and comes back intact on its next use."""
    ids = [engine.create_adapter(LoraConfig(rank=MAX_RANK, seed=i)) for i in range(MAX_ADAPTERS)]
    oldest = ids[0]
    _train(engine, oldest, steps=1)
    engine.forward_backward([(oldest, [next_token_datum(SEQ)])], "cross_entropy", {}, False)
    slot = engine.device_slot(oldest)
    before = {name: slot_arrays(tree, slot) for name, tree in (("lora", engine.lora), ("grads", engine.grads))}
    opt_before = tree_slot(engine.opt_state, slot)
    for adapter in ids[1:]:
        engine.forward_backward([(adapter, [next_token_datum(SEQ)])], "cross_entropy", {}, True)

    extra = [engine.create_adapter(LoraConfig(rank=2, seed=9)), engine.create_adapter(LoraConfig(rank=2, seed=10))]
    assert len(engine.slots.configs) == MAX_ADAPTERS
    assert engine.adapter_config(oldest).rank == MAX_RANK  # parked, still known
    engine.optim_step(extra[0], AdamParams())

    slot = engine.device_slot(oldest)  # brought back, parking another one
    for name, tree in (("lora", engine.lora), ("grads", engine.grads)):
        restored = slot_arrays(tree, slot)
        for key, value in before[name].items():
            np.testing.assert_array_equal(restored[key], value, err_msg=f"{name} {key}")
    for restored, value in zip(tree_slot(engine.opt_state, slot), opt_before, strict=True):
        np.testing.assert_array_equal(restored, value)
    assert engine.steps[oldest] == 1
    assert len(engine.slots.configs) == MAX_ADAPTERS


def test_snapshot_is_unaffected_by_later_training(engine: Engine) -> None:
    config = LoraConfig(rank=4, seed=5)
    slot = engine.create_adapter(config)
    _train(engine, slot, steps=1)
    before, lp_before = slot_arrays(engine.lora, slot), _logprobs(engine, slot)

    snap = engine.snapshot_adapter(slot)
    assert snap not in (0, slot) and engine.adapter_config(snap) == config
    np.testing.assert_array_equal(engine.slots.scales[snap], engine.slots.scales[slot])
    _train(engine, slot, steps=2)

    after = slot_arrays(engine.lora, snap)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    np.testing.assert_allclose(_logprobs(engine, snap), lp_before, rtol=0, atol=1e-5)
    assert np.abs(_logprobs(engine, slot) - lp_before).max() > 1e-3  # the source did move
    params = SamplingParams(max_tokens=4, temperature=0.0)
    sample = engine.sample(snap, SEQ[:5].astype(np.int32), 1, params, prompt_logprobs=False, topk_prompt_logprobs=0)
    assert len(sample.sequences[0].tokens) == 4


def test_request_validation(engine: Engine) -> None:
    vocab = engine.vocab_size
    ok = next_token_datum(SEQ)
    assert engine.check_forward_backward([ok], "cross_entropy", {}) == {}
    bad_data = {  # error message pattern -> data
        "at least one datum": [],
        "model_input has token id": [next_token_datum([1, vocab, 2])],
        "context limit": [next_token_datum(np.arange(CONTEXT + 2) % 100)],
        r"target_tokens'\] has token id": [
            Datum(ok.tokens, {"target_tokens": np.concatenate([ok.loss_inputs["target_tokens"][:-1], [vocab]])})
        ],
    }
    for pattern, data in bad_data.items():
        with pytest.raises(InputError, match=pattern):
            engine.check_forward_backward(data, "cross_entropy", {})
    with pytest.raises(InputError, match="loss_fn"):
        engine.check_forward_backward([ok], "no_such_loss", {})

    prompt = np.arange(5, dtype=np.int32)
    engine.check_sample(prompt, 2, SamplingParams(max_tokens=8))
    bad_params = [
        (prompt, 0, SamplingParams(max_tokens=8)),
        (prompt, 2, SamplingParams(max_tokens=0)),
        (prompt, 2, SamplingParams(max_tokens=CONTEXT)),
        (prompt, 2, SamplingParams(max_tokens=8, temperature=-1.0)),
        (prompt, 2, SamplingParams(max_tokens=8, temperature=float("nan"))),
        (prompt, 2, SamplingParams(max_tokens=8, top_p=0.0)),
        (prompt, 2, SamplingParams(max_tokens=8, top_k=0)),
        (prompt, 2, SamplingParams(max_tokens=8, top_k=vocab + 1)),
        (prompt, 2, SamplingParams(max_tokens=8, top_k=10**12)),
        (prompt, 2, SamplingParams(max_tokens=8, temperature=1e39)),
        (prompt, 2, SamplingParams(max_tokens=8, seed=1 << 64)),
        (prompt, 2, SamplingParams(max_tokens=8, stop_strings=("",))),
        (prompt, 2, SamplingParams(max_tokens=8, stop_strings=("x",) * 33)),
        (prompt, 2, SamplingParams(max_tokens=8, stop_token_ids=(vocab,))),
        (np.array([], np.int32), 1, SamplingParams(max_tokens=8)),
        (np.array([-1], np.int32), 1, SamplingParams(max_tokens=8)),
    ]
    for args in bad_params:
        with pytest.raises(InputError):
            engine.check_sample(*args)
