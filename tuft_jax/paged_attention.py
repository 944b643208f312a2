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

On a mesh (`pool_spec`) the kv heads are split over tp and the blocks over fsdp. Writes, block
copies and attention then run per device (`shard_map`) on the blocks it holds: a write or read of
a block held elsewhere goes to or is masked as this device's scratch block, and each device's
partial softmax (running max, sum, weighted values) is merged over fsdp. Left to XLA's
partitioner, the gather of blocks would gather the whole pool onto every device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from tuft_jax.attention import add_sinks
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

    Heads lead: they are the axis split over tp, and a gathered tile comes out as [kv_heads,
    rows x keys, head_dim], the batch-major layout the attention matmuls take (XLA:CPU still
    copies each gathered tile once, as it did with tokens first)."""

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


BLOCKS_AXIS, HEADS_AXIS = "fsdp", "tp"
"""The mesh axes (`tuft_jax.sharding.MESH_AXES`) the pool's blocks and kv heads are split over."""


def pool_spec(mesh: Mesh, kv_heads: int, blocks: int) -> P:
    """How a pool of `blocks` blocks is laid over `mesh`: kv heads over tp (each device keeps the
    heads its attention computes) and blocks over fsdp, each axis where it divides evenly."""
    heads = HEADS_AXIS if kv_heads % mesh.shape[HEADS_AXIS] == 0 else None
    split = BLOCKS_AXIS if blocks % mesh.shape[BLOCKS_AXIS] == 0 and mesh.shape[BLOCKS_AXIS] > 1 else None
    return P(heads, None, split, None, None)


def scratch_blocks(mesh: Mesh | None, blocks: int) -> list[int]:
    """Each device's scratch block: the first of its share of the blocks (block 0 unsplit)."""
    shards = 1 if mesh is None or pool_spec(mesh, 1, blocks)[2] is None else mesh.shape[BLOCKS_AXIS]
    return [s * (blocks // shards) for s in range(shards)]


@dataclass(frozen=True)
class _Split:
    """A pool split over a mesh: computations run per device (`shard_map`) on its blocks, whose
    global ids start at `axis_index(BLOCKS_AXIS) * blocks_per_device`."""

    mesh: Mesh
    spec: P

    @property
    def blocks(self) -> bool:
        """Whether the blocks are split (over BLOCKS_AXIS), not only the heads."""
        return self.spec[2] is not None

    @property
    def heads(self) -> P:
        """A [B, T, heads, head_dim] array with its heads laid like the pool's."""
        return P(None, None, self.spec[0], None)

    def run(self, fn: Callable, in_specs: tuple, out_specs: object, *args: object) -> object:
        # Unchecked: the attention loop's carry turns device-varying inside, and what leaves
        # replicated is replicated by construction (merged with psum over the block axis).
        return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)


def _first_block(pool: jax.Array, split: _Split | None) -> jax.Array | int:
    if split is None or not split.blocks:
        return 0
    return jax.lax.axis_index(BLOCKS_AXIS) * pool.shape[2]


def _local(blocks: jax.Array, pool: jax.Array, first: jax.Array | int) -> tuple[jax.Array, jax.Array]:
    """This device's index of each global block id, and whether it holds that block (others map to
    its scratch block)."""
    local = blocks - first
    owned = (local >= 0) & (local < pool.shape[2])
    return jnp.where(owned, local, SCRATCH_BLOCK), owned


def copy_blocks(pool: KVPool, src: jax.Array, dst: jax.Array, mesh: Mesh | None = None) -> KVPool:
    """Block dst[i] becomes a copy of block src[i] in every layer (copy on write). Split over
    devices, the source's holder contributes its content to a sum over the block axis and the
    destination's holder writes it, so a copy may cross devices."""
    split = _split(mesh, pool)

    def copy(x: jax.Array) -> jax.Array:
        first = _first_block(x, split)
        local_src, has_src = _local(src, x, first)
        local_dst, _ = _local(dst, x, first)
        content = jnp.where(has_src[None, None, :, None, None], x[:, :, local_src], jnp.zeros((), x.dtype))
        if split is not None and split.blocks:
            content = jax.lax.psum(content, BLOCKS_AXIS)
        return x.at[:, :, local_dst].set(content)  # blocks held elsewhere land in this device's scratch

    if split is None:
        return KVPool(*(copy(x) for x in pool))
    return KVPool(*(split.run(copy, (split.spec,), split.spec, x) for x in pool))


def _split(mesh: Mesh | None, pool: KVPool) -> _Split | None:
    if mesh is None or mesh.size == 1:
        return None
    return _Split(mesh, pool_spec(mesh, pool.k.shape[0], pool.k.shape[2]))


class PagedView(NamedTuple):
    """What one forward pass reads and writes: the pool, each row's block table [B, M] (global
    block ids), which of the new tokens [B, T] are kept, the attention tile in blocks (a Python
    int: static), the mesh the pool is laid over (None: one device), and the layer (set by the
    layer scan)."""

    pool: KVPool
    tables: jax.Array
    keep: jax.Array
    tile_blocks: int
    mesh: Mesh | None = None
    layer: jax.Array | int = 0

    def write(self, k: jax.Array, v: jax.Array, positions: jax.Array) -> PagedView:
        """Stores this layer's new keys and values [B, T, kv_heads, head_dim] at `positions`."""
        split = _split(self.mesh, self.pool)

        def put(pool: jax.Array, new: jax.Array, tables: jax.Array, keep: jax.Array, positions: jax.Array, layer: jax.Array):
            column = jnp.clip(positions // BLOCK_TOKENS, 0, tables.shape[1] - 1)
            local, owned = _local(jnp.take_along_axis(tables, column, axis=1), pool, _first_block(pool, split))
            row = layer * pool.shape[2] + jnp.where(keep & owned, local, SCRATCH_BLOCK)
            heads_first = jnp.moveaxis(to_stored(new, pool.dtype), 2, 0)
            offset = positions % BLOCK_TOKENS
            if row.size == 1:
                # A lone token (a one-row decode step) is written twice, the same value to the same
                # place: as a one-element scatter, XLA turns it into an update of the whole pool
                # that it copies (on XLA:CPU a copy of the pool per layer and step, measured).
                row, offset = jnp.concatenate([row, row]), jnp.concatenate([offset, offset])
                heads_first = jnp.concatenate([heads_first, heads_first], axis=1)
            return _flat(pool).at[:, row, offset].set(heads_first).reshape(pool.shape)

        args = (self.tables, self.keep, positions, jnp.asarray(self.layer))
        if split is None:
            pool = KVPool(put(self.pool.k, k, *args), put(self.pool.v, v, *args))
        else:
            specs = (split.spec, split.heads, P(), P(), P(), P())
            pool = KVPool(*(split.run(put, specs, split.spec, x, new, *args) for x, new in zip(self.pool, (k, v), strict=True)))
        return self._replace(pool=pool)

    def attend(
        self, q: jax.Array, positions: jax.Array, window: jax.Array | None = None, sinks: jax.Array | None = None
    ) -> jax.Array:
        """Causal attention of q [B, T, H, D] (at `positions` [B, T]) over the keys each row's
        table holds at positions <= the query's (and, with a `window`, > position - window);
        H is a multiple of the kv heads, and `sinks` [H] add a valueless logit per head. Split
        over devices, each attends over the blocks it holds and the partial softmaxes are merged."""
        split = _split(self.mesh, self.pool)

        def attend(k_pool, v_pool, q, positions, tables, layer, window, sinks):
            m, l, acc = _partial_attention(k_pool, v_pool, q, positions, tables, layer, self.tile_blocks, split, window)
            if split is not None and split.blocks:
                top = jax.lax.pmax(m, BLOCKS_AXIS)
                weight = jnp.where(m == -jnp.inf, 0.0, jnp.exp(m - jnp.where(top == -jnp.inf, 0.0, top)))
                m = top
                l = jax.lax.psum(l * weight, BLOCKS_AXIS)
                acc = jax.lax.psum(acc * weight[..., None], BLOCKS_AXIS)
            if sinks is not None:
                kv_heads = k_pool.shape[0]
                m, l, acc = add_sinks(m, l, acc, sinks.reshape(kv_heads, -1)[:, None, :, None])
            out = acc / jnp.where(l > 0, l, 1.0)[..., None]
            b, t, h, d = q.shape
            return jnp.transpose(out, (1, 3, 0, 2, 4)).reshape(b, t, h, d).astype(q.dtype)

        args = (self.pool.k, self.pool.v, q, positions, self.tables, jnp.asarray(self.layer), window, sinks)
        if split is None:
            return attend(*args)
        heads = P(split.spec[0])
        specs = (split.spec, split.spec, split.heads, P(), P(), P(), P(), None if sinks is None else heads)
        return split.run(attend, specs, split.heads, *args)


def _flat(x: jax.Array) -> jax.Array:
    """[kv_heads, L * N, BLOCK_TOKENS, head_dim]: merges two unsharded axes, a free reshape."""
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def _partial_attention(
    k_pool: jax.Array,
    v_pool: jax.Array,
    q: jax.Array,
    positions: jax.Array,
    tables: jax.Array,
    layer: jax.Array,
    tile_blocks: int,
    split: _Split | None,
    window: jax.Array | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Online softmax of q [B, T, H, D] over the keys of the pool's blocks (this device's, when
    split) at positions <= each query's (within `window`): running max m, sum l and weighted
    values acc, each [K, B, G, T] (acc with head_dim)."""
    b, t, h, d = q.shape
    kv_heads, _, blocks = k_pool.shape[:3]
    groups = h // kv_heads
    width = tables.shape[1]
    tile = min(tile_blocks, width)
    first = _first_block(k_pool, split)
    q = jnp.transpose(q.reshape(b, t, kv_heads, groups, d), (2, 0, 3, 1, 4))  # [K, B, G, T, D]
    flat_k, flat_v = _flat(k_pool), _flat(v_pool)
    steps = (jnp.max(positions) // BLOCK_TOKENS) // tile + 1
    scale = 1.0 / d**0.5

    def step(carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        j, m, l, acc = carry
        columns = j * tile + jnp.arange(tile)
        local, owned = _local(jnp.take(tables, jnp.minimum(columns, width - 1), axis=1), k_pool, first)
        rows = (layer * blocks + local).reshape(-1)

        def gather(flat: jax.Array) -> jax.Array:
            taken = jnp.take(flat, rows, axis=1, mode="clip")  # block ids are in bounds: no mask pass
            return from_stored(taken).reshape(kv_heads, b, tile * BLOCK_TOKENS, d).astype(q.dtype)

        k, v = gather(flat_k), gather(flat_v)
        key_pos = (columns[:, None] * BLOCK_TOKENS + jnp.arange(BLOCK_TOKENS)).reshape(-1)
        held = jnp.repeat(owned, BLOCK_TOKENS, axis=1)  # [B, tile * BLOCK_TOKENS]
        seen = (key_pos[None, None, :] <= positions[:, :, None]) & (key_pos < width * BLOCK_TOKENS) & held[:, None, :]
        if window is not None:
            seen &= positions[:, :, None] - key_pos[None, None, :] < window
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
    _, m, l, acc = jax.lax.while_loop(lambda c: c[0] < steps, step, init)
    return m, l, acc
