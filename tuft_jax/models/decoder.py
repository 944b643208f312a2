"""The pre-norm decoder-only transformer that Qwen3, Qwen3-MoE, gpt-oss and Llama 3 share, with
multi-slot LoRA.

Module and attribute names follow the Hugging Face layout (`model.layers.N.self_attn.q_proj`),
so a parameter's path is its safetensors key once `layer_stack.unstack` gives each layer its
index; projection kernels are stored [in, out]. The layers are stacked modules, scanned: one
stack, or for a MoE model that keeps dense MLPs in some layers, a second one of those layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from tuft_jax.attention import attention
from tuft_jax.layer_stack import DENSE_MLP_STACK, STACK, LayerLayout, scan_layers, stacked
from tuft_jax.layers import AdapterBatch, LoraDelta, LoraLinear, RMSNorm, apply_rope
from tuft_jax.models import gpt_oss, qwen3_moe
from tuft_jax.moe import MoeConfig
from tuft_jax.paged_attention import PagedView
from tuft_jax.stored_dtype import from_stored


@dataclass(frozen=True)
class Llama3RopeScaling:
    """HF `rope_type: llama3`: long wavelengths are slowed by `factor`, with a smooth band between."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class YarnRopeScaling:
    """HF `rope_type: yarn`: frequencies blended between interpolated (divided by `factor`) and
    original, by a linear ramp over the dimensions between the beta_fast and beta_slow
    rotation counts; cos and sin are scaled by `attention_factor`."""

    factor: float
    beta_fast: float
    beta_slow: float
    original_max_position_embeddings: int
    truncate: bool
    attention_factor: float


MOE_BLOCKS = {qwen3_moe.MODEL_TYPE: qwen3_moe.SparseMoeBlock, gpt_oss.MODEL_TYPE: gpt_oss.MoeBlock}
"""Each MoE family's block, by `MoeConfig.family`."""


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    qk_norm: bool
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...] = ()
    rope_scaling: Llama3RopeScaling | YarnRopeScaling | None = None
    moe: MoeConfig | None = None
    """Set for MoE families: each layer's MLP is a sparse MoE block, except `dense_mlp_layers`'."""
    dense_mlp_layers: tuple[int, ...] = ()
    """The layers of a MoE model that keep a dense MLP (Qwen3-MoE's `mlp_only_layers`)."""
    attention_bias: bool = False
    attention_sinks: bool = False
    """One learned logit per head that joins each query's softmax (gpt-oss)."""
    layer_windows: tuple[int | None, ...] | None = None
    """Per layer, the sliding window (None: full attention); None: full attention everywhere."""


@dataclass(frozen=True)
class LoraShape:
    """How many adapter slots each LoRA tensor holds and the largest rank a slot can take."""

    slots: int
    max_rank: int


def layer_layout(config: DecoderConfig) -> LayerLayout:
    return LayerLayout.of(config.num_layers, config.dense_mlp_layers)


def rope_frequencies(config: DecoderConfig) -> jax.Array:
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, config.head_dim, 2, dtype=jnp.float32) / config.head_dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if isinstance(scaling, YarnRopeScaling):
        return _yarn_frequencies(inv_freq, config.rope_theta, config.head_dim, scaling)
    old_len = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / scaling.low_freq_factor, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= old_len / scaling.high_freq_factor) & (wavelen <= old_len / scaling.low_freq_factor)
    return jnp.where(medium, smoothed, scaled)


def _yarn_frequencies(inv_freq: jax.Array, theta: float, head_dim: int, scaling: YarnRopeScaling) -> jax.Array:
    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(scaling.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / ((high - low) or 0.001), 0, 1)
    return inv_freq / scaling.factor * ramp + inv_freq * (1 - ramp)


def rope_scale(config: DecoderConfig) -> float:
    """The factor RoPE's cos and sin are multiplied by (YaRN's attention factor; else 1)."""
    return config.rope_scaling.attention_factor if isinstance(config.rope_scaling, YarnRopeScaling) else 1.0


FULL_WINDOW = jnp.iinfo(jnp.int32).max
"""The window of a full-attention layer in a stack that mixes windowed and full layers."""


class Attention(nnx.Module):
    def __init__(self, config: DecoderConfig, lora: LoraShape, dtype: jnp.dtype) -> None:
        d, hd = config.hidden_size, config.head_dim
        proj = dict(slots=lora.slots, rank=lora.max_rank, group="attn", dtype=dtype, bias=config.attention_bias)
        self.q_proj = LoraLinear(d, config.num_heads * hd, **proj)
        self.k_proj = LoraLinear(d, config.num_kv_heads * hd, **proj)
        self.v_proj = LoraLinear(d, config.num_kv_heads * hd, **proj)
        self.o_proj = LoraLinear(config.num_heads * hd, d, **proj)
        if config.qk_norm:
            self.q_norm = RMSNorm(hd, config.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(hd, config.rms_norm_eps, dtype=dtype)
        if config.attention_sinks:
            self.sinks = nnx.Param(jnp.zeros((config.num_heads,), dtype))
        self.config = config

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        inv_freq: jax.Array,
        adapters: AdapterBatch,
        cache: PagedView | None,
        segments: jax.Array | None,
        window: jax.Array | None,
    ) -> tuple[jax.Array, PagedView | None]:
        cfg = self.config
        b, t, _ = x.shape
        q = self.q_proj(x, adapters).reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x, adapters).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x, adapters).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        scale = rope_scale(cfg)
        q, k = apply_rope(q, positions, inv_freq, scale), apply_rope(k, positions, inv_freq, scale)
        sinks = from_stored(self.sinks[...]).astype(jnp.float32) if cfg.attention_sinks else None
        if cache is None:
            out = attention(q, k, v, positions, positions, segments, segments, window, sinks)
        else:
            cache = cache.write(k, v, positions)
            out = cache.attend(q, positions, window, sinks)
        return self.o_proj(out.reshape(b, t, -1), adapters), cache


class MLP(nnx.Module):
    def __init__(self, config: DecoderConfig, lora: LoraShape, dtype: jnp.dtype) -> None:
        d, f = config.hidden_size, config.intermediate_size
        proj = dict(slots=lora.slots, rank=lora.max_rank, group="mlp", dtype=dtype)
        self.gate_proj = LoraLinear(d, f, **proj)
        self.up_proj = LoraLinear(d, f, **proj)
        self.down_proj = LoraLinear(f, d, **proj)

    def __call__(self, x: jax.Array, adapters: AdapterBatch) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x, adapters)) * self.up_proj(x, adapters), adapters)


class DecoderLayer(nnx.Module):
    def __init__(self, config: DecoderConfig, lora: LoraShape, dtype: jnp.dtype, dense_mlp: bool) -> None:
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(config, lora, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        if dense_mlp or config.moe is None:
            self.mlp: MLP | qwen3_moe.SparseMoeBlock | gpt_oss.MoeBlock = MLP(config, lora, dtype)
        else:
            block = MOE_BLOCKS[config.moe.family]
            self.mlp = block(config.hidden_size, config.moe, slots=lora.slots, rank=lora.max_rank, dtype=dtype)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        inv_freq: jax.Array,
        adapters: AdapterBatch,
        cache: PagedView | None,
        segments: jax.Array | None,
        mesh: Mesh | None,
        window: jax.Array | None,
    ) -> tuple[jax.Array, PagedView | None]:
        attn_out, cache = self.self_attn(self.input_layernorm(x), positions, inv_freq, adapters, cache, segments, window)
        x = x + attn_out
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, adapters) if isinstance(self.mlp, MLP) else self.mlp(h, adapters, mesh)), cache


class Embedding(nnx.Module):
    def __init__(self, vocab_size: int, hidden_size: int, dtype: jnp.dtype) -> None:
        self.weight = nnx.Param(jnp.zeros((vocab_size, hidden_size), dtype))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return from_stored(self.weight[...][tokens])


class DecoderStack(nnx.Module):
    def __init__(self, config: DecoderConfig, lora: LoraShape, dtype: jnp.dtype) -> None:
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype)
        layout = layer_layout(config)
        self.layers = stacked(lambda: DecoderLayer(config, lora, dtype, dense_mlp=False), len(layout.layers(STACK)))
        if config.dense_mlp_layers:
            dense = len(layout.layers(DENSE_MLP_STACK))
            self.dense_layers = stacked(lambda: DecoderLayer(config, lora, dtype, dense_mlp=True), dense)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.layout = layout

    def stacks(self) -> dict[str, nnx.Module]:
        return {name: getattr(self, name) for name, _ in self.layout.stacks}


VOCAB_TILE = 16384
"""On XLA:CPU the output head runs in vocabulary tiles of at most this many entries: it runs bf16
matmuls in f32, and converting the whole head first is an f32 copy of it (2.5 GB for Qwen3-8B)."""


class Unembed(nnx.Module):
    """The output head; with tied embeddings it reuses the embedding matrix but keeps its own LoRA."""

    def __init__(self, config: DecoderConfig, lora: LoraShape, dtype: jnp.dtype) -> None:
        if not config.tie_word_embeddings:
            self.weight = nnx.Param(jnp.zeros((config.hidden_size, config.vocab_size), dtype))
        self.lora = LoraDelta(config.hidden_size, config.vocab_size, slots=lora.slots, rank=lora.max_rank, group="unembed")
        self.tied = config.tie_word_embeddings

    def __call__(self, h: jax.Array, embedding: jax.Array, adapters: AdapterBatch) -> jax.Array:
        kernel = embedding if self.tied else self.weight[...]
        logits = _head(h, kernel, vocab_axis=0 if self.tied else 1)
        return logits + self.lora(h, adapters).astype(jnp.float32)


def _head(h: jax.Array, kernel: jax.Array, vocab_axis: int) -> jax.Array:
    """fp32 logits of h [B, T, D] against `kernel` ([V, D] or [D, V], as held)."""
    spec = "btd,vd->btv" if vocab_axis == 0 else "btd,dv->btv"
    vocab = kernel.shape[vocab_axis]

    def tile_logits(w: jax.Array) -> jax.Array:
        return jnp.einsum(spec, h, from_stored(w), preferred_element_type=jnp.float32)

    if jax.default_backend() != "cpu" or vocab <= VOCAB_TILE:
        return tile_logits(kernel)
    n = -(-vocab // VOCAB_TILE)
    size = -(-vocab // n)

    def tile(j: jax.Array) -> jax.Array:  # the last tile ends at the vocabulary's end, overlapping its neighbour
        return tile_logits(jax.lax.dynamic_slice_in_dim(kernel, jnp.minimum(j * size, vocab - size), size, vocab_axis))

    tiles = jax.lax.map(jax.checkpoint(tile, prevent_cse=False), jnp.arange(n))
    head = jnp.moveaxis(tiles[:-1], 0, 2).reshape(*h.shape[:2], (n - 1) * size)
    return jnp.concatenate([head, tiles[-1][..., n * size - vocab :]], axis=-1)


class CausalLM(nnx.Module):
    def __init__(self, config: DecoderConfig, lora: LoraShape, *, dtype: jnp.dtype = jnp.float32) -> None:
        self.config = config
        self.model = DecoderStack(config, lora, dtype)
        self.lm_head = Unembed(config, lora, dtype)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        adapters: AdapterBatch,
        cache: PagedView | None = None,
        remat: bool = False,
        segments: jax.Array | None = None,
        mesh: Mesh | None = None,
    ) -> tuple[jax.Array, PagedView | None]:
        """Final hidden states [B, T, D] (and the updated KV cache when sampling); `remat`
        recomputes each layer in the backward pass instead of keeping its activations;
        `segments` [B, T] (packed datums, training only) confine attention to each segment;
        `mesh` is the mesh the batch is split over (MoE blocks route per device)."""
        inv_freq = rope_frequencies(self.config)
        windows = self.config.layer_windows
        layer_window = None if windows is None else jnp.asarray([FULL_WINDOW if w is None else w for w in windows], jnp.int32)

        def step(layer: DecoderLayer, x: jax.Array, adapters: AdapterBatch, cache: PagedView | None, index: jax.Array):
            window = None if layer_window is None else layer_window[index]
            return layer(x, positions, inv_freq, adapters, cache, segments, mesh, window)

        x = self.model.embed_tokens(tokens)
        x, cache = scan_layers(self.model.stacks(), self.model.layout, step, x, adapters, cache, remat)
        return self.model.norm(x), cache

    def logits(self, hidden: jax.Array, adapters: AdapterBatch) -> jax.Array:
        """fp32 logits [B, T, V]."""
        return self.lm_head(hidden, self.model.embed_tokens.weight[...], adapters)
