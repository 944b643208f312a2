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
    """A padded batch: rows hold datums (one adapter slot per row), targets/inputs are [B, T, K].

    `placements[i]` is the (row, offset) of datum i; `segments` ([B, T], ids from 1 per datum of
    a row, 0 for padding) is set when rows were packed, and positions restart at each datum.
    """

    tokens: np.ndarray
    positions: np.ndarray
    slots: np.ndarray
    targets: np.ndarray
    mask: np.ndarray
    inputs: dict[str, np.ndarray]
    target_shapes: list[tuple[int, ...]]
    placements: list[tuple[int, int]]
    segments: np.ndarray | None = None


def pack_rows(rows: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    """(row, offset) for each (slot, n) so that a row holds datums of one slot, end to end, in at
    most `length` positions: first fit, longest first, so few rows are opened."""
    order = sorted(range(len(rows)), key=lambda i: -rows[i][1])
    used: list[int] = []
    row_slot: list[int] = []
    placements: list[tuple[int, int]] = [(0, 0)] * len(rows)
    for i in order:
        slot, n = rows[i]
        row = next((r for r in range(len(used)) if row_slot[r] == slot and used[r] + n <= length), None)
        if row is None:
            row = len(used)
            used.append(0)
            row_slot.append(slot)
        placements[i] = (row, used[row])
        used[row] += n
    return placements


def build_train_batch(
    rows: list[tuple[int, Datum]], input_fill: dict[str, float], min_rows: int = 1, pack: bool = False
) -> TrainBatch:
    """`input_fill` names the float inputs to carry and the value for datums that lack one;
    the batch is padded to at least `min_rows` rows (the data-parallel width). With `pack`,
    datums of one adapter share rows up to the longest datum's length bucket."""
    lengths = [len(d.tokens) for _, d in rows]
    k = max(d.loss_inputs["target_tokens"].reshape(len(d.tokens), -1).shape[1] for _, d in rows)
    t = bucket(max(lengths))
    if pack:
        placements = pack_rows([(slot, n) for (slot, _), n in zip(rows, lengths, strict=True)], t)
    else:
        placements = [(i, 0) for i in range(len(rows))]
    b = max(batch_bucket(1 + max(row for row, _ in placements)), min_rows)
    tokens = np.zeros((b, t), np.int32)
    targets = np.zeros((b, t, k), np.int32)
    mask = np.zeros((b, t, k), bool)
    inputs = {key: np.zeros((b, t, k), np.float32) for key in input_fill}
    slots = np.zeros((b,), np.int32)
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
    segments = np.zeros((b, t), np.int32) if pack else None
    for i, ((slot, datum), (row, start)) in enumerate(zip(rows, placements, strict=True)):
        n = lengths[i]
        span = slice(start, start + n)
        target = datum.loss_inputs["target_tokens"].reshape(n, -1)
        width = target.shape[1]
        tokens[row, span] = datum.tokens
        targets[row, span, :width] = target
        mask[row, span, :width] = True
        slots[row] = slot
        positions[row, span] = np.arange(n)
        if segments is not None:
            segments[row, span] = 1 + int(segments[row].max())
        for key, fill in input_fill.items():
            value = datum.loss_inputs.get(key)
            inputs[key][row, span, :width] = fill if value is None else np.broadcast_to(value.reshape(n, -1), (n, width))
    shapes = [tuple(d.loss_inputs["target_tokens"].shape) for _, d in rows]
    return TrainBatch(tokens, positions, slots, targets, mask, inputs, shapes, placements, segments)
