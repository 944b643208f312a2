"""Losses against an independent PyTorch float64 autograd reference, plus every validation path."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tuft_jax.errors import InputError
from tuft_jax.losses import LOSSES, check_loss_request, token_loss

CLIPPED = ("ppo", "cispo", "gspo")
DEFAULTS = {
    "cross_entropy": {},
    "importance_sampling": {},
    "ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "cispo": {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0},
    "dro": {"beta": 0.05},
    "gspo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
}


@pytest.fixture(autouse=True)
def _x64() -> Iterator[None]:
    """float64 on both sides so a 1e-6 relative comparison measures the formulas, not rounding."""
    with jax.enable_x64(True):
        yield


@dataclass
class Batch:
    """The engine's padded [B, T, K] layout: learner logprobs, per-token inputs, validity mask,
    and for packed rows the datum id of every position ([B, T]; None: one datum per row)."""

    lp: np.ndarray
    inputs: dict[str, np.ndarray]
    mask: np.ndarray
    segments: np.ndarray | None = None


def make_batch(
    loss_fn: str, seed: int, shape: tuple[int, int, int] = (3, 9, 1), per_token_clip: bool = False
) -> Batch:
    """Random batch whose ratios fall on both sides of the clip range, so both branches run."""
    rng = np.random.default_rng(seed)
    lp = -rng.exponential(1.0, shape)
    mask = rng.random(shape) < 0.7
    mask[0] = True
    inputs = {"weights": rng.normal(size=shape)}
    if loss_fn != "cross_entropy":
        inputs["logprobs"] = lp + rng.normal(scale=0.6, size=shape)
        inputs["advantages"] = rng.normal(size=shape)
    if loss_fn == "gspo":  # sequence ratios about 1.5, 1 and 0.67: inside and outside the clip range
        inputs["logprobs"] += np.linspace(-0.4, 0.4, shape[0])[:, None, None]
        inputs["sequence_ratio_mask"] = (rng.random(shape) < 0.8).astype(float)
    if per_token_clip:
        inputs["clip_low_threshold"] = rng.uniform(0.0, 0.9, shape)
        inputs["clip_high_threshold"] = rng.uniform(1.1, 2.0, shape)
    return Batch(lp, inputs, mask)


def torch_sequence_log_ratio(batch: Batch, x: torch.Tensor, slp: torch.Tensor, in_ratio: torch.Tensor) -> torch.Tensor:
    """GSPO's ℓ at every valid token: the mean of sg(p) - q over the masked tokens of its datum."""
    rows, length = batch.lp.shape[:2]
    datum = np.arange(rows)[:, None] * (length + 1) + (0 if batch.segments is None else batch.segments)
    ids = torch.tensor(np.broadcast_to(datum[..., None], batch.lp.shape)[batch.mask])
    log_ratio = torch.zeros_like(x)
    for i in ids.unique():
        mine = ids == i
        weight = in_ratio[mine]
        if weight.sum() > 0:
            log_ratio[mine] = (weight * (x.detach()[mine] - slp[mine])).sum() / weight.sum()
    return log_ratio


def torch_reference(loss_fn: str, batch: Batch, config: Mapping[str, float]) -> tuple[float, np.ndarray]:
    """Sum and d(sum)/d(lp) from the docs' formulas, over the unmasked tokens only."""
    mask = batch.mask
    valid = {key: torch.tensor(value[mask], dtype=torch.float64) for key, value in batch.inputs.items()}
    clip = {key: valid.get(key, torch.tensor(config.get(key, 0.0), dtype=torch.float64)) for key in DEFAULTS["ppo"]}
    x = torch.tensor(batch.lp[mask], dtype=torch.float64, requires_grad=True)
    if loss_fn == "cross_entropy":
        per_token = -x
    else:
        slp, adv = valid["logprobs"], valid["advantages"]
        ratio = torch.exp(x - slp)
        if loss_fn == "gspo":
            log_ratio = torch_sequence_log_ratio(batch, x, slp, valid["sequence_ratio_mask"])
            ratio = torch.exp(log_ratio + x - x.detach())
        clipped = torch.clamp(ratio, clip["clip_low_threshold"], clip["clip_high_threshold"])
        per_token = {
            "importance_sampling": lambda: -ratio * adv,
            "ppo": lambda: -torch.minimum(ratio * adv, clipped * adv),
            "gspo": lambda: -torch.minimum(ratio * adv, clipped * adv),
            "cispo": lambda: -(clipped.detach() * x * adv),
            "dro": lambda: -(x * adv - 0.5 * config.get("beta", 0.0) * (x - slp) ** 2),
        }[loss_fn]()
    total = (per_token * valid.get("weights", torch.ones_like(x))).sum()
    total.backward()
    grad = np.zeros_like(batch.lp)
    grad[mask] = x.grad.numpy()
    return total.item(), grad


def jax_loss_and_grad(loss_fn: str, batch: Batch, config: Mapping[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """Elementwise loss and d(sum)/d(lp), jitted with config as traced scalars like the engine."""
    dtype = batch.lp.dtype
    mask = jnp.asarray(batch.mask)
    segments = None if batch.segments is None else jnp.asarray(batch.segments)

    @jax.jit
    def run(lp: jax.Array, inputs: dict[str, jax.Array], config: dict[str, jax.Array]) -> tuple[jax.Array, ...]:
        def total(x: jax.Array) -> jax.Array:
            return token_loss(loss_fn, x, inputs, mask, config, segments).sum()

        return token_loss(loss_fn, lp, inputs, mask, config, segments), jax.grad(total)(lp)

    inputs = {key: jnp.asarray(value) for key, value in batch.inputs.items()}
    traced = {key: jnp.asarray(value, dtype) for key, value in config.items()}
    loss, grad = run(jnp.asarray(batch.lp), inputs, traced)
    return np.asarray(loss), np.asarray(grad)


def assert_matches_reference(loss_fn: str, batch: Batch, config: Mapping[str, float]) -> None:
    expected_sum, expected_grad = torch_reference(loss_fn, batch, config)
    loss, grad = jax_loss_and_grad(loss_fn, batch, config)
    assert loss.shape == batch.lp.shape
    np.testing.assert_allclose(loss.sum(), expected_sum, rtol=1e-6)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("with_weights", [True, False])
@pytest.mark.parametrize("loss_fn", list(DEFAULTS))
def test_matches_torch_reference(loss_fn: str, with_weights: bool) -> None:
    batch = make_batch(loss_fn, seed=2 * list(DEFAULTS).index(loss_fn) + with_weights)
    if not with_weights:
        del batch.inputs["weights"]
    assert_matches_reference(loss_fn, batch, DEFAULTS[loss_fn])


@pytest.mark.parametrize(
    ("loss_fn", "config"),
    [
        ("ppo", {"clip_low_threshold": 0.5, "clip_high_threshold": 1.5}),
        ("cispo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
        ("dro", {"beta": 0.7}),
        ("gspo", {"clip_low_threshold": 0.95, "clip_high_threshold": 1.05}),
    ],
)
def test_non_default_config(loss_fn: str, config: dict[str, float]) -> None:
    assert_matches_reference(loss_fn, make_batch(loss_fn, seed=7), config)


@pytest.mark.parametrize("loss_fn", CLIPPED)
def test_per_token_clip_thresholds_override_config(loss_fn: str) -> None:
    batch = make_batch(loss_fn, seed=11, per_token_clip=True)
    assert_matches_reference(loss_fn, batch, DEFAULTS[loss_fn])
    config_only = make_batch(loss_fn, seed=11)
    loss_with_override, _ = jax_loss_and_grad(loss_fn, batch, DEFAULTS[loss_fn])
    loss_with_config_only, _ = jax_loss_and_grad(loss_fn, config_only, DEFAULTS[loss_fn])
    assert not np.allclose(loss_with_override, loss_with_config_only)


def test_top_k_cross_entropy() -> None:
    batch = make_batch("cross_entropy", seed=3, shape=(2, 6, 4))
    batch.mask[1, 4:, :] = False
    assert_matches_reference("cross_entropy", batch, {})


def test_gspo_ratio_is_per_datum_of_a_packed_row() -> None:
    """Packed datums (segments 1, 2, 3 and padding 0 in one row) each get their own sequence ratio,
    so a row holding three datums gives what three rows of one datum each give."""
    batch = make_batch("gspo", seed=17, shape=(2, 12, 1))
    batch.mask[:] = True
    batch.mask[1, 10:] = False
    batch.segments = np.array([[1] * 4 + [2] * 5 + [3] * 3, [1] * 6 + [2] * 4 + [0] * 2])
    assert_matches_reference("gspo", batch, DEFAULTS["gspo"])
    packed_loss, packed_grad = jax_loss_and_grad("gspo", batch, DEFAULTS["gspo"])
    spans = [(0, slice(0, 4)), (0, slice(4, 9)), (0, slice(9, 12)), (1, slice(0, 6)), (1, slice(6, 10))]
    for row, span in spans:
        alone = Batch(
            batch.lp[row : row + 1, span],
            {key: value[row : row + 1, span] for key, value in batch.inputs.items()},
            batch.mask[row : row + 1, span],
        )
        loss, grad = jax_loss_and_grad("gspo", alone, DEFAULTS["gspo"])
        np.testing.assert_allclose(packed_loss[row, span], loss[0], rtol=1e-12)
        np.testing.assert_allclose(packed_grad[row, span], grad[0], rtol=1e-12)


def test_gspo_value_is_the_sequence_ratio_and_gradient_the_tokens_own() -> None:
    """Without clipping and weights: loss_t = -s A_t with s = exp(mean masked log-ratio), and
    d loss_t / d lp_t = -s A_t (no gradient through the mean); unmasked tokens do not move s."""
    batch = make_batch("gspo", seed=19, shape=(1, 8, 1))
    del batch.inputs["weights"]
    batch.mask[:] = True
    in_ratio = batch.inputs["sequence_ratio_mask"]
    in_ratio[:] = 0
    in_ratio[0, 3:] = 1
    wide = {"clip_low_threshold": 0.0, "clip_high_threshold": 1e9}
    loss, grad = jax_loss_and_grad("gspo", batch, wide)
    log_ratio = batch.lp - batch.inputs["logprobs"]
    expected = -np.exp(log_ratio[0, 3:].mean()) * batch.inputs["advantages"]
    np.testing.assert_allclose(loss, expected, rtol=1e-12)
    np.testing.assert_allclose(grad, expected, rtol=1e-12)


def padded_batch(loss_fn: str, filler: float | None, dtype: type) -> Batch:
    """A fixed batch cast to `dtype`, its masked positions overwritten with `filler` unless None."""
    batch = make_batch(loss_fn, seed=5, per_token_clip=loss_fn in CLIPPED)
    if filler is not None:
        batch.lp[~batch.mask] = filler
        for key, value in batch.inputs.items():
            value[~batch.mask] = -filler if key == "logprobs" else filler
    inputs = {key: value.astype(dtype) for key, value in batch.inputs.items()}
    return Batch(batch.lp.astype(dtype), inputs, batch.mask)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("filler", [1e30, -1e30, np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("loss_fn", list(DEFAULTS))
def test_masked_positions_contribute_exactly_zero(loss_fn: str, filler: float, dtype: type) -> None:
    """Padding filler must not reach the loss or the gradient, even where exp() would overflow."""
    clean = padded_batch(loss_fn, None, dtype)
    with jax.enable_x64(dtype == np.float64):
        loss, grad = jax_loss_and_grad(loss_fn, padded_batch(loss_fn, filler, dtype), DEFAULTS[loss_fn])
        clean_loss, clean_grad = jax_loss_and_grad(loss_fn, clean, DEFAULTS[loss_fn])
    assert loss.dtype == grad.dtype == dtype
    assert np.all(loss[~clean.mask] == 0) and np.all(grad[~clean.mask] == 0)
    np.testing.assert_array_equal(loss, clean_loss)
    np.testing.assert_array_equal(grad, clean_grad)


def test_cispo_gradient_stops_at_the_ratio() -> None:
    """d/dlp of -(sg(clip(r)) * lp * A) is -clip(r) * A: the ratio's own derivative is excluded."""
    batch = make_batch("cispo", seed=13)
    del batch.inputs["weights"]
    _, grad = jax_loss_and_grad("cispo", batch, {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1})
    ratio = np.exp(batch.lp - batch.inputs["logprobs"])
    advantages = batch.inputs["advantages"]
    expected = np.where(batch.mask, -np.clip(ratio, 0.9, 1.1) * advantages, 0.0)
    np.testing.assert_allclose(grad, expected, rtol=1e-12)
    in_range = (ratio > 0.9) & (ratio < 1.1)
    full_derivative = np.where(in_range, -ratio * (1 + batch.lp) * advantages, expected)
    assert not np.allclose(grad[batch.mask], full_derivative[batch.mask])


def test_token_loss_rejects_unsupported_loss() -> None:
    with pytest.raises(InputError, match="stable_reinforce"):
        token_loss("stable_reinforce", jnp.zeros((1, 1, 1)), {}, jnp.ones((1, 1, 1), bool), {})


# --- check_loss_request ---------------------------------------------------------------------------


def rl(n: int = 4, **inputs: np.ndarray) -> dict[str, np.ndarray]:
    datum = {
        "target_tokens": np.arange(n, dtype=np.int64),
        "logprobs": np.full(n, -1.0, np.float32),
        "advantages": np.ones(n, np.float32),
    }
    return {**datum, **inputs}


def gspo(n: int = 4, **inputs: np.ndarray) -> dict[str, np.ndarray]:
    return rl(n, **{"sequence_ratio_mask": np.ones(n, np.float32), **inputs})


def ce(n: int = 4, k: int | None = None, **inputs: np.ndarray) -> dict[str, np.ndarray]:
    shape = (n,) if k is None else (n, k)
    datum = {"target_tokens": np.zeros(shape, np.int64), "weights": np.ones(shape, np.float32)}
    return {**datum, **inputs}


def without(datum: dict[str, np.ndarray], key: str) -> dict[str, np.ndarray]:
    return {name: value for name, value in datum.items() if name != key}


@pytest.mark.parametrize(
    ("loss_fn", "config", "inputs", "expected"),
    [
        ("cross_entropy", {}, [ce(), without(ce(), "weights")], {}),
        ("cross_entropy", {}, [ce(k=3)], {}),
        ("importance_sampling", {}, [rl(weights=np.zeros(4))], {}),
        ("ppo", {}, [rl()], DEFAULTS["ppo"]),
        ("ppo", {"clip_high_threshold": 2}, [rl()], {"clip_low_threshold": 0.8, "clip_high_threshold": 2.0}),
        ("cispo", {}, [rl(clip_low_threshold=np.full(4, 0.5), clip_high_threshold=np.full(4, 0.6))],
         DEFAULTS["cispo"]),
        ("dro", {"beta": 0.05}, [rl(), rl(n=2)], {"beta": 0.05}),
        ("gspo", {}, [gspo(), gspo(n=2, sequence_ratio_mask=np.zeros(2))], DEFAULTS["gspo"]),
        ("gspo", {"clip_low_threshold": 0.5}, [gspo(clip_high_threshold=np.full(4, 3.0))],
         {"clip_low_threshold": 0.5, "clip_high_threshold": 1.2}),
    ],
)
def test_valid_requests_resolve_config(
    loss_fn: str, config: dict[str, float], inputs: list[dict[str, np.ndarray]], expected: dict[str, float]
) -> None:
    counts = [len(datum["target_tokens"]) for datum in inputs]
    resolved = check_loss_request(loss_fn, config, inputs, counts)
    assert resolved == expected and all(type(value) is float for value in resolved.values())


BAD_REQUESTS = [
    # (loss_fn, config, inputs, token_counts, substrings the message must contain)
    ("mse", {}, [ce()], [4], ["'mse'", "unknown", "cross_entropy", "dro"]),
    ("stable_reinforce", {}, [rl()], [4], ["'stable_reinforce'", "not supported", *LOSSES]),
    ("gspo", {}, [gspo(), rl()], [4, 4], ["datum 1", "'sequence_ratio_mask'", "missing"]),
    ("gspo", {}, [gspo(sequence_ratio_mask=np.ones(3))], [4], ["datum 0", "'sequence_ratio_mask'", "(3,)"]),
    ("gspo", {}, [gspo(sequence_ratio_mask=np.ones((4, 1)))], [4], ["'sequence_ratio_mask'", "(4, 1)"]),
    ("gspo", {}, [gspo(sequence_ratio_mask=np.full(4, 0.5))], [4], ["'sequence_ratio_mask'", "only 0 and 1"]),
    ("gspo", {}, [gspo(sequence_ratio_mask=np.array([1, np.nan, 1, 1]))], [4], ["'sequence_ratio_mask'", "non-finite"]),
    ("gspo", {"beta": 0.1}, [gspo()], [4], ["'beta'", "clip_low_threshold"]),
    ("gspo", {"clip_low_threshold": 2.0}, [gspo()], [4], ["'clip_low_threshold' must be <="]),
    ("custom", {"loss_id": "x"}, [rl()], [4], ["'custom'", "not supported"]),
    ("cross_entropy", {"beta": 0.1}, [ce()], [4], ["'beta'", "none"]),
    ("ppo", {"clip": 0.2}, [rl()], [4], ["'clip'", "clip_low_threshold"]),
    ("dro", {}, [rl()], [4], ["'beta'", "required"]),
    ("dro", {"beta": -0.1}, [rl()], [4], ["'beta'", ">= 0"]),
    ("ppo", {"clip_low_threshold": "0.8"}, [rl()], [4], ["'clip_low_threshold'", "number"]),
    ("ppo", {"clip_low_threshold": True}, [rl()], [4], ["'clip_low_threshold'", "number"]),
    ("cispo", {"clip_high_threshold": float("nan")}, [rl()], [4], ["'clip_high_threshold'", "finite"]),
    ("ppo", {"clip_low_threshold": 1.5}, [rl()], [4], ["loss_fn_config", "'clip_low_threshold' must be <="]),
    ("ppo", {}, [rl(), rl()], [4], ["2 loss_fn_inputs", "1 datums"]),
    ("ppo", {}, [rl(), without(rl(), "advantages")], [4, 4], ["datum 1", "'advantages'", "missing"]),
    ("cross_entropy", {}, [without(ce(), "target_tokens")], [4], ["datum 0", "'target_tokens'", "missing"]),
    ("ppo", {}, [rl(), rl(mask=np.ones(4))], [4, 4], ["datum 1", "'mask'", "unknown"]),
    ("cross_entropy", {}, [ce(logprobs=np.zeros(4))], [4], ["datum 0", "'logprobs'", "unknown"]),
    ("dro", {"beta": 1}, [rl(clip_low_threshold=np.zeros(4))], [4], ["datum 0", "'clip_low_threshold'"]),
    ("cross_entropy", {}, [ce(target_tokens=np.zeros(4))], [4], ["datum 0", "'target_tokens'", "integers"]),
    ("cross_entropy", {}, [ce(target_tokens=np.arange(4) - 1)], [4], ["'target_tokens'", "non-negative"]),
    ("cross_entropy", {}, [ce(weights=np.array(list("abcd")))], [4], ["datum 0", "'weights'", "real"]),
    ("ppo", {}, [rl(advantages=np.ones(4, bool))], [4], ["datum 0", "'advantages'", "real numbers"]),
    ("ppo", {}, [rl(), rl(n=3)], [4, 5], ["datum 1", "'target_tokens'", "N = 5"]),
    ("ppo", {}, [rl(target_tokens=np.zeros((4, 2), np.int64))], [4], ["'target_tokens'", "expected (N,)"]),
    ("cross_entropy", {}, [ce(target_tokens=np.zeros((4, 2, 2), np.int64))], [4], ["'target_tokens'", "(N, K"]),
    ("cross_entropy", {}, [ce(target_tokens=np.zeros((4, 0), np.int64))], [4], ["'target_tokens'", "(4, 0)"]),
    ("cross_entropy", {}, [ce(), ce(k=3, weights=np.ones(4))], [4, 4], ["datum 1", "'weights'", "(4, 3)"]),
    ("ppo", {}, [rl(logprobs=np.zeros((4, 1)))], [4], ["datum 0", "'logprobs'", "(4, 1)"]),
    ("dro", {"beta": 1}, [rl(advantages=np.ones(3))], [4], ["datum 0", "'advantages'", "(3,)"]),
    ("ppo", {}, [rl(logprobs=np.array([0, np.nan, 0, 0]))], [4], ["datum 0", "'logprobs'", "non-finite"]),
    ("cross_entropy", {}, [ce(), ce(weights=np.array([1, np.inf, 1, 1]))], [4, 4], ["datum 1", "'weights'"]),
    ("ppo", {}, [rl(), rl(), rl(clip_low_threshold=np.full(4, 1.3))], [4] * 3, ["datum 2", "must be <="]),
    ("cispo", {}, [rl(clip_high_threshold=np.full(4, np.inf))], [4], ["'clip_high_threshold'", "non-finite"]),
]


@pytest.mark.parametrize(("loss_fn", "config", "inputs", "counts", "expected"), BAD_REQUESTS)
def test_bad_requests_are_rejected_with_a_precise_message(
    loss_fn: str,
    config: dict[str, float | str],
    inputs: list[dict[str, np.ndarray]],
    counts: list[int],
    expected: list[str],
) -> None:
    with pytest.raises(InputError) as raised:
        check_loss_request(loss_fn, config, inputs, counts)
    for text in expected:
        assert text in str(raised.value), f"{text!r} not in {raised.value}"
