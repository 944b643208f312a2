"""Sampling sessions and asample against the fake engine; results read by the SDK's decoder."""

from __future__ import annotations

import math
import threading

import pytest
from starlette.testclient import TestClient
from tinker import types as T
from tinker.proto.response_conv import deserialize_sample_response

from server.routes.sampling import sampling_params
from server.wire.types import SamplingParamsBody
from tuft_jax.errors import InputError


def sample_body(sampler_id: str, seq_id: int, *, prompt: list[int] | None = None, **params) -> dict:
    sampling = {"max_tokens": 3, "temperature": 1.0, "top_k": -1, "top_p": 1.0, **params.pop("sampling", {})}
    return {
        "num_samples": 2,
        "prompt": {"chunks": [{"tokens": prompt or [5, 6, 7], "type": "encoded_text"}]},
        "sampling_params": sampling,
        "sampling_session_id": sampler_id,
        "seq_id": seq_id,
        "prompt_logprobs": False,
        "topk_prompt_logprobs": 0,
        "topk_sample_logprobs": 0,
        "prompt_alt_tokens_k": 0,
        "record_stability_info": False,
        "type": "sample",
        **params,
    }


def base_sampler(api) -> str:
    session = api.session()
    body = {"session_id": session, "sampling_session_seq_id": 0, "base_model": "fake/tiny"}
    response = T.CreateSamplingSessionResponse.model_validate(api.post("create_sampling_session", body))
    assert response.sampling_session_id == f"{session}:sample:0"
    return response.sampling_session_id


def test_sample_from_base_model(api) -> None:
    sampler_id = base_sampler(api)
    future = T.UntypedAPIFuture.model_validate(api.post("asample", sample_body(sampler_id, 0)))
    assert future.sample_sequence_ids == [f"{sampler_id}:0:0", f"{sampler_id}:0:1"]
    response = deserialize_sample_response(api.result(future.request_id))
    assert [(s.tokens, s.stop_reason) for s in response.sequences] == [([8, 9, 10], "length")] * 2
    assert response.prompt_logprobs is None


def test_topk_sample_logprobs_reach_the_sdk_decoder(api) -> None:
    """Each sampled token's alternatives arrive as the SDK's (num_tokens, k) TopkLogprobs; a
    request that does not ask gets None."""
    sampler_id = base_sampler(api)
    future = api.post("asample", sample_body(sampler_id, 0, topk_sample_logprobs=2))
    asked = deserialize_sample_response(api.result(future["request_id"]))
    for sequence in asked.sequences:
        assert sequence.topk_logprobs == [[(t, -0.5), (t + 1, -1.5)] for t in [8, 9, 10]]
        assert sequence.topk_logprobs_np.token_ids.shape == (3, 2)
    plain = deserialize_sample_response(api.result(api.post("asample", sample_body(sampler_id, 1))["request_id"]))
    assert all(sequence.topk_logprobs is None for sequence in plain.sequences)


def test_sample_retry_returns_the_same_future(api) -> None:
    sampler_id = base_sampler(api)
    first = api.post("asample", sample_body(sampler_id, 7))
    assert api.post("asample", sample_body(sampler_id, 7)) == first


def test_stop_tokens_and_prompt_logprobs_last_n(api) -> None:
    sampler_id = base_sampler(api)
    body = sample_body(
        sampler_id, 1, prompt=[1, 2, 3, 4], sampling={"stop": [6]}, prompt_logprobs=True, prompt_logprobs_last_n=2
    )
    response = deserialize_sample_response(api.result(api.post("asample", body)["request_id"]))
    assert [(s.tokens, s.stop_reason) for s in response.sequences] == [([5, 6], "stop")] * 2
    assert response.prompt_logprobs == [None, None, -1.0, -1.0]  # the SDK reads NaN as None


@pytest.mark.parametrize(
    ("overrides", "detail"),
    [
        ({"prompt": [99]}, "out of range"),
        ({"sampling": {"max_tokens": None}}, "max_tokens is required"),
        ({"sampling": {"stop": [1, "x"]}}, "not a mix"),
        ({"topk_sample_logprobs": -1}, "topk_sample_logprobs must be >= 0"),
        ({"topk_prompt_logprobs": -1}, "topk_prompt_logprobs must be >= 0"),
        ({"prompt_alt_tokens_k": 1}, "not supported"),
        ({"prompt_logprobs_last_n": 1}, "requires prompt_logprobs"),
        ({"prompt_logprobs": True, "prompt_logprobs_last_n": 3}, "between 1 and 2"),
    ],
)
def test_bad_sample_requests_are_400(api, client: TestClient, overrides: dict, detail: str) -> None:
    body = sample_body(base_sampler(api), 0, **overrides)
    if body["sampling_params"].get("max_tokens", 0) is None:
        del body["sampling_params"]["max_tokens"]
    response = client.post("/api/v1/asample", json=body)
    assert response.status_code == 400 and detail in response.json()["detail"]


def test_image_prompt_chunks_are_refused(api, client: TestClient) -> None:
    body = sample_body(base_sampler(api), 0)
    body["prompt"]["chunks"].append({"type": "image", "data": "AAAA", "format": "png"})
    response = client.post("/api/v1/asample", json=body)
    assert response.status_code == 400 and "encoded_text" in response.json()["detail"]


def test_unknown_sampler_is_404(client: TestClient) -> None:
    assert client.post("/api/v1/asample", json=sample_body("s:sample:9", 0)).status_code == 404


def test_sampling_session_from_saved_weights(api, client: TestClient, engine) -> None:
    session = api.session()
    model_id = api.model(session)
    named = api.post("save_weights_for_sampler", {"model_id": model_id, "path": "s-1", "seq_id": 1})
    path = api.result(named["request_id"])["path"]

    body = {"session_id": session, "sampling_session_seq_id": 1, "model_path": path}
    sampler_id = api.post("create_sampling_session", body)["sampling_session_id"]
    assert api.post("create_sampling_session", body)["sampling_session_id"] == sampler_id  # retry: same sampler
    assert len(engine.adapters) == 2
    info = T.GetSamplerResponse.model_validate(client.get(f"/api/v1/samplers/{sampler_id}").json())
    assert (info.base_model, info.model_path) == (engine.name, path)

    response = deserialize_sample_response(api.result(api.post("asample", sample_body(sampler_id, 0))["request_id"]))
    assert len(response.sequences) == 2

    missing = {**body, "sampling_session_seq_id": 2, "model_path": f"tinker://{model_id}/sampler_weights/none"}
    assert client.post("/api/v1/create_sampling_session", json=missing).status_code == 404
    neither = {"session_id": session, "sampling_session_seq_id": 3}
    assert client.post("/api/v1/create_sampling_session", json=neither).status_code == 400


def test_asample_answers_429_while_the_sample_queue_is_full(api, client: TestClient, engine) -> None:
    """Backpressure: a JSON 429 (never 409) that the SDK retries with the same seq_id."""
    sampler_id = base_sampler(api)
    client.app.state.service.workers[engine.name].max_queued_sample_rows = 2
    engine.gate = threading.Event()  # the engine is busy: nothing leaves the queue
    first = api.post("asample", sample_body(sampler_id, 0))  # 2 samples waiting
    refused = client.post("/api/v1/asample", json=sample_body(sampler_id, 1, num_samples=1))
    assert refused.status_code == 429 and "full" in refused.json()["detail"]
    engine.gate.set()
    assert len(deserialize_sample_response(api.result(first["request_id"])).sequences) == 2
    retried = api.post("asample", sample_body(sampler_id, 1, num_samples=1))  # not remembered as answered
    assert retried["request_id"] != first["request_id"]
    assert len(deserialize_sample_response(api.result(retried["request_id"])).sequences) == 1


def test_sampling_params_stop_semantics() -> None:
    eos = 2
    omitted = sampling_params(SamplingParamsBody(max_tokens=4), eos)
    assert (omitted.stop_token_ids, omitted.stop_strings) == ((eos,), ())
    none = sampling_params(SamplingParamsBody(max_tokens=4, stop=[]), eos)
    assert (none.stop_token_ids, none.stop_strings) == ((), ())
    ids = sampling_params(SamplingParamsBody(max_tokens=4, stop=[7, 2, 7]), eos)
    assert ids.stop_token_ids == (eos, 7)
    strings = sampling_params(SamplingParamsBody(max_tokens=4, stop="\n"), eos)
    assert (strings.stop_token_ids, strings.stop_strings) == ((eos,), ("\n",))
    with pytest.raises(InputError):
        sampling_params(SamplingParamsBody(max_tokens=4, temperature=math.inf), eos)
