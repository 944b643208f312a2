"""Qwen3-MoE against transformers' Qwen3MoeForCausalLM on the same weights, in float32.

The tiny checkpoint has 8 experts, 2 per token (renormalised), in the published per-expert
layout. LoRA references merge every adapter factor into the weight it changes
(`moe_testing.MergedReference`); PEFT's export is checked through PEFT itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from engine_testing import (
    assert_close_rel,
    next_token_datum,
    random_lora,
    random_sequences,
    set_slot,
    slot_arrays,
)
from flax import nnx
from moe_testing import MergedReference, hf_logprobs
from peft import PeftModel
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM, GenerationConfig

from tuft_jax.engine import Engine
from tuft_jax.models.decoder import LoraShape
from tuft_jax.models.hf_config import config_from_hf
from tuft_jax.models.hf_weights import load_causal_lm
from tuft_jax.peft_export import CONFIG_FILE, WEIGHTS_FILE
from tuft_jax.sharding import make_mesh
from tuft_jax.types import AdamParams, LoraConfig, SamplingParams

FAMILY = "qwen3_moe"
EXPERT_LAYOUT = "out_in"
RANK = 4
LENGTHS = (13, 7, 16, 40)


@pytest.fixture
def moe_engine(make_engine) -> Engine:
    """A fresh engine (adapter ids are then slot numbers, which `set_slot` takes)."""
    return make_engine(FAMILY, False, seed=1)


def test_logprobs_match_transformers(moe_engine: Engine, tiny_checkpoint) -> None:
    slot = moe_engine.create_adapter(LoraConfig(rank=RANK, seed=0))  # PEFT init: B = 0, the bare base model
    sequences = random_sequences([n + 1 for n in LENGTHS], seed=7)
    (result,) = moe_engine.forward_backward([(slot, [next_token_datum(s) for s in sequences])], "cross_entropy", {}, True)
    reference = AutoModelForCausalLM.from_pretrained(tiny_checkpoint(FAMILY, False, seed=1), dtype=torch.float32).eval()
    for seq, output in zip(sequences, result.outputs, strict=True):
        np.testing.assert_allclose(output["logprobs"], hf_logprobs(reference, seq), rtol=0, atol=1e-4)
    assert np.std(np.concatenate([o["logprobs"] for o in result.outputs])) > 0.3


def test_lora_gradients_match_autograd(moe_engine: Engine, tiny_checkpoint) -> None:
    slot = moe_engine.create_adapter(LoraConfig(rank=RANK, seed=0))
    arrays = random_lora(moe_engine, RANK, seed=3)
    set_slot(moe_engine, slot, arrays)
    sequences = random_sequences([n + 1 for n in LENGTHS], seed=4)
    (result,) = moe_engine.forward_backward([(slot, [next_token_datum(s) for s in sequences])], "cross_entropy", {}, False)
    grads = slot_arrays(moe_engine.grads, slot)

    reference = MergedReference(tiny_checkpoint(FAMILY, False, seed=1), arrays, RANK, EXPERT_LAYOUT)
    loss = torch.zeros(())
    for seq, output in zip(sequences, result.outputs, strict=True):
        lp = reference.logprobs(seq)
        np.testing.assert_allclose(output["logprobs"], lp.detach().numpy(), rtol=0, atol=1e-4)
        loss = loss - lp.sum()
    loss.backward()
    assert result.metrics["loss:sum"] == pytest.approx(loss.item(), rel=1e-5)
    experts = [k for k in grads if ".experts." in k]
    assert len(experts) == 4 * moe_engine.config.num_layers  # gate_up and down, A and B
    for key, grad in grads.items():
        assert_close_rel(grad, reference.leaves[key].grad.numpy(), 1e-4, key)
    for other in (0, slot + 1):
        assert not any(np.any(g) for g in slot_arrays(moe_engine.grads, other).values())


def test_mixed_adapter_batch_equals_separate_batches(moe_engine: Engine) -> None:
    """Adapters of ranks 2, 4 and 8 in one batch (the grouped form, (expert, slot) groups) give
    each example's logprobs and each slot's gradients as the example run alone (one slot)."""
    slots = [moe_engine.create_adapter(LoraConfig(rank=r, seed=r)) for r in (2, 4, 8)]
    for i, (slot, rank) in enumerate(zip(slots, (2, 4, 8), strict=True)):
        set_slot(moe_engine, slot, random_lora(moe_engine, rank, seed=20 + i))
    data = [next_token_datum(s) for s in random_sequences([13, 6, 16, 9], seed=9)]
    owners = [slots[0], slots[1], slots[0], slots[2]]
    mixed = moe_engine.forward_backward([(s, [d]) for s, d in zip(owners, data, strict=True)], "cross_entropy", {}, False)
    mixed_grads = {s: slot_arrays(moe_engine.grads, s) for s in slots}
    for s in slots:
        moe_engine.optim_step(s, AdamParams(learning_rate=0.0))
    alone = [moe_engine.forward_backward([(s, [d])], "cross_entropy", {}, False)[0] for s, d in zip(owners, data, strict=True)]
    for m, a in zip(mixed, alone, strict=True):
        np.testing.assert_allclose(m.outputs[0]["logprobs"], a.outputs[0]["logprobs"], rtol=0, atol=1e-5)
    for s in slots:
        separate = slot_arrays(moe_engine.grads, s)
        for key, grad in mixed_grads[s].items():
            assert_close_rel(grad, separate[key], 1e-5, f"slot {s} {key}")


def test_greedy_equals_generate_and_sampled_logprobs_equal_forward(moe_engine: Engine, tiny_checkpoint) -> None:
    """Six greedy samples (more rows than adapter slots: the decode step's every-slot LoRA form)
    equal transformers' generate on the merged weights; seeded samples carry forward logprobs."""
    slot = moe_engine.create_adapter(LoraConfig(rank=RANK, seed=0))
    arrays = random_lora(moe_engine, RANK, seed=5)
    set_slot(moe_engine, slot, arrays)
    prompt = random_sequences([9], seed=11)[0].astype(np.int32)
    greedy = moe_engine.sample(slot, prompt, 6, SamplingParams(max_tokens=10, temperature=0.0), prompt_logprobs=False, topk_prompt_logprobs=0)
    model = MergedReference(tiny_checkpoint(FAMILY, False, seed=1), arrays, RANK, EXPERT_LAYOUT).frozen()
    model.generation_config.eos_token_id = None
    ids = torch.as_tensor(prompt, dtype=torch.long)[None]
    config = GenerationConfig(do_sample=False, max_new_tokens=10, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)[0, prompt.size :].tolist()
    assert all(seq.tokens == expected for seq in greedy.sequences)

    sampled = moe_engine.sample(slot, prompt, 3, SamplingParams(max_tokens=10, temperature=1.0, seed=3), prompt_logprobs=False, topk_prompt_logprobs=0)
    full = [np.concatenate([prompt, seq.tokens]) for seq in sampled.sequences]
    (forward,) = moe_engine.forward_backward([(slot, [next_token_datum(f) for f in full])], "cross_entropy", {}, True)
    for seq, output in zip(sampled.sequences, forward.outputs, strict=True):
        np.testing.assert_allclose(seq.logprobs, output["logprobs"][prompt.size - 1 :], rtol=0, atol=1e-4)
    assert len({tuple(seq.tokens) for seq in sampled.sequences}) > 1


def test_peft_export_loads_in_transformers_and_peft(moe_engine: Engine, tiny_checkpoint, tmp_path: Path) -> None:
    slot = moe_engine.create_adapter(LoraConfig(rank=RANK, seed=0))
    sequences = random_sequences([12, 9], seed=3)
    data = [next_token_datum(s) for s in sequences]
    for _ in range(2):
        moe_engine.forward_backward([(slot, data)], "cross_entropy", {}, False)
        moe_engine.optim_step(slot, AdamParams(learning_rate=1e-2))
    moe_engine.export_peft(slot, tmp_path)
    adapter_config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert adapter_config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert adapter_config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"]
    experts = moe_engine.config.moe
    assert load_file(tmp_path / WEIGHTS_FILE)["base_model.model.model.layers.0.mlp.experts.lora_A.weight"].shape == (
        experts.num_experts * RANK, experts.intermediate_size
    )

    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint(FAMILY, False, seed=1), dtype=torch.float32).eval()
    before = [hf_logprobs(base, seq) for seq in sequences]
    model = PeftModel.from_pretrained(base, tmp_path).eval()
    (ours,) = moe_engine.forward_backward([(slot, data)], "cross_entropy", {}, True)
    for seq, output, untrained in zip(sequences, ours.outputs, before, strict=True):
        np.testing.assert_allclose(output["logprobs"], hf_logprobs(model, seq), rtol=0, atol=1e-4)
        assert np.max(np.abs(output["logprobs"] - untrained)) > 0.05  # the adapter visibly changes the model


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
