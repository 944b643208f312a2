"""Pads ragged requests into a few fixed shapes so the jitted steps compile a bounded number of times."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tuft_jax.types import Datum


def bucket(n: int, minimum: int = 16) -> int:
    """Rounds up to the next of minimum, ..., 2^k, 3·2^(k-1), 2^(k+1), ... (at most 33% padding)."""
    if n <= minimum:
        return minimum
    power = 1 << (n - 1).bit_length()
    return power * 3 // 4 if power * 3 // 4 >= n else power


def batch_bucket(n: int) -> int:
    """Batch sizes are padded to powers of two."""
    return 1 << max(0, (n - 1).bit_length())


@dataclass
class TrainBatch:
    """A padded batch: rows are datums (adapter slot per row), targets/inputs are [B, T, K]."""

    tokens: np.ndarray
    positions: np.ndarray
    slots: np.ndarray
    targets: np.ndarray
    mask: np.ndarray
    inputs: dict[str, np.ndarray]
    target_shapes: list[tuple[int, ...]]


def build_train_batch(rows: list[tuple[int, Datum]], input_fill: dict[str, float], min_rows: int = 1) -> TrainBatch:
    """`input_fill` names the float inputs to carry and the value for datums that lack one;
    the batch is padded to at least `min_rows` rows (the data-parallel width)."""
    lengths = [len(d.tokens) for _, d in rows]
    k = max(d.loss_inputs["target_tokens"].reshape(len(d.tokens), -1).shape[1] for _, d in rows)
    b, t = max(batch_bucket(len(rows)), min_rows), bucket(max(lengths))
    tokens = np.zeros((b, t), np.int32)
    targets = np.zeros((b, t, k), np.int32)
    mask = np.zeros((b, t, k), bool)
    inputs = {key: np.zeros((b, t, k), np.float32) for key in input_fill}
    slots = np.zeros((b,), np.int32)
    for i, (slot, datum) in enumerate(rows):
        n = lengths[i]
        target = datum.loss_inputs["target_tokens"].reshape(n, -1)
        width = target.shape[1]
        tokens[i, :n] = datum.tokens
        targets[i, :n, :width] = target
        mask[i, :n, :width] = True
        slots[i] = slot
        for key, fill in input_fill.items():
            value = datum.loss_inputs.get(key)
            inputs[key][i, :n, :width] = fill if value is None else np.broadcast_to(value.reshape(n, -1), (n, width))
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
    shapes = [tuple(d.loss_inputs["target_tokens"].shape) for _, d in rows]
    return TrainBatch(tokens, positions, slots, targets, mask, inputs, shapes)
