"""engine.optim_step is torch.optim.AdamW (decoupled weight decay) after clip_grad_norm_, per slot.

The same accumulated gradients are fed to both sides each step, so the comparison measures the
optimizer alone: weights, first and second moments, the step count and the reported pre-clip
gradient norm, over 3 steps with weight decay, a non-negligible eps and active clipping.
"""

from __future__ import annotations

import numpy as np
import optax
import pytest
import torch
from engine_testing import assert_close_rel, next_token_datum, random_lora, random_sequences, set_slot, slot_arrays, tree_slot

from tuft_jax.types import AdamParams, LoraConfig

RANK = 4


def _moments(engine, slot: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    mu = optax.tree_utils.tree_get(engine.opt_state, "mu")
    nu = optax.tree_utils.tree_get(engine.opt_state, "nu")
    count = optax.tree_utils.tree_get(engine.opt_state, "count")
    return slot_arrays(mu, slot), slot_arrays(nu, slot), int(count[slot])


def test_optim_step_matches_torch_adamw(engine) -> None:
    slot = engine.create_adapter(LoraConfig(rank=RANK, seed=1))
    set_slot(engine, slot, random_lora(engine, RANK, seed=7))  # B != 0, so A gets gradient from step 1
    other = engine.create_adapter(LoraConfig(rank=8, seed=2))
    set_slot(engine, other, random_lora(engine, 8, seed=3))
    sequences = random_sequences([12, 15], seed=4)
    # The other adapter has accumulated, not yet applied, gradients and its own optimizer history.
    engine.forward_backward([(other, [next_token_datum(sequences[1])])], "cross_entropy", {}, False)
    engine.optim_step(other, AdamParams(learning_rate=1e-2))
    engine.forward_backward([(other, [next_token_datum(sequences[1])])], "cross_entropy", {}, False)
    other_before = (slot_arrays(engine.lora, other), slot_arrays(engine.grads, other), tree_slot(engine.opt_state, other))
    base_before = (slot_arrays(engine.lora, 0), tree_slot(engine.opt_state, 0))

    keys = sorted(slot_arrays(engine.lora, slot))
    start = slot_arrays(engine.lora, slot)
    params = [torch.tensor(start[k], requires_grad=True) for k in keys]
    hyper = dict(learning_rate=2e-2, beta1=0.8, beta2=0.9, eps=1e-4, weight_decay=0.3)
    reference = torch.optim.AdamW(
        params, lr=hyper["learning_rate"], betas=(hyper["beta1"], hyper["beta2"]), eps=hyper["eps"], weight_decay=hyper["weight_decay"]
    )
    clip, clipped = None, []
    for step in range(1, 4):
        engine.forward_backward([(slot, [next_token_datum(sequences[0])])], "cross_entropy", {}, False)
        grads = slot_arrays(engine.grads, slot)
        for p, k in zip(params, keys, strict=True):
            p.grad = torch.tensor(grads[k])
        if clip is None:  # clip at 60% of the first step's norm, so clipping is active at least then
            clip = 0.6 * float(np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values())))
        norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        clipped.append(norm > clip)
        reference.step()

        metrics = engine.optim_step(slot, AdamParams(**hyper, grad_clip_norm=clip))

        assert metrics["grad_norm:mean"] == pytest.approx(norm, rel=1e-5)
        ours = slot_arrays(engine.lora, slot)
        mu, nu, count = _moments(engine, slot)
        assert count == step and engine.steps[slot] == step
        for p, k in zip(params, keys, strict=True):
            state = reference.state[p]
            # Per tensor, max |ours - torch| <= 1e-5 x max |torch| (moments cancel elementwise).
            assert_close_rel(ours[k], p.detach().numpy(), 1e-5, f"step {step} {k}")
            assert_close_rel(mu[k], state["exp_avg"].numpy(), 1e-5, f"step {step} mu {k}")
            assert_close_rel(nu[k], state["exp_avg_sq"].numpy(), 1e-5, f"step {step} nu {k}")
        assert not any(np.any(g) for g in slot_arrays(engine.grads, slot).values()), "accumulator not reset"

    assert clipped[0], clipped
    # The weights really moved (weight decay and updates), in every trained tensor.
    final = slot_arrays(engine.lora, slot)
    assert all(np.abs(final[k] - start[k]).max() > 1e-3 for k in keys)
    # rank 4 < max rank 8: the padded columns of A, rows of B and their moments stay exactly zero.
    mu, nu, _ = _moments(engine, slot)
    for k in keys:
        for tree in (final, mu, nu):
            padding = tree[k][:, RANK:] if k.endswith("lora_a") else tree[k][RANK:]
            assert not np.any(padding), k
    # Other slots: weights, pending gradients and optimizer state untouched, bit for bit.
    other_after = (slot_arrays(engine.lora, other), slot_arrays(engine.grads, other), tree_slot(engine.opt_state, other))
    for before, after in zip(other_before[:2], other_after[:2], strict=True):
        assert all(np.array_equal(before[k], after[k]) for k in before)
    assert all(np.array_equal(b, a) for b, a in zip(other_before[2], other_after[2], strict=True))
    assert all(np.array_equal(base_before[0][k], v) for k, v in slot_arrays(engine.lora, 0).items())
    assert all(np.array_equal(b, a) for b, a in zip(base_before[1], tree_slot(engine.opt_state, 0), strict=True))


def test_clip_threshold_above_the_norm_or_zero_leaves_gradients_alone(engine) -> None:
    """grad_clip_norm = 0 (off) and a threshold above the norm give the same step; a threshold
    below the norm gives a different one (with eps = 1e-3 Adam is not scale-invariant)."""
    slots = [engine.create_adapter(LoraConfig(rank=RANK, seed=5)) for _ in range(3)]
    (seq,) = random_sequences([10], seed=6)
    for s in slots:
        engine.forward_backward([(s, [next_token_datum(seq)])], "cross_entropy", {}, False)
    norms = [
        engine.optim_step(s, AdamParams(learning_rate=1e-2, eps=1e-3, grad_clip_norm=clip))["grad_norm:mean"]
        for s, clip in zip(slots, (0.0, 1e6, 1e-2), strict=True)
    ]
    assert norms[0] == pytest.approx(norms[1], rel=1e-6) and norms[0] == pytest.approx(norms[2], rel=1e-6)
    assert norms[0] > 1e-2
    off, above, below = (slot_arrays(engine.lora, s) for s in slots)
    for k in off:
        assert_close_rel(above[k], off[k], 1e-4, k)  # not bitwise: each slot's gradient is summed in its own group
    assert max(np.abs(below[k] - off[k]).max() for k in off) > 1e-4
