"""Which base models this server serves, read from `models.yaml` (or the built-in default).

Every mistake in the file is reported at startup as a `ValueError` naming the file and the
entry, rather than surfacing later as an obscure failure while loading weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from tuft_jax.builtin_model import BUILTIN_MODEL_NAME, ensure_builtin_model

ModelFamily = Literal["qwen3", "qwen3_moe", "gpt_oss", "llama"]
ModelDtype = Literal["float32", "bfloat16"]

_REQUIRED_KEYS = ("name", "path", "max_context_length", "max_lora_rank", "max_adapters")
_OPTIONAL_KEYS = ("dtype", "kv_cache_tokens", "tensor_parallel", "expert_parallel")
_LIMIT_KEYS = ("max_context_length", "max_lora_rank", "max_adapters")


@dataclass(frozen=True)
class BaseModelSpec:
    """One servable base model: where its HF files are and the limits requests must respect.

    `family` is the config.json `model_type`; it picks the JAX implementation.
    `dtype` is the dtype the base weights are held in on the accelerator.
    """

    name: str
    path: Path
    max_context_length: int
    max_lora_rank: int
    max_adapters: int
    dtype: ModelDtype = "float32"
    family: ModelFamily = field(kw_only=True)
    kv_cache_tokens: int | None = field(default=None, kw_only=True)
    """Tokens the sampler's KV pool holds (None: see `Engine`, sized from free device memory)."""
    tensor_parallel: int = field(default=1, kw_only=True)
    """Devices each layer's heads, MLP width and KV pool are split over (the mesh's tp axis);
    the rest of the devices form the fsdp and ep axes."""
    expert_parallel: int = field(default=1, kw_only=True)
    """Devices a MoE layer's experts are split over, each computing its own experts for the
    tokens of its group (the mesh's ep axis; the batch is split over it as over fsdp)."""


def detect_family(model_dir: Path) -> ModelFamily:
    """Read `model_type` from the checkpoint's config.json; only supported families pass."""
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{model_dir} has no config.json; expected a Hugging Face model directory")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ValueError(f"{config_file} is not a JSON object: {exc}") from exc
    if model_type not in get_args(ModelFamily):
        supported = ", ".join(get_args(ModelFamily))
        raise ValueError(f"{config_file}: model_type {model_type!r} is not supported (supported: {supported})")
    return model_type


def builtin_model_spec(cache_dir: Path) -> BaseModelSpec:
    """The tiny random model served when no `models.yaml` is given (built under `cache_dir`)."""
    path = ensure_builtin_model(cache_dir)
    return BaseModelSpec(
        name=BUILTIN_MODEL_NAME,
        path=path,
        max_context_length=2048,
        max_lora_rank=32,
        max_adapters=16,
        dtype="float32",
        family=detect_family(path),
    )


def _parse_entry(entry: Any, where: str, base_dir: Path) -> BaseModelSpec:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a mapping with keys {', '.join(_REQUIRED_KEYS)}")
    unknown = sorted(set(entry) - set(_REQUIRED_KEYS) - set(_OPTIONAL_KEYS), key=str)
    if unknown:
        allowed = ", ".join(_REQUIRED_KEYS + _OPTIONAL_KEYS)
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(str, unknown))} (allowed: {allowed})")
    missing = [key for key in _REQUIRED_KEYS if key not in entry]
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(missing)}")

    name = entry["name"]
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where}: name must be a non-empty string")
    where = f"{where} ({name})"
    for key in _LIMIT_KEYS:
        value = entry[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{where}: {key} must be a positive integer, got {value!r}")
    dtype = entry.get("dtype", "float32")
    if dtype not in get_args(ModelDtype):
        raise ValueError(f"{where}: dtype must be one of {', '.join(get_args(ModelDtype))}, got {dtype!r}")
    kv_tokens = entry.get("kv_cache_tokens")
    if kv_tokens is not None and (isinstance(kv_tokens, bool) or not isinstance(kv_tokens, int) or kv_tokens <= 0):
        raise ValueError(f"{where}: kv_cache_tokens must be a positive integer, got {kv_tokens!r}")
    if kv_tokens is not None and kv_tokens < entry["max_context_length"]:
        raise ValueError(f"{where}: kv_cache_tokens ({kv_tokens}) must hold one max_context_length sequence")
    tp, ep = entry.get("tensor_parallel", 1), entry.get("expert_parallel", 1)
    for key, value in (("tensor_parallel", tp), ("expert_parallel", ep)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{where}: {key} must be a positive integer, got {value!r}")
    if not isinstance(entry["path"], str) or not entry["path"]:
        raise ValueError(f"{where}: path must be a non-empty string")

    path = (base_dir / Path(entry["path"]).expanduser()).resolve()
    if not path.is_dir():
        raise ValueError(f"{where}: path {path} does not exist or is not a directory")
    try:
        family = detect_family(path)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc
    return BaseModelSpec(
        name=name,
        path=path,
        max_context_length=entry["max_context_length"],
        max_lora_rank=entry["max_lora_rank"],
        max_adapters=entry["max_adapters"],
        dtype=dtype,
        family=family,
        kv_cache_tokens=kv_tokens,
        tensor_parallel=tp,
        expert_parallel=ep,
    )


def load_model_specs(config_path: Path | None, cache_dir: Path) -> list[BaseModelSpec]:
    """Parse and validate `models.yaml`; with no file, serve only the built-in tiny model.

    Relative paths are resolved against the yaml file's directory (so a config and its models
    can move together), after `~` expansion.
    """
    if config_path is None:
        return [builtin_model_spec(cache_dir)]
    config_path = config_path.expanduser()
    if not config_path.is_file():
        raise ValueError(f"model config {config_path} does not exist")
    try:
        document = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{config_path}: invalid YAML: {exc}") from exc
    if not isinstance(document, dict) or "models" not in document:
        raise ValueError(f"{config_path}: expected a top-level mapping with a 'models' list")
    unknown = sorted(set(document) - {"models"}, key=str)
    if unknown:
        raise ValueError(f"{config_path}: unknown top-level key(s) {', '.join(map(str, unknown))}")
    entries = document["models"]
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{config_path}: 'models' must be a non-empty list")

    base_dir = config_path.absolute().parent
    specs: list[BaseModelSpec] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        spec = _parse_entry(entry, f"{config_path}: models[{index}]", base_dir)
        if spec.name in seen:
            raise ValueError(f"{config_path}: models[{index}]: duplicate model name {spec.name!r}")
        seen.add(spec.name)
        specs.append(spec)
    return specs
