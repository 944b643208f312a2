"""Block bookkeeping of the paged KV cache: holders are counted, freed blocks come back, the
prefix cache finds the longest cached prefix of the same adapter weights only, and idle cached
blocks are evicted least recently released first, only when nothing is free."""

from __future__ import annotations

import numpy as np

from tuft_jax.kv_blocks import BlockTable, blocks_for, prefix_keys
from tuft_jax.paged_attention import BLOCK_TOKENS, SCRATCH_BLOCK


def tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, n).astype(np.int32)


def test_blocks_are_counted_and_come_back() -> None:
    table = BlockTable(5, bytes_per_block=64)
    first = table.allocate(3)
    assert first is not None and SCRATCH_BLOCK not in first and len(set(first)) == 3
    assert table.allocate(2) is None and table.available == 1  # all or nothing
    table.hold(first[:1])
    table.release(first)
    stats = table.stats()
    assert (stats.total, stats.used, stats.free, stats.cached_idle) == (4, 1, 3, 0)
    table.release(first[:1])
    assert table.stats().used == 0 and table.available == 4


def test_prefix_keys_cover_the_whole_prefix_and_the_adapter() -> None:
    prompt = tokens(3 * BLOCK_TOKENS + 5)
    keys = prefix_keys((1, 0), prompt)
    assert len(keys) == 3 == blocks_for(prompt.size) - 1
    changed = prompt.copy()
    changed[0] += 1  # a different first block changes every later key
    assert not set(prefix_keys((1, 0), changed)) & set(keys)
    assert not set(prefix_keys((2, 0), prompt)) & set(keys)  # another adapter
    assert not set(prefix_keys((1, 1), prompt)) & set(keys)  # the same adapter after a step
    assert prefix_keys((1, 0), prompt[: 2 * BLOCK_TOKENS]) == keys[:2]


def test_lookup_finds_the_longest_cached_prefix_and_holds_it() -> None:
    table = BlockTable(8, bytes_per_block=64)
    keys = prefix_keys((1, 0), tokens(3 * BLOCK_TOKENS))
    blocks = table.allocate(3)
    for key, block in zip(keys[:2], blocks, strict=False):
        table.register(key, block)
    table.release(blocks)  # two stay cached (idle), the third is free again
    assert table.stats().cached_idle == 2 and table.stats().free == 5
    found = table.lookup(keys)
    assert found == blocks[:2] and table.stats().used == 2
    table.record_lookup(len(keys), len(found))
    assert (table.prefix_hits, table.prefix_lookups) == (2, 3)
    assert table.lookup(prefix_keys((1, 0), tokens(3 * BLOCK_TOKENS, seed=1))) == []


def test_idle_cached_blocks_are_evicted_only_when_nothing_is_free() -> None:
    table = BlockTable(4, bytes_per_block=64)
    keys = prefix_keys((1, 0), tokens(3 * BLOCK_TOKENS))
    blocks = table.allocate(3)
    for key, block in zip(keys, blocks, strict=True):
        table.register(key, block)
    table.release([blocks[1]])
    table.release([blocks[0]])
    table.release([blocks[2]])
    assert table.stats().free == 0 and table.available == 3
    (fresh,) = table.allocate(1)
    assert fresh == blocks[1]  # the least recently released
    assert table.lookup(keys) == [blocks[0]]  # the chain now breaks at its second block
