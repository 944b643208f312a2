"""Orbax checkpoints of one adapter: LoRA weights (+ AdamW state), trimmed to the adapter's rank.

A checkpoint is a directory `state/` (Orbax) plus `tuft_adapter.json` (geometry and step). It is
written under a temporary name and renamed into place, so a crash mid-save never leaves a
visible half checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from tuft_jax.errors import InputError
from tuft_jax.types import LoraConfig

METADATA_FILE = "tuft_adapter.json"
_THIS_PROCESS_ONLY = ocp.options.MultiprocessingOptions(primary_host=0, active_processes={0})
"""Adapters are host arrays written and read by process 0 alone (no cross-process barriers)."""
FORMAT = "tuft-lora-v2"
"""v2 holds the decoder layers stacked (`layer_stack`); v1 held one subtree per layer."""


@dataclass(frozen=True)
class AdapterMetadata:
    base_model: str
    lora: LoraConfig
    alpha: float
    step: int
    has_optimizer: bool


def resize_rank(tree: Any, rank: int) -> Any:
    """Cuts or zero-pads the rank axis of every LoRA A ([..., in, r]) and B ([..., r, out]) leaf."""

    def resize(path: tuple, x: np.ndarray) -> np.ndarray:
        names = jax.tree_util.keystr(path)
        axis = -1 if "lora_a" in names else -2 if "lora_b" in names else None
        if axis is None:
            return x
        x = np.asarray(x)
        current = x.shape[axis]
        if current >= rank:
            return np.take(x, np.arange(rank), axis=axis)
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, rank - current)
        return np.pad(x, pad)

    return jax.tree_util.tree_map_with_path(resize, tree)


def save_adapter(directory: Path, tree: dict[str, Any], metadata: AdapterMetadata) -> int:
    """Writes the checkpoint atomically; returns its size in bytes."""
    if directory.exists():
        raise InputError(f"checkpoint {directory.name!r} already exists")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".staging-{directory.name}-{uuid.uuid4().hex}"
    try:
        with ocp.StandardCheckpointer(multiprocessing_options=_THIS_PROCESS_ONLY) as checkpointer:
            checkpointer.save(staging / "state", resize_rank(tree, metadata.lora.rank))
        meta = {"format": FORMAT, **asdict(metadata)}
        (staging / METADATA_FILE).write_text(json.dumps(meta, indent=1))
        os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def read_metadata(directory: Path) -> AdapterMetadata:
    path = directory / METADATA_FILE
    if not path.is_file():
        raise InputError(f"{directory.name!r} is not a checkpoint (no {METADATA_FILE})")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise InputError(f"checkpoint {directory.name!r} has unknown format {meta.get('format')!r}")
    return AdapterMetadata(
        base_model=meta["base_model"],
        lora=LoraConfig(**meta["lora"]),
        alpha=float(meta["alpha"]),
        step=int(meta["step"]),
        has_optimizer=bool(meta["has_optimizer"]),
    )


def load_adapter(directory: Path, template: dict[str, Any], max_rank: int) -> dict[str, Any]:
    """Restores into `template`'s structure (one slot, full rank) and pads back to `max_rank`."""
    metadata = read_metadata(directory)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), resize_rank(template, metadata.lora.rank)
    )
    with ocp.StandardCheckpointer(multiprocessing_options=_THIS_PROCESS_ONLY) as checkpointer:
        restored = checkpointer.restore(directory / "state", target)
    return resize_rank(jax.tree.map(np.asarray, restored), max_rank)
