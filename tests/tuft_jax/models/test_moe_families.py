"""Both MoE families (Qwen3-MoE, gpt-oss) against transformers on the same weights, in float32.

The tiny checkpoints have 8 experts, 2 per token. Qwen3-MoE's are in the published per-expert
layout, and run also with a dense MLP in layer 1 of 4 (`mlp_only_layers`: the layers run as
MoE 0, dense 1, MoE 2-3 from two stacks); gpt-oss adds attention biases and sinks, a sliding window of 8 keys on layer 0 (test
sequences run to 41 tokens, past it), YaRN RoPE and biased experts. LoRA references merge
every factor into the weight it changes (`moe_testing.MergedReference`); the PEFT export is
checked through PEFT itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_testing import assert_close_rel, next_token_datum, random_lora, random_sequences, set_slot, slot_arrays
from moe_testing import ExpertLayout, MergedReference, hf_logprobs
from peft import PeftModel
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, GenerationConfig

from tuft_jax.engine import Engine
from tuft_jax.peft_export import CONFIG_FILE, WEIGHTS_FILE
from tuft_jax.types import AdamParams, LoraConfig, SamplingParams

@dataclass(frozen=True)
class Variant:
    family: str
    experts: ExpertLayout
    overrides: dict = field(default_factory=dict)


VARIANTS = {
    "qwen3_moe": Variant("qwen3_moe", "out_in"),
    "qwen3_moe_dense_mlp": Variant("qwen3_moe", "out_in", {"num_hidden_layers": 4, "mlp_only_layers": [1]}),
    "gpt_oss": Variant("gpt_oss", "in_out"),
}
RANK = 4
LENGTHS = (13, 7, 16, 40)


@pytest.fixture(params=list(VARIANTS))
def family(request: pytest.FixtureRequest) -> Variant:
    return VARIANTS[request.param]


@pytest.fixture
def engine(make_engine, family: Variant) -> Engine:
    """A fresh engine (adapter ids are then slot numbers, which `set_slot` takes)."""
    return make_engine(family.family, False, seed=1, **family.overrides)


def _reference_dir(tiny_checkpoint, family: Variant) -> Path:
    return tiny_checkpoint(family.family, False, seed=1, **family.overrides)


def test_logprobs_match_transformers(engine: Engine, tiny_checkpoint, family: Variant) -> None:
    slot = engine.create_adapter(LoraConfig(rank=RANK, seed=0))  # PEFT init: B = 0, the bare base model
    sequences = random_sequences([n + 1 for n in LENGTHS], seed=7)
    (result,) = engine.forward_backward([(slot, [next_token_datum(s) for s in sequences])], "cross_entropy", {}, True)
    reference = AutoModelForCausalLM.from_pretrained(_reference_dir(tiny_checkpoint, family), dtype=torch.float32).eval()
    for seq, output in zip(sequences, result.outputs, strict=True):
        np.testing.assert_allclose(output["logprobs"], hf_logprobs(reference, seq), rtol=0, atol=1e-4)
    assert np.std(np.concatenate([o["logprobs"] for o in result.outputs])) > 0.3


def test_lora_gradients_match_autograd(engine: Engine, tiny_checkpoint, family: Variant) -> None:
    slot = engine.create_adapter(LoraConfig(rank=RANK, seed=0))
    arrays = random_lora(engine, RANK, seed=3)
    set_slot(engine, slot, arrays)
    sequences = random_sequences([n + 1 for n in LENGTHS], seed=4)
    (result,) = engine.forward_backward([(slot, [next_token_datum(s) for s in sequences])], "cross_entropy", {}, False)
    grads = slot_arrays(engine.grads, slot, engine.layout)

    reference = MergedReference(_reference_dir(tiny_checkpoint, family), arrays, RANK, family.experts)
    loss = torch.zeros(())
    for seq, output in zip(sequences, result.outputs, strict=True):
        lp = reference.logprobs(seq)
        np.testing.assert_allclose(output["logprobs"], lp.detach().numpy(), rtol=0, atol=1e-4)
        loss = loss - lp.sum()
    loss.backward()
    assert result.metrics["loss:sum"] == pytest.approx(loss.item(), rel=1e-5)
    moe_layers = engine.config.num_layers - len(engine.config.dense_mlp_layers)
    assert len([k for k in grads if ".experts." in k]) == 4 * moe_layers  # gate_up and down, A and B
    assert len([k for k in grads if ".mlp." in k and ".experts." not in k]) == 6 * len(engine.config.dense_mlp_layers)
    for key, grad in grads.items():
        assert_close_rel(grad, reference.leaves[key].grad.numpy(), 1e-4, key)
    for other in (0, slot + 1):
        assert not any(np.any(g) for g in slot_arrays(engine.grads, other, engine.layout).values())


def test_mixed_adapter_batch_equals_separate_batches(engine: Engine) -> None:
    """Adapters of ranks 2, 4 and 8 in one batch (the grouped form, (expert, slot) groups) give
    each example's logprobs and each slot's gradients as the example run alone (one slot)."""
    slots = [engine.create_adapter(LoraConfig(rank=r, seed=r)) for r in (2, 4, 8)]
    for i, (slot, rank) in enumerate(zip(slots, (2, 4, 8), strict=True)):
        set_slot(engine, slot, random_lora(engine, rank, seed=20 + i))
    data = [next_token_datum(s) for s in random_sequences([13, 6, 16, 9], seed=9)]
    owners = [slots[0], slots[1], slots[0], slots[2]]
    mixed = engine.forward_backward([(s, [d]) for s, d in zip(owners, data, strict=True)], "cross_entropy", {}, False)
    mixed_grads = {s: slot_arrays(engine.grads, s, engine.layout) for s in slots}
    for s in slots:
        engine.optim_step(s, AdamParams(learning_rate=0.0))
    alone = [engine.forward_backward([(s, [d])], "cross_entropy", {}, False)[0] for s, d in zip(owners, data, strict=True)]
    for m, a in zip(mixed, alone, strict=True):
        np.testing.assert_allclose(m.outputs[0]["logprobs"], a.outputs[0]["logprobs"], rtol=1e-5, atol=1e-5)
    for s in slots:
        separate = slot_arrays(engine.grads, s, engine.layout)
        for key, grad in mixed_grads[s].items():
            assert_close_rel(grad, separate[key], 1e-4, f"slot {s} {key}")


def test_greedy_equals_generate_and_sampled_logprobs_equal_forward(engine: Engine, tiny_checkpoint, family: Variant) -> None:
    """Six greedy samples (more rows than adapter slots: the decode step's every-slot LoRA form)
    equal transformers' generate on the merged weights, past gpt-oss's window through the
    paged cache; seeded samples carry the forward pass's logprobs."""
    slot = engine.create_adapter(LoraConfig(rank=RANK, seed=0))
    arrays = random_lora(engine, RANK, seed=5)
    set_slot(engine, slot, arrays)
    prompt = random_sequences([9], seed=11)[0].astype(np.int32)
    params = SamplingParams(max_tokens=14, temperature=0.0)
    greedy = engine.sample(slot, prompt, 6, params, prompt_logprobs=False, topk_prompt_logprobs=0)
    model = MergedReference(_reference_dir(tiny_checkpoint, family), arrays, RANK, family.experts).frozen()
    model.generation_config.eos_token_id = None
    ids = torch.as_tensor(prompt, dtype=torch.long)[None]
    config = GenerationConfig(do_sample=False, max_new_tokens=14, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    assert all(seq.tokens == expected[0, prompt.size :].tolist() for seq in greedy.sequences)

    params = SamplingParams(max_tokens=14, temperature=1.0, seed=3)
    sampled = engine.sample(slot, prompt, 3, params, prompt_logprobs=False, topk_prompt_logprobs=0)
    full = [np.concatenate([prompt, seq.tokens]) for seq in sampled.sequences]
    (forward,) = engine.forward_backward([(slot, [next_token_datum(f) for f in full])], "cross_entropy", {}, True)
    for seq, output in zip(sampled.sequences, forward.outputs, strict=True):
        np.testing.assert_allclose(seq.logprobs, output["logprobs"][prompt.size - 1 :], rtol=0, atol=1e-4)
    assert len({tuple(seq.tokens) for seq in sampled.sequences}) > 1


def test_peft_export_matches_compute_logprobs(engine: Engine, tiny_checkpoint, family: Variant, tmp_path: Path) -> None:
    """A trained adapter's PEFT export, loaded by transformers + peft, gives the prompt logprobs
    the sampler computes for it (the path behind the SDK's `compute_logprobs`)."""
    slot = engine.create_adapter(LoraConfig(rank=RANK, seed=0))
    sequences = random_sequences([12, 20], seed=3)
    data = [next_token_datum(s) for s in sequences]
    for _ in range(2):
        engine.forward_backward([(slot, data)], "cross_entropy", {}, False)
        engine.optim_step(slot, AdamParams(learning_rate=1e-2))
    engine.export_peft(slot, tmp_path)
    adapter_config = json.loads((tmp_path / CONFIG_FILE).read_text())
    dense_mlp = [f"mlp.{name}.weight" for name in ("gate_proj", "up_proj", "down_proj")] if engine.config.dense_mlp_layers else []
    assert adapter_config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", *dense_mlp]
    assert adapter_config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"]
    experts = engine.config.moe
    assert load_file(tmp_path / WEIGHTS_FILE)["base_model.model.model.layers.0.mlp.experts.lora_A.weight"].shape == (
        experts.num_experts * RANK, experts.intermediate_size
    )

    base = AutoModelForCausalLM.from_pretrained(_reference_dir(tiny_checkpoint, family), dtype=torch.float32).eval()
    before = [hf_logprobs(base, seq) for seq in sequences]
    model = PeftModel.from_pretrained(base, tmp_path).eval()
    snapshot = engine.snapshot_adapter(slot)
    for seq, untrained in zip(sequences, before, strict=True):
        params = SamplingParams(max_tokens=1)
        scored = engine.sample(snapshot, seq.astype(np.int32), 1, params, prompt_logprobs=True, topk_prompt_logprobs=0)
        ours = np.asarray(scored.prompt_logprobs[1:], np.float32)
        np.testing.assert_allclose(ours, hf_logprobs(model, seq), rtol=0, atol=1e-4)
        assert np.max(np.abs(ours - untrained)) > 0.05  # the adapter visibly changes the model
