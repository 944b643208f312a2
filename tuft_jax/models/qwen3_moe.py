"""Qwen3-MoE (`Qwen3MoeForCausalLM`): the Qwen3 decoder with a sparse MoE block as every layer's MLP.

The block routes each token by a softmax over all experts, keeps the top `num_experts_per_tok`
(renormalised when `norm_topk_prob`), and runs SwiGLU experts (`tuft_jax.moe`). Published
checkpoints store each expert's projections apart (`mlp.experts.3.gate_proj.weight`, [I, D]);
transformers 5 holds them fused in memory (`mlp.experts.gate_up_proj` [E, 2I, D], gate first,
and `down_proj` [E, D, I]). Both load. Layers that keep a dense SwiGLU MLP of
`intermediate_size` (`mlp_only_layers`, and with `decoder_sparse_step` s all but every s-th
layer) are the decoder's `dense_mlp_layers`, held in a stack of their own (`layer_stack`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from tuft_jax.layers import AdapterBatch
from tuft_jax.moe import Experts, MoeConfig, Router, per_device, softmax_top_k

MODEL_TYPE = "qwen3_moe"


def dense_mlp_layers(hf: dict[str, Any]) -> tuple[int, ...]:
    """The layers transformers builds with a dense MLP (`Qwen3MoeDecoderLayer`'s rule)."""
    layers = int(hf["num_hidden_layers"])
    step = int(hf.get("decoder_sparse_step", 1))
    only = hf.get("mlp_only_layers") or []
    if step < 1:
        raise ValueError(f"{MODEL_TYPE}: decoder_sparse_step must be >= 1, got {step}")
    experts = int(hf.get("num_experts") or hf.get("num_local_experts") or 0)
    sparse = {i for i in range(layers) if i not in only and experts > 0 and (i + 1) % step == 0}
    return tuple(i for i in range(layers) if i not in sparse)


def moe_config_from_hf(hf: dict[str, Any]) -> MoeConfig:
    return MoeConfig(
        num_experts=int(hf.get("num_experts") or hf["num_local_experts"]),
        experts_per_token=int(hf["num_experts_per_tok"]),
        intermediate_size=int(hf["moe_intermediate_size"]),
        normalize_top_k=bool(hf.get("norm_topk_prob", False)),
        family=MODEL_TYPE,
    )


def swiglu(h: jax.Array) -> jax.Array:
    """silu(gate) * up of a fused [A, 2I] gate/up output, gate first."""
    gate, up = jnp.split(h, 2, axis=-1)
    return jax.nn.silu(gate) * up


class SparseMoeBlock(nnx.Module):
    """The router (`mlp.gate`) and the SwiGLU experts (`mlp.experts`)."""

    def __init__(self, hidden_size: int, config: MoeConfig, *, slots: int, rank: int, dtype: jnp.dtype) -> None:
        self.gate = Router(hidden_size, config.num_experts, dtype)
        self.experts = Experts(config, hidden_size, swiglu, slots=slots, rank=rank, dtype=dtype)
        self.config = config

    def __call__(self, x: jax.Array, adapters: AdapterBatch, mesh: Mesh | None) -> jax.Array:
        return per_device(self, x, adapters, mesh)

    def routed(self, x: jax.Array, adapters: AdapterBatch, first_expert: jax.Array | int = 0) -> jax.Array:
        routing = softmax_top_k(self.gate(x), self.config.experts_per_token, self.config.normalize_top_k)
        return self.experts(x, routing, adapters, first_expert)


Read = Callable[[str], np.ndarray]
"""Reads one checkpoint tensor by key, as stored."""


def expert_tensor(layer_prefix: str, name: str, num_experts: int, read: Read, has: Callable[[str], bool]) -> np.ndarray:
    """One layer's expert kernel `name` (`gate_up_proj` [E, D, 2I] or `down_proj` [E, I, D]) from
    the checkpoint, in either layout; `layer_prefix` is `model.layers.N.mlp.experts`."""
    fused = f"{layer_prefix}.{name}"
    if has(fused):
        return np.swapaxes(read(fused), 1, 2)
    parts = ("gate_proj", "up_proj") if name == "gate_up_proj" else ("down_proj",)
    per_expert = [
        np.concatenate([read(f"{layer_prefix}.{e}.{part}.weight").T for part in parts], axis=-1) for e in range(num_experts)
    ]
    return np.stack(per_expert)
