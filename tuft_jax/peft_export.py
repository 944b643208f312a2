"""One adapter slot as a standard PEFT LoRA directory, and back.

`save_weights_for_sampler` output must load with `PeftModel.from_pretrained` (and vLLM's LoRA
loader), so it uses PEFT's layout: `adapter_config.json` plus `adapter_model.safetensors` with
keys `base_model.model.<HF module>.lora_A.weight` ([r, in]) and `...lora_B.weight` ([out, r]),
and scaling lora_alpha / r. Our slot leaves are A [in, r_max] and B [r_max, out] keyed by the
HF module path, so a tensor is one slice and transpose away from PEFT's.

MoE experts (`tuft_jax.moe`) are exported as PEFT's LoRA on raw parameters (`target_parameters`
`mlp.experts.gate_up_proj` and `mlp.experts.down_proj`): per expert e, lora_A.weight holds rows
[e r, (e + 1) r) and lora_B.weight columns e + E j (rank j), and our shared factor is repeated
for every expert. PEFT wraps the two parameters of `mlp.experts` one inside the other in
registration order, so gate/up's tensors are under `experts.base_layer.` and down's under
`experts.`. PEFT reads `gate_proj`/`up_proj`/`down_proj` module targets of a MoE model as its
experts, so the projections of a MoE model's dense-MLP layers are named as parameters too
(`mlp.gate_proj.weight`; their tensors are a plain LoRA's). Such adapters are written, not read
back (`target_parameters` is refused on read).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from tuft_jax.adapters import leaf_group
from tuft_jax.errors import InputError
from tuft_jax.types import LoraConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

GROUP_MODULES: dict[str, tuple[str, ...]] = {
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "unembed": ("lm_head",),
}
SUPPORTED_MODULES = frozenset(name for names in GROUP_MODULES.values() for name in names)
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
_EXPERT_WRAPPER = {"gate_up_lora": "base_layer.", "down_lora": ""}

# Config fields whose non-default values change what the tensors mean; reading them as plain
# LoRA would silently compute a different function.
_UNSUPPORTED_FIELDS: dict[str, str] = {
    "use_dora": "DoRA",
    "use_rslora": "rsLoRA scaling (lora_alpha / sqrt(r))",
    "lora_bias": "LoRA bias terms",
    "fan_in_fan_out": "fan_in_fan_out (transposed Conv1D weights)",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "modules_to_save": "fully trained modules (modules_to_save)",
    "trainable_token_indices": "trainable token embeddings",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "layer_replication": "layer replication",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA",
}


def peft_key(path: tuple) -> str:
    """('model', 'layers', 0, 'self_attn', 'q_proj', 'lora', 'lora_a') -> PEFT's saved tensor name."""
    module = ".".join(str(part) for part in path[:-2])
    which = "lora_A" if path[-1] == "lora_a" else "lora_B"
    return f"base_model.model.{module}.{which}.weight"


def _is_expert_lora(path: tuple) -> bool:
    return len(path) >= 3 and path[-3] == "experts"


def _expert_tensors(path: tuple, a: np.ndarray, b: np.ndarray, rank: int) -> dict[str, np.ndarray]:
    """PEFT's per-expert lora_A [E r, in] and lora_B [out, r E] of one expert LoRA, whose
    `path` ends in (experts, gate_up_lora | down_lora, lora_a); the factor without an expert
    axis is shared and repeated."""
    a, b = a[..., :rank], b[..., :rank, :]
    experts = (a if a.ndim == 3 else b).shape[0]
    a = np.broadcast_to(a, (experts, *a.shape[-2:]))  # [E, in, r]
    b = np.broadcast_to(b, (experts, *b.shape[-2:]))  # [E, r, out]
    module = ".".join(str(part) for part in path[:-2])
    prefix = f"base_model.model.{module}.{_EXPERT_WRAPPER[str(path[-2])]}"
    return {
        f"{prefix}lora_A.weight": np.ascontiguousarray(np.swapaxes(a, 1, 2).reshape(experts * rank, -1)),
        f"{prefix}lora_B.weight": np.ascontiguousarray(np.transpose(b, (2, 1, 0)).reshape(b.shape[-1], -1)),
    }


def _trained_groups(config: LoraConfig) -> set[str]:
    flags = {"attn": config.train_attn, "mlp": config.train_mlp, "unembed": config.train_unembed}
    return {group for group, on in flags.items() if on}


def write_peft_adapter(
    directory: Path, lora: Mapping[tuple, np.ndarray], config: LoraConfig, alpha: float, base_model_name_or_path: str
) -> int:
    """Writes the trained groups of one slot (A [in, r_max], B [r_max, out]) as a PEFT adapter.

    Untrained groups are left out rather than written as zeros, so `target_modules` says what
    the adapter really changes. Returns the bytes written.
    """
    groups = _trained_groups(config)
    rank = config.rank
    tensors: dict[str, np.ndarray] = {}
    experts = False
    for path, value in lora.items():
        if leaf_group(path) not in groups:
            continue
        value = np.asarray(value, np.float32)
        if _is_expert_lora(path):
            experts = True
            if path[-1] == "lora_a":
                tensors |= _expert_tensors(path, value, np.asarray(lora[(*path[:-1], "lora_b")], np.float32), rank)
            continue
        weight = value[:, :rank].T if path[-1] == "lora_a" else value[:rank, :].T
        tensors[peft_key(path)] = np.ascontiguousarray(weight)
    dense = {name for path in lora if not _is_expert_lora(path) for name in map(str, path)}
    modules = [name for group in GROUP_MODULES if group in groups for name in GROUP_MODULES[group] if name in dense]
    parameters = [*EXPERT_PARAMETERS, *(f"mlp.{name}.weight" for name in modules if name in GROUP_MODULES["mlp"])]
    if experts:
        modules = [name for name in modules if name not in GROUP_MODULES["mlp"]]
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": modules,
        **({"target_parameters": parameters} if experts else {}),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "use_rslora": False,
        "inference_mode": True,
    }
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=1))
    return (directory / WEIGHTS_FILE).stat().st_size + (directory / CONFIG_FILE).stat().st_size


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise InputError(f"{directory.name!r} is not a PEFT adapter (no {CONFIG_FILE})")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{CONFIG_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise InputError(f"{CONFIG_FILE} must be a JSON object")
    if config.get("peft_type") != "LORA":
        raise InputError(f"only LoRA adapters are supported, got peft_type {config.get('peft_type')!r}")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise InputError(f"only CAUSAL_LM adapters are supported, got task_type {config['task_type']!r}")
    for field, what in _UNSUPPORTED_FIELDS.items():
        if config.get(field):
            raise InputError(f"{what} is not supported ({field} = {config[field]!r})")
    if config.get("bias", "none") != "none":
        raise InputError(f"adapter bias terms are not supported (bias = {config['bias']!r}, expected 'none')")
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InputError(f"{CONFIG_FILE}: r must be a positive integer, got {rank!r}")
    alpha = config.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not np.isfinite(alpha):
        raise InputError(f"{CONFIG_FILE}: lora_alpha must be a number, got {alpha!r}")
    targets = config.get("target_modules")
    # A string is a regex or "all-linear"; the tensor names checked below are then the truth.
    if isinstance(targets, list):
        unknown = sorted(set(targets) - SUPPORTED_MODULES)
        if unknown:
            raise InputError(
                f"target module(s) {', '.join(unknown)} are not supported (supported: {', '.join(sorted(SUPPORTED_MODULES))})"
            )
    return config


def _read_tensors(directory: Path) -> dict[str, np.ndarray]:
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        if (directory / "adapter_model.bin").exists():
            raise InputError(f"only {WEIGHTS_FILE} is read, not adapter_model.bin; re-save with safe_serialization=True")
        raise InputError(f"{directory.name!r} has no {WEIGHTS_FILE}")
    # The flax reader handles bfloat16, which plain numpy cannot.
    with safe_open(path, framework="flax") as f:
        return {key: np.asarray(f.get_tensor(key), np.float32) for key in f.keys()}


def read_peft_adapter(
    directory: Path, template: Mapping[tuple, tuple[int, ...]]
) -> tuple[dict[tuple, np.ndarray], LoraConfig, float]:
    """Reads a PEFT LoRA adapter into one slot's leaves: (arrays, config, lora_alpha).

    `template` maps every LoRA leaf path of the model to its one-slot shape (A [in, r_max],
    B [r_max, out]); every path comes back, padded to r_max, with zeros for modules the adapter
    does not target. A group counts as trained when the adapter has any tensor in it. The
    engine scales by LORA_ALPHA / r, so a caller loading an adapter with another lora_alpha
    must multiply B by lora_alpha / LORA_ALPHA.
    """
    config = _read_config(directory)
    rank = config["r"]
    tensors = _read_tensors(directory)
    by_key = {peft_key(path): path for path in template}
    # PEFT also saves the (frozen) base weight of a targeted tied/embedding layer; the base
    # model provides it.
    keys = [key for key in tensors if not key.endswith(".base_layer.weight")]
    unknown = sorted(set(keys) - set(by_key))
    if unknown:
        more = f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise InputError(f"adapter tensor(s) {', '.join(unknown[:3])}{more} match no LoRA target of this model")
    if not keys:
        raise InputError(f"{WEIGHTS_FILE} has no LoRA tensors")

    arrays = {path: np.zeros(shape, np.float32) for path, shape in template.items()}
    groups: set[str] = set()
    for key in keys:
        path = by_key[key]
        is_a = path[-1] == "lora_a"
        partner = key.replace(".lora_A.", ".lora_B.") if is_a else key.replace(".lora_B.", ".lora_A.")
        if partner not in tensors:
            raise InputError(f"adapter has {key} but not {partner}")
        value, shape = tensors[key], template[path]
        max_rank = shape[1] if is_a else shape[0]
        if rank > max_rank:
            raise InputError(f"adapter rank {rank} exceeds this model's max LoRA rank {max_rank}")
        rank_axis = 0 if is_a else 1
        if value.ndim == 2 and value.shape[rank_axis] != rank:
            raise InputError(f"{key} has rank {value.shape[rank_axis]}, but {CONFIG_FILE} says r = {rank}")
        expected = (rank, shape[0]) if is_a else (shape[1], rank)
        if value.shape != expected:
            raise InputError(f"{key} has shape {list(value.shape)}, expected {list(expected)} for this model")
        if is_a:
            arrays[path][:, :rank] = value.T
        else:
            arrays[path][:rank, :] = value.T
        groups.add(leaf_group(path))
    lora = LoraConfig(rank=rank, train_attn="attn" in groups, train_mlp="mlp" in groups, train_unembed="unembed" in groups)
    return arrays, lora, float(config["lora_alpha"])
