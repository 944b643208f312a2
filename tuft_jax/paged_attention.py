"""The paged KV cache on the device: one pool of fixed-size blocks shared by every sequence, and
attention that reads only each sequence's blocks.

The pool is [kv_heads, L, N, BLOCK_TOKENS, head_dim] (keys and values each). A sequence owns a
block table, a row of block ids: its token at position p is at offset p % BLOCK_TOKENS of block
`table[p // BLOCK_TOKENS]`, in every layer. Which blocks a sequence holds, and which it shares
with others, is host bookkeeping (`tuft_jax.kv_blocks`); the device only follows the tables.
Block 0 is scratch: table entries a sequence has not been given point at it, and tokens that are
not to be kept (padding, finished rows) are written into it, so no write needs a branch and no
read of it is ever unmasked.

bf16 pools are held as their bits (`tuft_jax.stored_dtype`). Attention gathers a tile of keys per
step of an online softmax, for as many steps as the longest query position needs, so its
temporaries are one tile's, and its cost follows the tokens cached, not the table width. The
tile is static, chosen by the host per call (`tile_blocks`): the blocks the call's longest row
needs, rounded up to a power of two, so a short batch reads its keys in one gather, and at most
MAX_TILE_TOKENS (on XLA:CPU also CPU_TILE_BYTES), so a long one loops over bounded tiles.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tuft_jax.stored_dtype import from_stored, stored_dtype, to_stored

BLOCK_TOKENS = 16
"""Tokens per block: a sequence wastes at most BLOCK_TOKENS - 1 cached positions."""

MAX_TILE_TOKENS = 512
"""The most keys one attention step gathers per row."""

CPU_TILE_BYTES = 1 << 20
"""...and on XLA:CPU, the most bytes of keys one step gathers over all rows, so a tile stays in
cache: with 32 rows of a mid-size model (4 kv heads x 64) that is 32 keys per row, where one
gather of every key measured 1.1-1.2x slower for the whole decode; a lone row takes 512."""

SCRATCH_BLOCK = 0


class KVPool(NamedTuple):
    """Keys and values, [kv_heads, L, N, BLOCK_TOKENS, head_dim] each, in their stored dtype.

    Heads lead so that a gather of blocks keeps them as a batch axis in front ([kv_heads, rows,
    keys, head_dim]): the attention matmuls read the gathered keys as they are, where a
    tokens-first layout had XLA transpose every gathered tile (a copy as large as the tile); it
    is also the axis split over tp."""

    k: jax.Array
    v: jax.Array


def init_pool(layers: int, blocks: int, kv_heads: int, head_dim: int, dtype: jnp.dtype) -> KVPool:
    shape = (kv_heads, layers, blocks, BLOCK_TOKENS, head_dim)
    held = stored_dtype(dtype)
    return KVPool(jnp.zeros(shape, held), jnp.zeros(shape, held))


def tile_blocks(span: int, rows: int, kv_heads: int, head_dim: int) -> int:
    """The tile (in blocks) for a call whose `rows` attend to at most `span` positions: all of
    them rounded up to a power of two, within MAX_TILE_TOKENS (and CPU_TILE_BYTES of f32 keys)."""
    most = MAX_TILE_TOKENS
    if jax.default_backend() == "cpu":
        most = min(most, CPU_TILE_BYTES // (rows * kv_heads * head_dim * 4))
    cap = max(1, most // BLOCK_TOKENS)
    blocks = -(-int(span) // BLOCK_TOKENS)
    return min(1 << max(0, (blocks - 1).bit_length()), 1 << (cap.bit_length() - 1))


def block_bytes(layers: int, kv_heads: int, head_dim: int, dtype: jnp.dtype) -> int:
    """Bytes of one block: keys and values of BLOCK_TOKENS tokens in every layer."""
    return 2 * layers * BLOCK_TOKENS * kv_heads * head_dim * jnp.dtype(dtype).itemsize


def copy_blocks(pool: KVPool, src: jax.Array, dst: jax.Array) -> KVPool:
    """Block dst[i] becomes a copy of block src[i] in every layer (copy on write)."""
    return KVPool(*(x.at[:, :, dst].set(x[:, :, src]) for x in pool))


class PagedView(NamedTuple):
    """What one forward pass reads and writes: the pool, each row's block table [B, M], which of
    the new tokens [B, T] are kept, the attention tile in blocks (a Python int: static), and the
    layer (set by the layer scan)."""

    pool: KVPool
    tables: jax.Array
    keep: jax.Array
    tile_blocks: int
    layer: jax.Array | int = 0

    def _rows(self, blocks: jax.Array) -> jax.Array:
        """Indices of this layer's `blocks` along the merged (layer, block) axis of `_flat`."""
        return self.layer * self.pool.k.shape[2] + blocks

    @staticmethod
    def _flat(x: jax.Array) -> jax.Array:
        """[kv_heads, L * N, BLOCK_TOKENS, head_dim]: merges two unsharded axes, a free reshape."""
        return x.reshape(x.shape[0], -1, *x.shape[3:])

    def write(self, k: jax.Array, v: jax.Array, positions: jax.Array) -> PagedView:
        """Stores this layer's new keys and values [B, T, kv_heads, head_dim] at `positions`."""
        column = jnp.clip(positions // BLOCK_TOKENS, 0, self.tables.shape[1] - 1)
        block = jnp.where(self.keep, jnp.take_along_axis(self.tables, column, axis=1), SCRATCH_BLOCK)
        row, offset = self._rows(block), positions % BLOCK_TOKENS

        def put(pool: jax.Array, new: jax.Array) -> jax.Array:
            heads_first = jnp.moveaxis(to_stored(new, pool.dtype), 2, 0)
            return self._flat(pool).at[:, row, offset].set(heads_first).reshape(pool.shape)

        return self._replace(pool=KVPool(put(self.pool.k, k), put(self.pool.v, v)))

    def attend(self, q: jax.Array, positions: jax.Array) -> jax.Array:
        """Causal attention of q [B, T, H, D] (at `positions` [B, T]) over the keys each row's
        table holds at positions <= the query's; H is a multiple of the kv heads."""
        b, t, h, d = q.shape
        kv_heads = self.pool.k.shape[0]
        groups = h // kv_heads
        width = self.tables.shape[1]
        tile = min(self.tile_blocks, width)
        q = jnp.transpose(q.reshape(b, t, kv_heads, groups, d), (2, 0, 3, 1, 4))  # [K, B, G, T, D]
        flat_k, flat_v = self._flat(self.pool.k), self._flat(self.pool.v)
        steps = (jnp.max(positions) // BLOCK_TOKENS) // tile + 1
        scale = 1.0 / d**0.5

        def step(carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
            j, m, l, acc = carry
            columns = j * tile + jnp.arange(tile)
            rows = self._rows(jnp.take(self.tables, jnp.minimum(columns, width - 1), axis=1)).reshape(-1)

            def gather(flat: jax.Array) -> jax.Array:
                taken = jnp.take(flat, rows, axis=1, mode="clip")  # block ids are in bounds: no mask pass
                return from_stored(taken).reshape(kv_heads, b, tile * BLOCK_TOKENS, d).astype(q.dtype)

            k, v = gather(flat_k), gather(flat_v)
            key_pos = (columns[:, None] * BLOCK_TOKENS + jnp.arange(BLOCK_TOKENS)).reshape(-1)
            seen = (key_pos[None, None, :] <= positions[:, :, None]) & (key_pos < width * BLOCK_TOKENS)
            s = jnp.einsum("kbgtd,kbsd->kbgts", q, k, preferred_element_type=jnp.float32) * scale
            s = jnp.where(seen[None, :, None], s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=-1))
            shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp(s - shift[..., None])
            correction = jnp.exp(m - shift)
            pv = jnp.einsum("kbgts,kbsd->kbgtd", p.astype(q.dtype), v, preferred_element_type=jnp.float32)
            return j + 1, m_new, l * correction + p.sum(axis=-1), acc * correction[..., None] + pv

        stats = (kv_heads, b, groups, t)
        init = (
            jnp.int32(0),
            jnp.full(stats, -jnp.inf, jnp.float32),
            jnp.zeros(stats, jnp.float32),
            jnp.zeros((*stats, d), jnp.float32),
        )
        _, _, l, acc = jax.lax.while_loop(lambda c: c[0] < steps, step, init)
        out = acc / jnp.where(l > 0, l, 1.0)[..., None]
        return jnp.transpose(out, (1, 3, 0, 2, 4)).reshape(b, t, h, d).astype(q.dtype)
