"""gpt-oss specifics: per-layer windows, YaRN frequencies against transformers, and an MXFP4
checkpoint (written here in the published layout) loading as its dequantised twin does. The
behaviour it shares with Qwen3-MoE is tested in `test_moe_families.py`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import AutoConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from tuft_jax.models.decoder import LoraShape, rope_frequencies, rope_scale
from tuft_jax.models.gpt_oss import dequantize_mxfp4
from tuft_jax.models.hf_config import load_decoder_config
from tuft_jax.models.hf_weights import load_causal_lm
from tuft_jax.sharding import make_mesh

FAMILY = "gpt_oss"


def test_alternate_layers_slide(tiny_checkpoint) -> None:
    assert load_decoder_config(tiny_checkpoint(FAMILY, False, seed=1)).layer_windows == (8, None)


def test_yarn_frequencies_match_transformers(tiny_checkpoint) -> None:
    model_dir = tiny_checkpoint(FAMILY, False, seed=1)
    config = load_decoder_config(model_dir)
    theirs, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](AutoConfig.from_pretrained(model_dir), "cpu")
    np.testing.assert_allclose(np.asarray(rope_frequencies(config)), theirs.numpy(), rtol=1e-6)
    assert rope_scale(config) == pytest.approx(attention_factor)
    unscaled = 1.0 / 150000.0 ** (np.arange(0, 16, 2) / 16)
    changed = ~np.isclose(theirs.numpy(), unscaled, rtol=1e-6)
    assert changed.any() and not changed.all()  # both bands matter


def _mxfp4(rng: np.random.Generator, experts: int, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Random codes and exponents for an [E, rows, cols] matrix: rows x cols / 32 blocks."""
    blocks = rng.integers(0, 256, size=(experts, rows, cols // 32, 16), dtype=np.uint8)
    scales = rng.integers(120, 127, size=(experts, rows, cols // 32), dtype=np.uint8)
    return blocks, scales


def test_mxfp4_checkpoint_loads_as_its_dequantised_twin(tiny_checkpoint, tmp_path: Path) -> None:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    source = tiny_checkpoint(FAMILY, False, seed=1)  # hidden 64 and intermediate 32: whole 32-value blocks
    config = json.loads((source / "config.json").read_text())
    tensors = load_file(source / "model.safetensors")
    rng = np.random.default_rng(0)
    quantized, twin = dict(tensors), dict(tensors)
    e, d, i = config["num_local_experts"], config["hidden_size"], config["intermediate_size"]
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}.mlp.experts"
        for name, (rows, cols) in (("gate_up_proj", (2 * i, d)), ("down_proj", (d, i))):
            blocks, scales = _mxfp4(rng, e, rows, cols)
            del quantized[f"{prefix}.{name}"]
            quantized |= {f"{prefix}.{name}_blocks": blocks, f"{prefix}.{name}_scales": scales}
            reference = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
            np.testing.assert_array_equal(dequantize_mxfp4(blocks, scales), reference.numpy())
            twin[f"{prefix}.{name}"] = reference.to(torch.bfloat16).float().numpy()
    directories = {}
    for label, weights in (("mxfp4", quantized), ("twin", twin)):
        directory = tmp_path / label
        shutil.copytree(source, directory)
        save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
        directories[label] = directory
    mesh = make_mesh()
    _, got, _, _ = load_causal_lm(directories["mxfp4"], LoraShape(2, 4), jnp.bfloat16, mesh)
    _, want, _, _ = load_causal_lm(directories["twin"], LoraShape(2, 4), jnp.bfloat16, mesh)
    for (path, a), (_, b) in zip(nnx.to_flat_state(got), nnx.to_flat_state(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))
