"""The MoE layer's pieces: the CPU grouped matmul against `ragged_dot` (values and gradients),
and the shared-outer-factor LoRA's size."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tuft_jax import moe
from tuft_jax.moe import ExpertLora, MoeConfig, grouped_matmul


@pytest.mark.parametrize(
    "sizes",
    [[0, 7, 0, 0, 30, 1, 2, 0], [40, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 40], [5] * 8],
    ids=["uneven-with-empty", "one-group-first", "one-group-last", "even"],
)
@pytest.mark.parametrize("tile", [8, 16, 64])
def test_tiled_grouped_matmul_equals_ragged_dot(monkeypatch: pytest.MonkeyPatch, sizes: list[int], tile: int) -> None:
    monkeypatch.setattr(moe, "CPU_TILE_ROWS", tile)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((sum(sizes), 6)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((len(sizes), 6, 5)), jnp.float32)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    weights = jnp.asarray(rng.standard_normal((sum(sizes), 5)), jnp.float32)

    def loss(f):
        return lambda x, w: jnp.sum(f(x, w, group_sizes) * weights)

    want, want_grads = jax.value_and_grad(loss(jax.lax.ragged_dot), argnums=(0, 1))(x, w)
    got, got_grads = jax.value_and_grad(loss(grouped_matmul), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(grouped_matmul(x, w, group_sizes), jax.lax.ragged_dot(x, w, group_sizes), atol=1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, r in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, r, atol=1e-5)


def test_shared_outer_factor_lora_size_does_not_grow_with_experts_times_hidden() -> None:
    """Per adapter and MoE layer: 2 D r + 3 E I r, against E (2 D + 3 I) r for per-expert LoRA
    (Qwen3-30B-A3B's dimensions)."""
    config = MoeConfig(num_experts=128, experts_per_token=8, intermediate_size=768, normalize_top_k=True)
    d, r = 2048, 32
    e, i = config.num_experts, config.intermediate_size
    shapes = jax.eval_shape(
        lambda: (
            ExpertLora(d, 2 * i, e, per_expert="b", slots=1, rank=r),
            ExpertLora(i, d, e, per_expert="a", slots=1, rank=r),
        )
    )
    held = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))
    assert held == 2 * d * r + 3 * e * i * r == 9_568_256
    assert held < 0.37 * e * (2 * d + 3 * i) * r
