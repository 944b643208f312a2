"""Paged attention reads exactly each row's blocks: against dense attention over the same keys laid
out contiguously, for decode steps and prompt chunks that start mid-sequence, with blocks
scattered over the pool and longer than one tile; writes land in the row's blocks, and tokens
not kept land in the scratch block."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tuft_jax.attention import dense_attention
from tuft_jax.paged_attention import BLOCK_TOKENS, CPU_TILE_BYTES, MAX_TILE_TOKENS, SCRATCH_BLOCK, KVPool, PagedView, init_pool, tile_blocks
from tuft_jax.stored_dtype import from_stored

LAYERS, BLOCKS, KV_HEADS, HEADS, DIM = 2, 64, 2, 4, 8


def scattered_tables(rng: np.random.Generator, rows: int, width: int) -> np.ndarray:
    ids = rng.permutation(np.arange(1, BLOCKS))[: rows * width]
    return ids.reshape(rows, width).astype(np.int32)


def test_the_tile_covers_the_longest_row_up_to_a_bound() -> None:
    assert [tile_blocks(n, 1, 2, 8) for n in (1, 16, 17, 100, 160)] == [1, 1, 2, 8, 16]
    assert tile_blocks(10**6, 1, 2, 8) * BLOCK_TOKENS == MAX_TILE_TOKENS
    # On XLA:CPU the keys of one tile stay within CPU_TILE_BYTES: 32 rows x 4 heads x 64 -> 32 keys.
    assert tile_blocks(10**6, 32, 4, 64) * BLOCK_TOKENS * 32 * 4 * 64 * 4 == CPU_TILE_BYTES


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("tile", [4, 32])
@pytest.mark.parametrize(("queries", "first"), [(1, [300, 7]), (5, [40, 290])])
def test_written_keys_are_attended_like_dense(dtype, tile: int, queries: int, first: list[int]) -> None:
    rng = np.random.default_rng(queries)
    rows, width = 2, 24  # 384 positions per row: several tiles of 4 blocks, or one of 32
    tables = jnp.asarray(scattered_tables(rng, rows, width))
    length = max(first) + queries
    k_all = jnp.asarray(rng.standard_normal((rows, length, KV_HEADS, DIM)), dtype)
    v_all = jnp.asarray(rng.standard_normal((rows, length, KV_HEADS, DIM)), dtype)
    positions = jnp.arange(length)[None].repeat(rows, 0)
    pool = init_pool(LAYERS, BLOCKS, KV_HEADS, DIM, dtype)
    view = PagedView(pool, tables, jnp.ones((rows, length), bool), tile, layer=1)
    view = view.write(k_all, v_all, positions)  # the whole history, then queries at each row's own offset
    q_pos = jnp.asarray(first)[:, None] + jnp.arange(queries)
    q = jnp.asarray(rng.standard_normal((rows, queries, HEADS, DIM)), dtype)
    ours = view.attend(q, q_pos)
    reference = dense_attention(q, k_all, v_all, q_pos, positions)
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(reference, np.float32), atol=tolerance)


def test_writes_follow_the_table_and_dropped_tokens_go_to_scratch() -> None:
    tables = jnp.asarray([[5, 9, 0], [7, 3, 0]], jnp.int32)
    values = jnp.arange(2 * 4, dtype=jnp.float32).reshape(2, 4, 1, 1) + 1
    values = jnp.broadcast_to(values, (2, 4, KV_HEADS, DIM))
    positions = jnp.asarray([[14, 15, 16, 17], [0, 1, 2, 3]])
    keep = jnp.asarray([[True, True, True, False], [True, True, False, False]])
    pool = init_pool(LAYERS, BLOCKS, KV_HEADS, DIM, jnp.float32)
    view = PagedView(pool, tables, keep, tile_blocks=1, layer=0).write(values, values, positions)
    k = np.asarray(from_stored(view.pool.k))[:, 0]  # [kv_heads, N, BLOCK_TOKENS, head_dim] of layer 0
    assert np.all(k[:, 5, 14] == 1) and np.all(k[:, 5, 15] == 2) and np.all(k[:, 9, 0] == 3)
    assert np.all(k[:, 7, 0] == 5) and np.all(k[:, 7, 1] == 6) and np.all(k[:, 7, 2] == 0)
    assert np.all(k[:, 9, 1] == 0) and np.all(np.asarray(view.pool.k)[:, 1] == 0)  # other layer untouched
    kept = {5, 9, 7}
    assert all(np.all(k[:, b] == 0) for b in range(1, BLOCKS) if b not in kept)
    assert np.any(k[:, SCRATCH_BLOCK] != 0)


def test_bf16_pools_are_held_as_bits() -> None:
    pool = init_pool(LAYERS, BLOCKS, KV_HEADS, DIM, jnp.bfloat16)
    assert isinstance(pool, KVPool) and pool.k.dtype == jnp.uint16
    assert jax.eval_shape(lambda p: from_stored(p.k), pool).dtype == jnp.bfloat16
