"""Adapter slots: which slot holds which run, its LoRA scales, and the jitted slot edits.

Slot 0 is the bare base model (all zeros, scale 0). Slot indices and ranks are traced values,
so creating, copying or clearing an adapter never compiles anything new.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tuft_jax.errors import CapacityError, InputError
from tuft_jax.layers import LORA_GROUPS
from tuft_jax.types import LoraConfig

LORA_ALPHA = 32.0


def leaf_group(path: tuple) -> str:
    """The LoRA target group a parameter path belongs to."""
    if "self_attn" in path:
        return "attn"
    if "mlp" in path:
        return "mlp"
    return "unembed"


def group_flags(config: LoraConfig) -> np.ndarray:
    return np.array([config.train_attn, config.train_mlp, config.train_unembed], np.float32)


@dataclass
class SlotTable:
    """Host-side bookkeeping of the adapter slots of one base model."""

    num_slots: int
    max_rank: int

    def __post_init__(self) -> None:
        self.configs: dict[int, LoraConfig] = {}
        self.scales = np.zeros((self.num_slots, len(LORA_GROUPS)), np.float32)

    def allocate(self, config: LoraConfig) -> int:
        if not 1 <= config.rank <= self.max_rank:
            raise InputError(f"LoRA rank must be between 1 and {self.max_rank}, got {config.rank}")
        if not (config.train_attn or config.train_mlp or config.train_unembed):
            raise InputError("lora_config must train at least one of attn, mlp, unembed")
        free = self.free_slots()
        if not free:
            raise CapacityError(f"all {self.num_slots - 1} adapter slots of this base model are in use")
        slot = free[0]
        self.configs[slot] = config
        self.scales[slot] = group_flags(config) * (LORA_ALPHA / config.rank)
        return slot

    def free_slots(self) -> list[int]:
        return [s for s in range(1, self.num_slots) if s not in self.configs]

    def release(self, slot: int) -> None:
        self.configs.pop(slot, None)
        self.scales[slot] = 0.0

    def config(self, slot: int) -> LoraConfig:
        if slot not in self.configs:
            raise InputError(f"adapter slot {slot} is not in use")
        return self.configs[slot]


def _map_lora(fn, lora: nnx.State) -> nnx.State:
    return nnx.from_flat_state([(path, var.replace(fn(path, var[...]))) for path, var in nnx.to_flat_state(lora)])


@jax.jit
def init_slot(lora: nnx.State, slot: jax.Array, key: jax.Array, rank: jax.Array, flags: jax.Array) -> nnx.State:
    """PEFT init for one slot: A ~ U(±1/sqrt(fan_in)) in its first `rank` columns, B = 0."""

    def fill(path: tuple, x: jax.Array) -> jax.Array:
        if path[-1] == "lora_b":
            return x.at[slot].set(0.0)
        fan_in = x.shape[-2]
        leaf_key = jax.random.fold_in(key, zlib.crc32(repr(path).encode()))
        bound = 1.0 / jnp.sqrt(fan_in)
        a = jax.random.uniform(leaf_key, x.shape[1:], x.dtype, -bound, bound)
        keep = (jnp.arange(x.shape[-1]) < rank) & (flags[LORA_GROUPS.index(leaf_group(path))] > 0)
        return x.at[slot].set(jnp.where(keep, a, 0.0))

    return _map_lora(fill, lora)


@jax.jit
def copy_slot(tree: nnx.State, src: jax.Array, dst: jax.Array) -> nnx.State:
    return jax.tree.map(lambda x: x.at[dst].set(x[src]), tree)


@jax.jit
def clear_slot(tree: nnx.State, slot: jax.Array) -> nnx.State:
    return jax.tree.map(lambda x: x.at[slot].set(jnp.zeros_like(x[slot])), tree)
