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

Formula = Callable[[jax.Array, Mapping[str, jax.Array]], jax.Array]

CLIP_LOW = "clip_low_threshold"
CLIP_HIGH = "clip_high_threshold"
_INTEGER_INPUTS = frozenset({"target_tokens"})
_UNSUPPORTED = ("gspo", "stable_reinforce", "custom")


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


def _ppo(lp: jax.Array, x: Mapping[str, jax.Array]) -> jax.Array:
    ratio = _ratio(lp, x)
    clipped = jnp.clip(ratio, x[CLIP_LOW], x[CLIP_HIGH])
    return -jnp.minimum(ratio * x["advantages"], clipped * x["advantages"])


def _cispo(lp: jax.Array, x: Mapping[str, jax.Array]) -> jax.Array:
    coeff = jax.lax.stop_gradient(jnp.clip(_ratio(lp, x), x[CLIP_LOW], x[CLIP_HIGH]))
    return -coeff * lp * x["advantages"]


def _dro(lp: jax.Array, x: Mapping[str, jax.Array]) -> jax.Array:
    return -(lp * x["advantages"] - 0.5 * x["beta"] * (lp - x["logprobs"]) ** 2)


_CLIPPED_OPTIONAL = ("weights", CLIP_LOW, CLIP_HIGH)

LOSSES: Mapping[str, LossSpec] = {
    "cross_entropy": LossSpec(lambda lp, x: -lp, required=("target_tokens",), max_target_ndim=2),
    "importance_sampling": LossSpec(lambda lp, x: -_ratio(lp, x) * x["advantages"]),
    "ppo": LossSpec(_ppo, optional=_CLIPPED_OPTIONAL, config={CLIP_LOW: 0.8, CLIP_HIGH: 1.2}),
    "cispo": LossSpec(_cispo, optional=_CLIPPED_OPTIONAL, config={CLIP_LOW: 0.0, CLIP_HIGH: 4.0}),
    "dro": LossSpec(_dro, config={"beta": None}),
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


def token_loss(
    loss_fn: str,
    lp: jax.Array,
    inputs: Mapping[str, jax.Array],
    mask: jax.Array,
    config: Mapping[str, jax.Array | float],
) -> jax.Array:
    """Elementwise loss shaped like `lp` ([B, T, K]), exactly 0 wherever `mask` is False.

    Masked positions are replaced by zeros before the formula (ratio = 1, everything finite), so
    arbitrary padding filler can neither overflow `exp` nor put NaN into the gradient through the
    unselected `where` branch. Per-token inputs named like a config key override that key; an absent
    `weights` means 1. `target_tokens` and keys `loss_fn` does not accept are ignored.
    """
    spec = _spec(loss_fn)
    safe = {key: jnp.where(mask, inputs[key], 0) for key in spec.real_inputs if key in inputs}
    values = {**config, **safe}
    loss = spec.formula(jnp.where(mask, lp, 0), values)
    if "weights" in safe:
        loss = loss * safe["weights"]
    return jnp.where(mask, loss, 0)
