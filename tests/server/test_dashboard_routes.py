"""The dashboard's page and JSON routes against the fake engine: the static page is public, the
data is the caller's only, and each forward_backward / optim_step lands in its step's curves."""

from __future__ import annotations

import math

import pytest
from conftest import BASE_MODEL, Api, FakeEngine
from starlette.testclient import TestClient
from test_training_routes import fwd_body, optim, post_fwd

from server.dashboard import ASSETS

OTHER_KEY = "tml-another-tenant"


@pytest.fixture
def engine(text_engine: FakeEngine) -> FakeEngine:
    return text_engine


def _done(api: Api, response) -> object:
    assert response.status_code == 200, response.text
    return api.result(response.json()["request_id"])


def _train(api: Api, client: TestClient, model_id: str, steps: int, *, passes: int = 1) -> int:
    """`steps` optimizer steps, each after `passes` forward_backward calls; returns the next seq_id."""
    seq_id = 1
    for _ in range(steps):
        for _ in range(passes):
            _done(api, post_fwd(client, fwd_body(model_id, seq_id)))
            seq_id += 1
        _done(api, client.post("/api/v1/optim_step", json=optim(model_id, seq_id, lr=0.1)))
        seq_id += 1
    return seq_id


def _other(client: TestClient) -> TestClient:
    return TestClient(client.app, headers={"X-API-Key": OTHER_KEY}, raise_server_exceptions=False)


def test_the_page_is_served_without_a_key_and_the_data_needs_one(client: TestClient) -> None:
    keyless = TestClient(client.app, raise_server_exceptions=False)
    for path, (_, media_type) in ASSETS.items():
        response = keyless.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"] == media_type
        assert "script-src 'self'" in response.headers["content-security-policy"]
    assert "/dashboard/app.js" in keyless.get("/dashboard").text
    for path in ("/dashboard/api/runs", "/dashboard/api/health", "/dashboard/api/models", "/dashboard/api/runs/x"):
        assert keyless.get(path).status_code == 401, path
    assert keyless.post("/dashboard/api/sample", json={"model": BASE_MODEL, "prompt": "hi"}).status_code == 401
    assert keyless.get("/dashboard/").status_code in (401, 404)


def test_each_step_is_recorded_with_its_metrics(api: Api, client: TestClient) -> None:
    model_id = api.model(api.session(), rank=4)
    seq_id = _train(api, client, model_id, steps=2, passes=2)
    _done(api, post_fwd(client, fwd_body(model_id, seq_id)))  # the next step's pass, no optim_step yet
    _done(api, post_fwd(client, fwd_body(model_id, seq_id + 1, forward_only=True)))

    [run] = client.get("/dashboard/api/runs").json()["runs"]
    assert (run["model_id"], run["base_model"], run["step"], run["status"]) == (model_id, BASE_MODEL, 2, "training")
    assert run["lora"]["rank"] == 4 and run["session_id"] == model_id.split(":train:")[0]

    curves = client.get(f"/dashboard/api/runs/{model_id}").json()["curves"]
    series = curves["series"]
    assert curves["steps"] == [1, 2]
    # Fake engine: each pass has 4 tokens, all weighted 1, loss:sum = 4 * (1 + weight); the
    # gradient is 4 per pass, so 8 per step, and the weight moves by -0.1 * 8 per step.
    assert series["tokens"] == [8.0, 8.0] and series["weighted_tokens"] == [8.0, 8.0]
    assert series["loss:sum"] == pytest.approx([8.0, 8.0 * (1 - 0.8)])
    assert series["loss_per_token"] == pytest.approx([1.0, 1 - 0.8])
    assert series["grad_norm:mean"] == pytest.approx([8.0, 8.0])
    assert series["learning_rate"] == pytest.approx([0.1, 0.1])
    assert all(s >= 0 and math.isfinite(s) for s in series["step_seconds"])


def test_a_failed_step_is_not_counted(api: Api, client: TestClient) -> None:
    model_id = api.model(api.session(), rank=4)
    seq_id = _train(api, client, model_id, steps=1)
    bad = {"model_id": model_id, "seq_id": seq_id, "adam_params": {"learning_rate": -1.0}}
    assert client.post("/api/v1/optim_step", json=bad).status_code == 400
    _done(api, client.post("/api/v1/optim_step", json=optim(model_id, seq_id + 1)))
    assert client.get(f"/dashboard/api/runs/{model_id}").json()["curves"]["steps"] == [1, 2]


def test_checkpoints_with_size_ttl_visibility_and_download(api: Api, client: TestClient) -> None:
    model_id = api.model(api.session(), rank=4)
    _done(api, client.post("/api/v1/save_weights", json={"model_id": model_id, "path": "state", "seq_id": 1, "ttl_seconds": 3600}))
    _done(api, client.post("/api/v1/save_weights_for_sampler", json={"model_id": model_id, "path": "smp", "seq_id": 2}))
    client.post(f"/api/v1/training_runs/{model_id}/checkpoints/sampler_weights/smp/publish")

    state, sampler = client.get(f"/dashboard/api/runs/{model_id}").json()["checkpoints"]
    assert (state["kind"], state["name"], state["public"]) == ("weights", "state", False)
    assert state["size_bytes"] > 0 and state["expires_at"] is not None
    assert (sampler["tinker_path"], sampler["public"], sampler["expires_at"]) == (
        f"tinker://{model_id}/sampler_weights/smp", True, None
    )
    link = client.get(state["archive"], headers={"Accept": "application/json"}).json()["url"]
    download = TestClient(client.app).get(link)
    assert download.status_code == 200 and download.content[:2] == b"\x1f\x8b"
    models = client.get("/dashboard/api/models").json()
    assert models == {"base_models": [BASE_MODEL], "sampler_checkpoints": [sampler["tinker_path"]]}


def test_the_playground_samples_base_models_and_sampler_checkpoints(api: Api, client: TestClient) -> None:
    model_id = api.model(api.session(), rank=4)
    _done(api, client.post("/api/v1/save_weights_for_sampler", json={"model_id": model_id, "path": "smp", "seq_id": 1}))
    for model in (BASE_MODEL, f"tinker://{model_id}/sampler_weights/smp"):
        response = client.post("/dashboard/api/sample", json={"model": model, "prompt": "Hello", "max_tokens": 5})
        assert response.status_code == 200, response.text
        body = response.json()
        assert len(body["tokens"]) == 5 and body["finish"] == "length" and body["prompt_tokens"] > 0
        assert [t["logprob"] for t in body["tokens"]] == [-0.5] * 5  # the fake engine's logprobs
        assert "".join(t["text"] for t in body["tokens"]) == body["text"]


@pytest.mark.parametrize(
    "body",
    [
        {"model": BASE_MODEL, "prompt": "hi", "max_tokens": 0},
        {"model": BASE_MODEL, "prompt": "hi", "top_p": 0},
        {"model": BASE_MODEL, "prompt": "hi", "temperature": -1},
        {"model": BASE_MODEL, "prompt": ""},
        {"model": "no/such-model", "prompt": "hi"},
        {"model": BASE_MODEL, "prompt": "hi", "seed": 1},
    ],
)
def test_the_playground_refuses_bad_requests(client: TestClient, body: dict) -> None:
    response = client.post("/dashboard/api/sample", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["detail"]


def test_another_tenant_sees_none_of_it(api: Api, client: TestClient) -> None:
    model_id = api.model(api.session(), rank=4)
    _train(api, client, model_id, steps=1)
    _done(api, client.post("/api/v1/save_weights_for_sampler", json={"model_id": model_id, "path": "smp", "seq_id": 3}))
    other = _other(client)
    assert other.get("/dashboard/api/runs").json() == {"runs": [], "total": 0}
    assert other.get(f"/dashboard/api/runs/{model_id}").status_code == 404
    assert other.get("/dashboard/api/models").json()["sampler_checkpoints"] == []
    sample = {"model": f"tinker://{model_id}/sampler_weights/smp", "prompt": "hi", "max_tokens": 2}
    assert other.post("/dashboard/api/sample", json=sample).status_code == 404
    assert client.post("/dashboard/api/sample", json=sample).status_code == 200


def test_health_shows_the_metrics_figures(api: Api, client: TestClient) -> None:
    model_id = api.model(api.session(), rank=4)
    _train(api, client, model_id, steps=1)
    health = client.get("/dashboard/api/health").json()
    assert health["xla_compiles"] >= 0
    model = health["models"][BASE_MODEL]
    assert model["queue_depth"] == 0
    assert model["calls"]["forward_backward"] == 1 and model["tokens_per_second"]["forward_backward"] > 0
    assert model["kv"]["total"] == 64
