"""Decoder layers held as one stacked module and run as one scanned body.

Every variable of the stacked module carries a layer axis: base weights and norms lead with it
([L, ...]); LoRA weights keep the slot axis first ([slots, L, ...]), so one adapter's state is
still `x[slot]` wherever adapters are parked, stepped or saved, and that slice leads with the
layer axis like the base weights. The layers run under `jax.lax.scan`: one compiled body
however deep the model, and with `remat` the backward pass recomputes each layer from its input
instead of keeping its activations (the residual stream, [B, T, D] per layer, is all that is
saved between the forward and backward passes).

Outside the engine (Hugging Face checkpoints, PEFT adapters, tests) a layer is named by its
index, `model.layers.3.mlp.up_proj`: `unstack` and `stack` convert at that boundary.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tuft_jax.layers import AdapterBatch, KVCache

STACK = "layers"
"""The path element (the decoder's attribute name) of the stacked layer module."""


def stacked(make: Callable[[], nnx.Module], num_layers: int) -> nnx.Module:
    """The module `make()` returns, with a layer axis of `num_layers` on every variable."""
    graphdef, state = nnx.split(make())

    def stack(var: nnx.Variable) -> nnx.Variable:
        x = var[...]
        if isinstance(var, nnx.LoRAParam):
            return var.replace(jnp.broadcast_to(x[:, None], (x.shape[0], num_layers, *x.shape[1:])))
        return var.replace(jnp.broadcast_to(x, (num_layers, *x.shape)))

    leaves = [(path, stack(var)) for path, var in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


LayerStep = Callable[[nnx.Module, jax.Array, AdapterBatch, KVCache | None], tuple[jax.Array, KVCache | None]]


def scan_layers(
    layers: nnx.Module,
    step: LayerStep,
    x: jax.Array,
    adapters: AdapterBatch,
    caches: KVCache | None,
    remat: bool,
) -> tuple[jax.Array, KVCache | None]:
    """Runs `step(layer, x, adapters, cache)` for each layer in order.

    `caches` (when decoding) is one [B, L, S, kv_heads, head_dim] cache for all layers; the step
    sees and returns its layer's [B, S, ...] view. The LoRA layer axis is moved to the front to
    be scanned (a copy of the LoRA weights the batch can read: one slot for a `single`-form
    training batch, see `train_step`).
    """
    graphdef, lora, base = nnx.split(layers, nnx.LoRAParam, ...)
    lora = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), lora)

    def body(carry: tuple[jax.Array, KVCache | None, jax.Array], xs: tuple[nnx.State, nnx.State]):
        h, cache, i = carry
        layer_lora, layer_base = xs
        layer = nnx.merge(graphdef, layer_lora, jax.tree.map(from_stored, layer_base))
        view = None if cache is None else KVCache(*(jax.lax.dynamic_index_in_dim(c, i, 1, keepdims=False) for c in cache))
        h, view = step(layer, h, adapters, view)
        if cache is not None:
            cache = KVCache(*(jax.lax.dynamic_update_index_in_dim(c, u, i, 1) for c, u in zip(cache, view, strict=True)))
        return (h, cache, i + 1), None

    if remat:
        body = jax.checkpoint(body, prevent_cse=False, policy=jax.checkpoint_policies.nothing_saveable)
    (x, caches, _), _ = jax.lax.scan(body, (x, caches, jnp.int32(0)), (lora, base))
    return x, caches


def stored_dtype(path: tuple, dtype: jnp.dtype) -> jnp.dtype:
    """The dtype a base weight is held in: a bf16 leaf of the layer stack as its uint16 bits.

    XLA:CPU runs a bf16 dynamic slice in f32 and hoists the conversion of the whole operand out
    of the loop, an f32 copy of every layer's weights (30 GB for Qwen3-8B); converting the stack
    to bits inside the step would copy it instead (15 GB). Bits held from loading are sliced as
    they are, and the scan body turns its layer's slice back into bf16 (`from_stored`).
    """
    in_stack = STACK in [str(p) for p in path]
    return jnp.dtype(jnp.uint16) if in_stack and jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(dtype)


def from_stored(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x


def _split_path(path: tuple) -> tuple[tuple, tuple] | None:
    names = [str(p) for p in path]
    if STACK not in names:
        return None
    at = names.index(STACK) + 1
    return tuple(path[:at]), tuple(path[at:])


def unstack(arrays: Mapping[tuple, np.ndarray]) -> dict[tuple, np.ndarray]:
    """Leaves keyed by stacked paths (layer axis first) -> one leaf per layer, keyed by its HF-style
    path (`('model', 'layers', 3, 'mlp', ...)`); leaves outside the stack pass through."""
    out: dict[tuple, np.ndarray] = {}
    for path, value in arrays.items():
        split = _split_path(path)
        if split is None:
            out[path] = value
            continue
        head, tail = split
        for i in range(value.shape[0]):
            out[(*head, i, *tail)] = value[i]
    return out


def stack(arrays: Mapping[tuple, np.ndarray], stacked_paths: list[tuple]) -> dict[tuple, np.ndarray]:
    """The inverse of `unstack`, for the leaves `stacked_paths` names (in that order)."""
    out: dict[tuple, np.ndarray] = {}
    for path in stacked_paths:
        split = _split_path(path)
        if split is None:
            out[path] = arrays[path]
            continue
        head, tail = split
        layers = sorted(p[len(head)] for p in arrays if p[: len(head)] == head and p[len(head) + 1 :] == tail)
        out[path] = np.stack([arrays[(*head, i, *tail)] for i in layers])
    return out


def layer_paths(path: tuple, num_layers: int) -> list[tuple]:
    """The per-layer (HF-style) paths of one stacked path."""
    split = _split_path(path)
    if split is None:
        return [path]
    head, tail = split
    return [(*head, i, *tail) for i in range(num_layers)]
