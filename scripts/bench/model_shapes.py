"""Random-weight checkpoints for benchmarks: the built-in tiny model or a real model's shape."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tuft_jax.builtin_model import build_tiny_hf_checkpoint, ensure_builtin_model

SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": dict(
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
    ),
    "qwen3-1.7b": dict(
        hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
    ),
}


def model_dir(shape: str, cache_dir: Path) -> Path:
    """Builds (once) and returns an HF directory with random weights of the named shape."""
    if shape == "tiny":
        return ensure_builtin_model(cache_dir)
    target = cache_dir / f"bench-{shape}"
    if not (target / "model.safetensors").exists():
        overrides = dict(SHAPES[shape])
        build_tiny_hf_checkpoint(
            target, "qwen3", seed=0, vocab_size=overrides.pop("vocab_size"),
            tie_word_embeddings=overrides.pop("tie_word_embeddings"), max_position_embeddings=4096, **overrides,
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
