"""Loads a local Hugging Face checkpoint (config.json + safetensors shards) into a CausalLM.

Parameter paths equal safetensors keys once a stacked layer leaf is read as one tensor per
layer (`layer_stack.layer_paths`), so the weight map is one rule: projection kernels are
transposed to [in, out]; everything else loads as stored. MoE expert kernels are the exception:
each is assembled from its family's checkpoint layout (`qwen3_moe.expert_tensor`,
`gpt_oss.expert_tensor`, which dequantises MXFP4). LoRA slots
start at zero.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open

from tuft_jax.layer_stack import layer_paths
from tuft_jax.stored_dtype import stored_dtype
from tuft_jax.models.decoder import CausalLM, DecoderConfig, LoraShape, layer_layout
from tuft_jax.models import gpt_oss, qwen3_moe
from tuft_jax.models.hf_config import load_decoder_config
from tuft_jax.sharding import param_sharding


def hf_key(path: tuple) -> str:
    return ".".join(str(part) for part in path)


def is_projection(path: tuple) -> bool:
    """Kernels HF stores [out, in] and we store [in, out]."""
    return path[-1] == "weight" and path[-2] != "embed_tokens" and not str(path[-2]).endswith("norm")


def _shard_files(model_dir: Path) -> dict[str, Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: model_dir / name for key, name in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{model_dir} has neither model.safetensors nor model.safetensors.index.json")
    with safe_open(single, framework="flax") as f:
        return {key: single for key in f.keys()}


EXPERT_TENSORS = {qwen3_moe.MODEL_TYPE: qwen3_moe.expert_tensor, gpt_oss.MODEL_TYPE: gpt_oss.expert_tensor}


def is_expert_tensor(path: tuple) -> bool:
    return len(path) >= 2 and path[-2] == "experts"


def load_causal_lm(
    model_dir: Path, lora: LoraShape, dtype: jnp.dtype, mesh: Mesh
) -> tuple[nnx.GraphDef, nnx.State, nnx.State, DecoderConfig]:
    """Returns (graphdef, base params, LoRA params, config), each leaf placed with its sharding."""
    config = load_decoder_config(model_dir)
    abstract = nnx.eval_shape(lambda: CausalLM(config, lora, dtype=dtype))
    graphdef, lora_abstract, base_abstract = nnx.split(abstract, nnx.LoRAParam, nnx.Param)
    files = _shard_files(model_dir)
    handles = {path: safe_open(path, framework="flax") for path in set(files.values())}

    def read(key: str) -> np.ndarray:
        if key not in files:
            raise ValueError(f"{model_dir}: checkpoint has no tensor {key!r}")
        return np.asarray(handles[files[key]].get_tensor(key))

    def tensor_of(path: tuple) -> np.ndarray:
        key = hf_key(path)
        if is_expert_tensor(path):
            assert config.moe is not None
            prefix, _, name = key.rpartition(".")
            expert_tensor = EXPERT_TENSORS[config.moe.family]
            return expert_tensor(prefix, name, config.moe.num_experts, read, files.__contains__)
        return read(key).T if is_projection(path) else read(key)

    layout = layer_layout(config)
    base_leaves = []
    for path, var in nnx.to_flat_state(base_abstract):
        paths = layer_paths(path, layout)
        tensor = tensor_of(path) if paths == [path] else np.stack([tensor_of(p) for p in paths])
        if tensor.shape != var.shape:
            raise ValueError(f"{model_dir}: {hf_key(paths[0])} has shape {tensor.shape}, expected {var.shape}")
        tensor = np.asarray(tensor.astype(dtype)).view(stored_dtype(dtype))
        placed = jax.device_put(tensor, param_sharding(path, var.shape, mesh))
        base_leaves.append((path, var.replace(placed)))
    lora_leaves = [
        (path, var.replace(jax.device_put(np.zeros(var.shape, var.dtype), param_sharding(path, var.shape, mesh))))
        for path, var in nnx.to_flat_state(lora_abstract)
    ]
    return graphdef, nnx.from_flat_state(base_leaves), nnx.from_flat_state(lora_leaves), config

