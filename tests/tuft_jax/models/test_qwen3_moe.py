"""Qwen3-MoE specifics: both checkpoint layouts load alike, and the layers that keep a dense MLP.
The behaviour it shares with gpt-oss is tested in `test_moe_families.py`."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from tuft_jax.models.decoder import LoraShape
from tuft_jax.models.hf_config import config_from_hf
from tuft_jax.models.hf_weights import load_causal_lm
from tuft_jax.sharding import make_mesh

FAMILY = "qwen3_moe"


def test_fused_transformers5_layout_loads_like_the_published_one(tiny_checkpoint, tmp_path: Path) -> None:
    published = tiny_checkpoint(FAMILY, False, seed=1)
    tensors = load_file(published / "model.safetensors")
    config = json.loads((published / "config.json").read_text())
    fused = {k: v for k, v in tensors.items() if ".experts." not in k}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp.experts"
        experts = range(config["num_local_experts"])  # transformers 5 writes num_experts under this name
        fused[f"{p}.gate_up_proj"] = np.stack(
            [np.concatenate([tensors[f"{p}.{e}.gate_proj.weight"], tensors[f"{p}.{e}.up_proj.weight"]]) for e in experts]
        )
        fused[f"{p}.down_proj"] = np.stack([tensors[f"{p}.{e}.down_proj.weight"] for e in experts])
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(fused, tmp_path / "model.safetensors", metadata={"format": "pt"})
    mesh = make_mesh()
    _, want, _, _ = load_causal_lm(published, LoraShape(2, 4), jnp.float32, mesh)
    _, got, _, _ = load_causal_lm(tmp_path, LoraShape(2, 4), jnp.float32, mesh)
    for (path, a), (_, b) in zip(nnx.to_flat_state(want), nnx.to_flat_state(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))


@pytest.mark.parametrize(
    "dense", [{"mlp_only_layers": [1]}, {"decoder_sparse_step": 2}, {"decoder_sparse_step": 3, "mlp_only_layers": [5]}]
)
def test_dense_mlp_layers_are_the_ones_transformers_builds(dense: dict) -> None:
    hf = Qwen3MoeConfig(num_hidden_layers=6, hidden_size=16, intermediate_size=32, moe_intermediate_size=8, num_experts=4,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=8, vocab_size=64, **dense)  # fmt: skip
    model = Qwen3MoeForCausalLM(hf)
    built = tuple(i for i, layer in enumerate(model.model.layers) if not hasattr(layer.mlp, "experts"))
    config = config_from_hf(hf.to_dict())
    assert config.dense_mlp_layers == built and built
    assert config.moe is not None


def test_a_config_without_sparse_layers_is_a_dense_decoder(tiny_checkpoint) -> None:
    config = json.loads((tiny_checkpoint(FAMILY, False, seed=1) / "config.json").read_text()) | {"decoder_sparse_step": 3}
    decoder = config_from_hf(config)  # 2 layers, neither a multiple of 3
    assert decoder.moe is None and decoder.dense_mlp_layers == ()
