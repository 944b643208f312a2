"""Building blocks shared by the model families: norms, RoPE, the KV cache and multi-slot LoRA
(attention kernels are in `tuft_jax.attention`).

LoRA weights carry a leading slot axis so one compiled graph serves any mix of adapters: each
example names its slot, and the per-example scale (alpha / rank, or 0 for an untrained target)
comes in with the batch. Base weights may be held as bf16 bits (`tuft_jax.stored_dtype`):
every reader takes them through `from_stored`.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from tuft_jax.stored_dtype import from_stored


LORA_GROUPS = ("attn", "mlp", "unembed")


LoraForm = Literal["single", "per_row", "every_slot", "grouped"]
"""How a batch's LoRA deltas are computed (a static choice, one compiled variant each):

- `single`: every row with a nonzero scale uses one slot: plain matmuls on that slot's A and B;
- `per_row`: each row gathers its own A and B (BGMV): cost O(rows x in x rank) beyond the
  matmuls, the form for decode steps and for mixed batches where no grouped matmul exists;
- `every_slot`: every token through every slot's A at once, keeping only its own slot's rank
  block, then one product with every slot's B over the joint [slots x rank] axis: reads each
  slot's weights once however many rows there are, the form for decode steps with more rows
  than slots (a per-row gather would copy rows x the weights);
- `grouped`: tokens sorted by slot through `ragged_dot` (a grouped GEMM on accelerators;
  XLA:CPU expands it into one dense product per slot).
"""


class AdapterBatch(NamedTuple):
    """Which adapter slot each example uses, its LoRA scale per target group ([B, 3]), and the
    `form` (a Python string) the deltas are computed in."""

    slots: jax.Array
    scales: jax.Array
    form: LoraForm = "grouped"

    def scale(self, group: str) -> jax.Array:
        return self.scales[:, LORA_GROUPS.index(group)]


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype: jnp.dtype) -> None:
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * from_stored(self.weight[...]).astype(jnp.float32)).astype(x.dtype)


def _token_groups(adapters: AdapterBatch, tokens: int, num_slots: int) -> tuple[jax.Array, jax.Array]:
    """The `grouped` form's token order (sorted by slot) and tokens per slot."""
    token_slots = jnp.repeat(adapters.slots, tokens)
    return jnp.argsort(token_slots, stable=True), jnp.bincount(token_slots, length=num_slots).astype(jnp.int32)


def _slot_matmul(x: jax.Array, w: jax.Array, adapters: AdapterBatch) -> jax.Array:
    """x [B, T, p] times each row's slot of w [slots, p, q] in the `single`, `per_row` or
    `grouped` form: [B, T, q]."""
    if adapters.form == "single":
        return x @ jax.lax.dynamic_index_in_dim(w, jnp.max(adapters.slots), keepdims=False)
    if adapters.form == "per_row":
        return jnp.einsum("btp,bpq->btq", x, w[adapters.slots])
    b, t, p = x.shape
    order, sizes = _token_groups(adapters, t, w.shape[0])
    out = jax.lax.ragged_dot(x.reshape(b * t, p)[order], w, sizes)
    return jnp.zeros_like(out).at[order].set(out).reshape(b, t, -1)


def _own_slot(adapters: AdapterBatch, num_slots: int, dtype: jnp.dtype) -> jax.Array:
    """[B, slots]: one-hot of each row's slot."""
    return (jnp.arange(num_slots) == adapters.slots[:, None]).astype(dtype)


def per_slot_in(x: jax.Array, a: jax.Array, adapters: AdapterBatch) -> jax.Array:
    """x [B, T, in] times each row's slot of `a` [slots, in, r]: [B, T, r], in the batch's form."""
    a = a.astype(x.dtype)
    if adapters.form == "every_slot":
        return jnp.einsum("btsr,bs->btr", jnp.einsum("btd,sdr->btsr", x, a), _own_slot(adapters, a.shape[0], x.dtype))
    return _slot_matmul(x, a, adapters)


def per_slot_out(low: jax.Array, b: jax.Array, adapters: AdapterBatch) -> jax.Array:
    """low [B, T, r] times each row's slot of `b` [slots, r, out]: [B, T, out]. `every_slot`
    places each row's low in its own slot's block of the joint [slots x r] axis and meets all of
    `b` in one matmul, so each slot's weights are read once however many rows there are."""
    b = b.astype(low.dtype)
    if adapters.form == "every_slot":
        own = _own_slot(adapters, b.shape[0], low.dtype)
        return jnp.einsum("btsr,sro->bto", low[:, :, None, :] * own[:, None, :, None], b)
    return _slot_matmul(low, b, adapters)


class LoraDelta(nnx.Module):
    """The low-rank update (x @ A[slot]) @ B[slot] * scale for a batch mixing adapter slots,
    in the batch's `LoraForm`; no form makes a per-slot copy of the activations."""

    def __init__(self, in_features: int, out_features: int, *, slots: int, rank: int, group: str) -> None:
        self.lora_a = nnx.LoRAParam(jnp.zeros((slots, in_features, rank), jnp.float32))
        self.lora_b = nnx.LoRAParam(jnp.zeros((slots, rank, out_features), jnp.float32))
        self.group = group

    def __call__(self, x: jax.Array, adapters: AdapterBatch) -> jax.Array:
        # Rows of other slots (padding, the bare base model) have scale 0.
        scale = adapters.scale(self.group).astype(x.dtype)[:, None, None]
        return per_slot_out(per_slot_in(x, self.lora_a[...], adapters) * scale, self.lora_b[...], adapters)


class LoraLinear(nnx.Module):
    """A frozen base projection (kernel stored [in, out], optional bias) plus a multi-slot LoRA delta."""

    def __init__(
        self, in_features: int, out_features: int, *, slots: int, rank: int, group: str, dtype: jnp.dtype, bias: bool = False
    ) -> None:
        self.weight = nnx.Param(jnp.zeros((in_features, out_features), dtype))
        if bias:
            self.bias = nnx.Param(jnp.zeros((out_features,), dtype))
        self.lora = LoraDelta(in_features, out_features, slots=slots, rank=rank, group=group)
        self.has_bias = bias

    def __call__(self, x: jax.Array, adapters: AdapterBatch) -> jax.Array:
        y = x @ from_stored(self.weight[...])
        if self.has_bias:
            y = y + from_stored(self.bias[...]).astype(y.dtype)
        return y + self.lora(x, adapters)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array, scale: float = 1.0) -> jax.Array:
    """HF-style rotate-half RoPE; x is [B, T, heads, head_dim], positions [B, T]; cos and sin
    are multiplied by `scale` (YaRN's attention factor)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    cos = jnp.concatenate([jnp.cos(angles) * scale] * 2, axis=-1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles) * scale] * 2, axis=-1)[:, :, None, :]
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)
