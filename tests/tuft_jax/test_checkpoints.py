"""Adapter checkpoints: an exact save/load round trip, and the checkpoints an engine must refuse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from engine_testing import next_token_datum, random_lora, random_sequences, set_slot, slot_arrays, tree_slot

from tuft_jax.checkpoints import METADATA_FILE
from tuft_jax.engine import Engine
from tuft_jax.errors import InputError
from tuft_jax.types import AdamParams, LoraConfig

ADAM = AdamParams(learning_rate=1e-2, weight_decay=0.1, grad_clip_norm=10.0)
(SEQ,) = random_sequences([14], seed=30)


def _train(engine: Engine, slot: int, steps: int) -> None:
    for _ in range(steps):
        engine.forward_backward([(slot, [next_token_datum(SEQ)])], "cross_entropy", {}, False)
        engine.optim_step(slot, ADAM)


def _assert_same_slot(a: Engine, slot_a: int, b: Engine, slot_b: int, with_optimizer: bool = True) -> None:
    wa, wb = slot_arrays(a.lora, slot_a), slot_arrays(b.lora, slot_b)
    assert wa.keys() == wb.keys()
    for key in wa:
        np.testing.assert_array_equal(wb[key], wa[key], err_msg=key)
    if with_optimizer:
        for x, y in zip(tree_slot(a.opt_state, slot_a), tree_slot(b.opt_state, slot_b), strict=True):
            np.testing.assert_array_equal(y, x)


def test_round_trip_restores_weights_optimizer_state_and_step(make_engine, tmp_path: Path) -> None:
    config = LoraConfig(rank=4, seed=1, train_unembed=False)
    src = make_engine()
    slot = src.create_adapter(config)
    _train(src, slot, steps=2)
    size = src.save_adapter(slot, tmp_path / "ckpt", with_optimizer=True)
    assert size > 0 and (tmp_path / "ckpt" / METADATA_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging directory left behind
    meta = json.loads((tmp_path / "ckpt" / METADATA_FILE).read_text())
    assert meta["step"] == 2 and meta["lora"]["rank"] == 4 and meta["has_optimizer"]

    dst = make_engine()  # a fresh engine on the same base model, as after a restart
    loaded = dst.load_adapter(tmp_path / "ckpt", with_optimizer=True)
    assert loaded == slot
    _assert_same_slot(src, slot, dst, loaded)
    assert dst.steps[loaded] == 2 and dst.adapter_config(loaded) == config
    np.testing.assert_array_equal(dst.slots.scales[loaded], src.slots.scales[slot])
    # With the optimizer state (moments and step count) restored, training continues bit for bit.
    _train(src, slot, steps=1)
    _train(dst, loaded, steps=1)
    _assert_same_slot(src, slot, dst, loaded)

    # Into a different slot of an engine that already holds adapters: the same values land there.
    dst.create_adapter(LoraConfig(rank=8, seed=2))
    again = dst.load_adapter(tmp_path / "ckpt", with_optimizer=True)
    assert again not in (loaded, 0)
    src_at_save = make_engine()
    src_at_save.load_adapter(tmp_path / "ckpt", with_optimizer=True)
    _assert_same_slot(src_at_save, 1, dst, again)


def test_round_trip_keeps_layer_order_past_ten_layers(make_engine, tmp_path: Path) -> None:
    """With 12 layers, keys 10 and 11 sort between 1 and 2 as strings: every layer must come back
    to its own place (same-shaped layers would otherwise swap silently)."""
    dims = dict(num_hidden_layers=12, hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1)
    engine = make_engine(**dims)
    slot = engine.create_adapter(LoraConfig(rank=4, seed=0))
    set_slot(engine, slot, random_lora(engine, 4, seed=1))
    engine.save_adapter(slot, tmp_path / "deep", with_optimizer=False)
    loaded = engine.load_adapter(tmp_path / "deep", with_optimizer=False)
    _assert_same_slot(engine, slot, engine, loaded, with_optimizer=False)


def test_sampler_checkpoint_has_weights_only(make_engine, tmp_path: Path) -> None:
    src = make_engine()
    slot = src.create_adapter(LoraConfig(rank=2, seed=3))
    _train(src, slot, steps=1)
    small = src.save_adapter(slot, tmp_path / "weights", with_optimizer=False)
    full = src.save_adapter(slot, tmp_path / "full", with_optimizer=True)
    assert small < full

    dst = make_engine()
    with pytest.raises(InputError, match="no optimizer state"):
        dst.load_adapter(tmp_path / "weights", with_optimizer=True)
    assert dst.slots.configs == {}  # the failed load did not take a slot
    loaded = dst.load_adapter(tmp_path / "weights", with_optimizer=False)
    _assert_same_slot(src, slot, dst, loaded, with_optimizer=False)
    assert not any(np.any(x) for x in tree_slot(dst.opt_state, loaded))
    assert dst.steps[loaded] == 1


def test_checkpoint_of_another_base_model_is_rejected(make_engine, tmp_path: Path) -> None:
    other = make_engine(name="some-other-model")
    other.save_adapter(other.create_adapter(LoraConfig(rank=4, seed=0)), tmp_path / "other", with_optimizer=True)
    engine = make_engine()
    with pytest.raises(InputError, match="some-other-model"):
        engine.load_adapter(tmp_path / "other", with_optimizer=False)
    assert engine.slots.configs == {}


def test_checkpoint_with_rank_above_max_rank_is_rejected(make_engine, tmp_path: Path) -> None:
    big = make_engine(max_lora_rank=16)  # same base model name, larger rank limit
    big.save_adapter(big.create_adapter(LoraConfig(rank=12, seed=0)), tmp_path / "big", with_optimizer=False)
    engine = make_engine()
    with pytest.raises(InputError, match="rank"):
        engine.load_adapter(tmp_path / "big", with_optimizer=False)
    assert engine.slots.configs == {}


def test_bad_checkpoint_paths_are_input_errors(engine, tmp_path: Path) -> None:
    slot = engine.create_adapter(LoraConfig(rank=4, seed=0))
    engine.save_adapter(slot, tmp_path / "ckpt", with_optimizer=False)
    with pytest.raises(InputError, match="already exists"):
        engine.save_adapter(slot, tmp_path / "ckpt", with_optimizer=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a checkpoint"):
        engine.load_adapter(tmp_path / "empty", with_optimizer=False)
    meta = json.loads((tmp_path / "ckpt" / METADATA_FILE).read_text())
    (tmp_path / "ckpt" / METADATA_FILE).write_text(json.dumps({**meta, "alpha": 16.0}))
    with pytest.raises(InputError, match="alpha"):
        engine.load_adapter(tmp_path / "ckpt", with_optimizer=False)
    (tmp_path / "ckpt" / METADATA_FILE).write_text(json.dumps({**meta, "format": "something-else"}))
    with pytest.raises(InputError, match="unknown format"):
        engine.load_adapter(tmp_path / "ckpt", with_optimizer=False)
    assert list(engine.slots.configs) == [slot]
