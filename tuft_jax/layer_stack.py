"""Decoder layers held as one stacked module and run as one scanned body.

Every variable of the stacked module carries a layer axis: base weights and norms lead with it
([L, ...]); LoRA weights keep the slot axis first ([slots, L, ...]), so one adapter's state is
still `x[slot]` wherever adapters are parked, stepped or saved, and that slice leads with the
layer axis like the base weights. The layers run under `jax.lax.scan`: one compiled body however
deep the model, and with `remat` the backward pass recomputes each layer from its input instead
of keeping its activations (the residual stream, [B, T, D] per layer, is all that is saved
between the forward and backward passes).

Outside the engine (Hugging Face checkpoints, PEFT adapters, tests) a layer is named by its
index, `model.layers.3.mlp.up_proj`: `unstack` and `stack` convert at that boundary.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tuft_jax.layers import AdapterBatch
from tuft_jax.paged_attention import KVPool, PagedView

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


LayerStep = Callable[[nnx.Module, jax.Array, AdapterBatch, PagedView | None, jax.Array], tuple[jax.Array, PagedView | None]]


def scan_layers(
    layers: nnx.Module,
    step: LayerStep,
    x: jax.Array,
    adapters: AdapterBatch,
    cache: PagedView | None,
    remat: bool,
) -> tuple[jax.Array, PagedView | None]:
    """Runs `step(layer, x, adapters, cache, index)` for each layer in order (index: the layer's, traced).

    With a paged KV cache (sampling) the step sees it with its layer index set, and the pool is
    carried from layer to layer; each layer's LoRA weights are sliced from the stack inside the
    body. Without one (training, differentiated) the LoRA layer axis is moved to the front and
    scanned with the base weights (a copy of the LoRA weights the batch can read: one slot for
    a `single`-form batch, see `train_step`), so each layer's gradients come out of the scan.
    """
    graphdef, lora, base = nnx.split(layers, nnx.LoRAParam, ...)
    scanned = (jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), lora), base) if cache is None else (None, base)

    def body(carry: tuple[jax.Array, KVPool | None, jax.Array], xs: tuple[nnx.State | None, nnx.State]):
        h, pool, i = carry
        layer_lora, layer_base = xs
        if layer_lora is None:
            layer_lora = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 1, keepdims=False), lora)
        view = None if cache is None else cache._replace(pool=pool, layer=i)
        h, view = step(nnx.merge(graphdef, layer_lora, layer_base), h, adapters, view, i)
        return (h, None if view is None else view.pool, i + 1), None

    if remat:
        body = jax.checkpoint(body, prevent_cse=False, policy=jax.checkpoint_policies.nothing_saveable)
    (x, pool, _), _ = jax.lax.scan(body, (x, None if cache is None else cache.pool, jnp.int32(0)), scanned)
    return x, None if cache is None else cache._replace(pool=pool)


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
