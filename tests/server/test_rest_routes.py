"""REST views (training runs, checkpoints, sessions, samplers), validated with the SDK's models."""

from __future__ import annotations

from starlette.testclient import TestClient
from tinker import types as T


def trained_run(api) -> tuple[str, str, str]:
    session = api.session()
    model_id = api.model(session, rank=4)
    api.result(api.post("save_weights", {"model_id": model_id, "path": "ckpt-1", "seq_id": 1})["request_id"])
    api.result(api.post("save_weights_for_sampler", {"model_id": model_id, "path": "s-1", "seq_id": 2})["request_id"])
    return session, model_id, f"tinker://{model_id}/weights/ckpt-1"


def test_training_runs_and_checkpoints(api, client: TestClient, engine) -> None:
    session, model_id, path = trained_run(api)

    run = T.TrainingRun.model_validate(client.get(f"/api/v1/training_runs/{model_id}?access_scope=owned").json())
    assert (run.training_run_id, run.base_model, run.is_lora, run.lora_rank) == (model_id, engine.name, True, 4)
    assert run.last_checkpoint is not None and run.last_checkpoint.tinker_path == path
    assert run.last_sampler_checkpoint is not None and run.last_sampler_checkpoint.checkpoint_type == "sampler"

    runs = T.TrainingRunsResponse.model_validate(client.get("/api/v1/training_runs?limit=5&offset=0").json())
    assert [r.training_run_id for r in runs.training_runs] == [model_id]
    assert (runs.cursor.limit, runs.cursor.total_count) == (5, 1)

    listed = client.get(f"/api/v1/training_runs/{model_id}/checkpoints").json()
    listed = T.CheckpointsListResponse.model_validate(listed)
    assert [c.checkpoint_id for c in listed.checkpoints] == ["weights/ckpt-1", "sampler_weights/s-1"]
    assert listed.checkpoints[0].size_bytes and listed.cursor is None

    everything = T.CheckpointsListResponse.model_validate(client.get("/api/v1/checkpoints?limit=1&offset=1").json())
    assert [c.checkpoint_id for c in everything.checkpoints] == ["sampler_weights/s-1"]
    assert everything.cursor is not None and everything.cursor.total_count == 2

    info = T.WeightsInfoResponse.model_validate(api.post("weights_info", {"tinker_path": path}))
    assert (info.base_model, info.is_lora, info.lora_rank, info.train_mlp) == (engine.name, True, 4, True)

    session_view = T.GetSessionResponse.model_validate(client.get(f"/api/v1/sessions/{session}").json())
    assert session_view.training_run_ids == [model_id]


def test_delete_checkpoint(api, client: TestClient, tmp_path) -> None:
    _, model_id, path = trained_run(api)
    directory = tmp_path / "checkpoints" / model_id / "weights" / "ckpt-1"
    assert directory.is_dir()
    assert client.delete(f"/api/v1/training_runs/{model_id}/checkpoints/weights/ckpt-1").status_code == 200
    assert not directory.exists()
    assert client.delete(f"/api/v1/training_runs/{model_id}/checkpoints/weights/ckpt-1").status_code == 404
    assert client.post("/api/v1/weights_info", json={"tinker_path": path}).status_code == 404
    listed = client.get(f"/api/v1/training_runs/{model_id}/checkpoints").json()["checkpoints"]
    assert [c["checkpoint_id"] for c in listed] == ["sampler_weights/s-1"]


def test_delete_refuses_traversal(api, client: TestClient, tmp_path) -> None:
    _, model_id, _ = trained_run(api)
    victim = tmp_path / "checkpoints" / model_id / "sampler_weights" / "s-1"
    for checkpoint_id in ["weights/..%2Fsampler_weights%2Fs-1", "weights%2F..%2Fsampler_weights%2Fs-1", "weights/.."]:
        response = client.delete(f"/api/v1/training_runs/{model_id}/checkpoints/{checkpoint_id}")
        # 405: the client normalises a trailing `/..` away, leaving the (GET-only) listing URL.
        assert response.status_code in (400, 404, 405), checkpoint_id
    assert client.delete("/api/v1/training_runs/../checkpoints/weights/x").status_code in (400, 404, 405)
    assert victim.is_dir()


def test_unknown_things_are_404(client: TestClient) -> None:
    assert client.get("/api/v1/training_runs/nope:train:0").status_code == 404
    assert client.get("/api/v1/training_runs/nope:train:0/checkpoints").status_code == 404
    assert client.get("/api/v1/samplers/nope:sample:0").status_code == 404
    assert client.get("/api/v1/sessions/nope").status_code == 404
    assert client.post("/api/v1/weights_info", json={"tinker_path": "tinker://a:train:0/weights/x"}).status_code == 404
    assert client.post("/api/v1/weights_info", json={"tinker_path": "tinker://a/../x"}).status_code == 400
    assert client.get("/api/v1/training_runs?limit=-1").status_code == 400
