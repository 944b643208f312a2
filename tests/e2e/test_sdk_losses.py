"""Every Tinker loss and forward_backward_custom through the real SDK."""

from __future__ import annotations

import numpy as np
import pytest
import tinker
import torch
from tinker import types

BASE_MODEL = "tuft/tiny-qwen3"
TOKENS = [17, 301, 45, 99, 12, 250, 33, 7, 64, 128]


@pytest.fixture(scope="module")
def training(server_url: str):
    service = tinker.ServiceClient(base_url=server_url, api_key="tml-e2e-losses")
    yield service.create_lora_training_client(base_model=BASE_MODEL, rank=4, seed=3).result()
    service.close("success")


def _forward_logprobs(training) -> np.ndarray:
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(TOKENS[:-1]),
        loss_fn_inputs={"target_tokens": TOKENS[1:], "weights": [1.0] * (len(TOKENS) - 1)},
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
