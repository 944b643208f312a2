"""The layer stack: HF per-layer names at the boundary, and remat that changes no number."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from engine_testing import assert_close_rel, random_lora, set_slot, slot_arrays

from tuft_jax.batching import build_train_batch
from tuft_jax.layer_stack import LayerLayout, Run, layer_paths, stack, unstack
from tuft_jax.train_step import BatchArrays, forward_backward
from tuft_jax.types import Datum, LoraConfig


def test_unstack_names_every_layer_and_stack_inverts_it() -> None:
    stacked = {
        ("model", "layers", "mlp", "up_proj", "weight"): np.arange(12 * 2 * 3).reshape(12, 2, 3),
        ("lm_head", "weight"): np.ones((2, 2)),
    }
    layout = LayerLayout.of(12)
    flat = unstack(stacked, layout)
    assert len(flat) == 13
    np.testing.assert_array_equal(flat[("model", "layers", 11, "mlp", "up_proj", "weight")], stacked[next(iter(stacked))][11])
    assert layer_paths(("model", "layers", "mlp", "up_proj", "weight"), LayerLayout.of(2)) == [
        ("model", "layers", 0, "mlp", "up_proj", "weight"),
        ("model", "layers", 1, "mlp", "up_proj", "weight"),
    ]
    back = stack(flat, list(stacked), layout)
    for path, value in stacked.items():
        np.testing.assert_array_equal(back[path], value)


def test_a_second_stack_keeps_model_layer_names_and_runs_in_model_order() -> None:
    """Layers 0 and 3 of 5 in the dense-MLP stack: HF names by model layer, and the scan runs
    alternate between the stacks in model order."""
    layout = LayerLayout.of(5, dense_mlp_layers=(3, 0))
    assert layout.runs() == [Run("dense_layers", 0, 1, 0), Run("layers", 0, 2, 1), Run("dense_layers", 1, 2, 3), Run("layers", 2, 3, 4)]
    stacked = {
        ("model", "layers", "mlp", "experts", "down_proj"): np.arange(3)[:, None] + np.zeros((3, 2)),
        ("model", "dense_layers", "mlp", "down_proj", "kernel"): 10 + np.arange(2)[:, None] + np.zeros((2, 2)),
    }
    flat = unstack(stacked, layout)
    assert {path[2] for path in flat if path[3] == "mlp" and path[4] == "experts"} == {1, 2, 4}
    assert flat[("model", "layers", 3, "mlp", "down_proj", "kernel")][0] == 11
    assert flat[("model", "layers", 4, "mlp", "experts", "down_proj")][0] == 2
    back = stack(flat, list(stacked), layout)
    for path, value in stacked.items():
        np.testing.assert_array_equal(back[path], value)


def test_remat_gives_the_same_logprobs_losses_and_gradients(engine) -> None:
    slot = engine.create_adapter(LoraConfig(rank=4, seed=1))
    set_slot(engine, slot, random_lora(engine, 4, seed=9))
    rng = np.random.default_rng(3)
    rows = []
    for n in (40, 17):
        tokens = rng.integers(0, 460, n).astype(np.int32)
        rows.append((slot, Datum(tokens, {"target_tokens": rng.integers(0, 460, n), "weights": np.ones(n, np.float32)})))
    tb = build_train_batch(rows, {"weights": 1.0}, pack=True)
    batch = BatchArrays(
        tb.tokens, tb.positions, tb.slots, engine.slots.scales[tb.slots], tb.targets, tb.mask, tb.inputs, tb.segments
    )
    args = (engine.graphdef, engine.base, engine.lora, batch, {}, "cross_entropy")
    plain = forward_backward(*args, lora_form="single", remat=False)
    recomputed = forward_backward(*args, lora_form="single", remat=True)
    np.testing.assert_allclose(recomputed[1], plain[1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(recomputed[2], plain[2], rtol=1e-5, atol=1e-5)
    ours, reference = slot_arrays(recomputed[0], 0), slot_arrays(plain[0], 0)  # single: the one slot's grads
    for key, grad in ours.items():
        if reference[key].any():
            assert_close_rel(grad, reference[key], 1e-5, key)
    assert float(jnp.abs(plain[2]).sum()) > 0
