"""Attention kernels against the dense reference: outputs and dq, dk, dv, plus the memory bound."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tuft_jax import attention as attention_module
from tuft_jax.attention import (
    _index_causal,
    attention,
    blockwise_attention,
    dense_attention,
    splash_attention,
)

Kernel = Callable[..., jax.Array]


def _inputs(b: int, t: int, s: int, h: int = 4, kv: int = 2, d: int = 16, seed: int = 0) -> tuple[jax.Array, ...]:
    rng = np.random.default_rng(seed)
    draw = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    return draw(b, t, h, d), draw(b, s, kv, d), draw(b, s, kv, d), draw(b, t, h, d)


def _arange(b: int, t: int, start: int = 0) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(start, start + t, dtype=jnp.int32), (b, t))


def _packed(lengths: list[list[int]], t: int) -> tuple[jax.Array, jax.Array]:
    """Rows of packed sequences (segment ids 1, 2, ..., positions restarting at 0) then padding
    (segment 0, positions counting on from the last sequence's)."""
    positions, segments = [], []
    for row in lengths:
        pad = t - sum(row)
        positions.append(np.concatenate([np.arange(n) for n in row] + [np.arange(row[-1], row[-1] + pad)]))
        segments.append(np.repeat(np.arange(1, len(row) + 2) % (len(row) + 1), row + [pad]))
    return jnp.asarray(np.stack(positions), jnp.int32), jnp.asarray(np.stack(segments), jnp.int32)


def _run(kernel: Kernel, q, k, v, w, *masks) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """The output and the gradients of a random projection of it with respect to q, k and v."""

    def loss(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        out = kernel(q, k, v, *masks)
        return jnp.sum(out.astype(jnp.float32) * w), out

    grads, out = jax.jit(jax.grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def _assert_close(kernel: Kernel, q, k, v, w, *masks, atol: float = 1e-5) -> None:
    out, grads = _run(kernel, q, k, v, w, *masks)
    ref_out, ref_grads = _run(dense_attention, q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), w, *masks)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads), strict=True):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=atol, rtol=atol, err_msg=name)


@pytest.mark.parametrize("block", [(8, 8), (16, 32), (7, 5), (512, 512)])
def test_blockwise_matches_dense_causal_gqa(block: tuple[int, int]) -> None:
    """T = 40 is no multiple of most blocks; (512, 512) clamps to one tile."""
    q, k, v, w = _inputs(2, 40, 40)
    kernel = lambda *a: blockwise_attention(*a, block_q=block[0], block_k=block[1])  # noqa: E731
    _assert_close(kernel, q, k, v, w, _arange(2, 40), _arange(2, 40))


def _naive_window_sinks(q, k, v, window: int, sinks: np.ndarray) -> np.ndarray:
    """Per head and query, softmax over the window's keys plus the sink logit, in numpy."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, d = q.shape
    groups = h // k.shape[2]
    out = np.zeros_like(q)
    for i in range(t):
        keys = [j for j in range(t) if i - window < j <= i]
        for head in range(h):
            kv = head // groups
            logits = np.array([(q[:, i, head] * k[:, j, kv]).sum(-1) for j in keys]).T / np.sqrt(d)  # [b, keys]
            full = np.concatenate([logits, np.full((b, 1), sinks[head])], axis=1)
            probs = np.exp(full - full.max(1, keepdims=True))
            probs /= probs.sum(1, keepdims=True)
            out[:, i, head] = np.einsum("bj,bjd->bd", probs[:, :-1], v[:, keys, kv])
    return out


@pytest.mark.parametrize("block", [(8, 8), (16, 32)])
def test_sliding_window_and_sinks_match_the_definition(block: tuple[int, int]) -> None:
    """A window of 5 keys and one sink logit per head (gpt-oss), dense and blockwise against a
    direct computation, and blockwise gradients against dense ones."""
    q, k, v, w = _inputs(2, 40, 40)
    pos = _arange(2, 40)
    window, sinks = jnp.int32(5), jnp.asarray([0.5, -1.0, 2.0, 0.0], jnp.float32)
    want = _naive_window_sinks(q, k, v, 5, np.asarray(sinks))
    dense = dense_attention(q, k, v, pos, pos, None, None, window, sinks)
    np.testing.assert_allclose(dense, want, atol=1e-5)

    def blockwise(*args):
        return blockwise_attention(*args, None, None, window, sinks, block_q=block[0], block_k=block[1])

    def dense_reference(*args):
        return dense_attention(*args, None, None, window, sinks)

    out, grads = _run(blockwise, q, k, v, w, pos, pos)
    ref_out, ref_grads = _run(dense_reference, q, k, v, w, pos, pos)
    for name, got, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads), strict=True):
        np.testing.assert_allclose(got, ref, atol=1e-5, err_msg=name)


def test_blockwise_right_padded_rows() -> None:
    """Rows of 5, 17 and 24 tokens padded to 24 as `batching` pads them (positions count on);
    only real tokens carry loss, so padding rows must not leak into real rows' gradients."""
    q, k, v, w = _inputs(3, 24, 24)
    w = w * (jnp.arange(24)[None, :] < jnp.array([5, 17, 24])[:, None])[..., None, None]
    kernel = lambda *a: blockwise_attention(*a, block_q=8, block_k=8)  # noqa: E731
    _assert_close(kernel, q, k, v, w, _arange(3, 24), _arange(3, 24))


def test_blockwise_packed_segments() -> None:
    positions, segments = _packed([[10, 20, 8], [30, 10], [16, 16, 16]], 48)
    q, k, v, w = _inputs(3, 48, 48)
    kernel = lambda *a: blockwise_attention(*a, block_q=16, block_k=8)  # noqa: E731
    _assert_close(kernel, q, k, v, w, positions, positions, segments, segments)


def test_blockwise_queries_over_a_cache() -> None:
    """A chunk of 6 queries at positions 20..25 over 40 cache positions (decode, chunked prefill)."""
    q, k, v, w = _inputs(2, 6, 40)
    kernel = lambda *a: blockwise_attention(*a, block_q=4, block_k=16)  # noqa: E731
    _assert_close(kernel, q, k, v, w, _arange(2, 6, start=20), _arange(2, 40))


def test_blockwise_bf16_against_fp32_reference() -> None:
    q, k, v, w = (x.astype(jnp.bfloat16) for x in _inputs(2, 64, 64))
    kernel = lambda *a: blockwise_attention(*a, block_q=16, block_k=16)  # noqa: E731
    _assert_close(kernel, q, k, v, w.astype(jnp.float32), _arange(2, 64), _arange(2, 64), atol=3e-2)


@pytest.mark.parametrize("t", [16, 96, 192])
def test_attention_dispatch_matches_dense(t: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Short rows take the dense kernel, longer ones the blockwise kernel (CPU), here even when
    their scores would be small."""
    monkeypatch.setattr(attention_module, "DENSE_MAX_SCORE_BYTES", 0)
    positions, segments = _packed([[t // 3, t // 2]], t)
    q, k, v, w = _inputs(1, t, t)
    _assert_close(attention, q, k, v, w, positions, positions, segments, segments)


def test_index_causal_check() -> None:
    positions, segments = _packed([[100, 100, 40], [60, 150]], 256)
    assert _index_causal(positions, positions, segments, segments)
    assert _index_causal(_arange(2, 256), _arange(2, 256), None, None)
    assert not _index_causal(positions, positions, None, None)
    assert not _index_causal(_arange(2, 256), _arange(2, 256), segments, segments.at[0, 5].set(9))
    split = segments.at[0, 0].set(2)
    assert not _index_causal(positions, positions, split, split)


@pytest.mark.parametrize("packed", [True, False])
def test_splash_interpret_matches_dense(packed: bool) -> None:
    """The TPU kernel in Pallas interpret mode (CPU): packed rows pass the index-causal check and
    run Splash; without segment ids the restarting positions fail it and run the blockwise kernel."""
    positions, segments = _packed([[50, 70], [128]], 128)
    q, k, v, w = _inputs(2, 128, 128, h=2, kv=1, d=128)
    masks = (positions, positions) + ((segments, segments) if packed else ())
    kernel = lambda *a: splash_attention(*a, interpret=True)  # noqa: E731
    _assert_close(kernel, q, k, v, w, *masks)


def _grad_temp_bytes(kernel: Kernel, t: int, heads: int, d: int, layers: int = 0) -> int:
    """Temporaries of the gradient of one call, or (`layers` > 0) of that many calls in a scan
    whose carry is the queries, as the decoder's layer scan runs them."""

    def loss(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array) -> jax.Array:
        if not layers:
            return jnp.sum(kernel(q, k, v, positions, positions))

        def layer(x: jax.Array, _: None) -> tuple[jax.Array, None]:
            return x + kernel(x, k, v, positions, positions), None

        return jnp.sum(jax.lax.scan(layer, q, None, length=layers)[0])

    qkv = jax.ShapeDtypeStruct((1, t, heads, d), jnp.float32)
    positions = jax.ShapeDtypeStruct((1, t), jnp.int32)
    compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(qkv, qkv, qkv, positions).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_blockwise_backward_never_holds_the_scores() -> None:
    t, heads, d = 8192, 8, 64
    scores = t * t * heads * 4
    assert _grad_temp_bytes(attention, t, heads, d) < scores / 16
    assert _grad_temp_bytes(dense_attention, t, heads, d) > scores
    # Under a layer scan too (its tile loops were once stacked for autodiff: all the scores again).
    assert _grad_temp_bytes(attention, t, heads, d, layers=2) < scores / 4
