"""LoRA gradients of the jitted train step against PyTorch autograd, multi-adapter batches, and compile reuse.

The reference is PEFT on the transformers model with the same A/B values as one of our slots
(every attention and MLP projection plus lm_head, alpha 32), the loss the weighted
cross-entropy sum over unpadded sequences, and gradients taken by torch autograd. The logits are
computed in chunks of positions; tests with small chunks hold them to the unchunked formula.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from engine_testing import (
    MAX_ADAPTERS,
    MAX_RANK,
    assert_close_rel,
    count_compiles,
    next_token_datum,
    peft_model,
    peft_param_name,
    random_lora,
    random_sequences,
    set_slot,
    slot_arrays,
    torch_logprobs,
)
from flax import nnx

from tuft_jax.adapters import leaf_group
from tuft_jax.batching import build_train_batch
from tuft_jax.layers import AdapterBatch
from tuft_jax.losses import token_loss
from tuft_jax.models.decoder import CausalLM, DecoderConfig, LoraShape
from tuft_jax.models.hf_config import load_decoder_config
from tuft_jax.train_step import BatchArrays, forward_backward
from tuft_jax.types import AdamParams, Datum, LoraConfig

RANK = 4


def _weighted_data(lengths: tuple[int, ...], seed: int):
    rng = np.random.default_rng(seed)
    sequences = random_sequences([n + 1 for n in lengths], seed=seed)
    weights = [rng.uniform(0.0, 2.0, n) * (rng.random(n) > 0.2) for n in lengths]
    return sequences, weights, [next_token_datum(s, w) for s, w in zip(sequences, weights, strict=True)]


@pytest.mark.parametrize(("family", "tie"), [("qwen3", False), ("llama3", True)], ids=["qwen3-untied", "llama3-tied"])
def test_lora_gradients_match_peft_autograd(make_engine, tiny_checkpoint, family: str, tie: bool) -> None:
    engine = make_engine(family, tie, seed=2)
    slot = engine.create_adapter(LoraConfig(rank=RANK, seed=0))
    arrays = random_lora(engine, RANK, seed=3)
    set_slot(engine, slot, arrays)
    sequences, weights, data = _weighted_data((13, 7, 16), seed=4)
    (result,) = engine.forward_backward([(slot, data)], "cross_entropy", {}, False)
    grads = slot_arrays(engine.grads, slot)

    model = peft_model(tiny_checkpoint(family, tie, seed=2), arrays, RANK)
    loss = torch.zeros(())
    for seq, w, output in zip(sequences, weights, result.outputs, strict=True):
        lp = torch_logprobs(model, seq[:-1], seq[1:])
        np.testing.assert_allclose(output["logprobs"], lp.detach().numpy(), rtol=0, atol=1e-4)
        loss = loss - (lp * torch.from_numpy(w.astype(np.float32))).sum()
    loss.backward()
    assert result.metrics["loss:sum"] == pytest.approx(loss.item(), rel=1e-5)

    params = dict(model.named_parameters())
    n_layers = engine.config.num_layers
    assert len(grads) == 2 * (7 * n_layers + 1) and "lm_head.lora.lora_a" in grads
    for key, grad in grads.items():
        reference = params[peft_param_name(key)].grad.numpy().T
        is_a = key.endswith("lora_a")
        ours, padding = (grad[:, :RANK], grad[:, RANK:]) if is_a else (grad[:RANK], grad[RANK:])
        assert_close_rel(ours, reference, 1e-4, key)
        assert not np.any(padding), f"{key}: gradient in the padded rank columns"
    # Only this slot received gradient: the bare-model slot 0 and free slots stay exactly zero.
    for other in (0, slot + 1):
        assert not any(np.any(g) for g in slot_arrays(engine.grads, other).values())


def test_gradients_accumulate_until_optim_step(engine) -> None:
    slot = engine.create_adapter(LoraConfig(rank=RANK, seed=0))
    set_slot(engine, slot, random_lora(engine, RANK, seed=5))
    _, _, data = _weighted_data((9,), seed=6)
    engine.forward_backward([(slot, data)], "cross_entropy", {}, False)
    once = slot_arrays(engine.grads, slot)
    engine.forward_backward([(slot, data)], "cross_entropy", {}, False)
    twice = slot_arrays(engine.grads, slot)
    for key in once:
        np.testing.assert_array_equal(twice[key], 2 * once[key])
    # forward_only computes the same logprobs and leaves the accumulator alone.
    (fwd,) = engine.forward_backward([(slot, data)], "cross_entropy", {}, True)
    assert all(np.array_equal(twice[k], v) for k, v in slot_arrays(engine.grads, slot).items())
    engine.optim_step(slot, AdamParams(learning_rate=1e-3))
    assert not any(np.any(g) for g in slot_arrays(engine.grads, slot).values())
    assert fwd.outputs[0]["logprobs"].shape == (9,)


def test_untrained_groups_get_no_gradient_and_do_not_move(engine) -> None:
    slot = engine.create_adapter(LoraConfig(rank=RANK, seed=0, train_attn=False, train_unembed=False))
    initial = slot_arrays(engine.lora, slot)
    for key, value in initial.items():
        trained = leaf_group(tuple(key.split("."))) == "mlp"
        assert np.any(value) == (trained and key.endswith("lora_a")), key
    _, _, data = _weighted_data((11,), seed=8)
    engine.forward_backward([(slot, data)], "cross_entropy", {}, False)
    for key, grad in slot_arrays(engine.grads, slot).items():
        # B = 0 at init, so only B gets gradient on the first step, and only in the trained group.
        assert np.any(grad) == (leaf_group(tuple(key.split("."))) == "mlp" and key.endswith("lora_b")), key
    engine.optim_step(slot, AdamParams(learning_rate=1e-2, weight_decay=0.1))
    for key, value in slot_arrays(engine.lora, slot).items():
        if leaf_group(tuple(key.split("."))) != "mlp":
            assert not np.any(value), key


def test_mixed_adapter_batch_equals_separate_batches(engine) -> None:
    """Examples of 3 adapters (ranks 2, 4, 8) in one padded batch give the same logprobs and
    per-slot gradients as each example run alone."""
    slots = [engine.create_adapter(LoraConfig(rank=r, seed=r)) for r in (2, 4, 8)]
    for i, (slot, rank) in enumerate(zip(slots, (2, 4, 8), strict=True)):
        set_slot(engine, slot, random_lora(engine, rank, seed=20 + i))
    _, _, data = _weighted_data((12, 5, 15, 9), seed=9)
    owners = [slots[0], slots[1], slots[0], slots[2]]  # interleaved; slot[0] twice
    mixed = engine.forward_backward([(s, [d]) for s, d in zip(owners, data, strict=True)], "cross_entropy", {}, False)
    mixed_grads = {s: slot_arrays(engine.grads, s) for s in range(engine.slots.num_slots)}

    for s in slots:
        engine.optim_step(s, AdamParams(learning_rate=0.0))  # zero the accumulators; lr 0 keeps weights
    assert not any(np.any(g) for s in slots for g in slot_arrays(engine.grads, s).values())
    alone = [engine.forward_backward([(s, [d])], "cross_entropy", {}, False)[0] for s, d in zip(owners, data, strict=True)]

    for m, a in zip(mixed, alone, strict=True):
        np.testing.assert_allclose(m.outputs[0]["logprobs"], a.outputs[0]["logprobs"], rtol=0, atol=1e-5)
        assert m.metrics["loss:sum"] == pytest.approx(a.metrics["loss:sum"], rel=1e-5)
    for s in range(engine.slots.num_slots):
        separate = slot_arrays(engine.grads, s)
        for key, grad in mixed_grads[s].items():
            if s in slots:
                assert_close_rel(grad, separate[key], 1e-5, f"slot {s} {key}")
            else:  # slot 0 (the padding row's) and the free slot get nothing
                assert not np.any(grad) and not np.any(separate[key]), f"slot {s} {key}"
    # The adapters really differ, so equality above is not trivially shared weights.
    lps = [engine.forward_backward([(s, [data[0]])], "cross_entropy", {}, True)[0].outputs[0]["logprobs"] for s in slots]
    assert min(np.abs(lps[i] - lps[j]).max() for i in range(3) for j in range(i)) > 1e-2


def test_new_adapter_and_same_bucket_length_do_not_recompile(engine) -> None:
    first = engine.create_adapter(LoraConfig(rank=RANK, seed=0))
    (short,) = random_sequences([6], seed=10)
    engine.forward_backward([(first, [next_token_datum(short)])], "cross_entropy", {}, False)
    engine.optim_step(first, AdamParams())
    engine.forward_backward([(first, [next_token_datum(short)])], "cross_entropy", {}, False)
    engine.release_adapter(engine.create_adapter(LoraConfig(rank=RANK, seed=3)))  # compiles clear_slot once

    with count_compiles() as compiled:
        second = engine.create_adapter(LoraConfig(rank=2, seed=1, train_unembed=False))
        (longer,) = random_sequences([13], seed=11)  # 12 input tokens: the same 16-token bucket as 5
        engine.forward_backward([(second, [next_token_datum(longer)])], "cross_entropy", {}, False)
        engine.forward_backward([(first, [next_token_datum(longer[:9])])], "cross_entropy", {}, False)
        engine.optim_step(second, AdamParams(learning_rate=3e-2, weight_decay=0.5, grad_clip_norm=1.0))
        engine.release_adapter(second)
        engine.create_adapter(LoraConfig(rank=8, seed=2))
    assert compiled == [], compiled
    # (jit's `_cache_size()` is not a compile count: its C++ dispatch cache also keys on whether an
    # argument is committed to a device, so it can grow by an entry that reuses the same executable.)

    with count_compiles() as compiled:  # the counter does see compiles
        jax.jit(lambda x: x * 3 + 1)(np.zeros(3, np.float32))
    assert "jaxpr_trace_duration: <lambda>" in compiled  # (the XLA compile may come from a persistent cache)


def _unchunked_loss(
    lora: nnx.State, graphdef: nnx.GraphDef, base: nnx.State, batch: BatchArrays, config: Mapping, loss_fn: str
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """The reference: all [B, T, V] logits at once, then logsumexp and the target gather."""
    model = nnx.merge(graphdef, base, lora)
    adapters = AdapterBatch(batch.slots, batch.scales)
    hidden, _ = model(batch.tokens, batch.positions, adapters)
    logits = model.logits(hidden, adapters)
    lp = jnp.take_along_axis(logits, batch.targets, axis=-1) - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    per_row = token_loss(loss_fn, lp, batch.inputs, batch.mask, config).sum(axis=(1, 2))
    return per_row.sum(), (lp, per_row)


def _mixed_batch(engine, loss_fn: str, seed: int) -> BatchArrays:
    """4 rows of 3 adapters (ranks 2, 4, 8), lengths 9..48 (T = 48); cross-entropy gets (N, 2) targets."""
    slots = [engine.create_adapter(LoraConfig(rank=r, seed=r)) for r in (2, 4, 8)]
    for i, (slot, rank) in enumerate(zip(slots, (2, 4, 8), strict=True)):
        set_slot(engine, slot, random_lora(engine, rank, seed=seed + i))
    rng = np.random.default_rng(seed)
    rows = []
    for slot, n in zip([slots[0], slots[1], slots[0], slots[2]], (48, 31, 40, 9), strict=True):
        shape = (n, 2) if loss_fn == "cross_entropy" else (n,)
        weights = rng.uniform(0.0, 2.0, shape).astype(np.float32)
        inputs = {"target_tokens": rng.integers(0, 460, shape), "weights": weights}
        if loss_fn == "ppo":  # the learner's logprobs average about -7: ratios fall on both sides of the clip
            inputs["logprobs"] = (-7.0 + rng.normal(scale=0.5, size=shape)).astype(np.float32)
            inputs["advantages"] = rng.normal(size=shape).astype(np.float32)
        rows.append((slot, Datum(rng.integers(0, 460, n).astype(np.int32), inputs)))
    tb = build_train_batch(rows, {key: 1.0 for key in rows[0][1].loss_inputs if key != "target_tokens"})
    return BatchArrays(tb.tokens, tb.positions, tb.slots, engine.slots.scales[tb.slots], tb.targets, tb.mask, tb.inputs)


@pytest.mark.parametrize(
    ("loss_fn", "positions"),
    [("cross_entropy", 64), ("cross_entropy", 48), ("cross_entropy", 16), ("cross_entropy", 10), ("ppo", 16)],
    ids=["ce-T<C", "ce-T=C", "ce-T=3C", "ce-T=4.8C", "ppo-T=3C"],
)
def test_chunked_logprobs_loss_and_grads_equal_unchunked(engine, loss_fn: str, positions: int) -> None:
    """Chunks of C = `positions` positions (B = 4 rows, T = 48; C = 10 splits T into 5 chunks of
    10, padded by 2) give the unchunked logprobs, per-row losses and per-slot LoRA gradients."""
    batch = _mixed_batch(engine, loss_fn, seed=40)
    clip = {"clip_low_threshold": jnp.float32(0.8), "clip_high_threshold": jnp.float32(1.2)}
    config = clip if loss_fn == "ppo" else {}
    grads, lp, per_token = forward_backward(
        engine.graphdef, engine.base, engine.lora, batch, config, loss_fn, chunk_tokens=4 * positions
    )
    reference = jax.jit(jax.value_and_grad(_unchunked_loss, has_aux=True), static_argnums=(1, 5))
    (_, (ref_lp, ref_per_row)), ref_grads = reference(engine.lora, engine.graphdef, engine.base, batch, config, loss_fn)

    np.testing.assert_allclose(lp, ref_lp, rtol=0, atol=1e-5)
    np.testing.assert_allclose(per_token.sum(axis=1), ref_per_row, rtol=1e-5, atol=1e-5)
    used = set(batch.slots.tolist())
    for slot in range(engine.slots.num_slots):
        ref = slot_arrays(ref_grads, slot)
        for key, grad in slot_arrays(grads, slot).items():
            if slot in used:
                assert_close_rel(grad, ref[key], 1e-5, f"slot {slot} {key}")
            else:  # the padding row's slot 0 and the free slot
                assert not np.any(grad) and not np.any(ref[key]), f"slot {slot} {key}"


def _step_temp_bytes(config: DecoderConfig, rows: int, length: int, chunk_tokens: int) -> int:
    """Temp bytes of forward_backward compiled ahead of time from abstract shapes (nothing allocated)."""
    model = nnx.eval_shape(lambda: CausalLM(config, LoraShape(MAX_ADAPTERS + 1, MAX_RANK)))
    graphdef, lora, base = nnx.split(model, nnx.LoRAParam, nnx.Param)

    def spec(shape: tuple[int, ...], dtype: jnp.dtype) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype)

    tokens, targets = spec((rows, length), jnp.int32), spec((rows, length, 1), jnp.int32)
    scales, mask = spec((rows, 3), jnp.float32), spec((rows, length, 1), jnp.bool_)
    batch = BatchArrays(tokens, tokens, spec((rows,), jnp.int32), scales, targets, mask, {})
    compiled = forward_backward.lower(graphdef, base, lora, batch, {}, "cross_entropy", chunk_tokens).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_train_step_never_holds_the_full_logits(tiny_checkpoint) -> None:
    """The tiny model with V = 32768 at B = 1, T = 2048: with 64-token chunks the temporaries that
    grow with the vocabulary (temp bytes less those of the same program at V = 128) stay well under
    one fp32 [B, T, V] logits array; as one chunk (unchunked) they exceed it many times over.

    They are about 12 chunks' logits on XLA:CPU, which expands the unembed LoRA's `ragged_dot`
    into one dense product per slot, hence chunks this small here."""
    rows, length, vocab = 1, 2048, 32768
    config = load_decoder_config(tiny_checkpoint())
    logits_bytes = rows * length * vocab * 4

    def vocab_temp_bytes(chunk_tokens: int) -> int:
        big, small = (_step_temp_bytes(replace(config, vocab_size=v), rows, length, chunk_tokens) for v in (vocab, 128))
        return big - small

    assert vocab_temp_bytes(64) < logits_bytes / 2
    assert vocab_temp_bytes(rows * length) > 2 * logits_bytes
