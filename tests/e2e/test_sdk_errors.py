"""Bad requests through the real SDK get 4xx with a clear detail, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest
import tinker
from tinker import types

BASE_MODEL = "tuft/tiny-qwen3"


@pytest.fixture(scope="module")
def service(server_url: str) -> tinker.ServiceClient:
    client = tinker.ServiceClient(base_url=server_url, api_key="tml-e2e-errors")
    yield client
    client.close("success")


@pytest.fixture(scope="module")
def training(service: tinker.ServiceClient) -> tinker.TrainingClient:
    return service.create_lora_training_client(base_model=BASE_MODEL, rank=4).result()


def _datum(tokens: list[int], targets: list[int] | None = None, weights: list[float] | None = None) -> types.Datum:
    targets = tokens if targets is None else targets
    weights = [1.0] * len(targets) if weights is None else weights
    return types.Datum(model_input=types.ModelInput.from_ints(tokens), loss_fn_inputs={"target_tokens": targets, "weights": weights})


def test_unknown_base_model_is_rejected(service: tinker.ServiceClient) -> None:
    with pytest.raises((tinker.BadRequestError, tinker.NotFoundError)) as info:
        service.create_lora_training_client(base_model="no/such-model", rank=4).result()
    assert "no/such-model" in str(info.value)


@pytest.mark.parametrize(
    ("datum", "loss_fn", "fragment"),
    [
        (_datum([1, 2, 3], targets=[1, 2, 100_000]), "cross_entropy", "vocab"),
        (_datum([1, 2, 100_000]), "cross_entropy", "vocab"),
        (_datum([1, 2, 3], targets=[1, 2]), "cross_entropy", "target_tokens"),
        (_datum([1, 2, 3], weights=[1.0, 1.0]), "cross_entropy", "weights"),
        (_datum([1, 2, 3]), "no_such_loss", "no_such_loss"),
    ],
)
def test_invalid_forward_backward_gets_400(training: tinker.TrainingClient, datum, loss_fn: str, fragment: str) -> None:
    with pytest.raises(tinker.BadRequestError) as info:
        training.forward_backward([datum], loss_fn).result()
    assert fragment in str(info.value)
    ok = training.forward_backward([_datum([1, 2, 3])], "cross_entropy").result()
    assert "loss:sum" in ok.metrics


def test_error_bodies_are_json_with_length(server_url: str) -> None:
    response = httpx.post(
        f"{server_url}/api/v1/create_model",
        content=b"{not json",
        headers={"X-API-Key": "tml-raw", "Content-Type": "application/json"},
    )
    assert 400 <= response.status_code < 500
    assert int(response.headers["content-length"]) > 0
    assert "detail" in response.json()
    assert httpx.get(f"{server_url}/api/v1/healthz").status_code == 200


def test_a_bad_sample_request_is_refused_and_fails_no_other_tenant(server_url: str, service: tinker.ServiceClient) -> None:
    """An out-of-range sampling field is a 400 naming it; another tenant's running sample
    finishes with the tokens it gives alone."""
    prompt = types.ModelInput.from_ints([1, 2, 3, 4])
    params = types.SamplingParams(max_tokens=200, temperature=1.0, seed=3, stop=[])
    victim = service.create_sampling_client(base_model=BASE_MODEL)
    alone = victim.sample(prompt=prompt, num_samples=2, sampling_params=params).result()
    running = victim.sample(prompt=prompt, num_samples=2, sampling_params=params)
    attacker = tinker.ServiceClient(base_url=server_url, api_key="tml-e2e-attacker")
    try:
        hostile = attacker.create_sampling_client(base_model=BASE_MODEL)
        for field, value in (("top_k", 10**12), ("temperature", 1e30), ("max_tokens", 10**9)):
            bad = types.SamplingParams(**{"max_tokens": 4, field: value})
            with pytest.raises(tinker.BadRequestError) as info:
                hostile.sample(prompt=prompt, num_samples=1, sampling_params=bad).result()
            assert field in str(info.value)
    finally:
        attacker.close("success")
    assert [s.tokens for s in running.result().sequences] == [s.tokens for s in alone.sequences]
