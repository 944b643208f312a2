"""API keys and tenancy: keys are hashed at rest and managed with `tuft api-key`; unknown
keys get 401 once keys are enforced; every owned thing answers 404 to another tenant, except
public checkpoints, which everyone can read (but only the owner can change)."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.responses import PlainTextResponse
from starlette.testclient import TestClient
from tinker import types as T
from tinker.proto.request_conv import forward_backward_request_to_proto

from server import cli
from server.api_keys import ApiKeyAuth, anonymous_owner, create_api_key, verify_api_key
from server.auth import RequireApiKey, current_owner, visible_to_caller
from server.store import Quota
from server.store_sql import SqlStore

OTHER_KEY = "tml-someone-else"


def fwd_body(model_id: str, seq_id: int) -> bytes:
    datum = T.Datum(model_input=T.ModelInput.from_ints([1, 2]), loss_fn_inputs={"target_tokens": [2, 3]})
    request = T.ForwardBackwardRequest(
        forward_backward_input=T.ForwardBackwardInput(data=[datum], loss_fn="cross_entropy"),
        model_id=model_id,
        seq_id=seq_id,
    )
    return forward_backward_request_to_proto(request).SerializeToString()


def post_fwd(client, body: bytes):
    return client.post("/api/v1/forward_backward", content=body, headers={"Content-Type": "application/x-protobuf"})


def optim(model_id: str, seq_id: int) -> dict:
    return {"model_id": model_id, "seq_id": seq_id, "adam_params": {"learning_rate": 0.1}}


class KeyedClient:
    """The test client, sending another API key."""

    def __init__(self, client: TestClient, key: str) -> None:
        self._client, self._headers = client, {"X-API-Key": key}

    def __getattr__(self, method: str):
        def call(url: str, **kwargs):
            return getattr(self._client, method)(url, headers={**kwargs.pop("headers", {}), **self._headers}, **kwargs)

        return call


@pytest.fixture
def other(client: TestClient) -> KeyedClient:
    return KeyedClient(client, OTHER_KEY)


@pytest.fixture
def keyed_app(make_client, engine):
    """An app whose requests carry no key unless given; key checks are not cached."""
    return lambda **options: make_client(engine, api_key=None, auth_cache_s=0.0, **options)


# ---- keys ---------------------------------------------------------------------------------------


def test_keys_are_hashed_at_rest(tmp_path: Path) -> None:
    store = SqlStore.sqlite(tmp_path / "tuft.db")
    key, record = create_api_key(store, "ci")
    assert key.startswith("tml-") and record.key_id in key
    secret = key.rsplit("-", 1)[1]
    assert secret not in record.secret_hash and secret not in (tmp_path / "tuft.db").read_bytes().decode("latin-1")
    assert verify_api_key(store, key) == record
    assert verify_api_key(store, key[:-1] + ("0" if key[-1] != "0" else "1")) is None
    assert verify_api_key(store, "tml-anything") is None
    store.revoke_api_key(record.key_id, record.created_at)
    assert verify_api_key(store, key) is None
    with pytest.raises(ValueError):
        create_api_key(store, "  ")


def test_auth_modes(tmp_path: Path) -> None:
    store = SqlStore.sqlite(":memory:")
    auto, required, open_ = (ApiKeyAuth(store, mode, cache_s=0) for mode in ("auto", "required", "open"))
    assert auto.owner("tml-x") == open_.owner("tml-x") == anonymous_owner("tml-x") != anonymous_owner("tml-y")
    assert required.owner("tml-x") is None and auto.owner("") is None
    key, record = create_api_key(store, "ci")
    assert auto.owner("tml-x") is None, "auto enforces keys once one exists"
    assert open_.owner("tml-x") == anonymous_owner("tml-x")
    assert auto.owner(key) == required.owner(key) == open_.owner(key) == record.key_id
    with pytest.raises(ValueError):
        ApiKeyAuth(store, "sometimes")  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["auto", "open"])
def test_unregistered_keys_need_the_tml_prefix(keyed_app, mode: str) -> None:
    auth = ApiKeyAuth(SqlStore.sqlite(":memory:"), mode, cache_s=0)  # type: ignore[arg-type]
    assert auth.owner("tml-x") == anonymous_owner("tml-x")
    assert [auth.owner(key) for key in ("x", "TML-x", "sk-tml-x", " tml-x")] == [None] * 4
    with keyed_app(auth=mode) as client:
        refused = client.post("/api/v1/client/config", json={}, headers={"X-API-Key": "sk-123"})
        assert refused.status_code == 401 and refused.json()["detail"]
        assert client.post("/api/v1/client/config", json={}, headers={"X-API-Key": "tml-123"}).status_code == 200


def test_a_request_without_a_caller_owns_nothing() -> None:
    """Outside requests everything is visible; inside one, only the authenticated caller's
    things; an exempt request (no caller) sees nothing at all."""
    store = SqlStore.sqlite(":memory:")
    key, record = create_api_key(store, "alice")
    seen: list[tuple[str | None, bool, bool]] = []

    async def app(scope, receive, send) -> None:
        seen.append((current_owner(), visible_to_caller(record.key_id), visible_to_caller("")))
        await PlainTextResponse("ok")(scope, receive, send)

    client = TestClient(RequireApiKey(app, ApiKeyAuth(store, "required")))
    assert client.get("/healthz").status_code == client.head("/metrics").status_code == 200
    assert client.get("/api/v1/training_runs/x/checkpoints/a/b/archive?sig=1").status_code == 200
    assert client.get("/api/v1/training_runs/x/checkpoints/external_weights/b/files/f?sig=1").status_code == 200
    assert client.get("/api/v1/training_runs/x/checkpoints/weights/b/files/f?sig=1").status_code == 401
    assert client.get("/api/v1/training_runs/x/checkpoints/external_weights/b/files/f/g?sig=1").status_code == 401
    assert client.get("/api/v1/healthz", headers={"X-API-Key": key}).status_code == 200
    assert client.get("/api/v1/training_runs/x/checkpoints/weights/healthz").status_code == 401
    assert client.get("/api/v1/training_runs/x/checkpoints/a/b/archive?xsig=1").status_code == 401
    assert client.post("/healthz").status_code == 401, "exemptions match the method too"
    assert client.get("/owned", headers={"X-API-Key": key}).status_code == 200
    assert seen == [(None, False, False)] * 5 + [(record.key_id, True, False)]
    assert (current_owner(), visible_to_caller(record.key_id), visible_to_caller("")) == (None, True, True)


def test_cache_delays_enforcement_by_at_most_its_ttl() -> None:
    now = [0.0]
    store = SqlStore.sqlite(":memory:")
    auth = ApiKeyAuth(store, "auto", cache_s=5, clock=lambda: now[0])
    assert auth.owner("tml-x") is not None
    create_api_key(store, "ci")
    assert auth.owner("tml-x") is not None, "still cached"
    now[0] += 6
    assert auth.owner("tml-x") is None


def test_cli_create_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    where = ["--checkpoint-dir", str(tmp_path / "ckpt")]
    cli.main(["api-key", "create", "--name", "laptop", *where])
    out, err = capsys.readouterr()
    key = out.strip()
    assert key.startswith("tml-") and "cannot be shown again" in err
    cli.main(["api-key", "list", "--db", f"sqlite:///{tmp_path / 'ckpt' / 'tuft.db'}"])
    listed = capsys.readouterr().out
    key_id = key.split("-")[1]
    assert key_id in listed and "laptop" in listed and "active" in listed and key not in listed
    cli.main(["api-key", "revoke", key_id, *where])
    cli.main(["api-key", "list", *where])
    assert "revoked" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no active API key"):
        cli.main(["api-key", "revoke", key_id, *where])
    with pytest.raises(SystemExit, match="unsupported database URL"):
        cli.main(["api-key", "list", "--db", "mysql://x/y"])


def test_cli_quotas(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    where = ["--checkpoint-dir", str(tmp_path / "ckpt")]
    cli.main(["api-key", "create", "--name", "student", "--max-runs", "2", *where])
    key_id = capsys.readouterr().out.strip().split("-")[1]
    cli.main(["api-key", "quota", key_id, "--tokens-per-day", "1000", *where])
    assert capsys.readouterr().out.strip() == f"{key_id}\truns<=2 tokens/day<=1000"
    cli.main(["api-key", "quota", key_id, "--max-runs", "none", *where])
    assert capsys.readouterr().out.strip() == f"{key_id}\truns<=any tokens/day<=1000"
    cli.main(["api-key", "list", *where])
    assert "runs<=any tokens/day<=1000\tstudent" in capsys.readouterr().out
    store = SqlStore.sqlite(tmp_path / "ckpt" / "tuft.db")
    assert store.get_quota(key_id) == Quota(None, 1000)
    with pytest.raises(SystemExit, match="no API key"):
        cli.main(["api-key", "quota", "0" * 12, "--max-runs", "1", *where])
    with pytest.raises(SystemExit):
        cli.main(["api-key", "quota", key_id, "--max-runs", "0", *where])


def test_enforced_keys(keyed_app, make_api, tmp_path: Path) -> None:
    store = SqlStore.sqlite(tmp_path / "checkpoints" / "tuft.db")
    key, _ = create_api_key(store, "ci")
    revoked, revoked_record = create_api_key(store, "old")
    store.revoke_api_key(revoked_record.key_id, revoked_record.created_at)
    with keyed_app() as client:
        for headers in ({}, {"X-API-Key": "tml-unknown"}, {"X-API-Key": revoked}):
            response = client.post("/api/v1/client/config", json={}, headers=headers)
            assert response.status_code == 401, headers
            assert response.json()["detail"] and int(response.headers["content-length"]) > 0
        assert client.get("/api/v1/healthz").status_code == 200
        authed = make_api(KeyedClient(client, key))
        session = authed.session()
        assert client.get(f"/api/v1/sessions/{session}", headers={"X-API-Key": key}).status_code == 200


def test_required_mode_without_keys_refuses_everyone(keyed_app) -> None:
    with keyed_app(auth="required") as client:
        assert client.post("/api/v1/client/config", json={}, headers={"X-API-Key": "tml-x"}).status_code == 401


def test_open_mode_accepts_any_key(keyed_app, tmp_path: Path) -> None:
    create_api_key(SqlStore.sqlite(tmp_path / "checkpoints" / "tuft.db"), "ci")
    with keyed_app(auth="open") as client:
        assert client.post("/api/v1/client/config", json={}, headers={"X-API-Key": "tml-any"}).status_code == 200


# ---- tenancy ------------------------------------------------------------------------------------


def trained(api) -> tuple[str, str, str, str]:
    """A session with a model, a training checkpoint and a sampler checkpoint."""
    session = api.session()
    model_id = api.model(session, rank=4)
    api.result(api.post("save_weights", {"model_id": model_id, "path": "ckpt", "seq_id": 1})["request_id"])
    api.result(api.post("save_weights_for_sampler", {"model_id": model_id, "path": "smp", "seq_id": 2})["request_id"])
    return session, model_id, f"tinker://{model_id}/weights/ckpt", f"tinker://{model_id}/sampler_weights/smp"


def test_another_tenant_sees_nothing(api, client: TestClient, other: KeyedClient, engine, make_api) -> None:
    base_model = engine.name
    session, model_id, state, sampler_path = trained(api)
    sampler_id = api.post(
        "create_sampling_session", {"session_id": session, "sampling_session_seq_id": 0, "base_model": base_model}
    )["sampling_session_id"]
    pending = api.post("optim_step", optim(model_id, 3))["request_id"]
    api.result(pending)
    run_url = f"/api/v1/training_runs/{model_id}"
    ckpt_url = f"{run_url}/checkpoints/weights/ckpt"
    other_session = make_api(other).session()

    not_found = [
        other.get(f"/api/v1/sessions/{session}"),
        other.post("/api/v1/session_heartbeat", json={"session_id": session}),
        other.post(f"/api/v1/sessions/{session}/finish", json={}),
        other.post("/api/v1/create_model", json={"session_id": session, "model_seq_id": 5, "base_model": base_model}),
        other.post(
            "/api/v1/create_sampling_session",
            json={"session_id": session, "sampling_session_seq_id": 9, "base_model": base_model},
        ),
        other.post("/api/v1/get_info", json={"model_id": model_id}),
        post_fwd(other, fwd_body(model_id, 4)),
        other.post("/api/v1/optim_step", json=optim(model_id, 4)),
        other.post("/api/v1/save_weights", json={"model_id": model_id, "path": "x", "seq_id": 4}),
        other.post("/api/v1/load_weights", json={"model_id": model_id, "seq_id": 4, "path": state, "optimizer": True}),
        other.post(
            "/api/v1/load_weights",
            json={"session_id": other_session, "model_seq_id": 0, "path": state, "optimizer": True},
        ),
        other.post(
            "/api/v1/create_sampling_session",
            json={"session_id": other_session, "sampling_session_seq_id": 0, "model_path": sampler_path},
        ),
        other.post(
            "/api/v1/asample",
            json={"sampling_session_id": sampler_id, "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1]}]},
                  "sampling_params": {"max_tokens": 1}},
        ),
        other.post("/api/v1/retrieve_future", json={"request_id": pending}),
        other.get(f"/api/v1/samplers/{sampler_id}"),
        other.get(run_url),
        other.get(f"{run_url}?access_scope=accessible"),
        other.get(f"{run_url}/checkpoints"),
        other.post("/api/v1/weights_info", json={"tinker_path": state}),
        other.delete(ckpt_url),
        other.post(f"{ckpt_url}/publish"),
        other.delete(f"{ckpt_url}/publish"),
        other.put(f"{ckpt_url}/ttl", json={"ttl_seconds": 3600}),
        other.get(f"{ckpt_url}/archive"),
    ]
    assert [r.status_code for r in not_found] == [404] * len(not_found), [r.text for r in not_found if r.status_code != 404]
    assert other.get("/api/v1/sessions").json()["sessions"] == [other_session]
    assert other.get("/api/v1/training_runs").json()["training_runs"] == []
    assert other.get("/api/v1/training_runs?access_scope=accessible").json()["cursor"]["total_count"] == 0
    assert other.get("/api/v1/checkpoints").json()["checkpoints"] == []

    # Nothing was changed by the attempts: the owner still has everything, training continues.
    assert client.get(f"/api/v1/sessions/{session}").status_code == 200
    assert [c["checkpoint_id"] for c in client.get("/api/v1/checkpoints").json()["checkpoints"]] == [
        "weights/ckpt",
        "sampler_weights/smp",
    ]
    assert not client.get(f"{run_url}/checkpoints").json()["checkpoints"][0].get("public", False)
    assert api.result(api.post("optim_step", optim(model_id, 4))["request_id"])["metrics"] is not None


def test_public_checkpoints_are_readable_by_all(api, client: TestClient, other: KeyedClient, engine, make_api) -> None:
    _, model_id, state, sampler_path = trained(api)
    run_url = f"/api/v1/training_runs/{model_id}"
    for path in (state, sampler_path):
        checkpoint_id = path.split("/", 3)[3]
        assert client.post(f"{run_url}/checkpoints/{checkpoint_id}/publish").status_code == 200
    stranger = make_api(other)
    session = stranger.session()

    info = stranger.post("weights_info", {"tinker_path": state})
    assert (info["base_model"], info["lora_rank"]) == (engine.name, 4)
    listed = other.get(f"{run_url}/checkpoints").json()["checkpoints"]
    assert {c["checkpoint_id"] for c in listed} == {"weights/ckpt", "sampler_weights/smp"}
    assert all(c["public"] for c in listed)
    assert other.get(run_url).status_code == 404, "access_scope=owned shows only the caller's runs"
    run = other.get(f"{run_url}?access_scope=accessible").json()
    assert run["training_run_id"] == model_id and run["last_checkpoint"]["public"]
    runs = other.get("/api/v1/training_runs?access_scope=accessible").json()
    assert [r["training_run_id"] for r in runs["training_runs"]] == [model_id]
    with tarfile.open(fileobj=io.BytesIO(other.get(f"{run_url}/checkpoints/weights/ckpt/archive").content)) as tar:
        assert "ckpt/adapter.json" in tar.getnames()

    # Loadable: a sampler on the public weights, a training run from the public state.
    sampler = stranger.post(
        "create_sampling_session", {"session_id": session, "sampling_session_seq_id": 0, "model_path": sampler_path}
    )
    assert sampler["sampling_session_id"] == f"{session}:sample:0"
    loaded = stranger.post("load_weights", {"session_id": session, "model_seq_id": 0, "path": state, "optimizer": True})
    assert stranger.result(loaded["request_id"])["model_id"] == f"{session}:train:0"

    # ...but not changeable by anyone but the owner.
    for response in (
        other.delete(f"{run_url}/checkpoints/weights/ckpt"),
        other.delete(f"{run_url}/checkpoints/weights/ckpt/publish"),
        other.put(f"{run_url}/checkpoints/weights/ckpt/ttl", json={"ttl_seconds": 3600}),
    ):
        assert response.status_code == 404
    assert client.delete(f"{run_url}/checkpoints/weights/ckpt/publish").status_code == 200
    assert other.post("/api/v1/weights_info", json={"tinker_path": state}).status_code == 404


@pytest.fixture
def two_keys(keyed_app, tmp_path: Path) -> Iterator[tuple[TestClient, str, str]]:
    store = SqlStore.sqlite(tmp_path / "checkpoints" / "tuft.db")
    first, _ = create_api_key(store, "a")
    second, _ = create_api_key(store, "b")
    with keyed_app() as client:
        yield client, first, second


def test_registered_keys_are_separate_tenants(two_keys, make_api) -> None:
    client, first, second = two_keys
    api = make_api(KeyedClient(client, first))
    session, model_id, _, _ = trained(api)
    run = client.get(f"/api/v1/training_runs/{model_id}", headers={"X-API-Key": first}).json()
    assert run["model_owner"] == first.split("-")[1]
    assert client.get(f"/api/v1/sessions/{session}", headers={"X-API-Key": second}).status_code == 404
