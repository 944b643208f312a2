"""Attention kernels, picked per backend at trace time.

The mask is position based: a query sees the keys of its row whose position is <= its own (and,
with segment ids, whose segment equals its own, for packed sequences; with a sliding `window`,
only the `window` latest of them: q_pos - k_pos < window). Attention `sinks` (one logit per
head, gpt-oss) join each query's softmax as a key with no value. Both are traced values, so the
layers of one scanned stack can differ in them. `dense_attention` builds
the fp32 scores [B, kv_heads, groups, T, S] and autodiff keeps them for the backward pass, which
at 32k tokens is hundreds of GB per layer; `blockwise_attention` holds one [block_q, block_k]
tile of scores at a time in the forward and the backward pass; `splash_attention` is the TPU
Pallas kernel, exact only for self-attention whose positions rise along each segment.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

DENSE_MAX_QUERIES = 128
"""`attention` uses the dense kernel for at most this many queries (decode steps, short rows): its
scores are then at most [B, H, 128, S]. Measured on CPU: forward+backward ties the blockwise
kernel at 128 tokens (one tile) and is 1.4-2x slower at 256, 5-8x at 2048; a decode step (one
query over 2048 cache positions) is 1.4x faster dense."""

DENSE_MAX_SCORE_BYTES = 64 << 20
"""...and for any call whose fp32 scores [B, H, T, S] take at most this much: kept for the
backward pass in every layer, 64 MiB is 2.3 GB over 36 layers, while the blockwise kernel's
loops cost CPU time (above). Longer or wider calls (Qwen3-8B at 2048 tokens: 512 MiB a layer)
go blockwise."""

CPU_BLOCK = 128
"""Blockwise tile edge on CPU: 128x128 fp32 score tiles stay in cache; 512x512 tiles measured
1.4-3x slower there. Other backends take 512 (fewer loop steps; not measured here)."""


def _mask(
    q_pos: jax.Array, k_pos: jax.Array, q_seg: jax.Array | None, k_seg: jax.Array | None, window: jax.Array | None
) -> jax.Array:
    """[B, T, S]: which keys each query sees."""
    if (q_seg is None) != (k_seg is None):
        raise ValueError("pass both query and key segment ids, or neither")
    allowed = k_pos[:, None, :] <= q_pos[:, :, None]
    if window is not None:  # where causal, both positions are real (>= 0): the difference cannot wrap
        allowed &= q_pos[:, :, None] - k_pos[:, None, :] < window
    if q_seg is not None:
        allowed &= k_seg[:, None, :] == q_seg[:, :, None]
    return allowed


def add_sinks(m: jax.Array, l: jax.Array, acc: jax.Array, sinks: jax.Array | None) -> tuple[jax.Array, ...]:
    """An online softmax's running max m, sum l and weighted values acc ([K, G] leading the
    head axes of m and l, see the callers) with each head's sink logit added as one more key
    whose value is zero."""
    if sinks is None:
        return m, l, acc
    top = jnp.maximum(m, sinks)
    keep = jnp.where(m == -jnp.inf, 0.0, jnp.exp(m - top))
    return top, l * keep + jnp.exp(sinks - top), acc * keep[..., None]


def dense_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    k_positions: jax.Array,
    q_segments: jax.Array | None = None,
    k_segments: jax.Array | None = None,
    window: jax.Array | None = None,
    sinks: jax.Array | None = None,
) -> jax.Array:
    """The whole score matrix at once: q is [B, T, H, D]; k, v are [B, S, K, D] with H a multiple of K."""
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(d)
    allowed = _mask(q_positions, k_positions, q_segments, k_segments, window)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    if sinks is None:
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    else:
        sink = jnp.broadcast_to(sinks.reshape(kv_heads, -1)[None, :, :, None, None], (*scores.shape[:-1], 1))
        probs = jax.nn.softmax(jnp.concatenate([scores, sink.astype(jnp.float32)], axis=-1), axis=-1)[..., :-1].astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


class _Blocks(NamedTuple):
    """Queries as [nq, B, K, G, bq, D] (and their positions/segments [nq, B, bq]); keys and values
    as [nk, B, K, bk, D] (positions/segments [nk, B, bk])."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    q_pos: jax.Array
    k_pos: jax.Array
    q_seg: jax.Array | None
    k_seg: jax.Array | None


def _fit(n: int, block: int) -> int:
    """The block of at most `block` that splits n into the fewest near-equal parts (least padding)."""
    count = -(-n // min(block, n))
    return -(-n // count)


def _split(x: jax.Array, block: int, fill: int | float = 0) -> jax.Array:
    """[B, N, ...] -> [N / block, B, ..., block, ...trailing]: padded along N, the block axis placed
    before the last dimension for rank > 3 (head axes stay in front of it)."""
    n = x.shape[1]
    pad = -n % block
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    x = x.reshape(x.shape[0], -1, block, *x.shape[2:])
    if x.ndim == 3:
        return jnp.moveaxis(x, 1, 0)
    return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 2, -2)


def _merge(x: jax.Array, n: int) -> jax.Array:
    """The inverse of `_split` for rank > 3 blocks, cut back to length n."""
    x = jnp.moveaxis(jnp.moveaxis(x, -2, 2), 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :n]


def _blocks(q, k, v, q_pos, k_pos, q_seg, k_seg, block_q: int, block_k: int) -> _Blocks:
    """Padded queries get the lowest position (they see nothing) and padded keys the highest (no
    query sees them), so padding needs no mask of its own."""
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    low, high = jnp.iinfo(jnp.int32).min, jnp.iinfo(jnp.int32).max
    return _Blocks(
        _split(q.reshape(b, t, kv_heads, h // kv_heads, d), block_q),
        _split(k, block_k),
        _split(v, block_k),
        _split(q_pos.astype(jnp.int32), block_q, low),
        _split(k_pos.astype(jnp.int32), block_k, high),
        None if q_seg is None else _split(q_seg, block_q),
        None if k_seg is None else _split(k_seg, block_k),
    )


def _loop(n: int, body, init: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """`fori_loop(0, n, body, init)` as a while loop. A fori_loop with static bounds is a scan,
    and under the scan over decoder layers a scan inside this kernel had every tile's scores and
    mask stacked for autodiff (12 GB at 8k tokens for one layer, measured), although the custom
    VJP never differentiates it; a while loop is never differentiated, so nothing is kept."""

    def step(carry: tuple[jax.Array, tuple[jax.Array, ...]]) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        i, state = carry
        return i + 1, body(i, state)

    return jax.lax.while_loop(lambda carry: carry[0] < n, step, (jnp.int32(0), init))[1]


def _seg(seg: jax.Array | None, i: jax.Array) -> jax.Array | None:
    return None if seg is None else seg[i]


def _scores(x: _Blocks, i: jax.Array, j: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """Query block i against key block j in fp32, -inf where masked: [B, K, G, bq, bk]."""
    s = jnp.einsum("bkgqd,bksd->bkgqs", x.q[i], x.k[j], preferred_element_type=jnp.float32) * scale
    return jnp.where(mask[:, None, None], s, -jnp.inf)


def _forward(x: _Blocks, scale: float, window: jax.Array | None, sinks: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Online softmax over key blocks, one query block at a time: the output [nq, B, K, G, bq, D]
    (fp32) and each query's logsumexp [nq, B, K, G, bq] (sinks included). A query that sees no
    key gets zeros."""
    num_k = x.k.shape[0]
    head_sinks = None if sinks is None else sinks.reshape(x.q.shape[2], x.q.shape[3])[None, :, :, None]

    def query_block(_, i: jax.Array) -> tuple[None, tuple[jax.Array, jax.Array]]:
        def key_block(j: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
            mask = _mask(x.q_pos[i], x.k_pos[j], _seg(x.q_seg, i), _seg(x.k_seg, j), window)

            def update(carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
                m, l, acc = carry
                s = _scores(x, i, j, mask, scale)
                m_new = jnp.maximum(m, s.max(axis=-1))
                shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                p = jnp.exp(s - shift[..., None])
                correction = jnp.exp(m - shift)
                pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(x.v.dtype), x.v[j], preferred_element_type=jnp.float32)
                return m_new, l * correction + p.sum(axis=-1), acc * correction[..., None] + pv

            return jax.lax.cond(mask.any(), update, lambda c: c, carry)

        stats = x.q.shape[1:-1]
        f32 = jnp.float32
        init = (jnp.full(stats, -jnp.inf, f32), jnp.zeros(stats, f32), jnp.zeros(x.q.shape[1:], f32))
        m, l, acc = add_sinks(*_loop(num_k, key_block, init), head_sinks)
        seen = l > 0
        out = acc / jnp.where(seen, l, 1.0)[..., None]
        return None, (out, jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0))

    _, (out, lse) = jax.lax.scan(query_block, None, jnp.arange(x.q.shape[0]))
    return out, lse


def _backward(
    x: _Blocks, out: jax.Array, lse: jax.Array, d_out: jax.Array, scale: float, window: jax.Array | None
) -> tuple[jax.Array, ...]:
    """FlashAttention-2 backward: per key block, loop over query blocks recomputing the scores from
    the logsumexp, accumulating dk and dv for the block and adding into dq (all fp32). Sinks need
    nothing here: they are in the logsumexp, and their value is zero."""
    num_q = x.q.shape[0]
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)

    def key_block(dq: jax.Array, j: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        def query_block(i: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
            mask = _mask(x.q_pos[i], x.k_pos[j], _seg(x.q_seg, i), _seg(x.k_seg, j), window)

            def update(carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
                dq, dk, dv = carry
                p = jnp.exp(_scores(x, i, j, mask, scale) - lse[i][..., None])
                dv = dv + jnp.einsum(
                    "bkgqs,bkgqd->bksd", p.astype(d_out.dtype), d_out[i], preferred_element_type=jnp.float32
                )
                dp = jnp.einsum("bkgqd,bksd->bkgqs", d_out[i], x.v[j], preferred_element_type=jnp.float32)
                ds = p * (dp - delta[i][..., None]) * scale
                dk = dk + jnp.einsum("bkgqs,bkgqd->bksd", ds.astype(x.q.dtype), x.q[i], preferred_element_type=jnp.float32)
                dq_i = jnp.einsum("bkgqs,bksd->bkgqd", ds.astype(x.k.dtype), x.k[j], preferred_element_type=jnp.float32)
                return dq.at[i].add(dq_i), dk, dv

            return jax.lax.cond(mask.any(), update, lambda c: c, carry)

        zeros = jnp.zeros(x.k.shape[1:], jnp.float32)
        dq, dk, dv = _loop(num_q, query_block, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(x.q.shape, jnp.float32), jnp.arange(x.k.shape[0]))
    return dq, dk, dv


@partial(jax.custom_vjp, nondiff_argnums=(9, 10))
def _blockwise(q, k, v, q_pos, k_pos, q_seg, k_seg, window, sinks, block_q: int, block_k: int) -> jax.Array:
    return _blockwise_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, window, sinks, block_q, block_k)[0]


def _blockwise_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, window, sinks, block_q: int, block_k: int):
    x = _blocks(q, k, v, q_pos, k_pos, q_seg, k_seg, block_q, block_k)
    out, lse = _forward(x, 1.0 / q.shape[-1] ** 0.5, window, sinks)
    out = _merge(out, q.shape[1]).reshape(q.shape).astype(q.dtype)
    return out, (q, k, v, q_pos, k_pos, q_seg, k_seg, window, out, lse)


def _blockwise_bwd(block_q: int, block_k: int, residuals, d_out: jax.Array):
    """No gradient for the window or the sinks (frozen base weights: the engine never asks)."""
    q, k, v, q_pos, k_pos, q_seg, k_seg, window, out, lse = residuals
    x = _blocks(q, k, v, q_pos, k_pos, q_seg, k_seg, block_q, block_k)
    b, t, kv_heads = q.shape[0], q.shape[1], k.shape[2]
    grouped = (b, t, kv_heads, q.shape[2] // kv_heads, q.shape[3])
    d_out_blocks = _split(d_out.reshape(grouped), block_q)
    out_blocks = _split(out.reshape(grouped), block_q)
    dq, dk, dv = _backward(x, out_blocks, lse, d_out_blocks, 1.0 / q.shape[-1] ** 0.5, window)
    s = k.shape[1]
    return (
        _merge(dq, t).reshape(q.shape).astype(q.dtype),
        _merge(dk, s).astype(k.dtype),
        _merge(dv, s).astype(v.dtype),
        *[None] * 6,
    )


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    k_positions: jax.Array,
    q_segments: jax.Array | None = None,
    k_segments: jax.Array | None = None,
    window: jax.Array | None = None,
    sinks: jax.Array | None = None,
    *,
    block_q: int = 512,
    block_k: int = 512,
) -> jax.Array:
    """Flash-style attention in pure JAX (any backend): memory O(T * block) rather than O(T * S).

    The backward pass keeps only the output and each query's logsumexp and recomputes the scores
    tile by tile. Tiles that the mask hides entirely (above the diagonal, other segments) are
    skipped. Blocks are clamped to the lengths and evened out to pad as little as possible.
    """
    bq, bk = _fit(q.shape[1], block_q), _fit(k.shape[1], block_k)
    return _blockwise(q, k, v, q_positions, k_positions, q_segments, k_segments, window, sinks, bq, bk)


def _index_causal(
    q_pos: jax.Array, k_pos: jax.Array, q_seg: jax.Array | None, k_seg: jax.Array | None
) -> jax.Array:
    """Whether the position mask is the index-causal mask (and-ed with segments) that Splash
    applies: the same positions and segments on both sides, each segment one contiguous run of
    each row, positions rising along it. Rows built by `batching` (and packed rows) satisfy it."""
    same = jnp.all(q_pos == k_pos)
    if q_seg is None:
        seg = jnp.zeros_like(q_pos)
    else:
        same &= jnp.all(q_seg == k_seg)
        seg = q_seg
    run_starts = seg[:, 1:] != seg[:, :-1]
    rising = jnp.all(run_starts | (q_pos[:, 1:] > q_pos[:, :-1]))
    distinct = jnp.sum(jnp.diff(jnp.sort(seg, axis=1), axis=1) != 0, axis=1)
    return same & rising & jnp.all(jnp.sum(run_starts, axis=1) == distinct)


def splash_fits(q: jax.Array, k: jax.Array) -> bool:
    """Splash self-attention: its tiles are multiples of 128 along the sequence, and head_dim
    128 (Qwen3, Llama 3) is the layout used."""
    return q.shape[1] == k.shape[1] and q.shape[1] % 128 == 0 and q.shape[3] % 128 == 0


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    k_positions: jax.Array,
    q_segments: jax.Array | None = None,
    k_segments: jax.Array | None = None,
    *,
    interpret: bool = False,
) -> jax.Array:
    """The Pallas Splash kernel (TPU; `interpret` runs it anywhere, slowly) where the positions
    make the mask index causal, else the blockwise kernel: a runtime check picks the branch."""
    _, t, h, d = q.shape
    block = next(n for n in (512, 256, 128) if t % n == 0)
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    kernel = splash.make_splash_mha_single_device(
        splash.MultiHeadMask([splash.CausalMask((t, t))] * h), block_sizes=sizes, interpret=interpret
    )

    def fast(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        heads_first = partial(jnp.swapaxes, axis1=1, axis2=2)
        scaled = (q.astype(jnp.float32) / d**0.5).astype(q.dtype)
        if q_segments is None:
            out = jax.vmap(kernel)(heads_first(scaled), heads_first(k), heads_first(v))
        else:
            segments = splash.SegmentIds(q_segments, k_segments)
            out = jax.vmap(kernel)(heads_first(scaled), heads_first(k), heads_first(v), segments)
        return heads_first(out)

    def general(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return blockwise_attention(q, k, v, q_positions, k_positions, q_segments, k_segments)

    return jax.lax.cond(_index_causal(q_positions, k_positions, q_segments, k_segments), fast, general, q, k, v)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    k_positions: jax.Array,
    q_segments: jax.Array | None = None,
    k_segments: jax.Array | None = None,
    window: jax.Array | None = None,
    sinks: jax.Array | None = None,
) -> jax.Array:
    """Grouped-query causal attention: a query sees the keys whose position is <= its own (and,
    with segment ids [B, T] / [B, S], only keys of its own segment; with a `window`, only keys
    fewer than `window` positions back; `sinks` [H] add a valueless logit per head). q is [B, T, H, D]; k, v are
    [B, S, K, D] with H a multiple of K. Padding after a sequence is never attended by its real
    tokens, and a KV cache is written in position order. The kernel is picked at trace
    time: dense for short queries or small score matrices, Splash on a single TPU (a mesh would need it under
    `shard_map`), blockwise everywhere else. GPU stays on the blockwise kernel: cuDNN's masks
    (index causal, per-row lengths) express neither segment ids nor arbitrary positions, and
    its path cannot even be traced without a GPU to check the aligned case."""
    args = (q, k, v, q_positions, k_positions, q_segments, k_segments)
    b, t, h, _ = q.shape
    if t <= DENSE_MAX_QUERIES or b * h * t * k.shape[1] * 4 <= DENSE_MAX_SCORE_BYTES:
        return dense_attention(*args, window, sinks)
    backend = jax.default_backend()
    plain = window is None and sinks is None
    if backend == "tpu" and jax.device_count() == 1 and splash_fits(q, k) and plain:
        return splash_attention(*args)
    block = CPU_BLOCK if backend == "cpu" else 512
    return blockwise_attention(*args, window, sinks, block_q=block, block_k=block)
