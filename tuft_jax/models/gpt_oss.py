"""gpt-oss (`GptOssForCausalLM`): the shared decoder with attention biases and sinks, sliding-
window attention on alternate layers, YaRN RoPE, and a biased MoE block with a clamped SwiGLU.

What differs from Qwen3-MoE, per transformers' modelling code:
- attention: q/k/v/o biases; one learned sink logit per head joins the softmax (`attention`);
  `layer_types` says which layers attend only to the `sliding_window` latest keys;
- RoPE: YaRN (`decoder.YarnRopeScaling`), whose cos and sin are scaled by its attention factor;
- router: a biased projection; top-k of the logits, then a softmax over those k;
- experts: gate and up interleaved in the fused [E, D, 2I] kernel (gate at even columns), biases
  on both projections, and `(clamp(up, ±limit) + 1) * g * sigmoid(alpha * g)` with
  g = min(gate, limit). Kernels are stored [in, out], as we hold them.
Published checkpoints store the expert kernels in MXFP4: `<name>_blocks` [E, rows, cols / 32,
16] (two 4-bit e2m1 codes a byte, low nibble first) and `<name>_scales` [E, rows, cols / 32]
(a power-of-two exponent biased by 127 per 32 values), for the [E, out, in] matrix. They are
dequantised at load.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from tuft_jax.layers import AdapterBatch
from tuft_jax.moe import Experts, MoeConfig, Router, per_device, top_k_softmax

MODEL_TYPE = "gpt_oss"

FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)
"""The e2m1 value of each 4-bit code."""


def moe_config_from_hf(hf: dict[str, Any]) -> MoeConfig:
    return MoeConfig(
        num_experts=int(hf.get("num_local_experts") or hf["num_experts"]),
        experts_per_token=int(hf["num_experts_per_tok"]),
        intermediate_size=int(hf["intermediate_size"]),
        family=MODEL_TYPE,
        bias=True,
        swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)),
        swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
    )


def layer_windows(hf: dict[str, Any]) -> tuple[int | None, ...]:
    """Each layer's sliding window (None: full attention), from `layer_types`."""
    layers = int(hf["num_hidden_layers"])
    types = hf.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown or len(types) != layers:
        raise ValueError(f"{MODEL_TYPE}: layer_types must name one of sliding_attention / full_attention per layer, got {types}")
    window = int(hf.get("sliding_window") or 0)
    if "sliding_attention" in types and window < 1:
        raise ValueError(f"{MODEL_TYPE}: sliding layers need a positive sliding_window, got {hf.get('sliding_window')!r}")
    return tuple(window if t == "sliding_attention" else None for t in types)


@dataclass(frozen=True)
class ClampedSwiGLU:
    """gpt-oss's gated activation of an interleaved [A, 2I] gate/up output (a value, so equal
    configs trace to equal graphs)."""

    alpha: float
    limit: float

    def __call__(self, h: jax.Array) -> jax.Array:
        gate = jnp.minimum(h[..., 0::2], self.limit)
        up = jnp.clip(h[..., 1::2], -self.limit, self.limit)
        return (up + 1) * gate * jax.nn.sigmoid(gate * self.alpha)


class MoeBlock(nnx.Module):
    """The router (`mlp.router`) and the experts (`mlp.experts`)."""

    def __init__(self, hidden_size: int, config: MoeConfig, *, slots: int, rank: int, dtype: jnp.dtype) -> None:
        assert config.swiglu_limit is not None
        self.router = Router(hidden_size, config.num_experts, dtype, bias=True)
        activation = ClampedSwiGLU(config.swiglu_alpha, config.swiglu_limit)
        self.experts = Experts(config, hidden_size, activation, slots=slots, rank=rank, dtype=dtype)
        self.config = config

    def __call__(self, x: jax.Array, adapters: AdapterBatch, mesh: Mesh | None) -> jax.Array:
        return per_device(self, x, adapters, mesh)

    def routed(self, x: jax.Array, adapters: AdapterBatch, first_expert: jax.Array | int = 0) -> jax.Array:
        return self.experts(x, top_k_softmax(self.router(x), self.config.experts_per_token), adapters, first_expert)


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """[E, rows, G, 16] uint8 codes and [E, rows, G] exponents -> the [E, G * 32, rows] float32
    kernel, [in, out] as held."""
    blocks, exponents = np.asarray(blocks, np.uint8), np.asarray(scales, np.int32) - 127
    values = np.stack([FP4_VALUES[blocks & 0x0F], FP4_VALUES[blocks >> 4]], axis=-1)  # low nibble first
    values = np.ldexp(values.reshape(*blocks.shape[:-1], -1), exponents[..., None])
    return np.swapaxes(values.reshape(*blocks.shape[:2], -1), 1, 2)


def expert_tensor(
    layer_prefix: str, name: str, num_experts: int, read: Callable[[str], np.ndarray], has: Callable[[str], bool]
) -> np.ndarray:
    """One layer's expert tensor `name` (a kernel, [in, out], or a bias) from the checkpoint,
    dequantising MXFP4 kernels; `layer_prefix` is `model.layers.N.mlp.experts`."""
    key = f"{layer_prefix}.{name}"
    if has(f"{key}_blocks"):
        return dequantize_mxfp4(read(f"{key}_blocks"), read(f"{key}_scales"))
    return read(key)
