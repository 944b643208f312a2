"""Tinker's built-in token-level losses: request validation and the jittable elementwise formulas.

All losses are sum-reduced over tokens (wire protocol §10). `lp` is the learner's logprob of
`target_tokens`, `slp` the `logprobs` input (sampler logprobs) and `A` the `advantages` input.
One table, `LOSSES`, drives both validation and computation so the two can never disagree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from tuft_jax.errors import InputError

SequenceMean = Callable[[jax.Array, jax.Array], jax.Array]
"""(values, weights) -> at every position, the weighted mean of `values` over its own datum."""
Formula = Callable[[jax.Array, Mapping[str, jax.Array], SequenceMean], jax.Array]

CLIP_LOW = "clip_low_threshold"
CLIP_HIGH = "clip_high_threshold"
SEQUENCE_MASK = "sequence_ratio_mask"
_INTEGER_INPUTS = frozenset({"target_tokens"})
_UNSUPPORTED = ("stable_reinforce", "custom")


@dataclass(frozen=True)
class LossSpec:
    """What one loss reads and how it computes the per-token loss before `weights` are applied.

    `config` maps each `loss_fn_config` key to its default (None = required). An optional input
    that shares a config key's name overrides that config value per token.
    """

    formula: Formula
    required: tuple[str, ...] = ("target_tokens", "logprobs", "advantages")
    optional: tuple[str, ...] = ("weights",)
    config: Mapping[str, float | None] = field(default_factory=dict)
    max_target_ndim: int = 1

    @property
    def real_inputs(self) -> tuple[str, ...]:
        """The per-token values the formula may read; target_tokens only selects `lp`."""
        return tuple(key for key in self.required + self.optional if key not in _INTEGER_INPUTS)


def _ratio(lp: jax.Array, x: Mapping[str, jax.Array]) -> jax.Array:
    return jnp.exp(lp - x["logprobs"])


def _clipped_surrogate(ratio: jax.Array, x: Mapping[str, jax.Array]) -> jax.Array:
    clipped = jnp.clip(ratio, x[CLIP_LOW], x[CLIP_HIGH])
    return -jnp.minimum(ratio * x["advantages"], clipped * x["advantages"])


def _ppo(lp: jax.Array, x: Mapping[str, jax.Array], _: SequenceMean) -> jax.Array:
    return _clipped_surrogate(_ratio(lp, x), x)


def _gspo(lp: jax.Array, x: Mapping[str, jax.Array], sequence_mean: SequenceMean) -> jax.Array:
    """GSPO-token: every token's ratio has the value of its datum's sequence ratio (the geometric
    mean of the masked tokens' ratios) and the gradient of its own logprob."""
    fixed = jax.lax.stop_gradient(lp)
    log_ratio = sequence_mean(fixed - x["logprobs"], x[SEQUENCE_MASK])
    return _clipped_surrogate(jnp.exp(log_ratio + lp - fixed), x)


def _cispo(lp: jax.Array, x: Mapping[str, jax.Array], _: SequenceMean) -> jax.Array:
    coeff = jax.lax.stop_gradient(jnp.clip(_ratio(lp, x), x[CLIP_LOW], x[CLIP_HIGH]))
    return -coeff * lp * x["advantages"]


def _dro(lp: jax.Array, x: Mapping[str, jax.Array], _: SequenceMean) -> jax.Array:
    return -(lp * x["advantages"] - 0.5 * x["beta"] * (lp - x["logprobs"]) ** 2)


_CLIPPED_OPTIONAL = ("weights", CLIP_LOW, CLIP_HIGH)
_PPO_CLIP = {CLIP_LOW: 0.8, CLIP_HIGH: 1.2}

LOSSES: Mapping[str, LossSpec] = {
    "cross_entropy": LossSpec(lambda lp, x, _: -lp, required=("target_tokens",), max_target_ndim=2),
    "importance_sampling": LossSpec(lambda lp, x, _: -_ratio(lp, x) * x["advantages"]),
    "ppo": LossSpec(_ppo, optional=_CLIPPED_OPTIONAL, config=_PPO_CLIP),
    "cispo": LossSpec(_cispo, optional=_CLIPPED_OPTIONAL, config={CLIP_LOW: 0.0, CLIP_HIGH: 4.0}),
    "dro": LossSpec(_dro, config={"beta": None}),
    "gspo": LossSpec(
        _gspo,
        required=("target_tokens", "logprobs", "advantages", SEQUENCE_MASK),
        optional=_CLIPPED_OPTIONAL,
        config=_PPO_CLIP,
    ),
}


def _spec(loss_fn: str) -> LossSpec:
    if loss_fn not in LOSSES:
        kind = "not supported by this server" if loss_fn in _UNSUPPORTED else "unknown"
        raise InputError(f"loss_fn {loss_fn!r} is {kind}; supported: {', '.join(LOSSES)}")
    return LOSSES[loss_fn]


def _resolve_config(loss_fn: str, spec: LossSpec, config: Mapping[str, float | str]) -> dict[str, float]:
    """Fill defaults and reject unknown, missing or non-numeric values."""
    unknown = sorted(set(config) - set(spec.config))
    if unknown:
        allowed = ", ".join(spec.config) or "none"
        raise InputError(f"loss_fn_config keys {unknown} not accepted by {loss_fn!r} (allowed: {allowed})")
    resolved: dict[str, float] = {}
    for key, default in spec.config.items():
        value = config.get(key, default)
        if value is None:
            raise InputError(f"loss_fn_config[{key!r}] is required for {loss_fn!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"loss_fn_config[{key!r}] must be a finite number, got {value!r}")
        resolved[key] = float(value)
    if resolved.get("beta", 0.0) < 0:
        raise InputError(f"loss_fn_config['beta'] must be >= 0, got {resolved['beta']}")
    if CLIP_LOW in resolved:
        _check_clip_order("loss_fn_config", resolved[CLIP_LOW], resolved[CLIP_HIGH])
    return resolved


def _check_clip_order(where: str, low: np.ndarray | float, high: np.ndarray | float) -> None:
    if np.any(np.asarray(low) > np.asarray(high)):
        raise InputError(f"{where} {CLIP_LOW!r} must be <= {CLIP_HIGH!r}")


def _check_input(where: str, key: str, value: np.ndarray, target_shape: tuple[int, ...]) -> None:
    """One input's dtype kind, shape (identical to target_tokens') and value range."""
    if key in _INTEGER_INPUTS:
        if value.dtype.kind not in "iu":
            raise InputError(f"{where} {key!r} must hold integers, got dtype {value.dtype}")
        if np.any(value < 0):
            raise InputError(f"{where} {key!r} must be non-negative token ids")
        return
    if value.dtype.kind not in "iuf":
        raise InputError(f"{where} {key!r} must hold real numbers, got dtype {value.dtype}")
    if value.shape != target_shape:
        expected = f"{target_shape} like target_tokens"
        raise InputError(f"{where} {key!r} has shape {value.shape}, expected {expected}")
    if not np.all(np.isfinite(value)):
        raise InputError(f"{where} {key!r} contains non-finite values")


def _check_target_shape(where: str, spec: LossSpec, shape: tuple[int, ...], n_tokens: int) -> None:
    """target_tokens is (N,), or (N, K) with K >= 1 where the loss allows top-K targets."""
    allowed = "(N,)" if spec.max_target_ndim == 1 else "(N,) or (N, K)"
    if not 1 <= len(shape) <= spec.max_target_ndim or shape[0] != n_tokens or 0 in shape[1:]:
        raise InputError(
            f"{where} 'target_tokens' has shape {shape}, expected {allowed} with N = {n_tokens} "
            "(the datum's token count)"
        )


def _check_datum(
    index: int, spec: LossSpec, config: Mapping[str, float], inputs: Mapping[str, np.ndarray], n_tokens: int
) -> None:
    where = f"datum {index}: loss_fn_inputs"
    missing = [key for key in spec.required if key not in inputs]
    if missing:
        raise InputError(f"{where} is missing required {missing}")
    unknown = sorted(set(inputs) - set(spec.required) - set(spec.optional))
    if unknown:
        allowed = ", ".join(spec.required + spec.optional)
        raise InputError(f"{where} has unknown keys {unknown} (allowed: {allowed})")
    arrays = {key: np.asarray(value) for key, value in inputs.items()}
    _check_target_shape(where, spec, arrays["target_tokens"].shape, n_tokens)
    for key, value in arrays.items():
        _check_input(where, key, value, arrays["target_tokens"].shape)
    if CLIP_LOW in arrays or CLIP_HIGH in arrays:
        low, high = (arrays.get(key, config[key]) for key in (CLIP_LOW, CLIP_HIGH))
        _check_clip_order(where, low, high)
    if SEQUENCE_MASK in arrays and not np.isin(arrays[SEQUENCE_MASK], (0, 1)).all():
        raise InputError(f"{where} {SEQUENCE_MASK!r} must hold only 0 and 1 (1 on the sampled tokens)")


def check_loss_request(
    loss_fn: str,
    config: Mapping[str, float | str],
    inputs: Sequence[Mapping[str, np.ndarray]],
    token_counts: Sequence[int],
) -> dict[str, float]:
    """Reject a bad request before any device work and return the config with defaults filled in.

    The returned values are plain floats so the engine can pass them as traced scalars, keeping one
    compiled program per loss rather than one per config.
    """
    spec = _spec(loss_fn)
    resolved = _resolve_config(loss_fn, spec, config)
    if len(inputs) != len(token_counts):
        raise InputError(f"got {len(inputs)} loss_fn_inputs for {len(token_counts)} datums")
    for index, (datum_inputs, n_tokens) in enumerate(zip(inputs, token_counts, strict=True)):
        _check_datum(index, spec, resolved, datum_inputs, n_tokens)
    return resolved


def _sequence_mean(segments: jax.Array | None) -> SequenceMean:
    """Means over each datum: a whole row, or with `segments` ([B, T], one id per datum of a
    packed row) each id's positions. A datum with zero total weight gets 0."""

    def mean(values: jax.Array, weights: jax.Array) -> jax.Array:
        rows, length = values.shape[:2]
        ids = jnp.zeros((rows, length), jnp.int32) if segments is None else segments

        def row_mean(v: jax.Array, w: jax.Array, row_ids: jax.Array) -> jax.Array:
            total = jax.ops.segment_sum((v * w).sum(-1), row_ids, num_segments=length + 1)
            count = jax.ops.segment_sum(w.sum(-1), row_ids, num_segments=length + 1)
            return jnp.where(count > 0, total / jnp.where(count > 0, count, 1), 0)[row_ids]

        return jax.vmap(row_mean)(values, weights, ids)[..., None]

    return mean


def token_loss(
    loss_fn: str,
    lp: jax.Array,
    inputs: Mapping[str, jax.Array],
    mask: jax.Array,
    config: Mapping[str, jax.Array | float],
    segments: jax.Array | None = None,
) -> jax.Array:
    """Elementwise loss shaped like `lp` ([B, T, K]), exactly 0 wherever `mask` is False.

    Masked positions are replaced by zeros before the formula (ratio = 1, everything finite), so
    arbitrary padding filler can neither overflow `exp` nor put NaN into the gradient through the
    unselected `where` branch. Per-token inputs named like a config key override that key; an absent
    `weights` means 1. `target_tokens` and keys `loss_fn` does not accept are ignored. `segments`
    ([B, T]) tells the datums of a packed row apart for sequence-level losses; without it each row
    is one datum.
    """
    spec = _spec(loss_fn)
    safe = {key: jnp.where(mask, inputs[key], 0) for key in spec.real_inputs if key in inputs}
    values = {**config, **safe}
    loss = spec.formula(jnp.where(mask, lp, 0), values, _sequence_mean(segments))
    if "weights" in safe:
        loss = loss * safe["weights"]
    return jnp.where(mask, loss, 0)
