"""Device memory of the real training / prefill / decode step, from an ahead-of-time compile.

The jitted functions the engine runs (`train_step.forward_backward`, `sampler.prefill`,
`sampler.decode`) are lowered with abstract `ShapeDtypeStruct` inputs and compiled, and XLA's
buffer assignment (`compiled.memory_analysis()`) is reported. Nothing is allocated, so a 32k-token
Qwen3-8B step can be sized on a small CPU machine. On XLA:CPU the numbers are the CPU program's:
bf16 matmuls run in f32 and `ragged_dot` is expanded group by group, so temporaries differ from a
GPU/TPU compile. With `--devices N` the inputs are laid over a mesh of N simulated CPU devices
(`--tp` of them on the tp axis, `--ep` on the expert axis) as the engine lays them, and the
figures are one device's. Usage:
    python scripts/bench/memory.py --model qwen3-8b --batch 1 --seq 2048 --layers 4 --json
    python scripts/bench/memory.py --model qwen3-30b-a3b --devices 8 --batch 1 --seq 8192 --json
    python scripts/bench/memory.py --all --timeout 900 --out out/bench/memory.md
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import functools
import inspect
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from model_shapes import SHAPES, model_dir
from tuft_jax import sampler, train_step
from tuft_jax.kv_blocks import blocks_for
from tuft_jax.models.decoder import CausalLM, DecoderConfig, LoraShape
from tuft_jax.models.hf_config import config_from_hf
from tuft_jax.optimizer import init_optimizer_state
from tuft_jax.paged_attention import KVPool, init_pool, tile_blocks
from tuft_jax.sharding import batch_sharding, data_parallel, make_mesh, param_sharding
from tuft_jax.stored_dtype import stored_dtype

DECODE_CHUNK = 16
LOGITS_CHUNK = 1024
GB = 1e9

ALL_CONFIGS: list[list[str]] = [
    ["--model", "qwen3-0.6b", "--seq", "8192"],
    ["--model", "qwen3-0.6b", "--seq", "32768"],
    ["--model", "qwen3-8b", "--seq", "2048", "--layers", "4"],
    ["--model", "qwen3-8b", "--seq", "2048"],
    ["--model", "qwen3-8b", "--seq", "8192"],
    ["--model", "qwen3-8b", "--seq", "32768"],
    ["--model", "llama3.1-8b", "--seq", "8192"],
    ["--model", "llama3.1-8b", "--seq", "32768"],
]
"""What `--all` measures (batch 1, train)."""


def sds(shape: tuple[int, ...], dtype: Any, sharding: Any = None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def placed(state: nnx.State, mesh: Mesh, dtype_of: Any = lambda dtype: dtype) -> nnx.State:
    """Abstract leaves laid over `mesh` as the engine lays the parameters, in `dtype_of` their dtype."""
    leaves = nnx.to_flat_state(state)
    return nnx.from_flat_state([
        (path, var.replace(sds(var.shape, dtype_of(var.dtype), param_sharding(path, var.shape, mesh)))) for path, var in leaves
    ])  # fmt: skip


def nbytes(tree: Any) -> int:
    """Bytes of the leaves, one device's share of those laid over a mesh."""

    def held(leaf: Any) -> int:
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        return math.prod(shape) * jnp.dtype(leaf.dtype).itemsize

    return sum(held(leaf) for leaf in jax.tree.leaves(tree))


def decoder_config(model: str, layers: int | None, cache_dir: Path) -> DecoderConfig:
    """A real model's config, or the built-in tiny model's (built under `cache_dir` once)."""
    if model == "tiny":
        hf = json.loads((model_dir(model, cache_dir) / "config.json").read_text())
    else:
        hf = dict(SHAPES[model])
    if layers is not None:
        hf["num_hidden_layers"] = layers
    return config_from_hf(hf)


def train_batch(b: int, t: int, mesh: Mesh) -> train_step.BatchArrays:
    """The shapes, dtypes and layout `Engine._forward_backward_group` builds for a cross-entropy batch."""

    def rows(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
        return sds(shape, dtype, batch_sharding(mesh, len(shape)))

    return train_step.BatchArrays(
        tokens=rows((b, t), jnp.int32),
        positions=rows((b, t), jnp.int32),
        slots=rows((b,), jnp.int32),
        scales=rows((b, 3), jnp.float32),
        targets=rows((b, t, 1), jnp.int32),
        mask=rows((b, t, 1), jnp.bool_),
        inputs={"weights": rows((b, t, 1), jnp.float32)},
        **({"segments": rows((b, t), jnp.int32)} if "segments" in inspect.signature(train_step.BatchArrays).parameters else {}),
    )


def prompt_chunk(b: int, t: int) -> sampler.PromptChunk:
    """The last prefill chunk of B prompts of T tokens (as `DecodeScheduler._run_chunk` builds it):
    each chunk of a prompt compiles to the same program, and the last attends to every block."""
    i32 = jnp.int32
    width = sampler.prefill_width(t, b)
    return sampler.PromptChunk(
        tokens=sds((b, width), i32), start=sds((b,), i32), length=sds((b,), i32),
        tables=sds((b, blocks_for(t)), i32), slots=sds((b,), i32), scales=sds((b, 3), jnp.float32),
        next_tokens=sds((b, width), i32),
    )  # fmt: skip


def kv_pool(cfg: DecoderConfig, b: int, t: int, dtype: Any) -> KVPool:
    """A pool holding B sequences of T tokens (and the scratch block)."""
    return jax.eval_shape(lambda: init_pool(cfg.num_layers, b * blocks_for(t) + 1, cfg.num_kv_heads, cfg.head_dim, dtype))


def form_options(adapters: int, remat: bool, mesh: Mesh | None = None) -> dict[str, Any]:
    """The LoRA form an accelerator engine picks for a batch of `adapters` runs, remat (the
    variant its planner takes when the plain pass does not fit) and the mesh; options older
    commits lack are left out, so the bench also measures them."""
    params = inspect.signature(train_step.forward_backward).parameters
    options: dict[str, Any] = {"mesh": mesh} if "mesh" in params and mesh is not None else {}
    if "lora_form" in params:
        options["lora_form"] = "single" if adapters == 1 else "grouped"
    if "remat" in params:
        options["remat"] = remat
    return options


def lower(
    mode: str,
    graphdef: nnx.GraphDef,
    base: nnx.State,
    lora: nnx.State,
    cfg: DecoderConfig,
    b: int,
    t: int,
    dtype: Any,
    adapters: int,
    remat: bool,
    mesh: Mesh,
) -> jax.stages.Lowered:
    """Lowers the engine's own jitted function, called the way the engine calls it."""
    if mode == "train":
        return train_step.forward_backward.lower(
            graphdef=graphdef, base=base, lora=lora, batch=train_batch(b, t, mesh), config={}, loss_fn="cross_entropy",
            **form_options(adapters, remat, mesh),
        )
    pool = kv_pool(cfg, b, t, dtype)
    tile = tile_blocks(t, b, cfg.num_kv_heads, cfg.head_dim)
    if mode == "prefill":
        chunk = prompt_chunk(b, t)
        return sampler.prefill.lower(
            graphdef, base, lora, pool, chunk, score_prompt=False, topk_prompt=0, tile_blocks=tile
        )
    state = jax.eval_shape(functools.partial(sampler.init_state, b))
    tables, finish = sds((b, blocks_for(t)), jnp.int32), sds((b,), jnp.bool_)
    return sampler.decode.lower(
        graphdef, base, lora, pool, state, tables, finish, steps=DECODE_CHUNK, live_rows=b, tile_blocks=tile
    )


def cpu_f32_param_copies(compiled: jax.stages.Compiled) -> int:
    """Bytes of the f32 copies XLA:CPU makes of whole bf16 parameters before its loops (it runs
    bf16 matmuls in f32): temporaries a bf16-native backend (GPU, TPU) does not have."""
    text = compiled.as_text()
    entry = text[text.index("\nENTRY"):]
    params = set(re.findall(r"%(\S+) = bf16\[[\d,]*\]\{[^}]*\} parameter\(", entry))
    copies = re.findall(r"= f32\[([\d,]*)\]\{[^}]*\} fusion\(%([^,)\s]+)\), kind=kLoop, calls=%wrapped_convert", entry)
    return sum(4 * math.prod(int(n) for n in dims.split(",")) for dims, operand in copies if operand in params)


def lower_bound(
    mode: str, cfg: DecoderConfig, base_bytes: int, lora_bytes: int, b: int, t: int, itemsize: int
) -> dict[str, int]:
    """What any implementation must hold, assuming flash attention (no T x T scores), one saved
    residual per layer with the layer recomputed in the backward pass, and logits in chunks.

    One layer's activations, per token: its input, two norm outputs and the mid residual (4·D),
    q, k, v and the attention output (2·(heads + kv_heads)·head_dim), gate and up (2·F; for MoE
    2·k·F of the token's k experts). `b` counts one device's rows, the weights one device's share.
    """
    d, layers = cfg.hidden_size, cfg.num_layers
    ffn = cfg.intermediate_size if cfg.moe is None else cfg.moe.experts_per_token * cfg.moe.intermediate_size
    per_token = 4 * d + 2 * (cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim + 2 * ffn
    tokens = b * t if mode != "decode" else b
    parts = {"base_weights": base_bytes, "lora_weights": lora_bytes, "layer_activations": tokens * per_token * itemsize}
    if mode == "train":
        parts["lora_grads_and_adamw"] = 3 * lora_bytes
        parts["residual_stream"] = b * t * d * layers * itemsize
        parts["logits_chunk"] = min(b * t, max(LOGITS_CHUNK, b)) * cfg.vocab_size * 4
    else:
        parts["kv_cache"] = 2 * b * t * layers * cfg.num_kv_heads * cfg.head_dim * itemsize
        parts["logits"] = b * cfg.vocab_size * 4
    return parts


def measure(
    model: str,
    mode: str,
    b: int,
    t: int,
    layers: int | None,
    rank: int,
    slots: int,
    dtype_name: str,
    cache_dir: Path,
    adapters: int = 1,
    remat: bool = True,
    devices: int = 1,
    tp: int = 1,
    ep: int = 1,
) -> dict[str, Any]:
    if devices > 1 and mode != "train":
        raise SystemExit("--devices > 1 is measured for --mode train only")
    dtype = jnp.dtype(dtype_name)
    cfg = decoder_config(model, layers, cache_dir)
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, LoraShape(slots, rank), dtype=dtype))
    graphdef, lora, base = nnx.split(abstract, nnx.LoRAParam, nnx.Param)
    mesh = make_mesh(jax.devices()[:devices], tp, ep)
    base, lora = placed(base, mesh, stored_dtype), placed(lora, mesh)
    width = data_parallel(mesh)
    rows = -(-b // width) * width  # the engine pads the batch to the data-parallel width
    start = time.perf_counter()
    lowered = lower(mode, graphdef, base, lora, cfg, rows, t, dtype, adapters, remat, mesh)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    parts = lower_bound(mode, cfg, nbytes(base), nbytes(lora), rows // width, t, dtype.itemsize)
    argument, output, temp, alias = (
        mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.temp_size_in_bytes, mem.alias_size_in_bytes
    )
    # XLA:CPU (jax 0.10.2) reports arguments + outputs as the peak, without the temporaries; a
    # reported peak is used only when it covers the arguments and temporaries, live together.
    reported = getattr(mem, "peak_memory_in_bytes", 0)
    if reported >= argument + temp - alias and reported > 0:
        peak, source = reported, "xla"
    else:
        peak, source = argument + output + temp - alias, "argument+output+temp-alias"
    cpu_copies = cpu_f32_param_copies(compiled) if jax.default_backend() == "cpu" else 0
    # Training state the step does not take: AdamW moments and the gradient accumulator.
    outside = 0
    if mode == "train":
        # The AdamW moments are laid out like the LoRA weights they follow.
        held = nbytes(lora) / nbytes(jax.tree.map(lambda x: sds(x.shape, x.dtype), lora))
        outside = round(nbytes(jax.eval_shape(init_optimizer_state, lora)) * held) + nbytes(lora)
    return dict(
        model=model, mode=mode, batch=b, seq=t, layers=cfg.num_layers, rank=rank, slots=slots, dtype=dtype_name,
        devices=devices, mesh=dict(mesh.shape), rows=rows,
        adapters=adapters, **form_options(adapters, remat),
        peak_bytes=peak, peak_source=source, cpu_f32_param_copy_bytes=cpu_copies,
        peak_without_cpu_copies_bytes=peak - cpu_copies, xla_peak_bytes=reported, temp_bytes=temp, argument_bytes=argument,
        output_bytes=output, alias_bytes=alias, state_outside_step_bytes=outside,
        lower_bound_bytes=sum(parts.values()), lower_bound_parts=parts, lower_s=round(lower_s, 2),
        compile_s=round(compile_s, 2), backend=jax.default_backend(), jax_version=jax.__version__,
    )


COLUMNS = (
    "| model | mode | B×T | layers | peak GB | XLA:CPU f32 weight copies GB | peak without them GB | temp GB "
    "| lower bound GB | lower s | compile s | load avg |"
)


def table_row(args: list[str], result: dict[str, Any] | None, note: str, load: str) -> str:
    if result is None:
        cells = [f"`{' '.join(args)}`", note, *[""] * (COLUMNS.count("|") - 4), load]
    else:
        r = result
        cells = [
            r["model"], r["mode"], f"{r['batch']}×{r['seq']}", r["layers"],
            *(
                f"{r.get(key, 0) / GB:.2f}"
                for key in (
                    "peak_bytes", "cpu_f32_param_copy_bytes", "peak_without_cpu_copies_bytes", "temp_bytes",
                    "lower_bound_bytes",
                )
            ),
            f"{r['lower_s']:.1f}", f"{r['compile_s']:.1f}", load,
        ]
    return "| " + " | ".join(map(str, cells)) + " |"


def run_all(timeout: float, out: Path) -> None:
    """Each configuration in its own process (a compile can take minutes and much host memory);
    writes the table to `out` and every JSON result next to it (`.jsonl`)."""
    header = f"jax {jax.__version__}, {os.cpu_count()} CPUs; load avg: the 1-minute load as each configuration started"
    lines = [header, "", COLUMNS, "|---" * (COLUMNS.count("|") - 1) + "|"]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.with_suffix(".jsonl").open("w") as results:
        for args in ALL_CONFIGS:
            load = Path("/proc/loadavg").read_text().split()[0]
            try:
                command = [sys.executable, __file__, *args, "--json"]
                done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
                result = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
                note = "" if result else f"failed (rc {done.returncode}): {done.stderr.strip().splitlines()[-1:]}"
            except subprocess.TimeoutExpired:
                result, note = None, f"timeout after {timeout:.0f} s"
            if result:
                results.write(json.dumps(result) + "\n")
                results.flush()
            lines.append(table_row(args, result, note, load))
            print(lines[-1], flush=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", *sorted(SHAPES)], default="qwen3-0.6b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048, help="tokens per row (the cache length in decode)")
    parser.add_argument("--layers", type=int, default=None, help="override the model's depth")
    parser.add_argument("--mode", choices=["train", "prefill", "decode"], default="train")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--slots", type=int, default=9, help="LoRA slots (max_adapters + 1)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--adapters", type=int, default=1, help="distinct runs in the training batch (picks the LoRA form)")
    parser.add_argument("--no-remat", action="store_true", help="train without per-layer rematerialisation")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--all", action="store_true", help="run ALL_CONFIGS in subprocesses, write a markdown table")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per configuration with --all")
    parser.add_argument("--out", type=Path, default=Path("out/bench/memory.md"))
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/tuft/bench").expanduser(), help="for tiny")
    parser.add_argument("--devices", type=int, default=1, help="simulated CPU devices the inputs are laid over")
    parser.add_argument("--tp", type=int, default=1, help="of those, devices on the tp axis")
    parser.add_argument("--ep", type=int, default=1, help="of those, devices on the expert axis")
    args = parser.parse_args()
    jax.config.update("jax_num_cpu_devices", args.devices)
    if args.all:
        run_all(args.timeout, args.out)
        return
    r = measure(
        args.model, args.mode, args.batch, args.seq, args.layers, args.rank, args.slots, args.dtype, args.cache_dir,
        args.adapters, not args.no_remat, args.devices, args.tp, args.ep,
    )
    if args.json:
        print(json.dumps(r))
    else:
        fields = ("peak_bytes", "temp_bytes", "argument_bytes", "output_bytes", "lower_bound_bytes")
        gb = {key: f"{r[key] / GB:.3g}" for key in fields}
        print(
            f"{r['model']} {r['mode']} {r['batch']}x{r['seq']} layers={r['layers']}: peak {gb['peak_bytes']} GB "
            f"(temp {gb['temp_bytes']}, arguments {gb['argument_bytes']}, outputs {gb['output_bytes']}), "
            f"lower bound {gb['lower_bound_bytes']} GB; lower {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s"
        )


if __name__ == "__main__":
    main()
