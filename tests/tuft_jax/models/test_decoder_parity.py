"""Our JAX decoder computes the same function as transformers' PyTorch model on the same weights.

Per-token logprobs of padded batches (through the engine's jitted forward) are compared with
Qwen3ForCausalLM / LlamaForCausalLM run on each unpadded sequence, in float32, within 1e-4.
The Llama cases use `llama3` RoPE scaling with original_max_position_embeddings = 64 and
sequences up to 90 tokens, so scaled, smoothed and unscaled frequency bands all matter.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_testing import next_token_datum, random_sequences, torch_logprobs
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from tuft_jax.models.decoder import rope_frequencies
from tuft_jax.models.hf_config import load_decoder_config
from tuft_jax.types import LoraConfig

CASES = [
    pytest.param("qwen3", False, (13, 7, 16), id="qwen3-untied"),
    pytest.param("qwen3", True, (13, 7, 16), id="qwen3-tied"),
    pytest.param("llama3", False, (90, 70), id="llama3-untied-long"),
    pytest.param("llama3", True, (90, 70), id="llama3-tied-long"),
]


@pytest.mark.parametrize(("family", "tie", "lengths"), CASES)
def test_logprobs_match_transformers(make_engine, tiny_checkpoint, family: str, tie: bool, lengths: tuple[int, ...]) -> None:
    engine = make_engine(family, tie, seed=1)
    slot = engine.create_adapter(LoraConfig(rank=4, seed=0))  # PEFT init: B = 0, the bare base model
    sequences = random_sequences([n + 1 for n in lengths], seed=7)
    (result,) = engine.forward_backward([(slot, [next_token_datum(s) for s in sequences])], "cross_entropy", {}, True)

    reference = AutoModelForCausalLM.from_pretrained(tiny_checkpoint(family, tie, seed=1), dtype=torch.float32).eval()
    assert reference.config.tie_word_embeddings == tie
    total = 0.0
    for seq, output in zip(sequences, result.outputs, strict=True):
        with torch.no_grad():
            expected = torch_logprobs(reference, seq[:-1], seq[1:]).numpy()
        assert output["logprobs"].shape == expected.shape
        np.testing.assert_allclose(output["logprobs"], expected, rtol=0, atol=1e-4)
        total -= float(expected.sum())
    assert result.metrics["loss:sum"] == pytest.approx(total, rel=1e-5)
    # The test is not vacuous: the model is far from uniform over its vocabulary.
    assert np.std(np.concatenate([o["logprobs"] for o in result.outputs])) > 0.3


def test_llama3_rope_frequencies_match_transformers(tiny_checkpoint) -> None:
    model_dir = tiny_checkpoint("llama3", False, seed=1)
    ours = np.asarray(rope_frequencies(load_decoder_config(model_dir)))
    hf_config = AutoConfig.from_pretrained(model_dir)
    theirs, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6)
    assert attention_factor == 1.0
    # Scaling changes the low frequencies (else the long-sequence parity would prove nothing).
    unscaled = 1.0 / hf_config.rope_parameters["rope_theta"] ** (np.arange(0, 16, 2) / 16)
    changed = ~np.isclose(ours, unscaled, rtol=1e-6)
    assert changed.any() and not changed.all()
