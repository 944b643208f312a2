"""The jitted forward / forward-backward passes over a padded multi-adapter batch.

Gradients are taken with respect to the slot-stacked LoRA state only, so examples of several
adapters in one batch each land in their own slot, and are summed into a donated accumulator
until that adapter's optim_step. The heavy pass donates nothing, so when it fails (out of
memory, say) every slot's weights and pending gradients are as they were; only the cheap
`accumulate` that follows donates the accumulator. A `single`-form pass (one adapter) reads and
differentiates a one-slot view of the LoRA state, so its gradients are one slot's, not all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from tuft_jax.chunking import CHUNK_TOKENS, map_chunks
from tuft_jax.layers import AdapterBatch, LoraForm
from tuft_jax.losses import token_loss


@dataclass(frozen=True)
class BatchArrays:
    """Device arrays of a TrainBatch plus the per-row LoRA scales; `segments` ([B, T], one id
    per datum of a packed row) keeps packed datums from attending to each other."""

    tokens: jax.Array
    positions: jax.Array
    slots: jax.Array
    scales: jax.Array
    targets: jax.Array
    mask: jax.Array
    inputs: Mapping[str, jax.Array]
    segments: jax.Array | None = None


jax.tree_util.register_dataclass(
    BatchArrays,
    data_fields=["tokens", "positions", "slots", "scales", "targets", "mask", "inputs", "segments"],
    meta_fields=[],
)


def single_slot_view(lora: nnx.State, batch: BatchArrays) -> tuple[nnx.State, BatchArrays]:
    """The LoRA state of the batch's one adapter slot as a one-slot state, and the batch pointing
    at it (rows of other slots have scale 0, so which slot they name does not matter)."""
    slot = jnp.max(batch.slots)
    view = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, slot, 0, keepdims=True), lora)
    return view, replace(batch, slots=jnp.zeros_like(batch.slots))


def target_logprobs(
    graphdef: nnx.GraphDef,
    base: nnx.State,
    lora: nnx.State,
    batch: BatchArrays,
    chunk_tokens: int = CHUNK_TOKENS,
    lora_form: LoraForm = "grouped",
    remat: bool = False,
    mesh: Mesh | None = None,
) -> jax.Array:
    """log p(target) for every [B, T, K] target, in fp32, from logits computed chunk by chunk
    (`map_chunks`): the losses read only these, so the [B, T, V] logits are never held whole."""
    model = nnx.merge(graphdef, base, lora)
    adapters = AdapterBatch(batch.slots, batch.scales, lora_form)
    hidden, _ = model(batch.tokens, batch.positions, adapters, remat=remat, segments=batch.segments, mesh=mesh)

    def chunk_logprobs(h: jax.Array, targets: jax.Array) -> jax.Array:
        logits = model.logits(h, adapters)
        log_z = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        return jnp.take_along_axis(logits, targets, axis=-1) - log_z

    return map_chunks(chunk_logprobs, (hidden, batch.targets), chunk_tokens)


def _loss(
    lora: nnx.State,
    graphdef: nnx.GraphDef,
    base: nnx.State,
    batch: BatchArrays,
    config: Mapping[str, jax.Array],
    loss_fn: str,
    chunk_tokens: int = CHUNK_TOKENS,
    lora_form: LoraForm = "grouped",
    remat: bool = False,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    lp = target_logprobs(graphdef, base, lora, batch, chunk_tokens, lora_form, remat, mesh)
    per_token = token_loss(loss_fn, lp, batch.inputs, batch.mask, config, batch.segments).sum(axis=2)
    return per_token.sum(), (lp, per_token)


@partial(jax.jit, static_argnames=("graphdef", "loss_fn", "chunk_tokens", "lora_form", "remat", "mesh"))
def forward_backward(
    graphdef: nnx.GraphDef,
    base: nnx.State,
    lora: nnx.State,
    batch: BatchArrays,
    config: Mapping[str, jax.Array],
    loss_fn: str,
    chunk_tokens: int = CHUNK_TOKENS,
    lora_form: LoraForm = "grouped",
    remat: bool = False,
    mesh: Mesh | None = None,
) -> tuple[nnx.State, jax.Array, jax.Array]:
    """Returns (this batch's grads, target logprobs [B, T, K], loss per token [B, T]);
    `chunk_tokens` bounds the logits held at once (see `map_chunks`), `lora_form` picks how the
    LoRA deltas are computed (see `LoraForm`), `remat` recomputes each layer in the backward
    pass (see `layer_stack`), `mesh` is the mesh the batch is split over (MoE layers route each
    device's tokens there, see `qwen3_moe`). The grads have every slot, or for `single` the batch's one slot
    (a leading slot axis of 1; `accumulate` puts them in place)."""
    if lora_form == "single":
        lora, batch = single_slot_view(lora, batch)
    (_, (lp, per_token)), step_grads = jax.value_and_grad(_loss, has_aux=True)(
        lora, graphdef, base, batch, config, loss_fn, chunk_tokens, lora_form, remat, mesh
    )
    return step_grads, lp, per_token


@partial(jax.jit, donate_argnames=("grads",))
def accumulate(grads: nnx.State, step_grads: nnx.State, first_slot: jax.Array) -> nnx.State:
    """Adds a pass's gradients (all slots, or the slots from `first_slot` on that they cover)."""

    def add(acc: jax.Array, g: jax.Array) -> jax.Array:
        current = jax.lax.dynamic_slice_in_dim(acc, first_slot, g.shape[0], 0)
        return jax.lax.dynamic_update_slice_in_dim(acc, current + g, first_slot, 0)

    return jax.tree.map(add, grads, step_grads)


@partial(jax.jit, static_argnames=("graphdef", "loss_fn", "lora_form", "mesh"))
def forward(
    graphdef: nnx.GraphDef,
    base: nnx.State,
    lora: nnx.State,
    batch: BatchArrays,
    config: Mapping[str, jax.Array],
    loss_fn: str,
    lora_form: LoraForm = "grouped",
    mesh: Mesh | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Same outputs as forward_backward, no gradient."""
    if lora_form == "single":
        lora, batch = single_slot_view(lora, batch)
    _, (lp, per_token) = _loss(lora, graphdef, base, batch, config, loss_fn, lora_form=lora_form, mesh=mesh)
    return lp, per_token
