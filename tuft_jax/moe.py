"""Mixture-of-experts layers shared by the MoE families: the router, capacity-free top-k dispatch
through grouped matmuls, and expert LoRA in the shared-outer-factor form.

Dispatch. A token's k (token, expert) assignments are sorted by expert, so one grouped matmul
per projection multiplies each expert's tokens by that expert's weights: no token is dropped,
no expert computes another's tokens. Results go back to token order and are summed with the
routing weights. The grouped matmul is `ragged_dot` on accelerators. XLA:CPU expands
`ragged_dot` into one dense product per group, each the size of the whole output (a Qwen3-30B-A3B
layer at 8k tokens: 128 x 65536 x 1536 values per projection), so on CPU it runs as tiles of
rows instead (`grouped_matmul`).

Expert LoRA, shared outer factors. An expert's gate/up projection maps the hidden state [D] to
[2I], its down projection [I] back to [D]. A per-expert LoRA would hold E x (D + 2I) x r and
E x (I + D) x r. Here the factor on the hidden-state side (the outer one) is one matrix shared
by all experts, and only the factor on the expert's own side is per expert:

    gate_up_e(x) = x W_gu,e + s (x A_gu) B_gu,e        A_gu [D, r],    B_gu,e [r, 2I]
    down_e(y)    = y W_d,e  + s (y A_d,e) B_d          A_d,e [I, r],   B_d [r, D]

so an adapter holds 2 D r + 3 E I r per MoE layer instead of E (2 D + 3 I) r (Qwen3-30B-A3B,
r = 32: 9.6 M against 26 M parameters a layer). The shared factors run once per token: x A_gu
before dispatch, and B_d after the routing-weighted sum over the token's experts (exact, as
B_d is the same for all of them). The per-expert factors run grouped like the base weights,
over (expert, adapter slot) groups. Exported to PEFT (`target_parameters`), each expert gets
its own A and B with the shared factor repeated, which computes the same function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from tuft_jax.layers import AdapterBatch, per_slot_in, per_slot_out
from tuft_jax.sharding import EXPERT_AXIS, batch_axes, data_parallel, key_name, logical_axes
from tuft_jax.stored_dtype import from_stored


@dataclass(frozen=True)
class MoeConfig:
    """`family` is the config.json model_type whose MoE block and weight map apply; `bias` adds
    per-expert biases to both projections; `swiglu_alpha` / `swiglu_limit` are gpt-oss's
    clamped SwiGLU."""

    num_experts: int
    experts_per_token: int
    intermediate_size: int
    normalize_top_k: bool = False
    family: str = "qwen3_moe"
    bias: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float | None = None


class Routing(NamedTuple):
    """Each token's experts and their weights, [N, k] each."""

    experts: jax.Array
    weights: jax.Array


def softmax_top_k(logits: jax.Array, k: int, normalize: bool) -> Routing:
    """Softmax over all experts (fp32), then the k largest, renormalised over those k if asked."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(experts.astype(jnp.int32), weights)


def top_k_softmax(logits: jax.Array, k: int) -> Routing:
    """The k largest logits, then a softmax over those k (fp32)."""
    top, experts = jax.lax.top_k(logits.astype(jnp.float32), k)
    return Routing(experts.astype(jnp.int32), jax.nn.softmax(top, axis=-1))


class Router(nnx.Module):
    """The frozen router projection, kernel stored [hidden, experts], with an optional bias."""

    def __init__(self, hidden_size: int, num_experts: int, dtype: jnp.dtype, *, bias: bool = False) -> None:
        self.weight = nnx.Param(jnp.zeros((hidden_size, num_experts), dtype))
        if bias:
            self.bias = nnx.Param(jnp.zeros((num_experts,), dtype))
        self.has_bias = bias

    def __call__(self, x: jax.Array) -> jax.Array:
        """Router logits [N, E] of x [B, T, D]."""
        logits = (x @ from_stored(self.weight[...])).reshape(-1, self.weight.shape[1])
        return logits + from_stored(self.bias[...]) if self.has_bias else logits


class ExpertLora(nnx.Module):
    """One projection's expert LoRA, `lora_a` [slots, (E,) in, r] and `lora_b` [slots, (E,) r,
    out]: the expert axis is on the factor `per_expert` names, the other is shared."""

    def __init__(
        self, in_features: int, out_features: int, num_experts: int, *, per_expert: Literal["a", "b"], slots: int, rank: int
    ) -> None:
        experts_a = (num_experts,) if per_expert == "a" else ()
        experts_b = (num_experts,) if per_expert == "b" else ()
        self.lora_a = nnx.LoRAParam(jnp.zeros((slots, *experts_a, in_features, rank), jnp.float32))
        self.lora_b = nnx.LoRAParam(jnp.zeros((slots, *experts_b, rank, out_features), jnp.float32))


CPU_TILE_ROWS = 256
"""Rows per tile of the CPU grouped matmul."""


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x [A, K] (rows sorted by group) times w [G, K, N], row i by the weights of its group:
    [A, N]. Rows past the groups' total come out as zeros."""
    if jax.default_backend() != "cpu":
        return jax.lax.ragged_dot(x, w, group_sizes)
    return _tiled_grouped_matmul(x, w, group_sizes)


class _WorkItems(NamedTuple):
    """The (row tile, group) pairs that overlap, in order: at most tiles + groups of them."""

    tile: jax.Array
    group: jax.Array
    valid: jax.Array
    starts: jax.Array
    ends: jax.Array


def _work_items(group_sizes: jax.Array, tiles: int, m: int) -> _WorkItems:
    groups = group_sizes.shape[0]
    ends = jnp.cumsum(group_sizes)

    def advance(carry: tuple[jax.Array, jax.Array], _: None) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
        tile, group = carry
        next_group = (group < groups) & (ends[jnp.minimum(group, groups - 1)] <= (tile + 1) * m)
        return (jnp.where(next_group, tile, tile + 1), jnp.where(next_group, group + 1, group)), jnp.stack([tile, group])

    _, items = jax.lax.scan(advance, (jnp.int32(0), jnp.int32(0)), None, length=tiles + groups)
    valid = (items[:, 0] < tiles) & (items[:, 1] < groups)
    return _WorkItems(
        jnp.minimum(items[:, 0], tiles - 1), jnp.minimum(items[:, 1], groups - 1), valid, ends - group_sizes, ends
    )


ItemStep = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
"""(accumulator, row tile, group, the tile's rows in the group) -> the updated accumulator."""


def _over_items(group_sizes: jax.Array, rows: int, m: int, init: jax.Array, step: ItemStep) -> jax.Array:
    """`step(acc, tile, group, mine)` for every work item, in a while loop (never differentiated:
    the custom VJP below says what the gradients are, so no per-item value is kept)."""
    items = _work_items(group_sizes, -(-rows // m), m)

    def body(carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        i, acc = carry
        tile, group = items.tile[i], items.group[i]
        row = tile * m + jnp.arange(m)
        mine = (row >= items.starts[group]) & (row < items.ends[group])
        # Items past the last group (rows no group owns, e.g. experts held by other devices) do nothing.
        return i + 1, jax.lax.cond(items.valid[i], lambda a: step(a, tile, group, mine), lambda a: a, acc)

    return jax.lax.while_loop(lambda c: c[0] < items.tile.shape[0], body, (jnp.int32(0), init))[1]


def _tiled_products(x: jax.Array, w: jax.Array, group_sizes: jax.Array, m: int, transpose: bool) -> jax.Array:
    """Row i of the padded x times w[group of i] (or its transpose): [tiles * m, N]."""
    n = w.shape[1] if transpose else w.shape[2]

    def step(out: jax.Array, tile: jax.Array, group: jax.Array, mine: jax.Array) -> jax.Array:
        kernel = w[group].T if transpose else w[group]
        block = jax.lax.dynamic_slice_in_dim(x, tile * m, m) @ kernel
        block = jnp.where(mine[:, None], block, jnp.zeros((), block.dtype))
        return jax.lax.dynamic_update_slice_in_dim(out, jax.lax.dynamic_slice_in_dim(out, tile * m, m) + block, tile * m, 0)

    return _over_items(group_sizes, x.shape[0], m, jnp.zeros((x.shape[0], n), x.dtype), step)


def _tiled_weight_grads(x: jax.Array, dy: jax.Array, group_sizes: jax.Array, m: int, groups: int) -> jax.Array:
    """Per group, x^T dy over its rows: [G, K, N], accumulated in fp32."""

    def step(dw: jax.Array, tile: jax.Array, group: jax.Array, mine: jax.Array) -> jax.Array:
        x_tile = jnp.where(mine[:, None], jax.lax.dynamic_slice_in_dim(x, tile * m, m), jnp.zeros((), x.dtype))
        dy_tile = jax.lax.dynamic_slice_in_dim(dy, tile * m, m)
        return dw.at[group].add(jnp.matmul(x_tile.T, dy_tile, preferred_element_type=jnp.float32))

    return _over_items(group_sizes, x.shape[0], m, jnp.zeros((groups, x.shape[1], dy.shape[1]), jnp.float32), step)


@jax.custom_vjp
def _tiled_grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """The grouped matmul as a loop over (row tile, group) pairs that overlap: at most tiles +
    groups of them, each one [m, K] x [K, N] product masked to the group's rows, accumulated in
    place, so memory is the output's and compute O((A + G m) K N), whatever the group sizes."""
    return _tiled_grouped_matmul_fwd(x, w, group_sizes)[0]


def _tile_rows(rows: int) -> tuple[int, int]:
    m = min(CPU_TILE_ROWS, rows)
    return m, -(-rows // m) * m


def _tiled_grouped_matmul_fwd(x: jax.Array, w: jax.Array, group_sizes: jax.Array):
    m, padded = _tile_rows(x.shape[0])
    x_padded = jnp.pad(x, ((0, padded - x.shape[0]), (0, 0)))
    return _tiled_products(x_padded, w, group_sizes, m, transpose=False)[: x.shape[0]], (x, w, group_sizes)


def _tiled_grouped_matmul_bwd(residuals, dy: jax.Array):
    x, w, group_sizes = residuals
    m, padded = _tile_rows(x.shape[0])
    pad = ((0, padded - x.shape[0]), (0, 0))
    x_padded, dy_padded = jnp.pad(x, pad), jnp.pad(dy, pad)
    dx = _tiled_products(dy_padded, w.astype(dy.dtype), group_sizes, m, transpose=True)[: x.shape[0]]
    dw = _tiled_weight_grads(x_padded, dy_padded, group_sizes, m, w.shape[0])
    return dx.astype(x.dtype), dw.astype(w.dtype), None


_tiled_grouped_matmul.defvjp(_tiled_grouped_matmul_fwd, _tiled_grouped_matmul_bwd)


class _Dispatch(NamedTuple):
    """Assignments sorted by (expert, slot): the token each reads and its expert, the
    permutation back to (token, k) order, and group sizes per expert (base weights) and per
    group of the per-expert LoRA factors ((expert, slot); per expert in the `single` form,
    where one slot serves all)."""

    source: jax.Array
    expert: jax.Array
    inverse: jax.Array
    per_expert: jax.Array
    per_group: jax.Array


def _dispatch(routing: Routing, adapters: AdapterBatch, tokens_per_row: int, num_experts: int, num_slots: int) -> _Dispatch:
    """Expert id `num_experts` marks an assignment held elsewhere: it sorts last, in no group."""
    n, k = routing.experts.shape
    experts = routing.experts.reshape(-1)
    token = jnp.repeat(jnp.arange(n), k)
    per_expert = jnp.bincount(experts, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    if adapters.form == "single":
        key, per_group = experts, per_expert
    else:
        key = experts * num_slots + adapters.slots[token // tokens_per_row]
        per_group = jnp.bincount(key, length=(num_experts + 1) * num_slots)[: num_experts * num_slots].astype(jnp.int32)
    order = jnp.argsort(key, stable=True)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))
    return _Dispatch(token[order], experts[order], inverse, per_expert, per_group)


def _grouped(factor: jax.Array, adapters: AdapterBatch, dtype: jnp.dtype) -> jax.Array:
    """A per-expert LoRA factor [slots, E, p, q] as the right-hand side of the dispatch groups."""
    if adapters.form == "single":
        return jax.lax.dynamic_index_in_dim(factor, jnp.max(adapters.slots), keepdims=False).astype(dtype)
    return jnp.swapaxes(factor, 0, 1).reshape(-1, *factor.shape[2:]).astype(dtype)


GatedActivation = Callable[[jax.Array], jax.Array]
"""The family's gated activation: the gate/up projection's output [A, 2I] -> [A, I]."""


class Experts(nnx.Module):
    """E experts' gate/up [E, D, 2I] and down [E, I, D] kernels (stored [in, out]), their biases
    when the family has them, and their LoRA."""

    def __init__(
        self, config: MoeConfig, hidden_size: int, activation: GatedActivation, *, slots: int, rank: int, dtype: jnp.dtype
    ) -> None:
        e, d, i = config.num_experts, hidden_size, config.intermediate_size
        self.gate_up_proj = nnx.Param(jnp.zeros((e, d, 2 * i), dtype))
        self.down_proj = nnx.Param(jnp.zeros((e, i, d), dtype))
        if config.bias:
            self.gate_up_proj_bias = nnx.Param(jnp.zeros((e, 2 * i), dtype))
            self.down_proj_bias = nnx.Param(jnp.zeros((e, d), dtype))
        self.gate_up_lora = ExpertLora(d, 2 * i, e, per_expert="b", slots=slots, rank=rank)
        self.down_lora = ExpertLora(i, d, e, per_expert="a", slots=slots, rank=rank)
        self.activation = activation
        self.bias = config.bias

    def __call__(self, x: jax.Array, routing: Routing, adapters: AdapterBatch, first_expert: jax.Array | int = 0) -> jax.Array:
        """The routing-weighted sum of each token's experts on x [B, T, D]. This module may hold
        only experts first_expert, first_expert + 1, ... (expert parallel): assignments to the
        others are left out (the caller sums over the devices that hold them)."""
        b, t, d = x.shape
        n, k = routing.experts.shape
        num_experts = self.gate_up_proj.shape[0]
        local = routing.experts - first_expert
        mine = (local >= 0) & (local < num_experts)
        routing = Routing(jnp.where(mine, local, num_experts), jnp.where(mine, routing.weights, 0.0))
        plan = _dispatch(routing, adapters, t, num_experts, self.gate_up_lora.lora_a.shape[0])
        scale = adapters.scale("mlp").astype(x.dtype)[:, None, None]

        def token_order(y: jax.Array) -> jax.Array:  # [A, q] sorted -> routing-weighted [N, q]
            return jnp.einsum("nkq,nk->nq", y[plan.inverse].reshape(n, k, -1), routing.weights.astype(y.dtype))

        shared_in = (per_slot_in(x, self.gate_up_lora.lora_a[...], adapters) * scale).reshape(n, -1)
        h = grouped_matmul(x.reshape(n, d)[plan.source], from_stored(self.gate_up_proj[...]), plan.per_expert)
        h = h + grouped_matmul(shared_in[plan.source], _grouped(self.gate_up_lora.lora_b[...], adapters, x.dtype), plan.per_group)
        if self.bias:
            h = h + jnp.take(from_stored(self.gate_up_proj_bias[...]), plan.expert, axis=0, mode="clip").astype(h.dtype)
        y = self.activation(h)
        out = grouped_matmul(y, from_stored(self.down_proj[...]), plan.per_expert)
        if self.bias:
            out = out + jnp.take(from_stored(self.down_proj_bias[...]), plan.expert, axis=0, mode="clip").astype(out.dtype)
        low = grouped_matmul(y, _grouped(self.down_lora.lora_a[...], adapters, x.dtype), plan.per_group)
        shared_out = per_slot_out(token_order(low).reshape(b, t, -1) * scale, self.down_lora.lora_b[...], adapters)
        return token_order(out).reshape(b, t, d) + shared_out


class MoeBlock(Protocol):
    """A family's MoE block: `routed` routes a batch's tokens and computes them on the experts
    the block holds (from `first_expert` on)."""

    experts: Experts

    def routed(self, x: jax.Array, adapters: AdapterBatch, first_expert: jax.Array | int = 0) -> jax.Array: ...


def per_device(block: MoeBlock, x: jax.Array, adapters: AdapterBatch, mesh: Mesh | None) -> jax.Array:
    """`block.routed` with each device routing its own rows when the batch is split over the
    mesh (`shard_map`). Left to XLA's partitioner, the sort over the whole batch is replicated,
    and every device would dispatch every token. An unsplit batch is routed in one place.

    With an expert axis (ep > 1) each device holds E / ep experts: the ep group's tokens are
    all-gathered, each device computes its experts' share of every token, and a reduce-scatter
    sums the shares and hands each device its own rows back (the all-gather dispatch). Without
    one, the layer's experts are gathered to every device like any fsdp-split weight."""
    if mesh is None or data_parallel(mesh) == 1 or x.shape[0] % data_parallel(mesh):
        return block.routed(x, adapters)
    graphdef, state = nnx.split(block)
    ep = mesh.shape[EXPERT_AXIS]

    def local(state: nnx.State, x: jax.Array, slots: jax.Array, scales: jax.Array) -> jax.Array:
        held = nnx.merge(graphdef, state)
        if ep == 1:
            return held.routed(x, AdapterBatch(slots, scales, adapters.form))
        x, slots, scales = (jax.lax.all_gather(a, EXPERT_AXIS, axis=0, tiled=True) for a in (x, slots, scales))
        first = jax.lax.axis_index(EXPERT_AXIS) * held.experts.gate_up_proj.shape[0]
        out = held.routed(x, AdapterBatch(slots, scales, adapters.form), first)
        return jax.lax.psum_scatter(out, EXPERT_AXIS, scatter_dimension=0, tiled=True)

    def held_spec(path: tuple, leaf: jax.Array) -> P:
        axes = logical_axes(tuple(key_name(key) for key in path), leaf.ndim)
        return P(*(EXPERT_AXIS if axis == "experts" and ep > 1 else None for axis in axes))

    specs = jax.tree_util.tree_map_with_path(held_spec, state)
    rows = P(batch_axes(mesh))
    return jax.shard_map(local, mesh=mesh, in_specs=(specs, rows, rows, rows), out_specs=rows, check_vma=False)(
        state, x, adapters.slots, adapters.scales
    )
