"""Per-adapter AdamW over slot-stacked LoRA tensors.

Every optimizer leaf carries the slot axis; a step gathers one slot, runs optax's AdamW with
that request's hyperparameters (traced, so any learning rate reuses the compiled step), and
scatters back. Other adapters' weights, moments and accumulated gradients are untouched.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def _adamw(lr: jax.Array, b1: jax.Array, b2: jax.Array, eps: jax.Array, wd: jax.Array) -> optax.GradientTransformation:
    return optax.adamw(learning_rate=lr, b1=b1, b2=b2, eps=eps, weight_decay=wd)


def init_optimizer_state(lora: nnx.State) -> optax.OptState:
    """AdamW state for every slot at once (count has shape [slots])."""
    template = _adamw(1e-4, 0.9, 0.95, 1e-12, 0.0)
    return jax.vmap(template.init)(lora)


def _take(tree, slot: jax.Array):
    return jax.tree.map(lambda x: x[slot], tree)


def _put(tree, slot: jax.Array, values):
    return jax.tree.map(lambda x, v: x.at[slot].set(v), tree, values)


@jax.jit(donate_argnames=("lora", "opt_state", "grads"))
def adamw_step(
    lora: nnx.State, opt_state: optax.OptState, grads: nnx.State, slot: jax.Array, hyper: jax.Array
) -> tuple[nnx.State, optax.OptState, nnx.State, jax.Array]:
    """One step for `slot`; hyper = [lr, beta1, beta2, eps, weight_decay, grad_clip_norm].

    Returns the new LoRA weights, optimizer state, gradients with the slot's accumulator
    zeroed, and the pre-clip gradient norm.
    """
    lr, b1, b2, eps, wd, clip = (hyper[i] for i in range(6))
    g = _take(grads, slot)
    norm = optax.global_norm(g)
    factor = jnp.where((clip > 0) & (norm > clip), clip / jnp.maximum(norm, 1e-30), 1.0)
    g = jax.tree.map(lambda x: x * factor, g)
    params = _take(lora, slot)
    updates, new_state = _adamw(lr, b1, b2, eps, wd).update(g, _take(opt_state, slot), params)
    lora = _put(lora, slot, optax.apply_updates(params, updates))
    opt_state = _put(opt_state, slot, new_state)
    grads = jax.tree.map(lambda x: x.at[slot].set(0.0), grads)
    return lora, opt_state, grads, norm
