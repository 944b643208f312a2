"""LoRA training throughput and model-FLOP utilisation: TuFT-JAX vs transformers + peft.

Both train the same random-weight model (same rank, targets, batch, sequence length, AdamW)
in the same process; the result is a ratio, plus MFU against this machine's measured matmul
peak. The two alternate (A B A B ...) over `--rounds` rounds of `--steps` steps each, and each
reports its median round, so a change in machine load affects both alike. Usage:
    python scripts/bench/training.py --shape tiny --batch 8 --seq 128 --steps 10
    python scripts/bench/training.py --shape qwen3-0.6b --dtype bfloat16 --batch 8 --seq 512
    python scripts/bench/training.py --hidden 512 --intermediate 1536 --layers 8 --heads 8 \
        --kv-heads 4 --head-dim 64 --vocab 8192 --batch 8 --seq 256 --rank 16

`--server URL --server-model NAME` adds a third run: the same step through the Tinker SDK
against a server on this machine that serves this script's checkpoint (the path is printed as
`checkpoint`) under NAME, so the service's overhead is the ratio `server_over_in_process`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from load import require_loopback
from model_shapes import add_shape_arguments, matmul_params, model_dir, shape_from_arguments
from tuft_jax.engine import Engine
from tuft_jax.model_registry import BaseModelSpec
from tuft_jax.types import AdamParams, Datum, LoraConfig


def measured_peak_flops(dtype: jnp.dtype, size: int = 4096, repeats: int = 10) -> float:
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        out = matmul(a)
    out.block_until_ready()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def seconds_per_step(steps_by_name: dict[str, Callable[[], None]], steps: int, rounds: int) -> dict[str, float]:
    """Median over `rounds` of the mean time of `steps` calls, the runs alternating round by
    round, after two warm-up calls each (compilation, allocator warm-up)."""
    for step in steps_by_name.values():
        step()
        step()
    times: dict[str, list[float]] = {name: [] for name in steps_by_name}
    for _ in range(rounds):
        for name, step in steps_by_name.items():
            start = time.perf_counter()
            for _ in range(steps):
                step()
            times[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


def train_flops_per_token(directory: Path, seq: int) -> float:
    """Forward (2N + 4·L·T·H·D) plus activation gradients of the same size; frozen base weights need no weight gradients."""
    n, s = matmul_params(directory)
    attention = 4 * s["layers"] * seq * s["heads"] * s["head_dim"]
    return 2 * (2 * n + attention)


def batch_tokens(batch: int, seq: int, vocab: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, min(vocab, 400), size=(batch, seq + 1))


def ours(directory: Path, tokens: np.ndarray, rank: int, dtype: str) -> Callable[[], None]:
    spec = BaseModelSpec("bench", directory, tokens.shape[1] + 8, rank, 2, dtype=dtype, family="qwen3")
    engine = Engine(spec)
    slot = engine.create_adapter(LoraConfig(rank=rank, seed=0))
    data = [Datum(row[:-1].astype(np.int32), {"target_tokens": row[1:].astype(np.int64)}) for row in tokens]
    params = AdamParams(learning_rate=1e-4)

    def step() -> None:
        engine.forward_backward([(slot, data)], "cross_entropy", {}, False)
        engine.optim_step(slot, params)

    return step


def through_sdk(url: str, model: str, tokens: np.ndarray, rank: int) -> Callable[[], None]:
    import tinker
    from tinker import types

    service = tinker.ServiceClient(base_url=url, api_key="tml-bench-training")
    training = service.create_lora_training_client(base_model=model, rank=rank, seed=0).result()
    data = [
        types.Datum(model_input=types.ModelInput.from_ints(row[:-1].tolist()), loss_fn_inputs={"target_tokens": row[1:].tolist()})
        for row in tokens
    ]
    params = types.AdamParams(learning_rate=1e-4)

    def step() -> None:
        result = training.forward_backward(data, "cross_entropy")
        training.optim_step(params).result()
        result.result()

    return step


def torch_peft(directory: Path, tokens: np.ndarray, rank: int, dtype: str) -> Callable[[], None]:
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype).to(device)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=32, target_modules=targets))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    inputs = torch.tensor(tokens[:, :-1], device=device)
    labels = torch.tensor(tokens[:, 1:], device=device)

    def step() -> None:
        logits = model(input_ids=inputs).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/tuft/bench").expanduser())
    parser.add_argument("--server", help="also time the step through the SDK against this loopback server")
    parser.add_argument("--server-model", help="the name that server serves this checkpoint under")
    args = parser.parse_args()
    args.shape = shape_from_arguments(parser, args)

    directory = model_dir(args.shape, args.cache_dir)
    vocab = json.loads((directory / "config.json").read_text())["vocab_size"]
    tokens = batch_tokens(args.batch, args.seq, vocab)
    steps = {
        "tuft_jax": ours(directory, tokens, args.rank, args.dtype),
        "transformers_peft": torch_peft(directory, tokens, args.rank, args.dtype),
    }
    if args.server:
        require_loopback(args.server)
        steps["tuft_jax_via_sdk"] = through_sdk(args.server, args.server_model, tokens, args.rank)
    per_step = seconds_per_step(steps, args.steps, args.rounds)
    n_tokens = args.batch * args.seq
    peak = measured_peak_flops(jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32)
    flops = train_flops_per_token(directory, args.seq) * n_tokens
    result = {
        "device": jax.devices()[0].device_kind,
        "shape": args.shape,
        "dtype": args.dtype,
        "batch": args.batch,
        "seq": args.seq,
        "rank": args.rank,
        "tokens_per_s": {k: n_tokens / v for k, v in per_step.items()},
        "mfu": {k: flops / v / peak for k, v in per_step.items()},
        "measured_peak_tflops": peak / 1e12,
        "speedup_vs_transformers_peft": per_step["transformers_peft"] / per_step["tuft_jax"],
        "loadavg": os.getloadavg(),
        "checkpoint": str(directory),
    }
    if args.server:
        result["server_over_in_process"] = per_step["tuft_jax_via_sdk"] / per_step["tuft_jax"]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
