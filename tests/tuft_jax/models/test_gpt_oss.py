"""gpt-oss against transformers' GptOssForCausalLM on the same weights, in float32.

The tiny checkpoint has 8 experts (2 per token, biased, clamped SwiGLU), attention biases and
sinks, a sliding window of 8 keys on layer 0 and full attention on layer 1, and YaRN RoPE;
test sequences run to 41 tokens, well past the window. LoRA references merge every factor into
the weight it changes (`moe_testing.MergedReference`). A checkpoint with MXFP4 expert kernels,
written here in the published layout, must load as its dequantised twin does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from engine_testing import assert_close_rel, next_token_datum, random_lora, random_sequences, set_slot, slot_arrays
from flax import nnx
from moe_testing import MergedReference, hf_logprobs
from peft import PeftModel
from safetensors.numpy import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from tuft_jax.engine import Engine
from tuft_jax.models.decoder import LoraShape, rope_frequencies, rope_scale
from tuft_jax.models.hf_config import load_decoder_config
from tuft_jax.models.gpt_oss import dequantize_mxfp4
from tuft_jax.models.hf_weights import load_causal_lm
from tuft_jax.sharding import make_mesh
from tuft_jax.types import AdamParams, LoraConfig, SamplingParams

FAMILY = "gpt_oss"
RANK = 4
LENGTHS = (13, 7, 16, 40)


@pytest.fixture
def gpt_engine(make_engine) -> Engine:
    return make_engine(FAMILY, False, seed=1)


def test_logprobs_match_transformers(gpt_engine: Engine, tiny_checkpoint) -> None:
    assert gpt_engine.config.layer_windows == (8, None)
    slot = gpt_engine.create_adapter(LoraConfig(rank=RANK, seed=0))
    sequences = random_sequences([n + 1 for n in LENGTHS], seed=7)
    (result,) = gpt_engine.forward_backward([(slot, [next_token_datum(s) for s in sequences])], "cross_entropy", {}, True)
    reference = AutoModelForCausalLM.from_pretrained(tiny_checkpoint(FAMILY, False, seed=1), dtype=torch.float32).eval()
    for seq, output in zip(sequences, result.outputs, strict=True):
        np.testing.assert_allclose(output["logprobs"], hf_logprobs(reference, seq), rtol=0, atol=1e-4)
    assert np.std(np.concatenate([o["logprobs"] for o in result.outputs])) > 0.3


def test_lora_gradients_match_autograd(gpt_engine: Engine, tiny_checkpoint) -> None:
    slot = gpt_engine.create_adapter(LoraConfig(rank=RANK, seed=0))
    arrays = random_lora(gpt_engine, RANK, seed=3)
    set_slot(gpt_engine, slot, arrays)
    sequences = random_sequences([n + 1 for n in LENGTHS], seed=4)
    (result,) = gpt_engine.forward_backward([(slot, [next_token_datum(s) for s in sequences])], "cross_entropy", {}, False)
    grads = slot_arrays(gpt_engine.grads, slot)
    reference = MergedReference(tiny_checkpoint(FAMILY, False, seed=1), arrays, RANK, "in_out")
    loss = torch.zeros(())
    for seq, output in zip(sequences, result.outputs, strict=True):
        lp = reference.logprobs(seq)
        np.testing.assert_allclose(output["logprobs"], lp.detach().numpy(), rtol=0, atol=1e-4)
        loss = loss - lp.sum()
    loss.backward()
    assert len([k for k in grads if ".experts." in k]) == 4 * gpt_engine.config.num_layers
    for key, grad in grads.items():
        assert_close_rel(grad, reference.leaves[key].grad.numpy(), 1e-4, key)


def test_greedy_equals_generate_and_sampled_logprobs_equal_forward(gpt_engine: Engine, tiny_checkpoint) -> None:
    """Decoding runs past the sliding window through the paged cache, sinks included."""
    slot = gpt_engine.create_adapter(LoraConfig(rank=RANK, seed=0))
    arrays = random_lora(gpt_engine, RANK, seed=5)
    set_slot(gpt_engine, slot, arrays)
    prompt = random_sequences([9], seed=11)[0].astype(np.int32)
    params = SamplingParams(max_tokens=14, temperature=0.0)
    greedy = gpt_engine.sample(slot, prompt, 6, params, prompt_logprobs=False, topk_prompt_logprobs=0)
    model = MergedReference(tiny_checkpoint(FAMILY, False, seed=1), arrays, RANK, "in_out").frozen()
    model.generation_config.eos_token_id = None
    ids = torch.as_tensor(prompt, dtype=torch.long)[None]
    config = GenerationConfig(do_sample=False, max_new_tokens=14, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    assert all(seq.tokens == expected[0, prompt.size :].tolist() for seq in greedy.sequences)

    params = SamplingParams(max_tokens=14, temperature=1.0, seed=3)
    sampled = gpt_engine.sample(slot, prompt, 3, params, prompt_logprobs=False, topk_prompt_logprobs=0)
    full = [np.concatenate([prompt, seq.tokens]) for seq in sampled.sequences]
    (forward,) = gpt_engine.forward_backward([(slot, [next_token_datum(f) for f in full])], "cross_entropy", {}, True)
    for seq, output in zip(sampled.sequences, forward.outputs, strict=True):
        np.testing.assert_allclose(seq.logprobs, output["logprobs"][prompt.size - 1 :], rtol=0, atol=1e-4)


def test_peft_export_loads_in_transformers_and_peft(gpt_engine: Engine, tiny_checkpoint, tmp_path: Path) -> None:
    slot = gpt_engine.create_adapter(LoraConfig(rank=RANK, seed=0))
    sequences = random_sequences([12, 20], seed=3)
    data = [next_token_datum(s) for s in sequences]
    for _ in range(2):
        gpt_engine.forward_backward([(slot, data)], "cross_entropy", {}, False)
        gpt_engine.optim_step(slot, AdamParams(learning_rate=1e-2))
    gpt_engine.export_peft(slot, tmp_path)
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint(FAMILY, False, seed=1), dtype=torch.float32).eval()
    before = [hf_logprobs(base, seq) for seq in sequences]
    model = PeftModel.from_pretrained(base, tmp_path).eval()
    (ours,) = gpt_engine.forward_backward([(slot, data)], "cross_entropy", {}, True)
    for seq, output, untrained in zip(sequences, ours.outputs, before, strict=True):
        np.testing.assert_allclose(output["logprobs"], hf_logprobs(model, seq), rtol=0, atol=1e-4)
        assert np.max(np.abs(output["logprobs"] - untrained)) > 0.05


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
