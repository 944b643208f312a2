"""Decoder layers held as one stacked module and run as one scanned body.

Every variable of the stacked module carries a layer axis: base weights and norms lead with it
([L, ...]); LoRA weights keep the slot axis first ([slots, L, ...]), so one adapter's state is
still `x[slot]` wherever adapters are parked, stepped or saved, and that slice leads with the
layer axis like the base weights. The layers run under `jax.lax.scan`: one compiled body however
deep the model, and with `remat` the backward pass recomputes each layer from its input instead
of keeping its activations (the residual stream, [B, T, D] per layer, is all that is saved
between the forward and backward passes).

A scan needs equal layers, so a model that mixes two kinds of layer (Qwen3-MoE's dense-MLP
layers among its MoE ones) holds a second stack, `dense_layers`, and runs the layers in model
order as runs of consecutive layers of one stack (`LayerLayout`); a model of one kind of layer
has one stack and one run. Outside the engine (Hugging Face checkpoints, PEFT adapters, tests)
a layer is named by its model index, `model.layers.3.mlp.up_proj`, whichever stack holds it:
`unstack` and `stack` convert at that boundary.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tuft_jax.layers import AdapterBatch
from tuft_jax.paged_attention import KVPool, PagedView

STACK = "layers"
"""The path element (the decoder's attribute name) of the stacked layer module, and the HF name
of the layer list."""
DENSE_MLP_STACK = "dense_layers"
"""The second stack: a MoE model's layers that keep a dense MLP."""
STACKS = (STACK, DENSE_MLP_STACK)


@dataclass(frozen=True)
class Run:
    """Stack entries [start, stop) of `stack`, which are model layers first_layer, first_layer + 1, ..."""

    stack: str
    start: int
    stop: int
    first_layer: int


@dataclass(frozen=True)
class LayerLayout:
    """The model layers each stack holds, in stack order."""

    stacks: tuple[tuple[str, tuple[int, ...]], ...]

    @staticmethod
    def of(num_layers: int, dense_mlp_layers: tuple[int, ...] = ()) -> LayerLayout:
        rest = tuple(i for i in range(num_layers) if i not in dense_mlp_layers)
        return LayerLayout(((STACK, rest),) + (((DENSE_MLP_STACK, tuple(sorted(dense_mlp_layers))),) if dense_mlp_layers else ()))

    def layers(self, stack: str) -> tuple[int, ...]:
        return dict(self.stacks)[stack]

    def runs(self) -> list[Run]:
        """The stacks' entries as runs of consecutive model layers, in model order."""
        where = sorted((layer, name, at) for name, layers in self.stacks for at, layer in enumerate(layers))
        runs: list[Run] = []
        for layer, name, at in where:
            last = runs[-1] if runs else None
            if last is not None and last.stack == name and last.stop == at:
                runs[-1] = Run(name, last.start, at + 1, last.first_layer)
            else:
                runs.append(Run(name, at, at + 1, layer))
        return runs


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
    stacks: Mapping[str, nnx.Module],
    layout: LayerLayout,
    step: LayerStep,
    x: jax.Array,
    adapters: AdapterBatch,
    cache: PagedView | None,
    remat: bool,
) -> tuple[jax.Array, PagedView | None]:
    """Runs `step(layer, x, adapters, cache, index)` for each layer in model order (index: the
    model layer's, traced), one scan per run of the layout.

    With a paged KV cache (sampling) the step sees it with its layer index set, and the pool is
    carried from layer to layer; each layer's LoRA weights are sliced from the stack inside the
    body. Without one (training, differentiated) the LoRA layer axis is moved to the front and
    scanned with the base weights (a copy of the LoRA weights the batch can read: one slot for
    a `single`-form batch, see `train_step`), so each layer's gradients come out of the scan.
    """
    for run in layout.runs():
        x, cache = _scan_run(stacks[run.stack], len(layout.layers(run.stack)), run, step, x, adapters, cache, remat)
    return x, cache


def _scan_run(
    layers: nnx.Module,
    num_entries: int,
    run: Run,
    step: LayerStep,
    x: jax.Array,
    adapters: AdapterBatch,
    cache: PagedView | None,
    remat: bool,
) -> tuple[jax.Array, PagedView | None]:
    graphdef, lora, base = nnx.split(layers, nnx.LoRAParam, ...)
    whole = run.start == 0 and run.stop == num_entries
    if not whole:
        base = jax.tree.map(lambda a: a[run.start : run.stop], base)
    offset = run.first_layer - run.start  # model layer - stack entry
    if cache is None:
        run_lora = lora if whole else jax.tree.map(lambda a: a[:, run.start : run.stop], lora)
        scanned = (jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), run_lora), base)
    else:
        scanned = (None, base)

    def body(carry: tuple[jax.Array, KVPool | None, jax.Array], xs: tuple[nnx.State | None, nnx.State]):
        h, pool, i = carry
        layer_lora, layer_base = xs
        if layer_lora is None:
            entry = i - offset if offset else i
            layer_lora = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, entry, 1, keepdims=False), lora)
        view = None if cache is None else cache._replace(pool=pool, layer=i)
        h, view = step(nnx.merge(graphdef, layer_lora, layer_base), h, adapters, view, i)
        return (h, None if view is None else view.pool, i + 1), None

    if remat:
        body = jax.checkpoint(body, prevent_cse=False, policy=jax.checkpoint_policies.nothing_saveable)
    (x, pool, _), _ = jax.lax.scan(body, (x, None if cache is None else cache.pool, jnp.int32(run.first_layer)), scanned)
    return x, None if cache is None else cache._replace(pool=pool)


def _split_path(path: tuple) -> tuple[tuple, str, tuple] | None:
    """(the path up to the stack, the stack, the path within a layer), or None outside the stacks."""
    names = [str(p) for p in path]
    at = next((i for i, name in enumerate(names) if name in STACKS), None)
    if at is None:
        return None
    return tuple(path[:at]), names[at], tuple(path[at + 1 :])


def unstack(arrays: Mapping[tuple, np.ndarray], layout: LayerLayout) -> dict[tuple, np.ndarray]:
    """Leaves keyed by stacked paths (layer axis first) -> one leaf per layer, keyed by its HF-style
    path (`('model', 'layers', 3, 'mlp', ...)`, 3 the model layer); leaves outside the stacks
    pass through."""
    out: dict[tuple, np.ndarray] = {}
    for path, value in arrays.items():
        split = _split_path(path)
        if split is None:
            out[path] = value
            continue
        head, name, tail = split
        layers = layout.layers(name)
        if value.shape[0] != len(layers):
            raise ValueError(f"{path}: {value.shape[0]} stacked layers, the layout has {len(layers)}")
        for at, layer in enumerate(layers):
            out[(*head, STACK, layer, *tail)] = value[at]
    return out


def stack(arrays: Mapping[tuple, np.ndarray], stacked_paths: list[tuple], layout: LayerLayout) -> dict[tuple, np.ndarray]:
    """The inverse of `unstack`, for the leaves `stacked_paths` names (in that order)."""
    out: dict[tuple, np.ndarray] = {}
    for path in stacked_paths:
        per_layer = layer_paths(path, layout)
        out[path] = arrays[path] if per_layer == [path] else np.stack([arrays[p] for p in per_layer])
    return out


def layer_paths(path: tuple, layout: LayerLayout) -> list[tuple]:
    """The per-layer (HF-style) paths of one stacked path, in stack order."""
    split = _split_path(path)
    if split is None:
        return [path]
    head, name, tail = split
    return [(*head, STACK, layer, *tail) for layer in layout.layers(name)]
