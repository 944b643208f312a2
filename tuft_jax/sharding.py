"""Device mesh and logical-axis sharding rules for parameters and batches.

The mesh has two named axes: `fsdp` (parameters and the batch are split along it; MoE experts
whole, by expert) and `tp` (attention heads, MLP width and vocabulary are split along it). Parameters name their axes
logically from their role; a small rules table maps logical names to mesh axes, and a
dimension that an axis does not divide evenly stays replicated.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tuft_jax.layer_stack import STACK

MESH_AXES = ("fsdp", "tp")
BATCH_AXIS = "fsdp"
"""The axis batches are split over."""
LOGICAL_RULES: dict[str, str | None] = {
    "batch": "fsdp",
    "embed": "fsdp",
    "heads": "tp",
    "mlp": "tp",
    "vocab": "tp",
    "slots": None,
    "rank": None,
    "layers": None,
    "experts": "fsdp",
}

_PROJECTION_AXES = {
    "q_proj": ("embed", "heads"),
    "k_proj": ("embed", "heads"),
    "v_proj": ("embed", "heads"),
    "o_proj": ("heads", "embed"),
    "gate_proj": ("embed", "mlp"),
    "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
    "gate_up_proj": ("embed", "mlp"),
    "gate_up_lora": ("embed", "mlp"),
    "down_lora": ("mlp", "embed"),
    "lm_head": ("embed", "vocab"),
}


def make_mesh(devices: list[jax.Device] | None = None, tp: int = 1) -> Mesh:
    devices = jax.devices() if devices is None else devices
    if len(devices) % tp:
        raise ValueError(f"tp={tp} does not divide the {len(devices)} devices")
    return Mesh(np.array(devices).reshape(len(devices) // tp, tp), MESH_AXES)


def logical_axes(path: tuple, ndim: int) -> tuple[str | None, ...]:
    """Logical axis names of a parameter (or of a leaf mirroring one) from its path; a leaf of
    the layer stack has a `layers` axis first (after `slots` for LoRA), see `layer_stack`; MoE
    expert kernels, and the per-expert factor of an expert LoRA, have an `experts` axis next."""
    names = [str(p) for p in path]
    owner = next((n for n in reversed(names) if n in _PROJECTION_AXES), None)
    layer: tuple[str, ...] = ("layers",) if STACK in names else ()
    if "embed_tokens" in names:
        axes: tuple[str | None, ...] = ("vocab", "embed")
    elif owner is None:
        axes = (*layer, *([None] * (ndim - len(layer))))
    elif "lora_a" in names:
        axes = ("slots", *layer, _PROJECTION_AXES[owner][0], "rank")
    elif "lora_b" in names:
        axes = ("slots", *layer, "rank", _PROJECTION_AXES[owner][1])
    else:
        axes = (*layer, *_PROJECTION_AXES[owner])
    if "experts" in names and len(axes) == ndim - 1:
        slot_axis = 1 if "lora_a" in names or "lora_b" in names else 0
        at = slot_axis + len(layer)
        axes = (*axes[:at], "experts", *axes[at:])
    return axes if len(axes) == ndim else (None,) * ndim


def spec_for(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Maps logical axes to mesh axes, replicating any dimension the axis size does not divide;
    a mesh axis splits the first dimension that takes it (MoE experts before their hidden axis:
    each device then holds whole experts)."""
    parts: list[str | None] = []
    for axis, size in zip(axes, shape, strict=True):
        mesh_axis = LOGICAL_RULES.get(axis) if axis else None
        fits = mesh_axis is not None and mesh_axis not in parts and size % mesh.shape[mesh_axis] == 0
        parts.append(mesh_axis if fits else None)
    return PartitionSpec(*parts)


def param_sharding(path: tuple, shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, spec_for(logical_axes(path, len(shape)), shape, mesh))


def _key_name(key: object) -> object:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return key


def place_like_params(tree: object, mesh: Mesh) -> object:
    """Places every leaf by the role its path names (e.g. AdamW moments like their LoRA weights)."""

    def place(path: tuple, x: jax.Array) -> jax.Array:
        names = tuple(_key_name(k) for k in path)
        return jax.device_put(x, param_sharding(names, x.shape, mesh))

    return jax.tree_util.tree_map_with_path(place, tree)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Splits the leading (batch) axis over fsdp."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXIS, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
