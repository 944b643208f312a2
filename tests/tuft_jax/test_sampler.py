"""The jitted prefill + KV-cache decode loop against transformers' generate and our own forward pass.

Greedy decoding must reproduce `generate(do_sample=False)` of the PyTorch model with the same
LoRA (PEFT), token for token; sampled tokens must carry exactly the logprobs a forward pass
assigns them; and the request controls (seed, stop tokens, max_tokens, top-k / top-p, prompt
logprobs) must do what they say.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from engine_testing import count_compiles, next_token_datum, peft_model, random_lora, set_slot, torch_logprobs
from flax import nnx
from transformers import AutoModelForCausalLM, GenerationConfig

from tuft_jax import sampler
from tuft_jax.engine import Engine
from tuft_jax.layers import AdapterBatch
from tuft_jax.sampler import _prompt_scores, prefill_width
from tuft_jax.types import LoraConfig, SamplingParams

RANK = 4
MAX_TOKENS = 12
PROMPT = np.array([17, 301, 45, 9, 122, 260, 33], np.int32)


@dataclass
class Setup:
    engine: Engine
    slot: int
    peft: torch.nn.Module
    base: torch.nn.Module


@pytest.fixture(scope="module")
def setup(make_engine, tiny_checkpoint) -> Setup:
    engine = make_engine("qwen3", False, seed=3)
    slot = engine.create_adapter(LoraConfig(rank=RANK, seed=0))
    arrays = random_lora(engine, RANK, seed=4)
    set_slot(engine, slot, arrays)
    model_dir = tiny_checkpoint("qwen3", False, seed=3)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return Setup(engine, slot, peft_model(model_dir, arrays, RANK).eval(), base)


def _sample(setup: Setup, slot: int, num_samples: int = 1, **params):
    params.setdefault("max_tokens", MAX_TOKENS)
    return setup.engine.sample(slot, PROMPT, num_samples, SamplingParams(**params), prompt_logprobs=False, topk_prompt_logprobs=0)


def _hf_greedy(model, max_new: int, prompt: np.ndarray = PROMPT) -> list[int]:
    model.generation_config.eos_token_id = None  # decode the full length, like the engine with no stop ids
    ids = torch.as_tensor(prompt, dtype=torch.long)[None]
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, prompt.size :].tolist()


@pytest.mark.parametrize("with_lora", [True, False], ids=["lora", "base"])
def test_greedy_equals_transformers_generate(setup: Setup, with_lora: bool) -> None:
    slot, model = (setup.slot, setup.peft) if with_lora else (0, setup.base)
    (seq,) = _sample(setup, slot, temperature=0.0).sequences
    expected = _hf_greedy(model, MAX_TOKENS)
    assert seq.tokens == expected
    assert seq.stop_reason == "length" and len(seq.logprobs) == MAX_TOKENS
    full = np.concatenate([PROMPT, expected])
    with torch.no_grad():
        reference = torch_logprobs(model, full[:-1], full[1:]).numpy()[PROMPT.size - 1 :]
    np.testing.assert_allclose(seq.logprobs, reference, rtol=0, atol=1e-4)


def test_greedy_equals_transformers_generate_llama3_long_context(make_engine, tiny_checkpoint) -> None:
    """Decoding past original_max_position_embeddings (64) with llama3 RoPE scaling, tied embeddings."""
    engine = make_engine("llama3", True, seed=5)
    prompt = np.random.default_rng(6).integers(0, 460, size=70).astype(np.int32)
    params = SamplingParams(max_tokens=20, temperature=0.0)
    (seq,) = engine.sample(0, prompt, 1, params, prompt_logprobs=False, topk_prompt_logprobs=0).sequences
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama3", True, seed=5), dtype=torch.float32).eval()
    assert seq.tokens == _hf_greedy(model, 20, prompt)


def test_top_k_1_and_tiny_top_p_equal_greedy(setup: Setup) -> None:
    (greedy,) = _sample(setup, setup.slot, temperature=0.0).sequences
    for params in (dict(top_k=1), dict(top_p=1e-6), dict(top_k=1, top_p=0.5, temperature=2.0)):
        (seq,) = _sample(setup, setup.slot, seed=123, **{"temperature": 1.0, **params}).sequences
        assert seq.tokens == greedy.tokens, params
        np.testing.assert_allclose(seq.logprobs, greedy.logprobs, rtol=0, atol=1e-6)


def test_stop_tokens_stop_and_are_included(setup: Setup) -> None:
    (greedy,) = _sample(setup, setup.slot, temperature=0.0).sequences
    tokens = greedy.tokens
    stop = tokens[4]
    first = tokens.index(stop)
    (seq,) = _sample(setup, setup.slot, temperature=0.0, stop_token_ids=(stop,)).sequences
    assert seq.tokens == tokens[: first + 1] and seq.stop_reason == "stop"
    assert seq.logprobs == pytest.approx(greedy.logprobs[: first + 1], abs=1e-6)
    # Any of several stop ids stops at the earliest; ids that never appear change nothing.
    never = next(t for t in range(400) if t not in tokens)
    (seq,) = _sample(setup, setup.slot, temperature=0.0, stop_token_ids=(never, tokens[6], stop)).sequences
    assert seq.tokens == tokens[: min(first, tokens.index(tokens[6])) + 1] and seq.stop_reason == "stop"
    (seq,) = _sample(setup, setup.slot, temperature=0.0, stop_token_ids=(never,)).sequences
    assert seq.tokens == tokens and seq.stop_reason == "length"


def test_max_tokens_is_respected(setup: Setup) -> None:
    (greedy,) = _sample(setup, setup.slot, temperature=0.0).sequences
    for n in (1, 5):
        (seq,) = _sample(setup, setup.slot, temperature=0.0, max_tokens=n).sequences
        assert seq.tokens == greedy.tokens[:n] and len(seq.logprobs) == n and seq.stop_reason == "length"
    # A stop token at exactly the last allowed position reports "stop".
    (seq,) = _sample(setup, setup.slot, temperature=0.0, max_tokens=3, stop_token_ids=(greedy.tokens[2],)).sequences
    assert len(seq.tokens) <= 3 and seq.stop_reason == "stop"


def _sample_with_prompt_scores(setup: Setup, seed: int):
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=seed)
    return setup.engine.sample(setup.slot, PROMPT, 3, params, prompt_logprobs=True, topk_prompt_logprobs=2)


def test_sampled_and_prompt_logprobs_equal_forward_logprobs(setup: Setup) -> None:
    result = _sample_with_prompt_scores(setup, seed=11)
    assert len(result.sequences) == 3
    assert len({tuple(s.tokens) for s in result.sequences}) == 3  # each row has its own PRNG stream
    data = [next_token_datum(np.concatenate([PROMPT, s.tokens])) for s in result.sequences]
    data.append(next_token_datum(PROMPT))
    (forward,) = setup.engine.forward_backward([(setup.slot, data)], "cross_entropy", {}, True)
    for seq, output in zip(result.sequences, forward.outputs[:3], strict=True):
        assert len(seq.tokens) == 10 and seq.stop_reason == "length"
        np.testing.assert_allclose(seq.logprobs, output["logprobs"][PROMPT.size - 1 :], rtol=0, atol=1e-4)

    prompt_lp = np.asarray(result.prompt_logprobs)
    assert prompt_lp.shape == (PROMPT.size,) and np.isnan(prompt_lp[0])
    np.testing.assert_allclose(prompt_lp[1:], forward.outputs[-1]["logprobs"], rtol=0, atol=1e-4)

    # Top-2 prompt alternatives equal the PyTorch model's two most likely next tokens.
    topk = result.topk_prompt_logprobs
    assert len(topk) == PROMPT.size and topk[0] == []
    with torch.no_grad():
        logits = setup.peft(input_ids=torch.as_tensor(PROMPT, dtype=torch.long)[None]).logits[0]
    top_lp, top_ids = torch.log_softmax(logits, -1).topk(2, dim=-1)
    for p in range(1, PROMPT.size):
        assert [t for t, _ in topk[p]] == top_ids[p - 1].tolist()
        np.testing.assert_allclose([lp for _, lp in topk[p]], top_lp[p - 1].numpy(), rtol=0, atol=1e-4)
        assert topk[p][0][1] >= prompt_lp[p] - 1e-6


@pytest.mark.parametrize("temperature", [0.7, 0.0])
def test_topk_sample_logprobs_equal_the_forward_top_k(setup: Setup, temperature: float) -> None:
    """At every sampled position (the first, drawn at the prompt's end, included) the top-3
    alternatives are the PyTorch model's three most likely tokens with their unscaled logprobs,
    like the sampled logprob itself; the sampled token is among them when it ranks that high."""
    params = SamplingParams(max_tokens=10, temperature=temperature, seed=5)
    result = setup.engine.sample(
        setup.slot, PROMPT, 2, params, prompt_logprobs=False, topk_prompt_logprobs=0, topk_sample_logprobs=3
    )
    ranked = 0
    for seq in result.sequences:
        assert len(seq.topk_logprobs) == len(seq.tokens) == 10
        full = np.concatenate([PROMPT, seq.tokens])
        with torch.no_grad():
            logits = setup.peft(input_ids=torch.as_tensor(full[:-1], dtype=torch.long)[None]).logits[0]
        top_lp, top_ids = torch.log_softmax(logits, -1)[PROMPT.size - 1 :].topk(3, dim=-1)
        for alternatives, token, logprob, ids, lps in zip(seq.topk_logprobs, seq.tokens, seq.logprobs, top_ids, top_lp, strict=True):
            assert [t for t, _ in alternatives] == ids.tolist()
            np.testing.assert_allclose([lp for _, lp in alternatives], lps.numpy(), rtol=0, atol=1e-4)
            if logprob >= alternatives[-1][1] + 1e-4:
                ranked += 1
                assert (token, pytest.approx(logprob, abs=1e-5)) in alternatives
    assert ranked > 0
    if temperature == 0.0:
        assert all(seq.tokens[i] == seq.topk_logprobs[i][0][0] for seq in result.sequences for i in range(10))


def test_topk_sample_widths_share_a_program_and_change_no_token(setup: Setup) -> None:
    """Widths of one power-of-two bucket (3, 4) run one compiled program, which draws the tokens
    a request without alternatives draws."""

    def run(k: int):
        params = SamplingParams(max_tokens=6, temperature=1.0, seed=2)
        return setup.engine.sample(
            setup.slot, PROMPT, 1, params, prompt_logprobs=False, topk_prompt_logprobs=0, topk_sample_logprobs=k
        ).sequences[0]

    run(3), run(0)
    with count_compiles() as compiled:
        four, plain = run(4), run(0)
    assert compiled == [], compiled
    assert four.tokens == plain.tokens and plain.topk_logprobs is None
    assert {len(p) for p in four.topk_logprobs} == {4}


def test_same_seed_same_tokens_different_seed_different_tokens(setup: Setup) -> None:
    first, again, other = (_sample_with_prompt_scores(setup, seed) for seed in (11, 11, 12))
    for a, b in zip(first.sequences, again.sequences, strict=True):
        assert a.tokens == b.tokens and a.logprobs == b.logprobs
    assert [s.tokens for s in first.sequences] != [s.tokens for s in other.sequences]
    assert all(a.tokens != b.tokens for a, b in zip(first.sequences, other.sequences, strict=True))


def test_sampling_a_new_adapter_compiles_nothing(setup: Setup) -> None:
    # Warm, the adapter init included: JAX's trace cache is one LRU for the whole process, so
    # what earlier tests traced may have been evicted.
    setup.engine.release_adapter(setup.engine.create_adapter(LoraConfig(rank=3, seed=8)))
    _sample(setup, setup.slot, temperature=0.0)
    with count_compiles() as compiled:
        slot = setup.engine.create_adapter(LoraConfig(rank=2, seed=9))
        (seq,) = _sample(setup, slot, temperature=0.7, top_k=50, top_p=0.9, seed=1, max_tokens=9).sequences
    assert compiled == [], compiled
    assert len(seq.tokens) == 9
    setup.engine.release_adapter(slot)


@pytest.mark.parametrize("topk", [3, 0])
def test_chunked_prompt_scores_equal_unchunked(setup: Setup, topk: int) -> None:
    """Prompt scores over 2 prompts of width 24, in chunks of 5 positions (the 23 scored positions
    padded to 25), equal log_softmax over the whole [U, W, V] logits."""
    engine = setup.engine
    model = nnx.merge(engine.graphdef, engine.base, engine.lora)
    slots = np.array([setup.slot, 0], np.int32)
    adapters = AdapterBatch(jnp.asarray(slots), jnp.asarray(engine.slots.scales[slots]))
    rng = np.random.default_rng(5)
    hidden = jnp.asarray(rng.standard_normal((2, 24, engine.config.hidden_size)), jnp.float32)
    prompts = jnp.asarray(rng.integers(0, engine.vocab_size, (2, 24)), jnp.int32)

    scores, top_ids, top_lp = _prompt_scores(model, hidden[:, :-1], adapters, prompts[:, 1:], topk, chunk_tokens=2 * 5)
    log_probs = jax.nn.log_softmax(model.logits(hidden, adapters)[:, :-1], axis=-1)
    chosen = jnp.take_along_axis(log_probs, prompts[:, 1:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(scores, chosen, rtol=0, atol=1e-5)
    if topk == 0:
        assert top_ids is None and top_lp is None
        return
    ref_lp, ref_ids = jax.lax.top_k(log_probs, topk)
    np.testing.assert_array_equal(top_ids, ref_ids)
    np.testing.assert_allclose(top_lp, ref_lp, rtol=0, atol=1e-5)


def test_chunked_prefill_equals_one_pass(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt prefilled in chunks over several scheduler steps (each attending to the blocks the
    earlier ones wrote) gives the tokens, logprobs and prompt scores of prefilling it at once."""
    prompt = np.random.default_rng(5).integers(0, 460, 45).astype(np.int32)  # 6 chunks of 8
    assert prefill_width(45, 1, 8) == 8 and prefill_width(45, 1, 2048) == 45 and prefill_width(45, 2, 20) == 10

    def run():
        params = SamplingParams(max_tokens=6, temperature=0.0)
        return setup.engine.sample(setup.slot, prompt, 2, params, prompt_logprobs=True, topk_prompt_logprobs=2)

    whole = run()
    monkeypatch.setattr(sampler, "PREFILL_CHUNK_TOKENS", 8)
    chunked = run()
    for ours, reference in zip(chunked.sequences, whole.sequences, strict=True):
        assert ours.tokens == reference.tokens
        np.testing.assert_allclose(ours.logprobs, reference.logprobs, rtol=0, atol=1e-5)
    np.testing.assert_allclose(chunked.prompt_logprobs, whole.prompt_logprobs, rtol=0, atol=1e-5)
    for ours, reference in zip(chunked.topk_prompt_logprobs, whole.topk_prompt_logprobs, strict=True):
        assert [t for t, _ in ours] == [t for t, _ in reference]
