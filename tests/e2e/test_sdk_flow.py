"""The whole client flow through the real, unmodified `tinker` SDK against a live server."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tinker
from tinker import types
from transformers import AutoTokenizer

BASE_MODEL = "tuft/tiny-qwen3"
TEXT = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def service(server_url: str) -> tinker.ServiceClient:
    client = tinker.ServiceClient(base_url=server_url, api_key="tml-e2e-test-key")
    yield client
    client.close("success")


@pytest.fixture(scope="module")
def training(service: tinker.ServiceClient) -> tinker.TrainingClient:
    return service.create_lora_training_client(base_model=BASE_MODEL, rank=8, seed=0).result()


@pytest.fixture(scope="module")
def tokenizer(training: tinker.TrainingClient):
    return AutoTokenizer.from_pretrained(training.get_info().model_data.tokenizer_id)


def _datum(tokens: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


def test_capabilities_list_the_builtin_model(service: tinker.ServiceClient) -> None:
    names = [m.model_name for m in service.get_server_capabilities().supported_models]
    assert BASE_MODEL in names


def test_train_save_and_sample(service: tinker.ServiceClient, training: tinker.TrainingClient, tokenizer) -> None:
    tokens = tokenizer.encode(TEXT)
    datum = _datum(tokens)
    losses = []
    for _ in range(10):
        result = training.forward_backward([datum], "cross_entropy").result()
        training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        losses.append(result.metrics["loss:sum"])
        logprobs = result.loss_fn_outputs[0]["logprobs"].to_numpy()
        assert logprobs.shape == (len(tokens) - 1,)
        assert math.isclose(-float(logprobs.sum()), result.metrics["loss:sum"], rel_tol=1e-4)
    assert losses[-1] < 0.1 * losses[0], losses

    state_path = training.save_state("e2e-state").result().path
    sampler_path = training.save_weights_for_sampler("e2e-sampler").result().path
    assert state_path == f"tinker://{training.model_id}/weights/e2e-state"
    assert sampler_path == f"tinker://{training.model_id}/sampler_weights/e2e-sampler"

    session_id = training.model_id.split(":train:")[0]
    session = service.create_rest_client().get_session(session_id).result()
    assert training.model_id in session.training_run_ids

    sampler = service.create_sampling_client(model_path=sampler_path).result()
    prompt = types.ModelInput.from_ints(tokens[:6])
    params = types.SamplingParams(max_tokens=8, temperature=1.0, seed=7)
    response = sampler.sample(prompt=prompt, num_samples=2, sampling_params=params).result()
    assert len(response.sequences) == 2
    for sequence in response.sequences:
        assert 1 <= len(sequence.tokens) <= 8
        assert len(sequence.logprobs) == len(sequence.tokens)
    again = sampler.sample(prompt=prompt, num_samples=2, sampling_params=params).result()
    assert [s.tokens for s in again.sequences] == [s.tokens for s in response.sequences]

    greedy = sampler.sample(
        prompt=prompt, num_samples=1, sampling_params=types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])
    ).result()
    assert greedy.sequences[0].tokens == tokens[6:12], "the trained adapter should reproduce the memorised text"


def test_compute_logprobs_match_forward(service: tinker.ServiceClient, training: tinker.TrainingClient, tokenizer) -> None:
    tokens = tokenizer.encode(TEXT)[:12]
    sampler = training.save_weights_and_get_sampling_client().result()
    prompt_logprobs = sampler.compute_logprobs(types.ModelInput.from_ints(tokens)).result()
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(tokens)
    forward = training.forward([_datum(tokens)], "cross_entropy").result()
    expected = forward.loss_fn_outputs[0]["logprobs"].to_numpy()
    np.testing.assert_allclose(np.array(prompt_logprobs[1:], dtype=np.float32), expected, atol=1e-4)


def test_topk_sample_logprobs(service: tinker.ServiceClient, tokenizer) -> None:
    """`sample(..., topk_sample_logprobs=3)` gives every sampled token its 3 most likely tokens:
    those the prompt scores of the whole sequence rank at the same positions; k past the
    vocabulary is a 400 naming the field."""
    sampler = service.create_sampling_client(base_model=BASE_MODEL).result()
    prompt = tokenizer.encode(TEXT)[:6]
    params = types.SamplingParams(max_tokens=6, temperature=0.8, seed=3, stop=[])
    response = sampler.sample(types.ModelInput.from_ints(prompt), 2, params, topk_sample_logprobs=3).result()
    for sequence in response.sequences:
        assert sequence.topk_logprobs_np.token_ids.shape == (len(sequence.tokens), 3)
        full = types.ModelInput.from_ints(prompt + sequence.tokens)
        scored = sampler.sample(
            full, 1, types.SamplingParams(max_tokens=1), include_prompt_logprobs=True, topk_prompt_logprobs=3
        ).result()
        expected = scored.topk_prompt_logprobs[len(prompt) :]
        for ours, reference, logprob in zip(sequence.topk_logprobs, expected, sequence.logprobs, strict=True):
            assert [t for t, _ in ours] == [t for t, _ in reference]
            np.testing.assert_allclose([v for _, v in ours], [v for _, v in reference], atol=1e-4)
            assert ours[0][1] >= logprob - 1e-5
    with pytest.raises(tinker.BadRequestError) as info:
        sampler.sample(types.ModelInput.from_ints(prompt), 1, params, topk_sample_logprobs=10**6).result()
    assert "topk_sample_logprobs" in str(info.value)


def _metric(text: str, name: str) -> float:
    (line,) = [line for line in text.splitlines() if line.startswith(name)]
    return float(line.rsplit(" ", 1)[1])


def test_repeated_prompts_reuse_kv_blocks_on_metrics(service: tinker.ServiceClient, server_url: str) -> None:
    """Two requests with the same 40-token prompt on one sampler: the second reuses the first's
    full blocks (seen on /metrics), and every block is given back once both are done."""
    import httpx

    sampler = service.create_sampling_client(base_model=BASE_MODEL)
    prompt = types.ModelInput.from_ints([(7 * i) % 400 + 1 for i in range(40)])
    labels = f'{{base_model="{BASE_MODEL}"'

    def hits() -> float:
        return _metric(httpx.get(f"{server_url}/metrics").text, f"tuft_kv_prefix_hit_blocks_total{labels}}}")

    before = hits()
    for seed in (1, 2):
        params = types.SamplingParams(max_tokens=4, temperature=1.0, seed=seed)
        sampler.sample(prompt=prompt, num_samples=2, sampling_params=params).result()
    assert hits() - before >= 2
    text = httpx.get(f"{server_url}/metrics").text
    assert _metric(text, f'tuft_kv_blocks{labels},state="used"}}') == 0
    assert _metric(text, f"tuft_kv_block_bytes{labels}}}") > 0
