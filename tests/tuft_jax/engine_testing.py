"""Helpers for engine tests: read and write one adapter slot, and build PyTorch references.

Our LoRA tensors are slot-stacked and padded to the engine's max rank: A is [slots, in, max_rank]
and B is [slots, max_rank, out] (with a layer axis after the slot axis inside the layer stack,
which these helpers unstack into HF-style per-layer keys), with the delta x @ A @ B * (alpha / rank). PEFT stores the same
adapter as lora_A.weight = A[:, :rank].T and lora_B.weight = B[:rank].T with scaling alpha / r,
so copying one slot into a PEFT model gives an independent implementation of the same function.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from tuft_jax import layer_stack
from tuft_jax.layer_stack import LayerLayout
from tuft_jax.engine import Engine
from tuft_jax.types import Datum

# The geometry of every test engine (see conftest.make_engine).
MAX_RANK = 8
MAX_ADAPTERS = 4
CONTEXT = 256

# Tinker's LoRA alpha, written out (not imported) so the reference does not follow an engine change.
LORA_ALPHA = 32

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def leaf_key(path: tuple) -> str:
    """`model.layers.0.self_attn.q_proj.lora.lora_a`: the HF module path plus our leaf names."""
    return ".".join(str(part) for part in path)


def slot_arrays(state: nnx.State, slot: int, layout: LayerLayout | None = None) -> dict[str, np.ndarray]:
    """One slot of every slot-stacked leaf, one entry per layer, keyed by `leaf_key`; `layout`
    (the engine's) may be left out for a model of one layer stack."""
    one_slot = {path: np.array(var[...][slot]) for path, var in nnx.to_flat_state(state)}
    return {leaf_key(path): value for path, value in layer_stack.unstack(one_slot, layout or _one_stack(one_slot)).items()}


def _one_stack(one_slot: dict[tuple, np.ndarray]) -> LayerLayout:
    layers = {value.shape[0] for path, value in one_slot.items() if layer_stack.STACK in map(str, path)}
    assert len(layers) == 1 and not any(layer_stack.DENSE_MLP_STACK in map(str, p) for p in one_slot), "pass the layout"
    return LayerLayout.of(layers.pop())


def tree_slot(tree, slot: int) -> list[np.ndarray]:
    """One slot of every leaf of any slot-stacked pytree (e.g. the optimizer state), in tree order."""
    return [np.array(x[slot]) for x in jax.tree.leaves(tree)]


def set_slot(engine: Engine, slot: int, arrays: dict[str, np.ndarray]) -> None:
    flat = nnx.to_flat_state(engine.lora)
    by_path = {p: arrays[leaf_key(p)] for path, _ in flat for p in layer_stack.layer_paths(path, engine.layout)}
    values = layer_stack.stack(by_path, [path for path, _ in flat], engine.layout)
    engine.lora = nnx.from_flat_state([(path, var.replace(var[...].at[slot].set(values[path]))) for path, var in flat])


def random_lora(engine: Engine, rank: int, seed: int, b_std: float = 0.05) -> dict[str, np.ndarray]:
    """Random A and nonzero B in the first `rank` columns (rows of B), zero padding beyond.

    A has the PEFT init's scale (~1/sqrt(in)); with alpha / rank = 32 / rank the B scale gives
    deltas of the same order as the base projections, so every tensor visibly moves the output.
    """
    rng = np.random.default_rng(seed)
    arrays = {}
    for key, value in slot_arrays(engine.lora, 0, engine.layout).items():
        x = np.zeros_like(value)  # A [..., in, r_max], B [..., r_max, out] (MoE experts lead with E)
        if key.endswith("lora_a"):
            x[..., :rank] = rng.standard_normal((*x.shape[:-1], rank)) / np.sqrt(x.shape[-2])
        else:
            x[..., :rank, :] = rng.standard_normal((*x.shape[:-2], rank, x.shape[-1])) * b_std
        arrays[key] = x.astype(np.float32)
    return arrays


def module_path(key: str) -> str:
    """`model.layers.0.self_attn.q_proj.lora.lora_a` -> `model.layers.0.self_attn.q_proj`."""
    return key.rsplit(".lora.", 1)[0]


def peft_param_name(key: str) -> str:
    which = "lora_A" if key.endswith("lora_a") else "lora_B"
    return f"base_model.model.{module_path(key)}.{which}.default.weight"


def peft_model(model_dir: Path, arrays: dict[str, np.ndarray], rank: int):
    """The HF PyTorch model with a PEFT LoRA (alpha 32, every projection + lm_head) holding `arrays`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=LORA_ALPHA, target_modules=TARGET_MODULES, lora_dropout=0.0, bias="none")
    model = get_peft_model(model, config)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in arrays.items():
            weight = value[:, :rank] if key.endswith("lora_a") else value[:rank, :]
            params[peft_param_name(key)].copy_(torch.from_numpy(np.ascontiguousarray(weight.T)))
    expected = {peft_param_name(key) for key in arrays}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected, sorted(trainable ^ expected)
    return model


def torch_logprobs(model, tokens: np.ndarray, targets: np.ndarray):
    """log p(targets[t] | tokens[:t+1]) for one unpadded sequence, as a torch tensor (keeps the graph)."""
    import torch

    logits = model(input_ids=torch.as_tensor(tokens, dtype=torch.long)[None]).logits[0].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.as_tensor(targets, dtype=torch.long)[:, None])[:, 0]


def next_token_datum(sequence: Iterable[int], weights: np.ndarray | None = None) -> Datum:
    """A cross-entropy datum that predicts each token of `sequence` from the ones before it."""
    seq = np.asarray(list(sequence), np.int64)
    inputs = {"target_tokens": seq[1:]}
    if weights is not None:
        inputs["weights"] = np.asarray(weights, np.float32)
    return Datum(seq[:-1].astype(np.int32), inputs)


def random_sequences(lengths: Iterable[int], seed: int, vocab: int = 460) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=n) for n in lengths]


def assert_close_rel(actual: np.ndarray, expected: np.ndarray, tol: float, what: str = "") -> None:
    """max |actual - expected| <= tol * max |expected| (a scale-free per-tensor comparison)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = float(np.max(np.abs(expected)))
    err = float(np.max(np.abs(actual - expected)))
    assert scale > 0, f"{what}: reference is all zero"
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol} x max |ref| {scale:.3g}"


@contextlib.contextmanager
def count_compiles() -> Iterator[list[str]]:
    """Every trace to a jaxpr and every XLA compile inside the block (jitted functions and eager ops)."""
    events: list[str] = []
    watched = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/backend_compile_duration")

    def listener(event: str, duration: float, **kwargs) -> None:
        if event in watched:
            events.append(f"{event.rsplit('/', 1)[1]}: {kwargs.get('fun_name')}")

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
