"""Error responses: JSON `detail`, Content-Length always set, the right status codes."""

from __future__ import annotations

import pytest
from starlette.routing import Route
from starlette.testclient import TestClient


def assert_json_error(response, status: int, detail_part: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["content-length"]) == len(response.content) > 0
    assert detail_part in response.json()["detail"]


def test_unknown_route_is_json_404(client: TestClient) -> None:
    assert_json_error(client.get("/api/v1/nope"), 404, "Not Found")


def test_wrong_method_is_json_405(client: TestClient) -> None:
    assert_json_error(client.get("/api/v1/create_session"), 405, "Method Not Allowed")


def test_missing_api_key_is_401_but_health_is_open(client: TestClient) -> None:
    del client.headers["X-API-Key"]
    assert_json_error(client.post("/api/v1/client/config", json={}), 401, "X-API-Key")
    assert client.get("/api/v1/healthz").json() == {"status": "ok"}
    assert client.get("/healthz").json() == {"status": "ok"}


@pytest.mark.parametrize("body", [b"{", b"", b"[1]", b'{"session_id": 5}'])
def test_malformed_json_is_400(client: TestClient, body: bytes) -> None:
    assert_json_error(client.post("/api/v1/session_heartbeat", content=body), 400, "invalid request body")


def test_unknown_ids_are_404(client: TestClient) -> None:
    assert_json_error(client.post("/api/v1/retrieve_future", json={"request_id": "x"}), 404, "unknown request_id")
    assert_json_error(client.post("/api/v1/get_info", json={"model_id": "s:train:0"}), 404, "unknown model_id")
    assert_json_error(client.post("/api/v1/session_heartbeat", json={"session_id": "s"}), 404, "unknown session")


def test_input_error_is_400_and_capacity_error_is_429(client: TestClient, api, engine) -> None:
    session = api.session()
    body = {"session_id": session, "model_seq_id": 0, "base_model": "other/model", "lora_config": {"rank": 8}}
    assert_json_error(client.post("/api/v1/create_model", json=body), 400, "unknown base model")

    model_id = api.model(session)
    path = api.result(api.post("save_weights", {"model_id": model_id, "path": "c", "seq_id": 1})["request_id"])["path"]
    engine.max_adapters = 1
    body = {"session_id": session, "sampling_session_seq_id": 0, "model_path": path}
    assert_json_error(client.post("/api/v1/create_sampling_session", json=body), 429, "no free adapter slot")


def test_unexpected_exception_is_logged_500_and_server_keeps_serving(client: TestClient, caplog) -> None:
    async def explode(_):
        raise RuntimeError("kaboom")

    client.app.router.routes.append(Route("/api/v1/explode", explode))
    with caplog.at_level("ERROR"):
        assert_json_error(client.get("/api/v1/explode"), 500, "RuntimeError: kaboom")
    assert "unhandled error in GET /api/v1/explode" in caplog.text
    assert client.get("/api/v1/healthz").status_code == 200
