"""Every LoRA form computes the same delta: one slot by plain matmuls, per-row gathers, every
slot at once, and the grouped (ragged_dot) segment matmul, in value and in gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tuft_jax.layers import AdapterBatch, LoraDelta

SLOTS, IN, OUT, RANK, B, T = 5, 12, 10, 4, 4, 6


def delta_and_grads(form: str, slots: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    layer = LoraDelta(IN, OUT, slots=SLOTS, rank=RANK, group="mlp")
    rng = np.random.default_rng(0)
    layer.lora_a[...] = jnp.asarray(rng.standard_normal((SLOTS, IN, RANK)), jnp.float32)
    layer.lora_b[...] = jnp.asarray(rng.standard_normal((SLOTS, RANK, OUT)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((B, T, IN)), jnp.float32)
    graphdef, state = nnx.split(layer)
    adapters = AdapterBatch(jnp.asarray(slots, jnp.int32), jnp.asarray(scales, jnp.float32), form=form)

    def loss(state: nnx.State) -> jax.Array:
        out = nnx.merge(graphdef, state)(x, adapters)
        return jnp.sum(out * jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape) / out.size), out

    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(state)
    return np.asarray(out), [np.asarray(g) for g in jax.tree.leaves(grads)]


def scales_for(slots: np.ndarray) -> np.ndarray:
    scales = np.stack([np.full(B, 1.0), 0.5 + slots.astype(np.float32), np.full(B, 2.0)], axis=1)
    scales[slots == 0] = 0.0  # slot 0 is the bare base model
    return scales


@pytest.mark.parametrize("form", ["per_row", "every_slot", "grouped"])
def test_mixed_batch_forms_agree(form: str) -> None:
    slots = np.array([3, 1, 3, 0])
    want, want_grads = delta_and_grads("grouped", slots, scales_for(slots))
    got, got_grads = delta_and_grads(form, slots, scales_for(slots))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_single_slot_form_equals_the_grouped_form_with_padding_rows() -> None:
    slots = np.array([2, 2, 2, 0])  # a padding row of slot 0 (scale 0)
    want, want_grads = delta_and_grads("grouped", slots, scales_for(slots))
    got, got_grads = delta_and_grads("single", slots, scales_for(slots))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    assert not np.any(got[3])
