"""Bucketed padding: few distinct shapes, bounded waste, and a batch layout the train step can trust."""

from __future__ import annotations

import numpy as np

from tuft_jax.batching import batch_bucket, bucket, build_train_batch, pack_rows
from tuft_jax.types import Datum


def test_bucket_bounds_padding_and_shape_count() -> None:
    sizes = [bucket(n) for n in range(1, 4097)]
    assert all(s >= n for n, s in zip(range(1, 4097), sizes, strict=True))
    assert all(sizes[i] <= sizes[i + 1] for i in range(len(sizes) - 1))
    # Past the minimum, padding is under a third of the padded length (bucket < 1.5 n).
    assert all(s - n < s / 3 for n, s in zip(range(17, 4097), sizes[16:], strict=True))
    assert sorted(set(sizes))[:8] == [16, 24, 32, 48, 64, 96, 128, 192]
    assert len(set(sizes)) == 17  # 16 .. 4096: two shapes per octave
    assert bucket(5, minimum=4) == 6 and bucket(3, minimum=4) == 4
    assert [batch_bucket(n) for n in range(1, 10)] == [1, 2, 4, 4, 8, 8, 8, 8, 16]


def test_build_train_batch_layout() -> None:
    a = Datum(np.array([5, 6, 7], np.int32), {"target_tokens": np.array([6, 7, 8]), "weights": np.array([1.0, 0.0, 2.0])})
    b = Datum(np.array([9, 10], np.int32), {"target_tokens": np.array([[10, 11], [3, 4]])})  # top-2 targets
    batch = build_train_batch([(2, a), (3, b), (2, a)], {"weights": 1.0}, min_rows=1)
    assert batch.tokens.shape == (4, 16) and batch.targets.shape == (4, 16, 2)
    np.testing.assert_array_equal(batch.slots, [2, 3, 2, 0])  # padding row: slot 0, the bare base model
    np.testing.assert_array_equal(batch.tokens[0, :4], [5, 6, 7, 0])
    np.testing.assert_array_equal(batch.positions[1], np.arange(16))
    # The mask covers each datum's real tokens and target width, nothing else.
    assert batch.mask[0].sum() == 3 and batch.mask[0, :3, 0].all() and not batch.mask[0, :, 1].any()
    assert batch.mask[1].sum() == 4 and not batch.mask[3].any()
    np.testing.assert_array_equal(batch.targets[1, :2], [[10, 11], [3, 4]])
    # Missing per-token inputs take the fill value; given ones are copied.
    np.testing.assert_array_equal(batch.inputs["weights"][0, :3, 0], [1.0, 0.0, 2.0])
    np.testing.assert_array_equal(batch.inputs["weights"][1, :2], np.ones((2, 2)))
    assert batch.target_shapes == [(3,), (2, 2), (3,)]
    # The data-parallel width sets a floor on the number of rows.
    assert build_train_batch([(1, a)], {}, min_rows=8).tokens.shape == (8, 16)


def test_pack_rows_fills_rows_of_one_slot_longest_first() -> None:
    # slot 1: 40, 7, 20, 13 in rows of 48 -> [40, 7] and [20, 13]; slot 2 never shares a row with slot 1.
    placements = pack_rows([(1, 40), (1, 7), (1, 20), (2, 5), (1, 13)], 48)
    assert placements == [(0, 0), (0, 40), (1, 0), (2, 0), (1, 20)]


def test_packed_batch_restarts_positions_and_numbers_segments() -> None:
    a = Datum(np.arange(1, 11, dtype=np.int32), {"target_tokens": np.arange(2, 12)})
    b = Datum(np.arange(20, 26, dtype=np.int32), {"target_tokens": np.arange(21, 27)})
    batch = build_train_batch([(3, a), (3, b)], {}, pack=True)
    assert batch.tokens.shape == (1, 16) and batch.placements == [(0, 0), (0, 10)]
    np.testing.assert_array_equal(batch.tokens[0, 10:16], b.tokens)
    np.testing.assert_array_equal(batch.positions[0, :16], [*range(10), *range(6)])
    np.testing.assert_array_equal(batch.segments[0], [1] * 10 + [2] * 6)
    assert batch.mask[0].sum() == 16
    unpacked = build_train_batch([(3, a), (3, b)], {})
    assert unpacked.segments is None and unpacked.tokens.shape == (2, 16)
