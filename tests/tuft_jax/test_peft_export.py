"""Adapters exported as PEFT directories compute the same function under transformers + peft.

Each case exports one engine slot, loads it with `PeftModel.from_pretrained` on the HF model
(float32) and compares per-token logprobs with the engine's forward within 1e-4. The reverse
direction reads an adapter that PEFT itself saved back into a slot, and a table of malformed
or unsupported adapters checks that `read_peft_adapter` refuses each with a clear message.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_testing import leaf_key, next_token_datum, random_lora, random_sequences, set_slot, slot_arrays, torch_logprobs
from flax import nnx
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM

from tuft_jax import layer_stack
from tuft_jax.adapters import LORA_ALPHA, leaf_group
from tuft_jax.engine import Engine
from tuft_jax.errors import InputError
from tuft_jax.peft_export import CONFIG_FILE, WEIGHTS_FILE, read_peft_adapter, write_peft_adapter
from tuft_jax.types import AdamParams, LoraConfig

SEQUENCES = random_sequences([12, 9], seed=3)
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


def template(engine: Engine) -> dict[tuple, tuple[int, ...]]:
    """One slot's leaf shapes, one entry per layer (PEFT's names are per layer)."""
    one_slot = {path: var[...][0] for path, var in nnx.to_flat_state(engine.lora)}
    return {path: value.shape for path, value in layer_stack.unstack(one_slot, engine.layout).items()}


def engine_logprobs(engine: Engine, slot: int) -> list[np.ndarray]:
    (result,) = engine.forward_backward([(slot, [next_token_datum(s) for s in SEQUENCES])], "cross_entropy", {}, True)
    return [output["logprobs"] for output in result.outputs]


def hf_logprobs(model) -> list[np.ndarray]:
    with torch.no_grad():
        return [torch_logprobs(model, s[:-1], s[1:]).numpy() for s in SEQUENCES]


def trained_groups(config: LoraConfig) -> set[str]:
    return {g for g, on in (("attn", config.train_attn), ("mlp", config.train_mlp), ("unembed", config.train_unembed)) if on}


CASES = [
    pytest.param(False, LoraConfig(rank=8, seed=0, train_mlp=False, train_unembed=False), False, id="attn-only"),
    pytest.param(False, LoraConfig(rank=3, seed=0, train_attn=False, train_unembed=False), False, id="mlp-only-rank3"),
    pytest.param(False, LoraConfig(rank=2, seed=0), False, id="all-rank2"),
    pytest.param(True, LoraConfig(rank=4, seed=0), True, id="tied-all-rank4-trained"),
]


@pytest.mark.parametrize(("tie", "config", "train"), CASES)
def test_exported_adapter_matches_peft(
    make_engine, tiny_checkpoint, tmp_path: Path, tie: bool, config: LoraConfig, train: bool
) -> None:
    engine = make_engine("qwen3", tie)
    slot = engine.create_adapter(config)
    if train:
        data = [next_token_datum(s) for s in SEQUENCES]
        for _ in range(2):
            engine.forward_backward([(slot, data)], "cross_entropy", {}, False)
            engine.optim_step(slot, AdamParams(learning_rate=1e-2))
    else:
        groups = trained_groups(config)
        arrays = random_lora(engine, config.rank, seed=1)
        set_slot(engine, slot, {k: v if leaf_group(tuple(k.split("."))) in groups else 0 * v for k, v in arrays.items()})
    out = tmp_path / "peft"
    size = engine.export_peft(slot, out)

    assert size == sum(f.stat().st_size for f in out.iterdir())
    adapter_config = json.loads((out / CONFIG_FILE).read_text())
    modules = [
        *(ATTN if config.train_attn else []), *(MLP if config.train_mlp else []), *(["lm_head"] if config.train_unembed else [])
    ]
    assert adapter_config["target_modules"] == modules
    assert (adapter_config["r"], adapter_config["lora_alpha"], adapter_config["base_model_name_or_path"]) == (
        config.rank, LORA_ALPHA, engine.name
    )
    tensors = load_file(out / WEIGHTS_FILE)
    assert {key.split(".")[-3] for key in tensors} == set(modules)
    assert all(v.shape[0 if ".lora_A." in k else 1] == config.rank for k, v in tensors.items())

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("qwen3", tie), dtype=torch.float32).eval()
    base = hf_logprobs(model)
    model = PeftModel.from_pretrained(model, out).eval()
    expected = hf_logprobs(model)
    ours = engine_logprobs(engine, slot)
    for got, want in zip(ours, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    # Not vacuous: the adapter visibly changes the model.
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(expected, base, strict=True)) > 0.05

    arrays, read_config, alpha = read_peft_adapter(out, template(engine))
    assert (read_config.rank, alpha, trained_groups(read_config)) == (config.rank, LORA_ALPHA, trained_groups(config))
    current = slot_arrays(engine.lora, slot)
    for path, value in arrays.items():
        np.testing.assert_array_equal(value, current[leaf_key(path)], err_msg=leaf_key(path))


def test_reads_adapter_saved_by_peft(make_engine, tiny_checkpoint, tmp_path: Path) -> None:
    """A PEFT-trained adapter (subset of a group, other alpha, tied lm_head) loads into a slot."""
    model_dir = tiny_checkpoint("qwen3", True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_config = PeftLoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"], init_lora_weights=False, task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, peft_config).eval()
    model.save_pretrained(tmp_path / "peft")
    # PEFT stores a copy of the tied lm_head base weight next to its LoRA; the reader skips it.
    assert "base_model.model.lm_head.base_layer.weight" in load_file(tmp_path / "peft" / WEIGHTS_FILE)

    engine = make_engine("qwen3", True)
    arrays, config, alpha = read_peft_adapter(tmp_path / "peft", template(engine))
    assert (config.rank, alpha, trained_groups(config)) == (4, 16.0, {"attn", "mlp", "unembed"})
    assert not arrays[("model", "layers", 0, "self_attn", "k_proj", "lora", "lora_a")].any()
    slot = engine.create_adapter(config)
    set_slot(
        engine, slot, {leaf_key(p): v * (alpha / LORA_ALPHA) if p[-1] == "lora_b" else v for p, v in arrays.items()}
    )
    for got, want in zip(engine_logprobs(engine, slot), hf_logprobs(model), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


# ---- malformed and unsupported adapters --------------------------------------------------

Q_A = ("model", "layers", 0, "self_attn", "q_proj", "lora", "lora_a")
TEMPLATE: dict[tuple, tuple[int, ...]] = {
    Q_A: (8, 4),
    Q_A[:-1] + ("lora_b",): (4, 6),
    ("model", "layers", 0, "mlp", "down_proj", "lora", "lora_a"): (6, 4),
    ("model", "layers", 0, "mlp", "down_proj", "lora", "lora_b"): (4, 8),
    ("lm_head", "lora", "lora_a"): (8, 4),
    ("lm_head", "lora", "lora_b"): (4, 10),
}
Q_A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Edit = Callable[[Path], None]


def edit_config(**changes: object) -> Edit:
    def edit(directory: Path) -> None:
        config = json.loads((directory / CONFIG_FILE).read_text())
        (directory / CONFIG_FILE).write_text(json.dumps({**config, **changes}))

    return edit


def edit_tensors(fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]) -> Edit:
    def edit(directory: Path) -> None:
        save_file(fn(load_file(directory / WEIGHTS_FILE)), directory / WEIGHTS_FILE)

    return edit


def rank_5(directory: Path) -> None:
    """A consistent rank-5 adapter, above the template's max rank of 4."""
    edit_config(r=5)(directory)
    tensors = load_file(directory / WEIGHTS_FILE)
    resized = {k: np.ones((5, v.shape[1]) if ".lora_A." in k else (v.shape[0], 5), np.float32) for k, v in tensors.items()}
    save_file(resized, directory / WEIGHTS_FILE)


def bin_only(directory: Path) -> None:
    (directory / WEIGHTS_FILE).rename(directory / "adapter_model.bin")


ERRORS = [
    pytest.param(lambda d: (d / CONFIG_FILE).unlink(), "is not a PEFT adapter", id="no-config"),
    pytest.param(bin_only, "safe_serialization=True", id="bin-only"),
    pytest.param(edit_config(peft_type="IA3"), "only LoRA adapters", id="not-lora"),
    pytest.param(edit_config(task_type="SEQ_CLS"), "only CAUSAL_LM", id="seq-cls"),
    pytest.param(edit_config(use_dora=True), "DoRA is not supported", id="dora"),
    pytest.param(edit_config(use_rslora=True), "rsLoRA", id="rslora"),
    pytest.param(edit_config(bias="lora_only"), "bias terms are not supported", id="bias"),
    pytest.param(edit_config(rank_pattern={"q_proj": 8}), "per-module ranks", id="rank-pattern"),
    pytest.param(edit_config(modules_to_save=["embed_tokens"]), "modules_to_save", id="modules-to-save"),
    pytest.param(edit_config(target_modules=["q_proj", "embed_tokens"]), "embed_tokens are not supported", id="unknown-target"),
    pytest.param(edit_config(r=0), "r must be a positive integer", id="zero-rank"),
    pytest.param(edit_config(r=3), "has rank 2, but adapter_config.json says r = 3", id="rank-mismatch"),
    pytest.param(rank_5, "exceeds this model's max LoRA rank 4", id="rank-too-large"),
    pytest.param(
        edit_tensors(lambda t: {**t, Q_A_KEY.replace("layers.0", "layers.7"): t[Q_A_KEY]}), "layers.7", id="unknown-layer"
    ),
    pytest.param(
        edit_tensors(lambda t: {k: v for k, v in t.items() if k != "base_model.model.lm_head.lora_B.weight"}),
        "lm_head.lora_A.weight but not .*lm_head.lora_B.weight",
        id="missing-partner",
    ),
    pytest.param(edit_tensors(lambda t: {**t, Q_A_KEY: np.ones((2, 9), np.float32)}), r"expected \[2, 8\]", id="wrong-width"),
    pytest.param(edit_tensors(lambda t: {}), "has no LoRA tensors", id="empty"),
]


@pytest.mark.parametrize(("edit", "message"), ERRORS)
def test_read_rejects(tmp_path: Path, edit: Edit, message: str) -> None:
    rng = np.random.default_rng(0)
    lora = {path: rng.standard_normal(shape).astype(np.float32) for path, shape in TEMPLATE.items()}
    write_peft_adapter(tmp_path, lora, LoraConfig(rank=2), alpha=LORA_ALPHA, base_model_name_or_path="tiny")
    read_peft_adapter(tmp_path, TEMPLATE)  # the unedited adapter is valid
    edit(tmp_path)
    with pytest.raises(InputError, match=message):
        read_peft_adapter(tmp_path, TEMPLATE)
