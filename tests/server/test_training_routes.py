"""Training endpoints against the fake engine, with bodies built and results read by the SDK."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import zstandard
from starlette.testclient import TestClient
from tinker import types as T
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_forward_backward_output

PROTO = {"Content-Type": "application/x-protobuf"}


def fwd_body(
    model_id: str, seq_id: int, *, tokens: list[int] | None = None, loss_fn: str = "cross_entropy", forward_only=False
) -> bytes:
    tokens = tokens or [1, 2, 3, 4]
    datum = T.Datum(
        model_input=T.ModelInput.from_ints(tokens),
        loss_fn_inputs={"target_tokens": [*tokens[1:], 0], "weights": [1.0] * len(tokens)},
    )
    request = T.ForwardBackwardRequest(
        forward_backward_input=T.ForwardBackwardInput(data=[datum], loss_fn=loss_fn), model_id=model_id, seq_id=seq_id
    )
    proto = forward_backward_request_to_proto(request)
    proto.forward_only = forward_only
    return proto.SerializeToString()


def post_fwd(client: TestClient, body: bytes, **headers: str):
    return client.post("/api/v1/forward_backward", content=body, headers={**PROTO, **headers})


def optim(model_id: str, seq_id: int, lr: float = 0.1) -> dict:
    return {"model_id": model_id, "seq_id": seq_id, "adam_params": {"learning_rate": lr}, "type": "optim_step"}


def test_create_model_and_get_info(api, engine) -> None:
    session = api.session()
    model_id = api.model(session, model_seq_id=0, rank=4)
    assert model_id == f"{session}:train:0"
    info = T.GetInfoResponse.model_validate(api.post("get_info", {"model_id": model_id, "type": "get_info"}))
    assert (info.model_data.model_name, info.model_data.tokenizer_id) == (engine.name, engine.tokenizer_path)
    assert (info.is_lora, info.lora_rank, info.model_id) == (True, 4, model_id)


def test_create_model_retry_returns_same_future(api) -> None:
    session = api.session()
    body = {"session_id": session, "model_seq_id": 3, "base_model": "fake/tiny", "lora_config": {"rank": 4}}
    first, again = api.post("create_model", body), api.post("create_model", body)
    assert first["request_id"] == again["request_id"]
    assert api.result(first["request_id"]) == {"type": "create_model", "model_id": f"{session}:train:3"}


def test_create_model_failure_is_a_failed_future(api, client: TestClient, engine) -> None:
    engine.max_lora_rank = 999  # advertised, so the route lets it through; the engine refuses
    session = api.session()
    body = {"session_id": session, "model_seq_id": 0, "base_model": "fake/tiny", "lora_config": {"rank": 999}}
    result = api.result(api.post("create_model", body)["request_id"])
    assert result["category"] == "user" and "rank" in result["error"]
    assert client.post("/api/v1/get_info", json={"model_id": f"{session}:train:0"}).status_code == 404


@pytest.mark.parametrize(
    ("lora", "named"),
    [
        ({"rank": 0}, "rank"),
        ({"rank": 17}, "rank"),  # the fake engine's max_lora_rank is 16
        ({"rank": 4, "seed": -1}, "seed"),
        ({"rank": 4, "seed": 2**63}, "seed"),
        ({"rank": 4, "seed": 2**64}, "seed"),
        ({"rank": 4, "train_attn": False, "train_mlp": False, "train_unembed": False}, "train_attn"),
    ],
)
def test_create_model_rejects_bad_lora(api, client: TestClient, engine, lora: dict, named: str) -> None:
    session = api.session()
    body = {"session_id": session, "model_seq_id": 0, "base_model": "fake/tiny", "lora_config": lora}
    response = client.post("/api/v1/create_model", json=body)
    assert response.status_code == 400 and named in response.json()["detail"], response.text
    assert engine.adapters == {}, "refused before reaching the engine"
    assert api.model(session, rank=16), "the model's maximum rank itself is fine"


def test_create_model_default_rank_fits_the_model(api, engine) -> None:
    session = api.session()
    future = api.post("create_model", {"session_id": session, "model_seq_id": 0, "base_model": "fake/tiny"})
    assert api.result(future["request_id"])["model_id"] == f"{session}:train:0"
    assert [a["lora"].rank for a in engine.adapters.values()] == [engine.max_lora_rank]


def test_forward_backward_optim_step_flow(api, client: TestClient, engine) -> None:
    model_id = api.model(api.session())
    fwd = post_fwd(client, fwd_body(model_id, 1))
    assert fwd.status_code == 200, fwd.text
    output = deserialize_forward_backward_output(api.result(fwd.json()["request_id"]))
    assert output.metrics == {"loss:sum": 4.0}
    assert output.loss_fn_outputs[0]["logprobs"].tolist() == [-1.0] * 4

    step = api.result(api.post("optim_step", optim(model_id, 2))["request_id"])
    assert T.OptimStepResponse.model_validate(step).metrics == {"grad_norm:mean": 4.0}

    compressed = zstandard.ZstdCompressor().compress(fwd_body(model_id, 3, forward_only=True))
    fwd = post_fwd(client, compressed, **{"Content-Encoding": "zstd"})
    output = deserialize_forward_backward_output(api.result(fwd.json()["request_id"]))
    assert output.loss_fn_outputs[0]["logprobs"].tolist() == pytest.approx([-0.6] * 4)


def test_out_of_order_chunks_run_in_seq_order_and_retries_dedupe(api, client: TestClient, engine) -> None:
    model_id = api.model(api.session())
    slot = next(iter(engine.adapters))
    second = post_fwd(client, fwd_body(model_id, 2)).json()
    step = api.post("optim_step", optim(model_id, 3, lr=1.0))
    assert post_fwd(client, fwd_body(model_id, 2)).json() == second  # retry before dispatch
    assert engine.forward_batches == []
    first = post_fwd(client, fwd_body(model_id, 1)).json()
    api.result(step["request_id"])
    assert engine.forward_batches == [[slot], [slot]]
    # Both chunks ran before the step: the weight moved by the gradient of 8 weights.
    assert engine.adapters[slot]["weight"] == pytest.approx(-8.0)
    assert post_fwd(client, fwd_body(model_id, 1)).json() == first  # retry after completion
    assert engine.forward_batches == [[slot], [slot]]


def test_rejected_request_consumes_its_seq_id(api, client: TestClient, engine) -> None:
    model_id = api.model(api.session())
    later = api.post("optim_step", optim(model_id, 2))
    bad = post_fwd(client, fwd_body(model_id, 1, loss_fn="ppo"))
    assert bad.status_code == 400 and "unknown loss_fn" in bad.json()["detail"]
    assert "metrics" in api.result(later["request_id"])
    # A later bad body (invalid JSON types) still consumes its seq_id.
    assert client.post("/api/v1/optim_step", json={**optim(model_id, 3), "adam_params": "x"}).status_code == 400
    assert "metrics" in api.result(api.post("optim_step", optim(model_id, 4))["request_id"])
    # Token ids the engine refuses, in a body the codec accepts.
    assert post_fwd(client, fwd_body(model_id, 5, tokens=[1, 99])).status_code == 400
    assert api.post("optim_step", optim(model_id, 6))["request_id"]
    reused = client.post("/api/v1/optim_step", json=optim(model_id, 5))
    assert reused.status_code == 400 and "already used" in reused.json()["detail"]


def test_undecodable_forward_body_consumes_its_seq_id(api, client: TestClient) -> None:
    model_id = api.model(api.session())
    later = api.post("optim_step", optim(model_id, 2))
    # An image chunk: a valid proto that the codec refuses.
    datum = T.Datum(
        model_input=T.ModelInput(chunks=[T.ImageChunk(data=b"\x89PNG", format="png", expected_tokens=1)]),
        loss_fn_inputs={"target_tokens": [1], "weights": [1.0]},
    )
    fwd_input = T.ForwardBackwardInput(data=[datum], loss_fn="cross_entropy")
    request = T.ForwardBackwardRequest(fwd_input, model_id=model_id, seq_id=1)
    body = forward_backward_request_to_proto(request).SerializeToString()
    response = post_fwd(client, body)
    assert response.status_code == 400 and "encoded_text" in response.json()["detail"]
    assert "metrics" in api.result(later["request_id"])


def test_bad_adam_params_and_other_optimizers(api, client: TestClient) -> None:
    model_id = api.model(api.session())
    bad = client.post("/api/v1/optim_step", json={**optim(model_id, 1), "adam_params": {"beta1": 1.5}})
    assert bad.status_code == 400 and "beta1" in bad.json()["detail"]
    dimuon = {"model_id": model_id, "seq_id": 2, "optimizer_params": {"type": "dimuon", "learning_rate": 0.1}}
    bad = client.post("/api/v1/optim_step", json=dimuon)
    assert bad.status_code == 400 and "dimuon" in bad.json()["detail"]


def test_save_and_load_weights(api, client: TestClient, engine, tmp_path) -> None:
    session = api.session()
    model_id = api.model(session)
    api.result(post_fwd(client, fwd_body(model_id, 1)).json()["request_id"])
    api.result(api.post("optim_step", optim(model_id, 2, lr=0.5))["request_id"])
    save = api.post("save_weights", {"model_id": model_id, "path": "ckpt-1", "seq_id": 3, "overwrite": False})
    path = T.SaveWeightsResponse.model_validate(api.result(save["request_id"])).path
    assert path == f"tinker://{model_id}/weights/ckpt-1"
    assert (tmp_path / "checkpoints" / model_id / "weights" / "ckpt-1" / "adapter.json").is_file()

    exists = client.post("/api/v1/save_weights", json={"model_id": model_id, "path": "ckpt-1", "seq_id": 4})
    assert exists.status_code == 400 and "already exists" in exists.json()["detail"]
    overwrite = {"model_id": model_id, "path": "ckpt-1", "seq_id": 5, "overwrite": True}
    assert api.result(api.post("save_weights", overwrite)["request_id"])["path"] == path
    traversal = client.post("/api/v1/save_weights", json={"model_id": model_id, "path": "../x", "seq_id": 6})
    assert traversal.status_code == 400

    # Create-via-load: the client computes the model id itself.
    load = {"session_id": session, "model_seq_id": 1, "path": path, "optimizer": True, "type": "load_weights"}
    future = api.post("load_weights", load)
    assert future["model_id"] == f"{session}:train:1"
    assert api.post("load_weights", load)["request_id"] == future["request_id"]
    loaded = T.LoadWeightsResponse.model_validate(api.result(future["request_id"]))
    assert loaded.model_id == f"{session}:train:1"
    info = api.post("get_info", {"model_id": loaded.model_id})
    assert info["lora_rank"] == 8
    new_slot = max(engine.adapters)
    assert engine.adapters[new_slot]["weight"] == pytest.approx(-2.0)

    # Legacy load replaces the weights of an existing model, in seq order.
    legacy = {"model_id": model_id, "seq_id": 7, "path": path, "optimizer": False}
    assert api.result(api.post("load_weights", legacy)["request_id"]) == {
        "type": "load_weights",
        "path": path,
        "model_id": model_id,
    }


@pytest.mark.parametrize(
    ("path", "status"),
    [("tinker://a/../b", 400), ("tinker://x:train:0/weights/..", 400), ("tinker://x:train:0/weights/none", 404)],
)
def test_load_weights_rejects_bad_paths(api, client: TestClient, path: str, status: int) -> None:
    load = {"session_id": api.session(), "model_seq_id": 0, "path": path, "optimizer": False}
    assert client.post("/api/v1/load_weights", json=load).status_code == status


def test_save_weights_for_sampler_named_and_ephemeral(api, client: TestClient, engine) -> None:
    session = api.session()
    model_id = api.model(session)
    named = api.post("save_weights_for_sampler", {"model_id": model_id, "path": "s-1", "seq_id": 1})
    result = T.SaveWeightsForSamplerResponseInternal.model_validate(api.result(named["request_id"]))
    assert result.path == f"tinker://{model_id}/sampler_weights/s-1" and result.sampling_session_id is None

    ephemeral = {"model_id": model_id, "sampling_session_seq_id": 0, "kind": "inflight", "seq_id": 2}
    result = api.result(api.post("save_weights_for_sampler", ephemeral)["request_id"])
    assert result == {"type": "save_weights_for_sampler", "sampling_session_id": f"{session}:sample:0"}
    assert len(engine.adapters) == 2

    neither = client.post("/api/v1/save_weights_for_sampler", json={"model_id": model_id, "seq_id": 3})
    assert neither.status_code == 400
    taken = client.post("/api/v1/save_weights_for_sampler", json={**ephemeral, "seq_id": 4})
    assert taken.status_code == 400 and "already exists" in taken.json()["detail"]


@pytest.mark.parametrize("route", ["save_weights", "save_weights_for_sampler"])
def test_unwritable_checkpoint_directory_fails_the_save_clearly(api, client: TestClient, tmp_path, route) -> None:
    model_id = api.model(api.session())
    blocker = tmp_path / "checkpoints" / model_id
    blocker.write_text("a file where the run's checkpoint directory belongs")  # blocks even root
    result = api.result(api.post(route, {"model_id": model_id, "path": "step-1", "seq_id": 1})["request_id"])
    assert result["category"] == "server"
    assert f"cannot write checkpoint 'step-1' under {blocker}/" in result["error"]
    assert "not a directory" in result["error"]
    assert client.get("/api/v1/checkpoints").json()["checkpoints"] == []
    assert "metrics" in api.result(api.post("optim_step", optim(model_id, 2))["request_id"]), "the worker lives on"
    blocker.unlink()
    assert api.result(api.post(route, {"model_id": model_id, "path": "step-1", "seq_id": 3})["request_id"])["path"]


def test_permission_denied_names_the_checkpoint_and_leaves_nothing(api, client: TestClient, engine, tmp_path) -> None:
    model_id = api.model(api.session())

    def refuse(slot: int, directory, *, with_optimizer: bool) -> int:
        directory.mkdir(parents=True)
        (directory / "half").write_text("x")
        raise PermissionError(13, "Permission denied", str(directory / "state"))

    engine.save_adapter = refuse
    result = api.result(api.post("save_weights", {"model_id": model_id, "path": "step-1", "seq_id": 1})["request_id"])
    weights = tmp_path / "checkpoints" / model_id / "weights"
    assert result["category"] == "server"
    assert f"cannot write checkpoint 'step-1' under {weights}: permission denied" in result["error"]
    assert list(weights.iterdir()) == [], "no half-written checkpoint"
    assert client.get("/api/v1/checkpoints").json()["checkpoints"] == []


def test_encrypted_save_weights_external_is_refused_but_consumes(api, client: TestClient) -> None:
    model_id = api.model(api.session())
    later = api.post("optim_step", optim(model_id, 2))
    body = {"model_id": model_id, "path": "x", "seq_id": 1, "age_encryption_recipients": ["age1qqq"]}
    refused = client.post("/api/v1/save_weights_external", json=body)
    assert refused.status_code == 400 and "age_encryption_recipients" in refused.json()["detail"]
    assert "metrics" in api.result(later["request_id"])
    assert client.get("/api/v1/checkpoints").json()["checkpoints"] == []


def test_retrieve_future_answers_try_again_while_pending(api, client: TestClient, engine) -> None:
    model_id = api.model(api.session())
    engine.gate = threading.Event()
    try:
        future = api.post("optim_step", optim(model_id, 1))
        service = client.app.state.service
        service.options = dataclasses.replace(service.options, future_hold_s=0.05)
        pending = client.post("/api/v1/retrieve_future", json={"request_id": future["request_id"]}).json()
        assert pending == {"type": "try_again", "request_id": future["request_id"], "queue_state": "active"}
    finally:
        engine.gate.set()
    assert "metrics" in api.result(future["request_id"])


def test_ending_the_session_releases_adapters_and_fails_waiting_requests(api, client: TestClient, engine) -> None:
    session = api.session()
    model_id = api.model(session)
    snapshot = {"model_id": model_id, "sampling_session_seq_id": 0, "seq_id": 1}
    api.result(api.post("save_weights_for_sampler", snapshot)["request_id"])
    stuck = api.post("optim_step", optim(model_id, 3))  # waits for seq_id 2 forever
    assert len(engine.adapters) == 2
    client.post(f"/api/v1/sessions/{session}/finish", json={"reason": {"type": "success"}})
    assert api.result(stuck["request_id"])["category"] == "user"
    assert client.post("/api/v1/get_info", json={"model_id": model_id}).status_code == 404
    for _ in range(100):  # the release runs on the worker thread
        if not engine.adapters:
            break
        time.sleep(0.01)
    assert engine.adapters == {}
