"""Tiny random HF checkpoints: the built-in model served with no config, and test fixtures.

Weights are drawn with numpy and written with safetensors rather than by instantiating the
torch model, because torch is only a test dependency; the files are the same ones
`transformers` writes (same tensor names, shapes, float32, `format: pt` metadata), and the
tests check that `AutoModelForCausalLM` loads them with no missing or unexpected keys.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
from safetensors.numpy import save_file
from transformers import GptOssConfig, LlamaConfig, PretrainedConfig, Qwen3Config, Qwen3MoeConfig

from tuft_jax.models import qwen3_moe
from tuft_jax.tiny_tokenizer import build_tiny_tokenizer

BUILTIN_MODEL_NAME = "tuft/tiny-qwen3"

# Bump the suffix whenever the recipe changes, so caches built by older versions are not reused.
_BUILTIN_DIR_NAME = "tiny-qwen3-v1"
_BUILTIN_SEED = 0

CheckpointFamily = Literal["qwen3", "qwen3_moe", "gpt_oss", "llama3"]

_TINY_DIMS: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
}

# Llama 3.1's frequency-dependent rope scaling, with a short original context so that the
# scaled and unscaled frequency bands both matter at test sequence lengths.
LLAMA3_ROPE_PARAMETERS: dict[str, Any] = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
QWEN3_ROPE_PARAMETERS: dict[str, Any] = {"rope_type": "default", "rope_theta": 1000000.0}

# Eight small experts, two per token, renormalised: every token mixes experts, and with a few
# dozen tokens every expert gets some.
QWEN3_MOE_DIMS: dict[str, Any] = {
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
}

# gpt-oss: the same expert geometry, a sliding window of 8 on even layers (test sequences run
# past it), and YaRN as gpt-oss ships it, over an original context of 64 (x 32 = the tiny 2048).
GPT_OSS_DIMS: dict[str, Any] = {
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "intermediate_size": 32,
    "sliding_window": 8,
    "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "truncate": False, "original_max_position_embeddings": 64,
    },
}  # fmt: skip


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _make_config(
    family: CheckpointFamily,
    vocab_size: int,
    tie_word_embeddings: bool,
    eos_token_id: int,
    overrides: dict[str, Any],
) -> PretrainedConfig:
    common: dict[str, Any] = {
        **_TINY_DIMS,
        "vocab_size": vocab_size,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
        "dtype": "float32",
    }
    if family == "qwen3":
        kwargs = {**common, "rope_parameters": QWEN3_ROPE_PARAMETERS, **overrides}
        return Qwen3Config(architectures=["Qwen3ForCausalLM"], **kwargs)
    if family == "qwen3_moe":
        kwargs = {**common, "rope_parameters": QWEN3_ROPE_PARAMETERS, **QWEN3_MOE_DIMS, **overrides}
        return Qwen3MoeConfig(architectures=["Qwen3MoeForCausalLM"], **kwargs)
    if family == "gpt_oss":
        kwargs = {**common, **GPT_OSS_DIMS, **overrides}
        return GptOssConfig(architectures=["GptOssForCausalLM"], **kwargs)
    if family == "llama3":
        kwargs = {**common, "rope_parameters": LLAMA3_ROPE_PARAMETERS, **overrides}
        return LlamaConfig(architectures=["LlamaForCausalLM"], **kwargs)
    raise ValueError(f"unknown checkpoint family {family!r}; expected 'qwen3', 'qwen3_moe', 'gpt_oss' or 'llama3'")


def _tensor_shapes(config: PretrainedConfig, family: CheckpointFamily) -> dict[str, tuple[int, ...]]:
    """HF parameter names and shapes ([out, in] for linears), in a fixed order for seeding."""
    h, hd, inter = config.hidden_size, config.head_dim, config.intermediate_size
    q_dim, kv_dim = config.num_attention_heads * hd, config.num_key_value_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    dense_mlp = qwen3_moe.dense_mlp_layers(config.to_dict()) if family == "qwen3_moe" else ()
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (q_dim, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv_dim, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv_dim, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, q_dim)
        if family == "gpt_oss":
            shapes |= {p + "self_attn.q_proj.bias": (q_dim,), p + "self_attn.k_proj.bias": (kv_dim,)}
            shapes |= {p + "self_attn.v_proj.bias": (kv_dim,), p + "self_attn.o_proj.bias": (h,)}
            shapes[p + "self_attn.sinks"] = (config.num_attention_heads,)
        if family in ("qwen3", "qwen3_moe"):
            shapes[p + "self_attn.q_norm.weight"] = (hd,)
            shapes[p + "self_attn.k_norm.weight"] = (hd,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        if family == "qwen3_moe" and i not in dense_mlp:  # the published per-expert layout
            shapes[p + "mlp.gate.weight"] = (config.num_experts, h)
            for e in range(config.num_experts):
                shapes[p + f"mlp.experts.{e}.gate_proj.weight"] = (config.moe_intermediate_size, h)
                shapes[p + f"mlp.experts.{e}.up_proj.weight"] = (config.moe_intermediate_size, h)
                shapes[p + f"mlp.experts.{e}.down_proj.weight"] = (h, config.moe_intermediate_size)
        elif family == "gpt_oss":  # kernels [E, in, out], gate and up interleaved
            e = config.num_local_experts
            shapes |= {p + "mlp.router.weight": (e, h), p + "mlp.router.bias": (e,)}
            shapes |= {p + "mlp.experts.gate_up_proj": (e, h, 2 * inter), p + "mlp.experts.gate_up_proj_bias": (e, 2 * inter)}
            shapes |= {p + "mlp.experts.down_proj": (e, inter, h), p + "mlp.experts.down_proj_bias": (e, h)}
        else:
            shapes[p + "mlp.gate_proj.weight"] = (inter, h)
            shapes[p + "mlp.up_proj.weight"] = (inter, h)
            shapes[p + "mlp.down_proj.weight"] = (h, inter)
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


def _random_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """Deterministic weights scaled so activations and logits are O(1).

    Matrices get std 1/sqrt(in_features) and norm scales 1 + N(0, 0.1): every weight then
    visibly moves the output, so parity tests catch a dropped or swapped tensor that
    near-zero or all-ones weights would hide.
    """
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            values = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            values = rng.standard_normal(shape) / np.sqrt(shape[1])
        weights[name] = values.astype(np.float32)
    return weights


def build_tiny_hf_checkpoint(
    out_dir: Path,
    family: CheckpointFamily,
    *,
    seed: int,
    tie_word_embeddings: bool = False,
    vocab_size: int | None = None,
    **overrides: Any,
) -> Path:
    """Write a tiny random float32 HF checkpoint (config, safetensors, tokenizer) to `out_dir`.

    `vocab_size` defaults to the tokenizer's size rounded up to a multiple of 64, so the
    embedding has padding rows as real checkpoints do. `overrides` are config fields (sizes,
    `rope_parameters`, ...) that replace the tiny defaults.
    """
    tokenizer = build_tiny_tokenizer(model_max_length=overrides.get("max_position_embeddings", 2048))
    if vocab_size is None:
        vocab_size = _round_up(len(tokenizer), 64)
    elif vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    config = _make_config(family, vocab_size, tie_word_embeddings, tokenizer.eos_token_id, overrides)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out_dir)
    weights = _random_weights(_tensor_shapes(config, family), seed)
    save_file(weights, out_dir / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(out_dir)
    return out_dir


def ensure_builtin_model(cache_dir: Path) -> Path:
    """Return the built-in model's directory under `cache_dir`, building it on first use.

    It is built in a private temporary directory and renamed into place, so concurrent callers
    and interrupted builds never expose a half-written model; a caller that loses the rename
    race uses the winner's copy, which is byte-identical.
    """
    target = cache_dir / _BUILTIN_DIR_NAME
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{_BUILTIN_DIR_NAME}-", dir=cache_dir))
    try:
        build_tiny_hf_checkpoint(tmp, "qwen3", seed=_BUILTIN_SEED)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.is_dir():
            raise
    return target
