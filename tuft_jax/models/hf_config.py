"""Hugging Face `config.json` → DecoderConfig for the supported families.

Qwen3 (dense) is the shared decoder with per-head RMSNorm on queries and keys; Qwen3-MoE adds
its sparse MoE block (`tuft_jax.models.qwen3_moe`); gpt-oss has attention biases and sinks,
sliding-window layers, YaRN RoPE and its own MoE block (`tuft_jax.models.gpt_oss`); Llama 3.x
has no q/k norm and may carry `llama3` RoPE scaling. Fields that moved between transformers versions
(`rope_parameters` in 5.x, `rope_theta`/`rope_scaling` in 4.x) are read from either place.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tuft_jax.models import gpt_oss, qwen3_moe
from tuft_jax.models.decoder import DecoderConfig, Llama3RopeScaling, YarnRopeScaling

SUPPORTED_MODEL_TYPES = {"qwen3": True, qwen3_moe.MODEL_TYPE: True, gpt_oss.MODEL_TYPE: False, "llama": False}  # -> q/k RMSNorm


def load_decoder_config(model_dir: Path) -> DecoderConfig:
    return config_from_hf(json.loads((model_dir / "config.json").read_text()))


def config_from_hf(hf: dict[str, Any]) -> DecoderConfig:
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r} (supported: {sorted(SUPPORTED_MODEL_TYPES)})")
    gpt = model_type == gpt_oss.MODEL_TYPE
    if (hf.get("attention_bias") and not gpt) or hf.get("mlp_bias"):
        raise ValueError(f"{model_type} checkpoints with attention or MLP biases are not supported")
    heads = int(hf["num_attention_heads"])
    moe = {qwen3_moe.MODEL_TYPE: qwen3_moe.moe_config_from_hf, gpt_oss.MODEL_TYPE: gpt_oss.moe_config_from_hf}.get(model_type)
    layers = int(hf["num_hidden_layers"])
    dense = qwen3_moe.dense_mlp_layers(hf) if model_type == qwen3_moe.MODEL_TYPE else ()
    if len(dense) == layers:  # no sparse layer: a dense decoder
        moe, dense = None, ()
    return DecoderConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(hf),
        rope_scaling=_rope_scaling(hf),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qk_norm=SUPPORTED_MODEL_TYPES[model_type],
        max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
        eos_token_ids=_eos_token_ids(hf),
        moe=None if moe is None else moe(hf),
        dense_mlp_layers=dense,
        attention_bias=gpt and bool(hf.get("attention_bias", True)),
        attention_sinks=gpt,
        layer_windows=gpt_oss.layer_windows(hf) if gpt else None,
    )


def _rope_theta(hf: dict[str, Any]) -> float:
    params = hf.get("rope_parameters") or {}
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _rope_scaling(hf: dict[str, Any]) -> Llama3RopeScaling | YarnRopeScaling | None:
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return None
    if kind == "yarn":
        return _yarn(params, hf)
    if kind != "llama3":
        raise ValueError(f"unsupported rope_type {kind!r} (supported: default, llama3, yarn)")
    return Llama3RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )


def _yarn(params: dict[str, Any], hf: dict[str, Any]) -> YarnRopeScaling:
    """transformers' YaRN defaults: beta_fast 32, beta_slow 1, truncate on, and an attention
    factor of 0.1 ln(factor) + 1 unless given (mscale variants are not supported)."""
    if params.get("mscale") or params.get("mscale_all_dim"):
        raise ValueError("YaRN with mscale / mscale_all_dim is not supported")
    original = int(params["original_max_position_embeddings"])
    factor = float(params.get("factor") or int(hf["max_position_embeddings"]) / original)
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return YarnRopeScaling(
        factor=factor,
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        original_max_position_embeddings=original,
        truncate=bool(params.get("truncate", True)),
        attention_factor=float(attention_factor),
    )


def _eos_token_ids(hf: dict[str, Any]) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(e) for e in eos) if isinstance(eos, list) else (int(eos),)
