"""Qwen3-MoE specifics: both checkpoint layouts load alike, and dense-MLP layers are refused.
The behaviour it shares with gpt-oss is tested in `test_moe_families.py`."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

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


@pytest.mark.parametrize("dense", [{"mlp_only_layers": [1]}, {"decoder_sparse_step": 2}], ids=["mlp_only_layers", "sparse_step"])
def test_layers_with_a_dense_mlp_are_refused(tiny_checkpoint, dense: dict) -> None:
    config = json.loads((tiny_checkpoint(FAMILY, False, seed=1) / "config.json").read_text()) | dense
    with pytest.raises(ValueError, match="keep a dense MLP"):
        config_from_hf(config)
