"""bf16 arrays held as their uint16 bits: base weights and the KV pool.

XLA:CPU runs bf16 slices, gathers, scatters and matmuls in f32, and converts a whole bf16 operand
before the loop that reads it: an f32 copy of every layer's weights (30 GB for Qwen3-8B), of the
KV pool (9.8 GB for a 4.8 GB pool, measured) or of the output head (2.5 GB). Bits are sliced and
gathered as they are; readers turn just what they read back into bf16 (`from_stored`), a free
bitcast on every backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def stored_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """The dtype an array of `dtype` is held in: bf16 as uint16 bits, anything else as itself."""
    return jnp.dtype(jnp.uint16) if jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(dtype)


def compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """The inverse of `stored_dtype`."""
    return jnp.dtype(jnp.bfloat16) if jnp.dtype(dtype) == jnp.uint16 else jnp.dtype(dtype)


def from_stored(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x


def to_stored(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """`x` in the held dtype `dtype` (its bits when that is uint16)."""
    if jnp.dtype(dtype) == jnp.uint16:
        return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
    return x.astype(dtype)
