"""Sampling throughput: TuFT-JAX's continuous-batching decoder vs transformers' generate.

Both decode the same random-weight model in the same process, greedily, from the same prompts
(one per sequence, all of `--prompt` tokens) for exactly `--max-tokens` new tokens, at each batch
size; the result is generated tokens per second (prefill included) and our ratio to
transformers. Our engine samples through the base slot, so the multi-LoRA path runs as it does
in service. At batch 1 it also reports the share of the memory roofline (weights + the
sequence's KV bytes read per token, over the measured copy bandwidth). Usage:
    python scripts/bench/sampling.py                      # tiny model, batch 1 and 32
    python scripts/bench/sampling.py --shape qwen3-1.7b --dtype bfloat16 --batch 1 8 64 256   # on a GPU
    python scripts/bench/sampling.py --hidden 512 --intermediate 1536 --layers 8 --heads 8 \
        --kv-heads 4 --head-dim 64 --vocab 8192 --batch 32      # the mid-size explicit shape
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from model_shapes import add_shape_arguments, model_dir, shape_from_arguments

from tuft_jax.engine import Engine
from tuft_jax.model_registry import BaseModelSpec
from tuft_jax.paged_attention import BLOCK_TOKENS
from tuft_jax.types import SampleResult, SamplingParams


def prompts(batch: int, length: int, vocab: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, min(vocab, 400), size=(batch, length)).astype(np.int32)


Run = Callable[[np.ndarray], list[list[int]]]


def timed_alternately(
    runs: dict[str, Run], make_prompts: Callable[[int], np.ndarray], repeats: int
) -> dict[str, tuple[float, list[list[int]]]]:
    """Median wall time of each run over `repeats` rounds, after a warm-up round (compiles); the
    runs alternate within a round, so a change in machine load affects them alike. Each round
    has new prompts (the same for every run), so no run reuses what an earlier round computed
    (our prefix cache would)."""
    outputs = {name: run(make_prompts(0)) for name, run in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(1, repeats + 1):
        batch = make_prompts(round_index)
        for name, run in runs.items():
            start = time.perf_counter()
            outputs[name] = run(batch)
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), outputs[name]) for name in runs}


def ours(engine: Engine, max_tokens: int) -> Run:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)  # no stop ids: exactly max_tokens

    def run(batch: np.ndarray) -> list[list[int]]:
        results: list[SampleResult | None] = [None] * len(batch)
        for i, row in enumerate(batch):

            def done(result: SampleResult | None, error: BaseException | None, i: int = i) -> None:
                assert error is None, error
                results[i] = result

            engine.submit_sample(0, row, 1, params, prompt_logprobs=False, topk_prompt_logprobs=0, on_done=done)
        while engine.has_sampling_work():
            engine.step_sampling()
        return [r.sequences[0].tokens for r in results]  # type: ignore[union-attr]

    return run


def transformers_generate(directory: Path, max_tokens: int, dtype: str) -> Run:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype).to(device).eval()
    model.generation_config.eos_token_id = None  # no stop: exactly max_tokens (min_new_tokens would mask EOS)
    config = GenerationConfig(do_sample=False, max_new_tokens=max_tokens, eos_token_id=None, pad_token_id=0)

    def run(batch: np.ndarray) -> list[list[int]]:
        ids = torch.as_tensor(batch, dtype=torch.long, device=device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        if device == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == batch.shape[1] + max_tokens
        return out[:, batch.shape[1] :].tolist()

    return run


def copy_bandwidth(bytes_: int = 1 << 28, repeats: int = 10) -> float:
    """Bytes per second one device reads and writes, from timing an elementwise pass over a buffer."""
    x = jax.numpy.zeros(bytes_ // 4, jax.numpy.float32)
    touch = jax.jit(lambda x: x + 1)
    touch(x).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        x = touch(x)
    x.block_until_ready()
    return 2 * bytes_ * repeats / (time.perf_counter() - start)


def roofline(engine: Engine, context: float, tokens_per_s: float) -> dict[str, float]:
    """A lone sequence's tokens/s as a share of the memory roofline: every step reads the base
    weights and the sequence's keys and values (at its mean context), at the measured bandwidth."""
    weights = sum(x.nbytes for x in jax.tree.leaves(engine.base))
    kv = engine.kv_cache_stats().bytes_per_block / BLOCK_TOKENS * context
    bandwidth = copy_bandwidth()
    bound = bandwidth / (weights + kv)
    return {
        "copy_bandwidth_gb_per_s": bandwidth / 1e9, "bytes_per_token": weights + kv,
        "roofline_tokens_per_s": bound, "share": tokens_per_s / bound,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens per sequence")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens per sequence")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=None, help="decode chunk (default: the engine's)")
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/tuft/bench").expanduser())
    parser.add_argument("--out", type=Path, default=Path("out/bench/sampling.json"), help="where the JSON result goes")
    args = parser.parse_args()
    args.shape = shape_from_arguments(parser, args)

    directory = model_dir(args.shape, args.cache_dir)
    vocab = json.loads((directory / "config.json").read_text())["vocab_size"]
    context = args.prompt + args.max_tokens
    spec = BaseModelSpec("bench", directory, context, 8, 2, dtype=args.dtype, family="qwen3")
    engine_options = {"decode_rows": max(args.batch)} | ({"decode_chunk": args.chunk} if args.chunk else {})
    engine = Engine(spec, **engine_options)

    rows = []
    for b in args.batch:
        timings = timed_alternately(
            {
                "ours": ours(engine, args.max_tokens),
                "transformers": transformers_generate(directory, args.max_tokens, args.dtype),
            },
            lambda seed, b=b: prompts(b, args.prompt, vocab, seed),
            args.repeats,
        )
        (ours_s, ours_tokens), (hf_s, hf_tokens) = timings["ours"], timings["transformers"]
        generated = b * args.max_tokens
        rows.append(
            {
                "batch": b,
                "tuft_jax_tokens_per_s": generated / ours_s,
                "transformers_tokens_per_s": generated / hf_s,
                "ratio": hf_s / ours_s,
                "greedy_rows_identical": sum(a == h for a, h in zip(ours_tokens, hf_tokens, strict=True)) / b,
            }
        )
        if b == 1:
            rows[-1]["roofline"] = roofline(engine, args.prompt + args.max_tokens / 2, generated / ours_s)
        print(json.dumps(rows[-1]))
    result = {
        "device": jax.devices()[0].device_kind,
        "machine": f"{platform.machine()}, {jax.device_count()} JAX device(s), {os.cpu_count()} CPU cores",
        "load_avg": Path("/proc/loadavg").read_text().split()[:3],
        "shape": args.shape,
        "dtype": args.dtype,
        "prompt_tokens": args.prompt,
        "max_tokens": args.max_tokens,
        "decode_rows": engine.decoder.rows,
        "decode_chunk": engine.decoder.chunk,
        "results": rows,
    }
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
