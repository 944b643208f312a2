"""REST views (training runs, checkpoints, sessions, samplers), validated with the SDK's models."""

from __future__ import annotations

import dataclasses
import io
import os
import tarfile
from datetime import UTC, datetime, timedelta

from starlette.testclient import TestClient
from tinker import types as T

from server import checkpoint_files
from server.paths import parse_tinker_path
from server.url_signing import SECRET_FILE
from tuft_jax.types import LoraConfig


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


# ---- checkpoint management ----------------------------------------------------------------------


def _ckpt_url(model_id: str, checkpoint_id: str = "weights/ckpt-1") -> str:
    return f"/api/v1/training_runs/{model_id}/checkpoints/{checkpoint_id}"


def _listed(client: TestClient, model_id: str) -> dict[str, dict]:
    response = client.get(f"/api/v1/training_runs/{model_id}/checkpoints")
    return {c["checkpoint_id"]: c for c in response.json()["checkpoints"]}


def test_publish_and_unpublish_are_idempotent(api, client: TestClient) -> None:
    _, model_id, _ = trained_run(api)
    url = _ckpt_url(model_id) + "/publish"
    for _ in range(2):
        assert client.post(url).status_code == 200
        assert _listed(client, model_id)["weights/ckpt-1"]["public"] is True
    for _ in range(2):
        assert client.delete(url).status_code == 200
        assert _listed(client, model_id)["weights/ckpt-1"].get("public", False) is False
    assert client.post(_ckpt_url(model_id, "weights/nope") + "/publish").status_code == 404


def test_ttl_expiry_and_sweep(api, client: TestClient, tmp_path) -> None:
    _, model_id, path = trained_run(api)
    url = _ckpt_url(model_id) + "/ttl"
    assert client.put(url, json={"ttl_seconds": 3600}).status_code == 200
    expires = T.Checkpoint.model_validate(_listed(client, model_id)["weights/ckpt-1"]).expires_at
    assert expires is not None and 3500 < (expires - datetime.now(UTC)).total_seconds() <= 3600
    assert client.put(url, json={"ttl_seconds": None}).status_code == 200
    assert _listed(client, model_id)["weights/ckpt-1"].get("expires_at") is None
    for bad in ({"ttl_seconds": 0}, {"ttl_seconds": -5}, {"ttl_seconds": 10**12}, {"ttl_seconds": "soon"}):
        assert client.put(url, json=bad).status_code == 400, bad

    # Expired: gone from every view at once, and the sweep deletes the files.
    service = client.app.state.service
    ref = parse_tinker_path(path)
    service.store.set_checkpoint_expiry(ref, datetime.now(UTC) - timedelta(seconds=1))
    assert "weights/ckpt-1" not in _listed(client, model_id)
    assert client.post("/api/v1/weights_info", json={"tinker_path": path}).status_code == 404
    assert client.get(_ckpt_url(model_id) + "/archive").status_code == 404
    run = client.get(f"/api/v1/training_runs/{model_id}").json()
    assert "last_checkpoint" not in run
    directory = tmp_path / "checkpoints" / model_id / "weights" / "ckpt-1"
    assert directory.is_dir()
    assert checkpoint_files.delete_expired(service.store, service.checkpoint_dir, datetime.now(UTC)) == 1
    assert not directory.exists() and service.store.get_checkpoint(ref) is None
    # The name is free again.
    again = api.post("save_weights", {"model_id": model_id, "path": "ckpt-1", "seq_id": 3})
    assert api.result(again["request_id"])["path"] == path


def test_user_checkpoints_are_paged(api, client: TestClient) -> None:
    _, model_id, _ = trained_run(api)
    first = T.CheckpointsListResponse.model_validate(client.get("/api/v1/checkpoints?limit=1").json())
    assert [c.checkpoint_id for c in first.checkpoints] == ["weights/ckpt-1"]
    assert first.cursor is not None and (first.cursor.offset, first.cursor.limit, first.cursor.total_count) == (0, 1, 2)
    rest = client.get("/api/v1/checkpoints?limit=5&offset=1").json()
    assert [c["checkpoint_id"] for c in rest["checkpoints"]] == ["sampler_weights/s-1"]
    assert client.get("/api/v1/checkpoints?offset=x").status_code == 400
    assert client.get("/api/v1/training_runs?access_scope=everything").status_code == 400


def test_sessions_list_and_sampler_view(api, client: TestClient, engine) -> None:
    base_model = engine.name
    first, second = api.session(), api.session()
    listed = T.ListSessionsResponse.model_validate(client.get("/api/v1/sessions?limit=10").json())
    assert listed.sessions == [first, second]
    assert client.get("/api/v1/sessions?limit=1&offset=1").json()["sessions"] == [second]
    sampler = api.post(
        "create_sampling_session", {"session_id": first, "sampling_session_seq_id": 0, "base_model": base_model}
    )["sampling_session_id"]
    view = T.GetSamplerResponse.model_validate(client.get(f"/api/v1/samplers/{sampler}").json())
    assert (view.sampler_id, view.base_model, view.model_path) == (sampler, base_model, None)
    assert T.GetSessionResponse.model_validate(client.get(f"/api/v1/sessions/{first}").json()).sampler_ids == [sampler]


def test_archive_streams_the_checkpoint(api, client: TestClient, tmp_path) -> None:
    _, model_id, _ = trained_run(api)
    with client.stream("GET", _ckpt_url(model_id, "sampler_weights/s-1") + "/archive") as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/gzip"
        assert "s-1.tar.gz" in response.headers["content-disposition"]
        body = b"".join(response.iter_bytes())
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
        names = set(tar.getnames())
        assert {"s-1", "s-1/adapter.json", "s-1/peft", "s-1/peft/adapter_config.json"} <= names
        extracted = tar.extractfile("s-1/peft/adapter_model.safetensors").read()
    source = tmp_path / "checkpoints" / model_id / "sampler_weights" / "s-1" / "peft" / "adapter_model.safetensors"
    assert extracted == source.read_bytes()


def test_archive_of_large_files_is_chunked(tmp_path) -> None:
    directory = tmp_path / "ckpt"
    (directory / "sub").mkdir(parents=True)
    payload = os.urandom(3 * 1024 * 1024 + 17)
    (directory / "sub" / "big.bin").write_bytes(payload)
    (directory / "small.txt").write_text("hi")
    chunks = list(checkpoint_files.archive_chunks(directory, "top"))
    assert len(chunks) > 3 and max(len(c) for c in chunks) < 2 * 1024 * 1024
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks)), mode="r:gz") as tar:
        assert tar.extractfile("top/sub/big.bin").read() == payload
        assert tar.extractfile("top/small.txt").read() == b"hi"


def test_sampler_checkpoints_carry_a_peft_adapter(api, tmp_path) -> None:
    _, model_id, _ = trained_run(api)
    root = tmp_path / "checkpoints" / model_id
    assert (root / "sampler_weights" / "s-1" / "peft" / "adapter_config.json").is_file()
    assert not (root / "weights" / "ckpt-1" / "peft").exists()
    assert [p.name for p in (root / "sampler_weights").iterdir()] == ["s-1"], "no staging leftovers"


def test_overwrite_semantics(api, client: TestClient, engine) -> None:
    _, model_id, path = trained_run(api)
    again = client.post("/api/v1/save_weights", json={"model_id": model_id, "path": "ckpt-1", "seq_id": 3})
    assert again.status_code == 400 and "overwrite" in again.json()["detail"]
    sampler_again = client.post(
        "/api/v1/save_weights_for_sampler", json={"model_id": model_id, "path": "s-1", "seq_id": 4}
    )
    assert sampler_again.status_code == 400
    before = client.get(f"/api/v1/training_runs/{model_id}/checkpoints").json()["checkpoints"][0]["time"]
    engine.adapters[next(iter(engine.adapters))]["weight"] = 42.0
    replaced = api.post("save_weights", {"model_id": model_id, "path": "ckpt-1", "seq_id": 5, "overwrite": True})
    assert api.result(replaced["request_id"])["path"] == path
    listed = client.get(f"/api/v1/training_runs/{model_id}/checkpoints").json()["checkpoints"]
    assert [c["checkpoint_id"] for c in listed] == ["sampler_weights/s-1", "weights/ckpt-1"]
    assert listed[1]["time"] > before


def test_a_checkpoint_named_like_an_action(api, client: TestClient) -> None:
    session = api.session()
    model_id = api.model(session)
    for seq_id, name in enumerate(["publish", "ttl", "archive"], start=1):
        api.result(api.post("save_weights", {"model_id": model_id, "path": name, "seq_id": seq_id})["request_id"])
    assert client.post(_ckpt_url(model_id, "weights/publish") + "/publish").status_code == 200
    assert client.delete(_ckpt_url(model_id, "weights/publish")).status_code == 200
    assert client.delete(_ckpt_url(model_id, "weights/ttl")).status_code == 200
    assert list(_listed(client, model_id)) == ["weights/archive"]
    assert client.get(_ckpt_url(model_id, "weights/archive") + "/archive").status_code == 200


def test_unsupported_checkpoint_actions(api, client: TestClient) -> None:
    _, model_id, _ = trained_run(api)
    assert client.get(_ckpt_url(model_id, "external_weights/x") + "/external_weights_urls").status_code == 404
    assert client.get(_ckpt_url(model_id) + "/external_weights_urls").status_code == 400
    assert client.get(_ckpt_url(model_id) + "/nothing").status_code == 404
    assert client.put(_ckpt_url(model_id) + "/publish").status_code == 404
    assert client.get(_ckpt_url(model_id)).status_code == 404


# ---- hostile names and paths --------------------------------------------------------------------

BAD_NAMES = [
    "../x", "..", ".", "a/b", "..\\x", "%2e%2e", "%2e%2e%2fetc", "/etc/passwd", "/abs", "x\x00y", "\x00",
    ".hidden", "a" * 201, "a" * 100_000, "name with space",
]
BAD_PATHS = [
    "tinker://a/../b", "tinker://x/weights/..", "tinker://x/weights/.", "tinker://../weights/x",
    "tinker://x/weights/%2e%2e", "tinker://x%2F..%2F../weights/y", "tinker://x/weights/a/b", "tinker://x/weights/\x00",
    "tinker:///etc/passwd", "/etc/passwd", "file:///etc/passwd", "tinker://x/weights/" + "a" * 5000,
    "tinker://x/sampler_weights/.staging-x",
]


def test_hostile_save_names_are_400(api, client: TestClient, tmp_path) -> None:
    model_id = api.model(api.session())
    for seq_id, name in enumerate(BAD_NAMES, start=1):
        for endpoint in ("save_weights", "save_weights_for_sampler", "save_weights_external"):
            body = {"model_id": model_id, "path": name, "seq_id": seq_id if endpoint == "save_weights" else None}
            response = client.post(f"/api/v1/{endpoint}", json={k: v for k, v in body.items() if v is not None})
            assert response.status_code == 400, (endpoint, name[:20], response.text)
    state_files = {"tuft.db", "tuft.db-wal", "tuft.db-shm", SECRET_FILE}
    assert {p.name for p in (tmp_path / "checkpoints").iterdir()} <= state_files
    ok = api.post("save_weights", {"model_id": model_id, "path": "fine", "seq_id": len(BAD_NAMES) + 1})
    assert api.result(ok["request_id"])["path"].endswith("/weights/fine"), "rejected names consumed their seq_ids"


def test_hostile_tinker_paths_are_400(api, client: TestClient) -> None:
    session = api.session()
    model_id = api.model(session)
    for i, path in enumerate(BAD_PATHS):
        responses = {
            "weights_info": client.post("/api/v1/weights_info", json={"tinker_path": path}),
            "load": client.post(
                "/api/v1/load_weights", json={"session_id": session, "model_seq_id": 10 + i, "path": path, "optimizer": False}
            ),
            "legacy load": client.post(
                "/api/v1/load_weights", json={"model_id": model_id, "seq_id": i + 1, "path": path, "optimizer": False}
            ),
            "sampler": client.post(
                "/api/v1/create_sampling_session",
                json={"session_id": session, "sampling_session_seq_id": i, "model_path": path},
            ),
        }
        for what, response in responses.items():
            assert response.status_code == 400, (what, path[:40], response.text)


def test_hostile_rest_urls(api, client: TestClient) -> None:
    _, model_id, _ = trained_run(api)
    for url in [
        f"/api/v1/training_runs/{model_id}/checkpoints/weights/%2e%2e/archive",
        f"/api/v1/training_runs/{model_id}/checkpoints/weights/..%2F..%2Fx/archive",
        f"/api/v1/training_runs/{model_id}/checkpoints/weights/%00/archive",
        "/api/v1/training_runs/%2e%2e/checkpoints/weights/ckpt-1/archive",
        f"/api/v1/training_runs/{model_id}/checkpoints/weights/{'a' * 5000}/archive",
    ]:
        assert client.get(url).status_code in (400, 404), url


# ---- geometry -----------------------------------------------------------------------------------


def test_load_checks_recorded_geometry(api, client: TestClient, engine) -> None:
    base_model = engine.name
    session, model_id, path = trained_run(api)
    store = client.app.state.service.store
    ref = parse_tinker_path(path)
    record = store.get_checkpoint(ref)
    assert (record.base_model, record.lora.rank) == (base_model, 4)

    def load(**extra):
        body = {"session_id": session, "model_seq_id": 7, "path": path, "optimizer": True, **extra}
        return client.post("/api/v1/load_weights", json=body)

    store.put_checkpoint(dataclasses.replace(record, lora=LoraConfig(rank=64)))
    assert load().status_code == 400 and "at most 16" in load().json()["detail"]
    store.put_checkpoint(dataclasses.replace(record, base_model="gone/model"))
    assert "does not serve" in load().json()["detail"]
    store.put_checkpoint(record)
    assert load(base_model="other/model").status_code == 400
    sampler_path = f"tinker://{model_id}/sampler_weights/s-1"
    refused = client.post(
        "/api/v1/load_weights", json={"session_id": session, "model_seq_id": 8, "path": sampler_path, "optimizer": True}
    )
    assert refused.status_code == 400 and "no optimizer state" in refused.json()["detail"]
    assert api.result(load().json()["request_id"])["model_id"] == f"{session}:train:7"


def test_signed_archive_links_for_old_sdks(api, client: TestClient) -> None:
    """SDK <= 0.25 asks for `{"url", "expires"}` (Accept: application/json) and downloads the
    URL without an API key."""
    _, model_id, _ = trained_run(api)
    url = _ckpt_url(model_id) + "/archive"
    link = client.get(url, headers={"Accept": "application/json"}).json()
    expires = datetime.fromisoformat(link["expires"])
    assert 800 < (expires - datetime.now(UTC)).total_seconds() <= 900
    keyless = TestClient(client.app, raise_server_exceptions=False)  # same running app, no key
    downloaded = keyless.get(link["url"])
    assert downloaded.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(downloaded.content), mode="r:gz") as tar:
        assert "ckpt-1/adapter.json" in tar.getnames()

    tampered = link["url"][:-1] + ("0" if link["url"][-1] != "0" else "1")
    stale = link["url"].replace("expires=", "expires=1")
    assert keyless.get(tampered).status_code == 404
    assert keyless.get(stale).status_code == 404
    assert keyless.get(url).status_code == 401
    assert keyless.get(url + "?sig=abc").status_code == 404
    # The exemption covers exactly this GET: nothing else works without a key.
    assert keyless.delete(_ckpt_url(model_id) + "?sig=abc").status_code == 401
    assert keyless.get(f"/api/v1/training_runs/{model_id}?sig=abc").status_code == 401
    assert keyless.get(f"/api/v1/training_runs/{model_id}/checkpoints/weights/archive?sig=abc").status_code == 401
