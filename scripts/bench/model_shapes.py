"""Random-weight checkpoints for benchmarks: the built-in tiny model or a real model's shape."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tuft_jax.builtin_model import (
    QWEN3_ROPE_PARAMETERS, CheckpointFamily, build_tiny_hf_checkpoint, ensure_builtin_model,
)

_QWEN3 = dict(model_type="qwen3", rms_norm_eps=1e-6, rope_parameters=QWEN3_ROPE_PARAMETERS, max_position_embeddings=40960)

SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": dict(
        _QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
    ),
    "qwen3-1.7b": dict(
        _QWEN3, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
    ),
    "qwen3-8b": dict(
        _QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False,
    ),
    "qwen3-30b-a3b": dict(
        _QWEN3, model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936, tie_word_embeddings=False,
        num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[],
    ),
    "llama3.1-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False, rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    ),
}
"""Real models' `config.json` fields (sizes, norms, RoPE); `config_from_hf` reads them as they are."""

_FAMILY: dict[str, CheckpointFamily] = {"qwen3": "qwen3", "qwen3_moe": "qwen3_moe", "llama": "llama3"}


def explicit_shape(
    hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, head_dim: int, vocab: int
) -> str:
    """Registers an untied Qwen3 of the given dimensions in SHAPES; returns its name."""
    name = f"qwen3-d{hidden}-f{intermediate}-l{layers}-h{heads}-kv{kv_heads}-hd{head_dim}-v{vocab}"
    SHAPES[name] = dict(
        _QWEN3, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=vocab,
        tie_word_embeddings=False,
    )  # fmt: skip
    return name


_DIMS = ("hidden", "intermediate", "layers", "heads", "kv-heads", "head-dim", "vocab")


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """--shape (a named shape), or the seven dimensions of an explicit one."""
    parser.add_argument("--shape", default="tiny", choices=["tiny", *SHAPES])
    for dim in _DIMS:
        parser.add_argument(f"--{dim}", type=int, help="an explicit shape (all seven together; overrides --shape)")


def shape_from_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The shape `add_shape_arguments`' arguments name (an explicit one registered in SHAPES)."""
    explicit = [getattr(args, dim.replace("-", "_")) for dim in _DIMS]
    if all(v is None for v in explicit):
        return args.shape
    if None in explicit:
        parser.error("an explicit shape needs all of --" + ", --".join(_DIMS))
    return explicit_shape(*explicit)


def model_dir(shape: str, cache_dir: Path) -> Path:
    """Builds (once) and returns an HF directory with random weights of the named shape."""
    if shape == "tiny":
        return ensure_builtin_model(cache_dir)
    target = cache_dir / f"bench-{shape}"
    if not (target / "model.safetensors").exists():
        overrides = dict(SHAPES[shape])
        build_tiny_hf_checkpoint(
            target, _FAMILY[overrides.pop("model_type")], seed=0, vocab_size=overrides.pop("vocab_size"),
            tie_word_embeddings=overrides.pop("tie_word_embeddings"), **overrides,
        )
    return target


def matmul_params(directory: Path) -> tuple[int, dict[str, int]]:
    """Parameters that take part in matmuls per token (all projections + the output head) and the shape."""
    hf = json.loads((directory / "config.json").read_text())
    d, f, layers = hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"]
    heads, kv, hd, vocab = hf["num_attention_heads"], hf["num_key_value_heads"], hf.get("head_dim") or d // hf["num_attention_heads"], hf["vocab_size"]
    per_layer = d * heads * hd * 2 + d * kv * hd * 2 + 3 * d * f
    shape = dict(layers=layers, heads=heads, head_dim=hd, hidden=d, vocab=vocab)
    return layers * per_layer + d * vocab, shape
