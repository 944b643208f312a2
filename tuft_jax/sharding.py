"""Device mesh and logical-axis sharding rules for parameters and batches.

The mesh has three named axes:
- `fsdp`: parameters and the batch are split along it;
- `ep` (expert parallel): the batch and the parameters are split along it as along fsdp, and
  MoE experts are split over it first, so that each ep device computes its own experts for the
  tokens of its ep group (`moe.per_device`);
- `tp`: attention heads, MLP width and vocabulary are split along it.
Parameters name their axes logically from their role; a rules table maps each logical name to
mesh axes, a dimension takes those of them not yet used by an earlier dimension whose sizes
divide it (in order, stopping at the first that does not), and axes of size 1 are left out.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from tuft_jax.layer_stack import STACKS

MESH_AXES = ("fsdp", "ep", "tp")
EXPERT_AXIS = "ep"
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("fsdp", "ep"),
    "embed": ("fsdp", "ep"),
    "heads": ("tp",),
    "mlp": ("tp",),
    "vocab": ("tp",),
    "slots": (),
    "rank": (),
    "layers": (),
    "experts": ("ep", "fsdp"),
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


def make_mesh(devices: list[jax.Device] | None = None, tp: int = 1, ep: int = 1) -> Mesh:
    devices = jax.devices() if devices is None else devices
    if len(devices) % (tp * ep):
        raise ValueError(f"tp={tp} x ep={ep} does not divide the {len(devices)} devices")
    return Mesh(np.array(devices).reshape(len(devices) // (tp * ep), ep, tp), MESH_AXES)


def batch_axes(mesh: Mesh | AbstractMesh) -> tuple[str, ...]:
    """The mesh axes (of size > 1) the batch rows are split over."""
    return tuple(axis for axis in LOGICAL_RULES["batch"] if mesh.shape[axis] > 1)


def data_parallel(mesh: Mesh | AbstractMesh) -> int:
    """How many ways the batch rows are split (a batch is padded to a multiple of it)."""
    return math.prod(mesh.shape[axis] for axis in LOGICAL_RULES["batch"])


def logical_axes(path: tuple, ndim: int) -> tuple[str | None, ...]:
    """Logical axis names of a parameter (or of a leaf mirroring one) from its path; a leaf of
    the layer stack has a `layers` axis first (after `slots` for LoRA), see `layer_stack`; MoE
    expert kernels, and the per-expert factor of an expert LoRA, have an `experts` axis next."""
    names = [str(p) for p in path]
    owner = next((n for n in reversed(names) if n in _PROJECTION_AXES), None)
    layer: tuple[str, ...] = ("layers",) if any(n in STACKS for n in names) else ()
    if "embed_tokens" in names:
        axes: tuple[str | None, ...] = ("vocab", "embed")
    elif owner is None:
        rest = ndim - len(layer)
        axes = (*layer, "experts", *[None] * (rest - 1)) if "experts" in names and rest else (*layer, *[None] * rest)
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
    used: set[str] = set()
    parts: list[str | tuple[str, ...] | None] = []
    for axis, size in zip(axes, shape, strict=True):
        taken: list[str] = []
        for mesh_axis in LOGICAL_RULES.get(axis, ()) if axis else ():
            if mesh_axis in used or mesh.shape[mesh_axis] == 1:
                continue
            if size % (math.prod(mesh.shape[a] for a in taken) * mesh.shape[mesh_axis]):
                break
            taken.append(mesh_axis)
        used |= set(taken)
        parts.append(None if not taken else taken[0] if len(taken) == 1 else tuple(taken))
    return PartitionSpec(*parts)


def param_sharding(path: tuple, shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, spec_for(logical_axes(path, len(shape)), shape, mesh))


def key_name(key: object) -> object:
    """A pytree path entry's name (dict key, attribute or index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return key


def place_like_params(tree: object, mesh: Mesh) -> object:
    """Places every leaf by the role its path names (e.g. AdamW moments like their LoRA weights)."""

    def place(path: tuple, x: jax.Array) -> jax.Array:
        names = tuple(key_name(k) for k in path)
        return jax.device_put(x, param_sharding(names, x.shape, mesh))

    return jax.tree_util.tree_map_with_path(place, tree)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Splits the leading (batch) axis over the batch axes."""
    split = batch_axes(mesh)
    rows = None if not split else split[0] if len(split) == 1 else split
    return NamedSharding(mesh, PartitionSpec(rows, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
