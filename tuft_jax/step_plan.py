"""Fitting a training pass into device memory: compiled ahead of time, measured, then chosen.

Each variant of a padded batch shape is compiled ahead of time, and XLA's buffer assignment says
what the pass allocates beyond its (already resident) arguments: temporaries plus outputs, less
what aliases an argument. A plan takes the fastest variant whose allocation fits the free device
memory with headroom: the whole batch without remat, then with remat, then micro-batches of half
the rows, a quarter, ... with remat (their gradients are summed into the same accumulator, so
the result equals one pass). When one row does not fit, the request is the caller's to shorten.
Compiled variants are kept, so a shape is planned and compiled once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from tuft_jax.errors import InputError

HEADROOM = 0.9
"""The share of free memory a pass may plan to allocate (fragmentation, host-side buffers)."""

GB = 1e9


def allocated_bytes(compiled: jax.stages.Compiled) -> int:
    """What running `compiled` allocates per device beyond its arguments."""
    mem = compiled.memory_analysis()
    return mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes


def _host_available_bytes() -> int:
    """MemAvailable, capped by the cgroup's remaining allowance where one is set."""
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    limit, usage = Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")
    if limit.is_file() and usage.is_file() and limit.read_text().strip() != "max":
        available = min(available, int(limit.read_text()) - int(usage.read_text()))
    return available


def free_device_bytes(devices: list[jax.Device]) -> int:
    """The least free memory over `devices` (this process's share of the mesh) and, with several
    processes, over all of them: an SPMD pass allocates the same on each device, and every
    process must pick the same plan (this is called inside a collective engine call)."""
    free = []
    for device in devices:
        stats = device.memory_stats() if device.platform != "cpu" else None
        if stats and "bytes_limit" in stats:
            free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
        else:
            # Host memory is shared by the CPU devices: split it between them.
            free.append(_host_available_bytes() // max(1, sum(d.platform == "cpu" for d in devices)))
    if jax.process_count() == 1:
        return min(free)
    mib = np.int32(min(free) >> 20)  # int32: x64 is off
    return int(multihost_utils.process_allgather(mib).min()) << 20


@dataclass(frozen=True)
class Variant:
    rows: int
    remat: bool


@dataclass(frozen=True)
class Plan:
    """Run the batch as consecutive micro-batches of `variant.rows` rows with `compiled`."""

    variant: Variant
    compiled: jax.stages.Compiled
    allocated_bytes: int


class StepPlanner:
    """Chooses (and keeps) a compiled variant per batch shape; `free_bytes()` is read per plan,
    so memory other tenants' state takes (parked adapters coming back, a grown KV cache) counts."""

    def __init__(self, free_bytes: Callable[[], int]) -> None:
        self.free_bytes = free_bytes
        self._compiled: dict[tuple[Hashable, Variant], jax.stages.Compiled] = {}
        self.allocations: dict[tuple[Hashable, Variant], int] = {}
        """What each compiled variant allocates, by (batch shape key, variant)."""

    def compiled(self, key: Hashable, variant: Variant, lower: Callable[[Variant], Any]) -> tuple[jax.stages.Compiled, int]:
        if (key, variant) not in self._compiled:
            compiled = lower(variant).compile()
            self._compiled[(key, variant)] = compiled
            self.allocations[(key, variant)] = allocated_bytes(compiled)
        return self._compiled[(key, variant)], self.allocations[(key, variant)]

    def plan(self, key: Hashable, rows: int, min_rows: int, lower: Callable[[Variant], Any], backward: bool) -> Plan:
        """The first variant that fits: all `rows` without then with remat (remat only for a
        `backward` pass), then halved row counts (never below `min_rows`, the data-parallel
        width) with remat. `lower(variant)` lowers the pass for that many rows."""
        budget = HEADROOM * self.free_bytes()
        candidates = [Variant(rows, False)] + ([Variant(rows, True)] if backward else [])
        micro = rows // 2
        while micro >= min_rows:
            candidates.append(Variant(micro, backward))
            micro //= 2
        for variant in candidates:
            compiled, allocated = self.compiled(key, variant, lower)
            if allocated <= budget:
                return Plan(variant, compiled, allocated)
        raise InputError(
            f"the smallest micro-batch of this batch ({variant.rows} rows) needs {allocated / GB:.1f} GB of device "
            f"memory beyond the model's state, and {budget / GB:.1f} GB are free; send shorter sequences"
        )
