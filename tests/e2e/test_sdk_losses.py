"""Every Tinker loss and forward_backward_custom through the real SDK."""

from __future__ import annotations

import numpy as np
import pytest
import tinker
import torch
from tinker import types

from tuft_jax.losses import LOSSES

BASE_MODEL = "tuft/tiny-qwen3"
TOKENS = [17, 301, 45, 99, 12, 250, 33, 7, 64, 128]


@pytest.fixture(scope="module")
def service(server_url: str):
    client = tinker.ServiceClient(base_url=server_url, api_key="tml-e2e-losses")
    yield client
    client.close("success")


@pytest.fixture(scope="module")
def training(service):
    return service.create_lora_training_client(base_model=BASE_MODEL, rank=4, seed=3).result()


def _forward_logprobs(training, tokens: list[int] = TOKENS) -> np.ndarray:
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )
    return training.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()


@pytest.mark.parametrize(
    ("loss_fn", "config"),
    [
        ("importance_sampling", None),
        ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
        ("cispo", None),
        ("dro", {"beta": 0.05}),
    ],
)
def test_rl_losses_match_their_definition(training, loss_fn: str, config: dict | None) -> None:
    lp = _forward_logprobs(training)
    rng = np.random.default_rng(0)
    sampler_lp = (lp + rng.normal(0, 0.1, lp.shape)).astype(np.float32)
    advantages = rng.normal(0, 1, lp.shape).astype(np.float32)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(TOKENS[:-1]),
        loss_fn_inputs={"target_tokens": TOKENS[1:], "logprobs": sampler_lp.tolist(), "advantages": advantages.tolist()},
    )
    result = training.forward([datum], loss_fn, loss_fn_config=config).result()
    ratio = np.exp(lp - sampler_lp)
    expected = {
        "importance_sampling": lambda: -(ratio * advantages).sum(),
        "ppo": lambda: -np.minimum(ratio * advantages, np.clip(ratio, 0.9, 1.1) * advantages).sum(),
        "cispo": lambda: -(np.clip(ratio, 0.0, 4.0) * lp * advantages).sum(),
        "dro": lambda: -(lp * advantages - 0.5 * 0.05 * (lp - sampler_lp) ** 2).sum(),
    }[loss_fn]()
    np.testing.assert_allclose(result.metrics["loss:sum"], expected, rtol=1e-4, atol=1e-4)


def test_forward_backward_custom_equals_cross_entropy(training) -> None:
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(TOKENS[:-1]),
        loss_fn_inputs={"target_tokens": TOKENS[1:], "weights": [1.0] * (len(TOKENS) - 1)},
    )

    def negative_log_likelihood(data, logprobs_list):
        loss = -torch.stack([lp.sum() for lp in logprobs_list]).sum()
        return loss, {"nll:sum": float(loss.detach())}

    custom = training.forward_backward_custom([datum], negative_log_likelihood).result()
    expected = -_forward_logprobs(training).sum()
    np.testing.assert_allclose(custom.metrics["loss:sum"], expected, rtol=1e-4)
    np.testing.assert_allclose(custom.metrics["nll:sum"], expected, rtol=1e-4)
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    assert -_forward_logprobs(training).sum() < expected


def _torch_gspo(lp: np.ndarray, inputs: dict[str, np.ndarray], low: float, high: float) -> tuple[float, np.ndarray]:
    """One datum's GSPO-token loss and d(loss)/d(lp), by float64 autograd from the definition."""
    x = torch.tensor(lp, dtype=torch.float64, requires_grad=True)
    q, advantages, in_ratio = (
        torch.tensor(inputs[key], dtype=torch.float64) for key in ("logprobs", "advantages", "sequence_ratio_mask")
    )
    log_ratio = (in_ratio * (x.detach() - q)).sum() / in_ratio.sum()
    ratio = torch.exp(log_ratio + x - x.detach())
    loss = -torch.minimum(ratio * advantages, torch.clamp(ratio, low, high) * advantages).sum()
    loss.backward()
    return loss.item(), x.grad.numpy()


def test_gspo_forward_backward_matches_a_torch_reference(service) -> None:
    """Two datums packed into one row, each with its own sequence ratio (one past the clip, one
    inside): the loss and logprobs equal the torch reference, and the gradient does too: one Adam
    step after gspo lands where a step after cross_entropy with weights = -dloss/dlp lands."""
    gspo_client, reference_client = (
        service.create_lora_training_client(base_model=BASE_MODEL, rank=4, seed=5).result() for _ in range(2)
    )
    sequences, offsets, prompt_lengths = [TOKENS, TOKENS[2:7]], [-0.3, 0.05], [3, 1]
    rng = np.random.default_rng(1)
    data, reference_data, expected_loss, expected_lp = [], [], 0.0, []
    for tokens, offset, prompt in zip(sequences, offsets, prompt_lengths, strict=True):
        lp = _forward_logprobs(gspo_client, tokens).astype(np.float64)
        sampled = np.arange(len(lp)) >= prompt
        inputs = {
            "logprobs": (lp + offset + rng.normal(0, 0.1, lp.shape)).astype(np.float32),
            "advantages": np.where(sampled, rng.normal(0, 1, lp.shape), 0).astype(np.float32),
            "sequence_ratio_mask": sampled.astype(np.float32),
        }
        loss, grad = _torch_gspo(lp, inputs, 0.8, 1.2)
        expected_loss += loss
        expected_lp.append(lp)
        model_input = types.ModelInput.from_ints(tokens[:-1])
        data.append(
            types.Datum(model_input=model_input, loss_fn_inputs={"target_tokens": tokens[1:], **inputs})
        )
        reference_data.append(
            types.Datum(model_input=model_input, loss_fn_inputs={"target_tokens": tokens[1:], "weights": -grad})
        )
    result = gspo_client.forward_backward(data, "gspo").result()
    np.testing.assert_allclose(result.metrics["loss:sum"], expected_loss, rtol=1e-4, atol=1e-4)
    for output, lp in zip(result.loss_fn_outputs, expected_lp, strict=True):
        np.testing.assert_allclose(output["logprobs"].to_numpy(), lp, atol=1e-5)
    reference_client.forward_backward(reference_data, "cross_entropy").result()
    step = types.AdamParams(learning_rate=1e-2)
    gspo_client.optim_step(step).result()
    reference_client.optim_step(step).result()
    for tokens, before in zip(sequences, expected_lp, strict=True):
        after = _forward_logprobs(gspo_client, tokens)
        assert np.abs(after - before).max() > 1e-2
        np.testing.assert_allclose(after, _forward_logprobs(reference_client, tokens), atol=1e-4)


@pytest.mark.parametrize(
    ("loss_fn", "inputs", "fragments"),
    [
        ("gspo", {"logprobs": [-1.0] * 3, "advantages": [1.0] * 3}, ["sequence_ratio_mask", "missing"]),
        ("gspo", {"logprobs": [-1.0] * 3, "advantages": [1.0] * 3, "sequence_ratio_mask": [1.0] * 2},
         ["sequence_ratio_mask", "shape"]),
        ("stable_reinforce", {"logprobs": [-1.0] * 3, "advantages": [1.0] * 3}, ["not supported", *LOSSES]),
    ],
)
def test_unservable_rl_requests_get_400_with_a_detail(training, loss_fn: str, inputs: dict, fragments: list[str]) -> None:
    datum = types.Datum(model_input=types.ModelInput.from_ints(TOKENS[:3]), loss_fn_inputs={"target_tokens": TOKENS[1:4], **inputs})
    with pytest.raises(tinker.BadRequestError) as info:
        training.forward_backward([datum], loss_fn).result()
    for fragment in fragments:
        assert fragment in str(info.value)
