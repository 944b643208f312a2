"""Per-token functions of fp32 logits, mapped over chunks of positions so [B, T, V] never exists.

At 32k tokens and a 152k vocabulary the fp32 logits alone are 20 GB, and their gradient as much
again; a chunk of CHUNK_TOKENS tokens holds 0.6 GB. Chunks split the position axis only, so the
batch axis keeps its data-parallel sharding and no chunk moves rows between devices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

CHUNK_TOKENS = 1024
"""Tokens (rows x positions, over the whole batch) per chunk. A batch of at most this many runs
as one chunk, exactly as unchunked: chunking costs one more unembed matmul per chunked step (the
backward recomputes the logits), which short batches, whose logits are small, need not pay."""


def map_chunks(fn: Callable[..., Any], xs: tuple[jax.Array, ...], chunk_tokens: int = CHUNK_TOKENS) -> Any:
    """`fn(*xs)` for arrays xs shaped [B, T, ...], computed over chunks of the T axis.

    `fn` must act on each position independently; its outputs (a pytree of [B, chunk, ...]
    arrays) are joined back along T. T is split into equal chunks of at most
    max(1, chunk_tokens // B) positions (padded by fewer positions than there are chunks). The
    chunk body is `jax.checkpoint`ed, so a backward pass recomputes a chunk's logits instead of
    keeping them: only the inputs and outputs of `fn` cross chunk boundaries.
    """
    b, t = xs[0].shape[:2]
    n = max(1, -(-t // max(1, chunk_tokens // b)))
    if n == 1:
        return fn(*xs)
    c = -(-t // n)

    def split(x: jax.Array) -> jax.Array:
        x = jnp.pad(x, [(0, 0), (0, n * c - t)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, n, c, *x.shape[2:]), 1, 0)

    def join(y: jax.Array) -> jax.Array:
        return jnp.moveaxis(y, 0, 1).reshape(b, n * c, *y.shape[3:])[:, :t]

    body = jax.checkpoint(lambda chunk: fn(*chunk), prevent_cse=False)
    return jax.tree.map(join, jax.lax.map(body, tuple(split(x) for x in xs)))
