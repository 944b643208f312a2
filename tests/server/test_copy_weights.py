"""copy_weights: into a project or a session, hard-linked, idempotent per key, tenant-checked."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from starlette.testclient import TestClient
from test_auth import OTHER_KEY, KeyedClient
from test_rest_routes import trained_run
from test_session_routes import new_session, runs_in
from test_training_routes import optim
from tinker import types as T


def copy(client: TestClient | KeyedClient, key: str | None = None, **body: Any):
    headers = {} if key is None else {"X-Idempotency-Key": key}
    return client.post("/api/v1/copy_weights", json=body, headers=headers)


def copied(client: TestClient, **body: Any) -> str:
    response = copy(client, **body)
    assert response.status_code == 200, response.text
    return T.CopyWeightsResponse.model_validate(response.json()).tinker_path


def files(root: Path, tinker_path: str) -> dict[str, int]:
    """Relative file name -> inode of a checkpoint's files."""
    directory = root.joinpath(*tinker_path.removeprefix("tinker://").split("/"))
    return {str(p.relative_to(directory)): p.stat().st_ino for p in directory.rglob("*") if p.is_file()}


def test_copy_into_a_project(api, client: TestClient, tmp_path: Path) -> None:
    _, model_id, source = trained_run(api)
    path = copied(client, source_path=source, destination_project_id="archive", ttl_seconds=7200)
    run_id, kind, name = path.removeprefix("tinker://").split("/")
    assert (kind, name) == ("weights", "ckpt-1") and run_id != model_id and run_id.endswith(":train:0")
    root = tmp_path / "checkpoints"
    assert files(root, path) == files(root, source), "the same files: hard links, no bytes duplicated"

    assert runs_in(client, "archive") == [run_id]
    run = T.TrainingRun.model_validate(client.get(f"/api/v1/training_runs/{run_id}").json())
    assert run.last_checkpoint is not None and run.last_checkpoint.tinker_path == path
    assert run.lora_rank == 4
    copy_record = client.get(f"/api/v1/training_runs/{run_id}/checkpoints").json()["checkpoints"][0]
    expires = datetime.fromisoformat(copy_record["expires_at"])
    assert 7100 < (expires - datetime.now(UTC)).total_seconds() <= 7200
    info = T.WeightsInfoResponse.model_validate(api.post("weights_info", {"tinker_path": path}))
    assert info.lora_rank == 4

    holder = run_id.removesuffix(":train:0")
    summary = client.post("/api/v1/sessions/search", json={"session_id": holder}).json()["sessions"][0]
    assert summary["project_id"] == "archive" and summary["status"]["type"] == "client_finished"
    assert client.post("/api/v1/optim_step", json=optim(run_id, 1)).status_code == 404, "a copy cannot be trained"
    load = {"session_id": api.session(), "model_seq_id": 0, "path": path, "optimizer": True}
    restored = api.post("load_weights", load)
    assert api.result(restored["request_id"])["model_id"], "but it loads like any checkpoint"


def test_deleting_either_side_keeps_the_other(api, client: TestClient, tmp_path: Path) -> None:
    _, model_id, source = trained_run(api)
    path = copied(client, source_path=source, destination_project_id="archive")
    before = files(tmp_path / "checkpoints", path)
    assert client.delete(f"/api/v1/training_runs/{model_id}/checkpoints/weights/ckpt-1").status_code == 200
    assert files(tmp_path / "checkpoints", path) == before
    assert api.post("weights_info", {"tinker_path": path})["lora_rank"] == 4


def test_copy_into_a_session(api, client: TestClient) -> None:
    _, _, source = trained_run(api)
    session = new_session(api, project_id="proj-s")
    path = copied(client, source_path=source, session_id=session, model_seq_id=3)
    assert path == f"tinker://{session}:train:3/weights/ckpt-1"
    assert runs_in(client, "proj-s") == [f"{session}:train:3"], "the copy is in the session's project"

    taken = copy(client, source_path=source, session_id=session, model_seq_id=3)
    assert taken.status_code == 400 and "already exists" in taken.json()["detail"]
    api.model(session, model_seq_id=4)
    assert copy(client, source_path=source, session_id=session, model_seq_id=4).status_code == 400
    assert copy(client, source_path=source, session_id=session).status_code == 400
    assert copy(client, source_path=source, model_seq_id=5).status_code == 400
    assert copy(client, source_path=source, session_id="nope", model_seq_id=5).status_code == 404
    client.post(f"/api/v1/sessions/{session}/finish", json={})
    assert copy(client, source_path=source, session_id=session, model_seq_id=6).status_code == 410


def test_a_retried_copy_is_not_copied_twice(api, client: TestClient) -> None:
    _, _, source = trained_run(api)
    first = copy(client, "key-1", source_path=source, destination_project_id="archive").json()["tinker_path"]
    again = copy(client, "key-1", source_path=source, destination_project_id="archive").json()["tinker_path"]
    assert again == first and len(runs_in(client, "archive")) == 1
    other = copy(client, "key-2", source_path=source, destination_project_id="archive").json()["tinker_path"]
    assert other != first and len(runs_in(client, "archive")) == 2
    unkeyed = {copied(client, source_path=source, destination_project_id="archive") for _ in range(2)}
    assert len(unkeyed) == 2, "without a key every call is a new copy"
    theirs = copy(KeyedClient(client, OTHER_KEY), "key-1", source_path=source, destination_project_id="archive")
    assert theirs.status_code == 404, "keys are per tenant: another's key does not replay this one's copy"
    assert copy(client, "k" * 201, source_path=source, destination_project_id="archive").status_code == 400


def test_tenancy(api, client: TestClient) -> None:
    _, model_id, source = trained_run(api)
    other = KeyedClient(client, OTHER_KEY)
    refused = copy(other, source_path=source, destination_project_id="mine")
    assert refused.status_code == 404 and refused.json()["detail"]
    with_token = other.post(
        "/api/v1/copy_weights",
        json={"source_path": source, "destination_project_id": "mine"},
        headers={"X-Tinker-Weights-Access-Token": "tok-1"},
    )
    assert with_token.status_code == 404 and "access tokens" in with_token.json()["detail"]

    client.post(f"/api/v1/training_runs/{model_id}/checkpoints/weights/ckpt-1/publish")
    path = copy(other, source_path=source, destination_project_id="mine").json()["tinker_path"]
    run_id = path.removeprefix("tinker://").split("/")[0]
    other_owner = other.get("/api/v1/auth/apikey/me").json()["details"]["user_details"]["email"]
    assert other.get(f"/api/v1/training_runs/{run_id}").json()["model_owner"] == other_owner
    assert client.get(f"/api/v1/training_runs/{run_id}").status_code == 404, "the copy is the copier's, and private"
    mine = other.get("/api/v1/checkpoints").json()["checkpoints"]
    assert [c["tinker_path"] for c in mine] == [path] and not mine[0].get("public")


def test_bad_copies_are_400(api, client: TestClient) -> None:
    _, _, source = trained_run(api)
    for body in (
        {"source_path": source},
        {"destination_project_id": "p"},
        {"source_path": "tinker://../weights/x", "destination_project_id": "p"},
        {"source_path": "s3://bucket/x", "destination_project_id": "p"},
        {"source_path": source, "destination_project_id": ""},
        {"source_path": source, "destination_project_id": "p", "ttl_seconds": 0},
        {"source_path": source, "session_id": "s", "model_seq_id": -1},
    ):
        response = copy(client, **body)
        assert response.status_code == 400 and response.json()["detail"], body
    missing = copy(client, source_path=source.replace("ckpt-1", "nope"), destination_project_id="p")
    assert missing.status_code == 404
    assert runs_in(client, "p") == [], "a refused copy leaves nothing behind"
