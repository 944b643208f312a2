"""Training and sampling on a mesh of 8 simulated CPU devices give the same losses, LoRA weights
and samples as one device, and each device holds an eighth of the KV pool (heads over tp=2,
blocks over fsdp=4); for a Qwen3-MoE and a gpt-oss too, whose experts are split over fsdp and
whose tokens each device routes itself (gpt-oss: with attention sinks split over tp; the
Qwen3-MoE keeps a dense MLP in its middle layer, a second layer stack).

XLA's device count is fixed when JAX starts, so the comparison runs in a child process that
sets `--xla_force_host_platform_device_count=8` and trains the same adapter on a 1-device and
an (fsdp=4, tp=2) mesh, then samples from it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from tuft_jax.sharding import MESH_AXES, logical_axes, make_mesh, spec_for


def _train(mesh_devices: int, tp: int, ep: int, model_dir: Path) -> dict:
    import jax

    from tuft_jax.engine import Engine
    from tuft_jax.model_registry import BaseModelSpec, detect_family
    from tuft_jax.types import AdamParams, Datum, LoraConfig, SamplingParams

    spec = BaseModelSpec("tiny", model_dir, 256, 8, 4, family=detect_family(model_dir))
    engine = Engine(spec, make_mesh(jax.devices()[:mesh_devices], tp=tp, ep=ep), kv_cache_tokens=1024)
    slots = [engine.create_adapter(LoraConfig(rank=4, seed=s)) for s in (1, 2)]
    rng = np.random.default_rng(0)
    data = []
    for length in (9, 13, 17):
        tokens = rng.integers(0, 400, size=length + 1)
        data.append(Datum(tokens[:-1].astype(np.int32), {"target_tokens": tokens[1:].astype(np.int64)}))
    losses = []
    for _ in range(3):
        results = engine.forward_backward([(slots[0], data[:2]), (slots[1], data[2:])], "cross_entropy", {}, False)
        losses.append([r.metrics["loss:sum"] for r in results])
        for slot in slots:
            engine.optim_step(slot, AdamParams(learning_rate=1e-2, weight_decay=0.1, grad_clip_norm=5.0))
    weights = [float(np.abs(np.asarray(x)).sum()) for x in jax.tree.leaves(engine.lora)]
    shardings = {str(x.sharding.spec) for x in jax.tree.leaves(engine.base)}
    snapshot = engine.snapshot_adapter(slots[0])
    prompt = rng.integers(0, 400, size=21).astype(np.int32)
    samples = []
    for params in (SamplingParams(max_tokens=12, temperature=0.0), SamplingParams(max_tokens=12, temperature=1.0, seed=3)):
        result = engine.sample(snapshot, prompt, 3, params, prompt_logprobs=True, topk_prompt_logprobs=0)
        samples.append([[s.tokens, s.logprobs] for s in result.sequences] + [result.prompt_logprobs[1:]])
    pool = engine.decoder._require_pool()
    kv_device_bytes = max(shard.data.nbytes for shard in pool.k.addressable_shards)
    return {
        "losses": losses, "weights": weights, "shardings": sorted(shardings), "samples": samples,
        "kv_bytes": pool.k.nbytes, "kv_device_bytes": kv_device_bytes, "kv_blocks": pool.k.shape[2],
        "kv_split": engine.mesh.shape["fsdp"] * engine.mesh.shape["tp"],
    }  # fmt: skip


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "gpt_oss"])
def test_eight_device_mesh_matches_one_device(tmp_path: Path, family: str) -> None:
    from tuft_jax.builtin_model import build_tiny_hf_checkpoint

    overrides = {"num_hidden_layers": 3, "mlp_only_layers": [1]} if family == "qwen3_moe" else {}
    model_dir = build_tiny_hf_checkpoint(tmp_path / family, family, seed=0, **overrides)  # type: ignore[arg-type]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    ep = 1 if family == "qwen3" else 2  # MoE: experts over ep=2, with fsdp=2 and tp=2
    out = subprocess.run(
        [sys.executable, __file__, str(model_dir), str(ep)], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-4000:]
    single, sharded = json.loads(out.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(sharded["losses"], single["losses"], rtol=1e-4)
    np.testing.assert_allclose(sharded["weights"], single["weights"], rtol=1e-4)
    assert any("fsdp" in s for s in sharded["shardings"]) and any("tp" in s for s in sharded["shardings"])
    if family != "qwen3":  # expert kernels [L, E, D, 2I] and [L, E, I, D]: whole experts per (ep, fsdp) shard
        assert {"P(None, ('ep', 'fsdp'), None, 'tp')", "P(None, ('ep', 'fsdp'), 'tp', None)"} <= set(sharded["shardings"])
    for ours, reference in zip(sharded["samples"], single["samples"], strict=True):
        assert [tokens for tokens, _ in ours[:-1]] == [tokens for tokens, _ in reference[:-1]]
        np.testing.assert_allclose([lp for _, lp in ours[:-1]], [lp for _, lp in reference[:-1]], atol=1e-4)
        np.testing.assert_allclose(ours[-1], reference[-1], atol=1e-4)
    # The pool's kv heads are split over tp and its blocks over fsdp: each device holds
    # 1 / (fsdp x tp) of it (an eighth without ep), at the same bytes per block.
    assert single["kv_device_bytes"] == single["kv_bytes"]
    assert sharded["kv_device_bytes"] * sharded["kv_split"] == sharded["kv_bytes"]
    assert sharded["kv_split"] == 8 // ep
    assert sharded["kv_bytes"] / sharded["kv_blocks"] == single["kv_bytes"] / single["kv_blocks"]


def test_logical_axes_follow_parameter_roles() -> None:
    lora_a = ("model", "layers", "self_attn", "q_proj", "lora", "lora_a")
    assert logical_axes(lora_a, 4) == ("slots", "layers", "embed", "rank")
    assert logical_axes(("model", "layers", "mlp", "down_proj", "weight"), 3) == ("layers", "mlp", "embed")
    assert logical_axes(("model", "embed_tokens", "weight"), 2) == ("vocab", "embed")
    assert logical_axes(("model", "layers", "self_attn", "q_norm", "weight"), 2) == ("layers", None)
    assert logical_axes(("lm_head", "lora", "lora_b"), 3) == ("slots", "rank", "vocab")
    experts = ("model", "layers", "mlp", "experts")
    assert logical_axes((*experts, "gate_up_proj"), 4) == ("layers", "experts", "embed", "mlp")
    assert logical_axes((*experts, "gate_up_lora", "lora_b"), 5) == ("slots", "layers", "experts", "rank", "mlp")
    assert logical_axes((*experts, "down_lora", "lora_a"), 5) == ("slots", "layers", "experts", "mlp", "rank")
    assert logical_axes((*experts, "down_lora", "lora_b"), 4) == ("slots", "layers", "rank", "embed")
    assert logical_axes((*experts, "gate_up_proj_bias"), 3) == ("layers", "experts", None)
    assert logical_axes(("mlp", "experts", "down_proj_bias"), 2) == ("experts", None)  # one layer's


def test_indivisible_dimensions_stay_replicated() -> None:
    mesh = AbstractMesh((4, 1, 2), MESH_AXES)
    assert spec_for(("vocab", "embed"), (8, 64), mesh) == PartitionSpec("tp", "fsdp")
    assert spec_for(("vocab", "embed"), (7, 6), mesh) == PartitionSpec(None, None)


def test_a_mesh_axis_splits_the_first_dimension_that_takes_it() -> None:
    mesh = AbstractMesh((4, 1, 2), MESH_AXES)
    experts = ("layers", "experts", "embed", "mlp")
    assert spec_for(experts, (2, 8, 64, 64), mesh) == PartitionSpec(None, "fsdp", None, "tp")
    assert spec_for(experts, (2, 6, 64, 64), mesh) == PartitionSpec(None, None, "fsdp", "tp")
    expert_parallel = AbstractMesh((2, 2, 2), MESH_AXES)
    assert spec_for(experts, (2, 8, 64, 64), expert_parallel) == PartitionSpec(None, ("ep", "fsdp"), None, "tp")
    assert spec_for(experts, (2, 2, 64, 64), expert_parallel) == PartitionSpec(None, "ep", "fsdp", "tp")
    assert spec_for(("vocab", "embed"), (8, 64), expert_parallel) == PartitionSpec("tp", ("fsdp", "ep"))


if __name__ == "__main__":
    model, ep = Path(sys.argv[1]), int(sys.argv[2])
    print(json.dumps([_train(1, 1, 1, model), _train(8, 2, ep, model)]))
