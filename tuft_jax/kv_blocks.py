"""Host bookkeeping of the paged KV cache: which blocks are free, who holds each, and the prefix
cache of full prompt blocks.

A block is held by every sequence (or queued request) whose table names it, counted in `refs`;
it goes back to the free list when the last holder lets go, unless it is in the prefix cache.
The prefix cache maps a full block's key (its tokens, all the tokens before it, and the adapter
weights that computed it: keys and values depend on the LoRA weights) to the block, for prompt
blocks and for the blocks of sequences that ended or were preempted; a cached
block nobody holds stays filled and is evicted, least recently released first, only when a
fresh block is needed and none is free (keys of changed or released adapters are never looked
up again and age out the same way). Scratch blocks (block 0, or each device's first block of a
pool split over devices) are never handed out.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from tuft_jax.paged_attention import BLOCK_TOKENS, SCRATCH_BLOCK
from tuft_jax.types import KVCacheStats


def blocks_for(tokens: int) -> int:
    return -(-tokens // BLOCK_TOKENS)


def prefix_keys(adapter: tuple[int, int], tokens: np.ndarray) -> list[bytes]:
    """One key per full block of `tokens`, each covering the whole prefix up to its end and the
    adapter (id, weights version) that computes it."""
    digest = hashlib.blake2b(np.asarray(adapter, np.int64).tobytes(), digest_size=16).digest()
    keys = []
    for j in range(len(tokens) // BLOCK_TOKENS):
        block = np.asarray(tokens[j * BLOCK_TOKENS : (j + 1) * BLOCK_TOKENS], np.int32).tobytes()
        digest = hashlib.blake2b(digest + block, digest_size=16).digest()
        keys.append(digest)
    return keys


class BlockTable:
    def __init__(self, num_blocks: int, bytes_per_block: int, scratch: Sequence[int] = (SCRATCH_BLOCK,)) -> None:
        """`scratch`: the devices' scratch blocks, one per share of a pool split over devices
        (`paged_attention.scratch_blocks`); free blocks are handed out from the shares in turn,
        so each device holds about as many."""
        if num_blocks <= len(scratch):
            raise ValueError("a KV pool needs its scratch blocks and at least one more")
        self.num_blocks = num_blocks
        self.bytes_per_block = bytes_per_block
        self.refs = np.zeros(num_blocks, np.int64)
        share = num_blocks // len(scratch)
        usable = [b for b in range(num_blocks) if b not in set(scratch)]
        self._free = sorted(usable, key=lambda b: (b % share, b // share), reverse=True)
        self._scratch = len(scratch)
        self._cached: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()
        """Cached blocks nobody holds, least recently used first."""
        self.prefix_hits = 0
        self.prefix_lookups = 0

    @property
    def available(self) -> int:
        """Blocks `allocate` can hand out now (free, or cached and evictable)."""
        return len(self._free) + len(self._idle)

    def stats(self) -> KVCacheStats:
        usable = self.num_blocks - self._scratch
        return KVCacheStats(
            total=usable,
            used=usable - len(self._free) - len(self._idle),
            cached_idle=len(self._idle),
            free=len(self._free),
            bytes_per_block=self.bytes_per_block,
            prefix_hits=self.prefix_hits,
            prefix_lookups=self.prefix_lookups,
        )

    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks, each held once, or None (and nothing changes) if fewer are available."""
        if n > self.available:
            return None
        out = []
        for _ in range(n):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._idle.popitem(last=False)
                del self._cached[self._key_of.pop(block)]
            self.refs[block] = 1
            out.append(block)
        return out

    def hold(self, blocks: Sequence[int]) -> None:
        for block in blocks:
            if self.refs[block] == 0:
                self._idle.pop(block)
            self.refs[block] += 1

    def release(self, blocks: Sequence[int]) -> None:
        for block in blocks:
            self.refs[block] -= 1
            if self.refs[block] > 0:
                continue
            if block in self._key_of:
                self._idle[block] = None
            else:
                self._free.append(block)

    def lookup(self, keys: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `keys`, each now held once more (counted in
        the stats by `record_lookup` once the prompt is admitted)."""
        found = []
        for key in keys:
            block = self._cached.get(key)
            if block is None:
                break
            found.append(block)
        self.hold(found)
        return found

    def record_lookup(self, looked_up: int, found: int) -> None:
        self.prefix_lookups += looked_up
        self.prefix_hits += found

    def register(self, key: bytes, block: int) -> None:
        """Enters a filled, held block into the prefix cache (a key already cached keeps its block)."""
        if key in self._cached or block in self._key_of:
            return
        self._cached[key] = block
        self._key_of[block] = key
