"""Continuous batching: requests of several adapters share a few decode rows and give exactly what
each gives alone; finished rows are refilled at once; every stop condition ends a row where it
should; greedy decoding in a mixed batch equals transformers' generate; snapshots never move.

The engine here has 4 decode rows and decodes 4 tokens per chunk, so a handful of requests
already queue, share chunks, cross chunk boundaries and reuse rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
import torch
from engine_testing import next_token_datum, peft_model, random_lora, set_slot
from transformers import AutoModelForCausalLM, GenerationConfig

from tuft_jax import decode_scheduler
from tuft_jax.kv_blocks import blocks_for
from tuft_jax.paged_attention import BLOCK_TOKENS
from tuft_jax.engine import Engine
from tuft_jax.model_registry import BaseModelSpec
from tuft_jax.types import AdamParams, LoraConfig, SampleResult, SamplingParams

ROWS, CHUNK, CONTEXT, RANK = 4, 4, 256, 4


@dataclass
class Setup:
    engine: Engine
    slots: tuple[int, int]
    arrays: dict
    model_dir: object


@pytest.fixture(scope="module")
def setup(tiny_checkpoint) -> Setup:
    model_dir = tiny_checkpoint("qwen3", False, seed=7)
    spec = BaseModelSpec("tiny", model_dir, max_context_length=CONTEXT, max_lora_rank=8, max_adapters=4, family="qwen3")
    engine = Engine(spec, decode_rows=ROWS, decode_chunk=CHUNK)
    slots = (engine.create_adapter(LoraConfig(rank=RANK, seed=1)), engine.create_adapter(LoraConfig(rank=RANK, seed=2)))
    arrays = random_lora(engine, RANK, seed=8)
    set_slot(engine, slots[0], arrays)
    set_slot(engine, slots[1], random_lora(engine, RANK, seed=9))
    return Setup(engine, slots, arrays, model_dir)


def prompt(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 460, size=n).astype(np.int32)


@dataclass
class Request:
    slot: int
    prompt: np.ndarray
    num_samples: int
    params: SamplingParams
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0

    def run(self, engine: Engine) -> SampleResult:
        return engine.sample(
            self.slot, self.prompt, self.num_samples, self.params,
            prompt_logprobs=self.prompt_logprobs, topk_prompt_logprobs=self.topk_prompt_logprobs,
            topk_sample_logprobs=self.topk_sample_logprobs,
        )  # fmt: skip


@dataclass
class Collector:
    """Submits requests and records each result with the scheduler step it completed in."""

    engine: Engine
    results: dict[int, SampleResult] = field(default_factory=dict)
    finished_at: dict[int, int] = field(default_factory=dict)
    steps: int = 0
    most_blocks: int = 0

    def submit(self, key: int, request: Request) -> None:
        def done(result: SampleResult | None, error: BaseException | None) -> None:
            assert error is None, error
            self.results[key], self.finished_at[key] = result, self.steps

        self.engine.submit_sample(
            request.slot, request.prompt, request.num_samples, request.params,
            prompt_logprobs=request.prompt_logprobs, topk_prompt_logprobs=request.topk_prompt_logprobs, on_done=done,
            topk_sample_logprobs=request.topk_sample_logprobs,
        )  # fmt: skip

    def run(self, until: Callable[[], bool] | None = None) -> None:
        while self.engine.has_sampling_work() and not (until and until()):
            self.steps += 1
            self.engine.step_sampling()
            self.most_blocks = max(self.most_blocks, self.engine.kv_cache_stats().used)


def assert_same(actual: SampleResult, expected: SampleResult) -> None:
    assert [(s.tokens, s.stop_reason) for s in actual.sequences] == [
        (s.tokens, s.stop_reason) for s in expected.sequences
    ]
    for a, e in zip(actual.sequences, expected.sequences, strict=True):
        np.testing.assert_allclose(a.logprobs, e.logprobs, rtol=0, atol=1e-5)
        assert (a.topk_logprobs is None) == (e.topk_logprobs is None)
        if e.topk_logprobs is not None:
            assert [[t for t, _ in p] for p in a.topk_logprobs] == [[t for t, _ in p] for p in e.topk_logprobs]
            np.testing.assert_allclose(
                [[v for _, v in p] for p in a.topk_logprobs], [[v for _, v in p] for p in e.topk_logprobs], rtol=0, atol=1e-5
            )
    for name in ("prompt_logprobs", "topk_prompt_logprobs"):
        a, e = getattr(actual, name), getattr(expected, name)
        assert (a is None) == (e is None), name
    if expected.prompt_logprobs is not None:
        np.testing.assert_allclose(actual.prompt_logprobs, expected.prompt_logprobs, rtol=0, atol=1e-5)
    if expected.topk_prompt_logprobs is not None:
        assert [[t for t, _ in p] for p in actual.topk_prompt_logprobs] == [
            [t for t, _ in p] for p in expected.topk_prompt_logprobs
        ]


def test_interleaved_requests_equal_each_alone(setup: Setup) -> None:
    a, b = setup.slots
    requests = [
        Request(a, prompt(5, 1), 3, SamplingParams(max_tokens=10, temperature=1.0, seed=1), topk_sample_logprobs=5),
        Request(b, prompt(20, 2), 1, SamplingParams(max_tokens=7, temperature=0.0)),
        Request(
            0, prompt(9, 3), 2, SamplingParams(max_tokens=13, temperature=0.8, top_k=20, top_p=0.8, seed=2**64 - 1)
        ),
        Request(a, prompt(3, 4), 1, SamplingParams(max_tokens=1, temperature=0.7, seed=5), True, 3),
        Request(b, prompt(200, 5), 2, SamplingParams(max_tokens=9, temperature=1.2, top_p=0.95, seed=6)),
        Request(0, prompt(6, 6), 5, SamplingParams(max_tokens=6, temperature=1.0, seed=7), True, 0, 1),
    ]
    alone = [r.run(setup.engine) for r in requests]
    together = Collector(setup.engine)
    for key, request in enumerate(requests):
        together.submit(key, request)
    together.run()
    assert sorted(together.results) == list(range(len(requests)))
    for key, expected in enumerate(alone):
        assert_same(together.results[key], expected)
    # 14 samples went through 4 rows; the blocks held followed the 200-token prompt (its two
    # samples share its full blocks), and every block is given back at the end.
    assert blocks_for(200) <= together.most_blocks < 2 * blocks_for(200 + 9)
    assert setup.engine.kv_cache_stats().used == 0
    # Samples of one request draw from their own streams; a prompt-only request has NaN first.
    assert len({tuple(s.tokens) for s in alone[5].sequences}) == 5
    assert np.isnan(alone[3].prompt_logprobs[0]) and len(alone[3].prompt_logprobs) == 3
    assert alone[3].topk_prompt_logprobs[0] == [] and all(len(p) == 3 for p in alone[3].topk_prompt_logprobs[1:])
    # Sampled-token alternatives: k per token for the requests that asked, none for the others.
    for key, k in ((0, 5), (5, 1)):
        assert all(len(s.topk_logprobs) == len(s.tokens) and {len(p) for p in s.topk_logprobs} == {k} for s in alone[key].sequences)
    assert all(s.topk_logprobs is None for r in alone[1:5] for s in r.sequences)


def test_finished_rows_are_refilled_at_once(setup: Setup) -> None:
    collector = Collector(setup.engine)
    collector.submit(0, Request(setup.slots[0], prompt(8, 10), 3, SamplingParams(max_tokens=40, temperature=0.0)))
    for key in range(1, 5):
        collector.submit(
            key, Request(setup.slots[1], prompt(4 + key, 10 + key), 1, SamplingParams(max_tokens=3, temperature=0.0))
        )
    collector.run()
    # One row is left beside the long request: each short request takes it as soon as the one
    # before has finished (one chunk each), long before the long request ends.
    assert [collector.finished_at[k] for k in range(1, 5)] == [1, 2, 3, 4]
    assert collector.finished_at[0] == 10  # 1 token from prefill, then 39 in chunks of 4
    assert all(len(s.tokens) == 40 for s in collector.results[0].sequences)


def _greedy(setup: Setup, slot: int, max_tokens: int = 24, **params) -> list[int]:
    (seq,) = (
        Request(slot, prompt(7, 20), 1, SamplingParams(max_tokens=max_tokens, temperature=0.0, **params))
        .run(setup.engine)
        .sequences
    )
    return seq.tokens


def test_stop_token_ids_and_no_stops(setup: Setup) -> None:
    slot = setup.slots[0]
    tokens = _greedy(setup, slot)
    stop = tokens[5]  # across a chunk boundary
    first = tokens.index(stop)
    (seq,) = (
        Request(slot, prompt(7, 20), 1, SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=(stop,)))
        .run(setup.engine)
        .sequences
    )
    assert (seq.tokens, seq.stop_reason) == (tokens[: first + 1], "stop")
    assert _greedy(setup, slot, stop_token_ids=()) == tokens  # stop=[]: runs to max_tokens
    (seq,) = (
        Request(slot, prompt(7, 20), 1, SamplingParams(max_tokens=first + 1, temperature=0.0, stop_token_ids=(stop,)))
        .run(setup.engine)
        .sequences
    )
    assert seq.stop_reason == "stop"  # the budget and a stop token end together: a stop


def test_stop_strings_end_the_row_early(setup: Setup) -> None:
    slot = setup.slots[1]
    tokens = _greedy(setup, slot, max_tokens=40)
    decode = setup.engine.tokenizer.decode
    k = next(
        k for k in range(5, 30)
        if (piece := decode(tokens[k : k + 1])).isprintable() and piece.strip() and piece not in decode(tokens[:k])
    )  # fmt: skip
    stop = decode(tokens[k : k + 1])
    end = next(n for n in range(1, 41) if stop in decode(tokens[:n]))
    collector = Collector(setup.engine)
    params = SamplingParams(max_tokens=40, temperature=0.0, stop_strings=("never-in-this-text", stop))
    collector.submit(0, Request(slot, prompt(7, 20), 1, params, topk_sample_logprobs=2))
    collector.run()
    (seq,) = collector.results[0].sequences
    assert (seq.tokens, seq.stop_reason) == (tokens[:end], "stop")
    assert len(seq.logprobs) == len(seq.topk_logprobs) == end
    assert collector.finished_at[0] <= end // CHUNK + 1  # freed within a chunk of the stop, not at max_tokens
    params = SamplingParams(max_tokens=40, temperature=0.0, stop_strings=("never-in-this-text",))
    (seq,) = Request(slot, prompt(7, 20), 1, params).run(setup.engine).sequences
    assert (seq.tokens, seq.stop_reason) == (tokens, "length")


def test_seeds(setup: Setup) -> None:
    def draw(seed: int | None) -> list[list[int]]:
        params = SamplingParams(max_tokens=8, temperature=1.0, seed=seed)
        return [s.tokens for s in Request(setup.slots[0], prompt(5, 30), 2, params).run(setup.engine).sequences]

    big = 2**64 - 1
    assert draw(big) == draw(big) and draw(3) == draw(3)
    assert draw(big) != draw(big - 2**32)  # the high 32 bits count
    assert draw(3) != draw(4) and draw(None) != draw(None)


def test_greedy_in_a_mixed_batch_equals_transformers_and_logprobs_equal_forward(setup: Setup) -> None:
    engine, slot = setup.engine, setup.slots[0]
    lora_prompt, base_prompt, sampled_prompt = prompt(7, 40), prompt(12, 41), prompt(9, 42)
    collector = Collector(engine)
    collector.submit(0, Request(slot, lora_prompt, 1, SamplingParams(max_tokens=14, temperature=0.0)))
    collector.submit(1, Request(0, base_prompt, 1, SamplingParams(max_tokens=11, temperature=0.0)))
    collector.submit(2, Request(slot, sampled_prompt, 2, SamplingParams(max_tokens=10, temperature=1.0, seed=3)))
    collector.run()

    config = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0)
    models = {
        slot: peft_model(setup.model_dir, setup.arrays, RANK).eval(),
        0: AutoModelForCausalLM.from_pretrained(setup.model_dir, dtype=torch.float32).eval(),
    }
    for key, (s, p, n) in enumerate([(slot, lora_prompt, 14), (0, base_prompt, 11)]):
        ids = torch.as_tensor(p, dtype=torch.long)[None]
        with torch.no_grad():
            out = models[s].generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config, max_new_tokens=n
            )
        assert collector.results[key].sequences[0].tokens == out[0, p.size :].tolist()

    sequences = collector.results[2].sequences
    data = [next_token_datum(np.concatenate([sampled_prompt, s.tokens])) for s in sequences]
    (forward,) = engine.forward_backward([(slot, data)], "cross_entropy", {}, True)
    for seq, output in zip(sequences, forward.outputs, strict=True):
        np.testing.assert_allclose(seq.logprobs, output["logprobs"][sampled_prompt.size - 1 :], rtol=0, atol=1e-4)


def test_snapshot_isolation_and_release_while_decoding(setup: Setup) -> None:
    engine = setup.engine
    source = engine.create_adapter(LoraConfig(rank=RANK, seed=11))
    set_slot(engine, source, setup.arrays)
    snap = engine.snapshot_adapter(source)
    request = Request(snap, prompt(6, 50), 2, SamplingParams(max_tokens=20, temperature=1.0, seed=9))
    before = request.run(engine)

    collector = Collector(engine)
    collector.submit(0, request)
    collector.run(until=lambda: collector.steps == 2)
    data = [next_token_datum(prompt(12, 51))]
    for _ in range(3):  # train the source between chunks of the snapshot's decoding
        engine.forward_backward([(source, data)], "cross_entropy", {}, False)
        engine.optim_step(source, AdamParams(learning_rate=0.05))
    engine.release_adapter(snap)  # waits for the running request
    assert snap in engine.slots.configs
    collector.run()
    assert_same(collector.results[0], before)
    assert snap not in engine.slots.configs  # released once its last row ended
    engine.release_adapter(source)


def test_a_failed_decode_fails_its_requests_and_the_scheduler_recovers(setup: Setup, monkeypatch) -> None:
    engine = setup.engine
    errors: list[BaseException] = []
    for seed in (1, 2):
        engine.submit_sample(
            0, prompt(5, 60), 1, SamplingParams(max_tokens=9, temperature=1.0, seed=seed),
            prompt_logprobs=False, topk_prompt_logprobs=0, on_done=lambda r, e: errors.append(e),
        )  # fmt: skip

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(decode_scheduler.sampler, "decode", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        engine.step_sampling()
    assert [str(e) for e in errors] == ["device lost"] * 2 and not engine.has_sampling_work()
    monkeypatch.undo()
    assert len(Request(0, prompt(5, 60), 1, SamplingParams(max_tokens=9)).run(engine).sequences[0].tokens) == 9


def test_prompts_reuse_cached_blocks_of_the_same_adapter_weights(setup: Setup) -> None:
    """A prompt seen before on the same adapter weights reuses its full blocks (computing only the
    rest) and samples exactly what it sampled the first time; after an optimizer step of that
    adapter nothing is reused."""
    engine, slot = setup.engine, setup.slots[0]
    long_prompt = prompt(3 * BLOCK_TOKENS + 5, 70)
    request = Request(slot, long_prompt, 2, SamplingParams(max_tokens=9, temperature=1.0, seed=4))
    first = request.run(engine)
    hits = engine.kv_cache_stats().prefix_hits
    assert_same(request.run(engine), first)
    assert engine.kv_cache_stats().prefix_hits == hits + 3
    engine.optim_step(slot, AdamParams(learning_rate=0.0))  # same weights, a new version: no reuse
    assert_same(request.run(engine), first)
    assert engine.kv_cache_stats().prefix_hits == hits + 3


def test_a_follow_up_prompt_reuses_the_blocks_of_the_turn_before(setup: Setup) -> None:
    """A prompt that extends an earlier prompt and its completion (the next chat turn) finds the
    earlier sequence's full blocks cached, and samples what it samples computed afresh."""
    engine, slot = setup.engine, setup.slots[1]
    turn = prompt(21, 73)
    (first,) = Request(slot, turn, 1, SamplingParams(max_tokens=30, temperature=0.0)).run(engine).sequences
    follow_up = np.concatenate([turn, np.asarray(first.tokens, np.int32), prompt(5, 74)])
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=3)
    hits = engine.kv_cache_stats().prefix_hits
    reused = Request(slot, follow_up, 1, params).run(engine)
    assert engine.kv_cache_stats().prefix_hits - hits == (21 + 30 - 1) // BLOCK_TOKENS
    fresh = Request(slot, follow_up, 1, params, prompt_logprobs=True).run(engine)  # scored: computed whole
    assert reused.sequences[0].tokens == fresh.sequences[0].tokens
    np.testing.assert_allclose(reused.sequences[0].logprobs, fresh.sequences[0].logprobs, rtol=0, atol=1e-4)


def test_a_long_prompt_never_stalls_running_rows(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt prefilled over many chunks shares each scheduler step with a decode chunk of the
    rows already running, and both give what they give alone."""
    monkeypatch.setattr(decode_scheduler.sampler, "PREFILL_CHUNK_TOKENS", 32)
    short = Request(setup.slots[0], prompt(6, 71), 1, SamplingParams(max_tokens=6 * CHUNK, temperature=0.0))
    # Scoring its prompt, the long request computes all of it (no prefix-cache reuse).
    long = Request(setup.slots[1], prompt(200, 72), 1, SamplingParams(max_tokens=3, temperature=1.0, seed=2), True, 2)
    alone = [short.run(setup.engine), long.run(setup.engine)]
    collector = Collector(setup.engine)
    collector.submit(0, short)
    collector.run(until=lambda: collector.steps == 1)
    collector.submit(1, long)  # 200 tokens in chunks of 32: 7 steps of prefill
    collector.run()
    assert collector.finished_at[0] <= 1 + 6 < collector.finished_at[1]
    for key, expected in enumerate(alone):
        assert_same(collector.results[key], expected)


def test_preempted_sequences_resume_with_the_same_tokens(setup: Setup) -> None:
    """With a pool that holds two of the four sequences, rows are preempted as they grow and are
    recomputed later: every sequence is what it is with an ample pool."""
    spec = BaseModelSpec("tiny", setup.model_dir, max_context_length=CONTEXT, max_lora_rank=8, max_adapters=4, family="qwen3")
    small = Engine(spec, decode_rows=ROWS, decode_chunk=CHUNK, kv_cache_tokens=CONTEXT)
    adapter = small.create_adapter(LoraConfig(rank=RANK, seed=1))
    set_slot(small, adapter, setup.arrays)
    slot = setup.slots[0]
    requests = [
        Request(slot, prompt(60, 80), 2, SamplingParams(max_tokens=70, temperature=1.0, seed=5), topk_sample_logprobs=2),
        Request(slot, prompt(45, 81), 2, SamplingParams(max_tokens=70, temperature=0.0)),
    ]
    expected = [r.run(setup.engine) for r in requests]
    collector = Collector(small)
    for key, request in enumerate(requests):
        collector.submit(key, replace(request, slot=adapter))
    collector.run()
    stats = small.kv_cache_stats()
    assert stats.preemptions > 0 and stats.used == 0
    assert collector.most_blocks <= stats.total
    for key, reference in enumerate(expected):
        assert_same(collector.results[key], reference)

    # A prompt that fills the pool: its samples run one after another (the last one takes the
    # prompt's own partial block), and the request completes.
    full = Request(slot, prompt(CONTEXT - 6, 82), 3, SamplingParams(max_tokens=5, temperature=1.0, seed=6))
    expected_full = full.run(setup.engine)
    collector = Collector(small)
    collector.submit(0, Request(adapter, full.prompt, full.num_samples, full.params))
    collector.run(until=lambda: collector.steps > 100)
    assert_same(collector.results[0], expected_full)


def test_grpo_shaped_workload_holds_a_quarter_of_dense_rows(tiny_checkpoint) -> None:
    """8 prompts x 16 samples, 1024-token prompts, 256 new tokens: the samples share their prompt's
    blocks, so the KV bytes held at the peak are those of the distinct tokens (one partial block
    per sequence at most), at most 1/4 of 128 dense rows of 1280 tokens."""
    prompts, samples, prompt_tokens, new_tokens = 8, 16, 1024, 256
    model_dir = tiny_checkpoint("qwen3", False, seed=7)
    spec = BaseModelSpec("tiny", model_dir, max_context_length=prompt_tokens + new_tokens, max_lora_rank=8, max_adapters=4, family="qwen3")
    engine = Engine(spec, decode_rows=prompts * samples, decode_chunk=16)
    cfg = engine.config
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4  # float32
    stats = engine.kv_cache_stats()
    assert stats.bytes_per_block == BLOCK_TOKENS * per_token
    collector = Collector(engine)
    params = SamplingParams(max_tokens=new_tokens, temperature=1.0, seed=0)
    for key in range(prompts):
        collector.submit(key, Request(0, prompt(prompt_tokens, 90 + key), samples, params))
    collector.run()
    assert all(len(s.tokens) == new_tokens for r in collector.results.values() for s in r.sequences)
    cached = prompts * prompt_tokens + prompts * samples * (new_tokens - 1)  # the last token is never fed
    sequences = prompts * samples
    peak_bytes = collector.most_blocks * stats.bytes_per_block
    assert peak_bytes <= cached * per_token + sequences * stats.bytes_per_block
    dense_bytes = sequences * (prompt_tokens + new_tokens) * per_token
    assert peak_bytes <= dense_bytes / 4
