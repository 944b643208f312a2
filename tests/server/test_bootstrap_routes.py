"""Client bootstrap, sessions and capability endpoints."""

from __future__ import annotations

from starlette.testclient import TestClient
from tinker import types as T


def test_client_config_is_valid_for_the_sdk(client: TestClient) -> None:
    response = client.post("/api/v1/client/config", json={"sdk_version": "0.38.0"})
    config = T.ClientConfigResponse.model_validate(response.json())
    assert config.proto_compress_fwdbwd and not config.pjwt_auth_enabled
    assert client.post("/api/v1/client/dynamic_config", json={"sdk_version": "0.38.0"}).json() == {}


def test_telemetry_is_accepted(client: TestClient) -> None:
    response = client.post("/api/v1/telemetry", json={"events": [], "platform": "Linux"})
    assert response.json() == {"status": "accepted"}


def test_capabilities(client: TestClient, engine) -> None:
    body = client.get("/api/v1/get_server_capabilities").json()
    caps = T.GetServerCapabilitiesResponse.model_validate(body)
    assert [(m.model_name, m.max_context_length, m.trainable, m.sampleable) for m in caps.supported_models] == [
        (engine.name, 64, True, True)
    ]


def test_session_lifecycle(client: TestClient) -> None:
    request = {"tags": ["a"], "user_metadata": {"exp": "x"}, "sdk_version": "0.38.0", "type": "create_session"}
    created = T.CreateSessionResponse.model_validate(client.post("/api/v1/create_session", json=request).json())
    session_id = created.session_id
    heartbeat = {"session_id": session_id, "type": "session_heartbeat"}
    assert client.post("/api/v1/session_heartbeat", json=heartbeat).json() == {"type": "session_heartbeat"}

    finish = {"reason": {"type": "success"}, "detail": None}
    assert client.post(f"/api/v1/sessions/{session_id}/finish", json=finish).status_code == 200
    assert client.post(f"/api/v1/sessions/{session_id}/finish", json=finish).status_code == 200
    assert client.post("/api/v1/session_heartbeat", json=heartbeat).status_code == 410

    rest = T.GetSessionResponse.model_validate(client.get(f"/api/v1/sessions/{session_id}").json())
    assert (rest.training_run_ids, rest.sampler_ids, rest.user_metadata) == ([], [], {"exp": "x"})
    assert client.get("/api/v1/sessions?limit=5&offset=0").json() == {"sessions": [session_id]}
