"""Restart safety with the fake engine: what a dead process left behind (pending requests,
active sessions, half-written or unrecorded checkpoints) is resolved at startup; atomic saves
leave nothing visible when they fail; silent sessions expire and free their adapters."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from server import checkpoint_files
from server.api_keys import anonymous_owner
from server.futures import LOST, RESTARTED
from server.paths import CheckpointRef
from server.store import CheckpointRecord, SessionRecord, TrainingRunRecord
from server.store_sql import SqlStore
from tuft_jax.types import LoraConfig

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_work_of_a_dead_process_is_resolved_at_startup(engine, make_client, tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    client = make_client(engine)
    owner = anonymous_owner(client.headers["x-api-key"])
    store = SqlStore.sqlite(root / "tuft.db")  # what the previous process had written
    store.put_session(SessionRecord("old-session", owner, NOW, NOW))
    store.add_future("in-flight", owner, NOW)
    store.add_future("saved", owner, NOW)
    store.finish_future("saved", "done", "application/json", b'{"path":"tinker://x/weights/y"}', NOW)
    store.add_future("proto", owner, NOW)
    store.finish_future("proto", "done", "application/x-protobuf", None, NOW)
    store.add_future("theirs", "someone-else", NOW)
    store.close()

    with client:

        def retrieve(request_id: str):
            return client.post("/api/v1/retrieve_future", json={"request_id": request_id})

        assert retrieve("in-flight").json() == msgspec.to_builtins(RESTARTED)
        assert retrieve("in-flight").json()["category"] == "server"
        assert retrieve("saved").json() == {"path": "tinker://x/weights/y"}
        assert retrieve("proto").json() == msgspec.to_builtins(LOST)
        assert retrieve("theirs").status_code == 404
        assert retrieve("never-existed").status_code == 404
        heartbeat = client.post("/api/v1/session_heartbeat", json={"session_id": "old-session"})
        assert heartbeat.status_code == 410, "sessions of the dead process are over"


def test_futures_and_runs_survive_a_restart(engine, make_client, make_api) -> None:
    with make_client(engine) as client:
        api = make_api(client)
        session = api.session()
        model_id = api.model(session)
        saved = api.post("save_weights", {"model_id": model_id, "path": "ckpt", "seq_id": 1})["request_id"]
        api.result(saved)
    engine = type(engine)()  # a new process: no adapters
    with make_client(engine) as client:
        api = make_api(client)
        assert api.result(saved) == {"type": "save_weights", "path": f"tinker://{model_id}/weights/ckpt"}
        runs = client.get("/api/v1/training_runs").json()["training_runs"]
        assert [r["training_run_id"] for r in runs] == [model_id]
        assert runs[0]["last_checkpoint"]["checkpoint_id"] == "weights/ckpt"
        assert client.post("/api/v1/get_info", json={"model_id": model_id}).status_code == 404, "its adapter is gone"
        new_session = api.session()
        body = {"session_id": new_session, "model_seq_id": 0, "path": f"tinker://{model_id}/weights/ckpt", "optimizer": True}
        assert api.result(api.post("load_weights", body)["request_id"])["model_id"] == f"{new_session}:train:0"


def test_disk_is_reconciled_with_the_store(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    store = SqlStore.sqlite(root / "tuft.db")
    lora = LoraConfig(rank=4)
    store.put_training_run(TrainingRunRecord("m:train:0", "s", "alice", "base", lora, NOW, NOW))
    kind_dir = root / "m:train:0" / "weights"

    def make(name: str) -> Path:
        (kind_dir / name).mkdir(parents=True)
        (kind_dir / name / "data").write_text(name)
        return kind_dir / name

    make(".pending-half-0123")  # a save that never finished
    make(".staging-.pending-half-0123-4567")  # the engine's own staging
    make(".deleted-gone-89ab")  # a delete that never finished
    make(".replaced-swapped-cdef")  # overwrite interrupted between the two renames
    make("kept")
    make(".replaced-kept-0000")  # overwrite interrupted after the new one was in place
    make("unrecorded")  # saved, but the process died before writing the record
    (root / "unknown:train:0" / "weights" / "stray").mkdir(parents=True)
    recorded = CheckpointRecord(CheckpointRef("m:train:0", "weights", "kept"), "alice", NOW, 1)
    vanished = CheckpointRecord(CheckpointRef("m:train:0", "weights", "vanished"), "alice", NOW, 1)
    store.put_checkpoint(recorded)
    store.put_checkpoint(vanished)

    checkpoint_files.recover(store, root)

    assert sorted(p.name for p in kind_dir.iterdir()) == ["kept", "swapped", "unrecorded"]
    assert (kind_dir / "swapped" / "data").read_text() == ".replaced-swapped-cdef"
    assert (kind_dir / "kept" / "data").read_text() == "kept"
    names = {r.ref.name: r for r in store.list_checkpoints().items}
    assert set(names) == {"kept", "swapped", "unrecorded"}
    assert names["unrecorded"].owner == "alice" and names["unrecorded"].lora == lora
    assert names["unrecorded"].size_bytes == len("unrecorded")
    assert (root / "unknown:train:0" / "weights" / "stray").is_dir(), "not ours to delete"


def test_failed_saves_leave_nothing_visible(engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    export_peft = engine.export_peft

    def failing_export(slot: int, directory: Path) -> int:
        if engine.fail_export:
            raise OSError("disk full")
        return export_peft(slot, directory)

    monkeypatch.setattr(engine, "export_peft", failing_export, raising=False)
    slot = engine.create_adapter(LoraConfig(rank=2))
    target = tmp_path / "m" / "sampler_weights" / "s"
    engine.fail_export = True
    with pytest.raises(OSError):
        checkpoint_files.save(engine, slot, target, "sampler_weights", replace=False)
    assert list(target.parent.iterdir()) == []

    engine.fail_export = False
    checkpoint_files.save(engine, slot, target, "sampler_weights", replace=False)
    before = json.loads((target / "adapter.json").read_text())
    engine.adapters[slot]["weight"] = 5.0
    engine.fail_export = True
    with pytest.raises(OSError):
        checkpoint_files.save(engine, slot, target, "sampler_weights", replace=True)
    assert json.loads((target / "adapter.json").read_text()) == before, "the old checkpoint is intact"
    assert [p.name for p in target.parent.iterdir()] == ["s"]
    with pytest.raises(Exception, match="already exists"):
        checkpoint_files.save(engine, slot, target, "sampler_weights", replace=False)


def test_silent_sessions_expire_and_free_their_adapters(engine, make_client, make_api) -> None:
    with make_client(engine, session_timeout_s=0.2) as client:
        api = make_api(client)
        quiet, alive = api.session(), api.session()
        quiet_model, alive_model = api.model(quiet), api.model(alive, rank=2)
        sampler = api.post(
            "save_weights_for_sampler", {"model_id": quiet_model, "sampling_session_seq_id": 0, "seq_id": 1}
        )
        api.result(sampler["request_id"])
        assert len(engine.adapters) == 3
        time.sleep(0.3)
        assert client.post("/api/v1/session_heartbeat", json={"session_id": alive}).status_code == 200
        client.portal.call(client.app.state.service.sweep)
        api.post("get_info", {"model_id": alive_model})  # queues behind the releases
        deadline = time.monotonic() + 5
        while len(engine.adapters) != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [a["lora"].rank for a in engine.adapters.values()] == [2], "only the live session's adapter is left"
        assert client.post("/api/v1/session_heartbeat", json={"session_id": quiet}).status_code == 410
        assert client.post("/api/v1/get_info", json={"model_id": quiet_model}).status_code == 404
        assert client.app.state.service.store.get_session(quiet).finished == "expired"
